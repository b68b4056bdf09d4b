"""Synthetic MIMIC-style extracts drawn from an explicit latent model, for the demo, the tests and
benchmarks.

Usage: `python medhmp.py synth --out data/raw [--patients 400]
[--layout mimic3|mimic4|trinetx|meds|meds-eicu] [--seed 0]`, or
`synthesize(SynthConfig(out=Path("data/raw")))`, which returns a summary. Writes `.csv.gz` tables
with the real column lists of mimic3 (one folder, upper-case MIMIC-III v1.4 names), mimic4 (hosp/,
icu/, note/discharge of MIMIC-IV v2.2 and MIMIC-IV-Note) or trinetx (patient and diagnosis of a
TriNetX-style extract, dotted codes); meds and meds-eicu write the same cohort's MIMIC-IV tables as
a MEDS root, as MIMIC_IV_MEDS (`meds_etl`: its lab codes up to 0.0.7 or from 0.1.0) or eICU_MEDS
would (preprocessing/meds_etl.py), filling the ids and the columns the reader
(preprocessing/extract.py) reads, the others blank; and latents/, true latents and flags, which
preprocessing never reads (`read_latents` loads them for probes and benchmarks).

The latent model: labels act only through latents (and the noise of a Bernoulli draw); each latent
shapes many items at once, each weakly, as diseases do; no label is planted on a code or a feature.
  patient    cardiac pulmonary renal cognitive frailty social: N(0, 1), correlated a little through
             age
  admission  the patient latents plus a drift (_DRIFT), and acuity (new at each admission)
  stay       resp circ sev: sums of admission latents plus noise (_STAY_FROM)
  emissions  codes, drugs and discharge-note phrases come from pools per latent (_CODES, _DRUGS,
             _PHRASES): each item loads on its pool's latent (logit 0.5-2.1, rarer items more;
             phrases 0.7x) and a third also on a second one (0.15-0.35), drawn once from a fixed
             seed; background pools load on none. Hourly ICU variables (_HOURLY: vitals, labs, text
             items, inputs, outputs) move in level, measurement frequency, use or category with
             several latents each, a little at first and fully by 48 h (_ramp).
  outcomes   _OUTCOMES: ARF / shock = ventilation (PEEP 220339, 225792/225794) / vasopressors
             (221906, 221289, 221662, 222315, 221749) starting before 48 h (out of the cohort) or
             after (the label), from resp / circ; death from the last stay's sev and frailty; a next
             admission within 30 days from social, frailty, renal; heart failure, COPD, amnesia
             cases from cardiac, pulmonary, cognitive: a case gets its task codes (tasks.TASKS) from
             its last planned admission (>= 182 days after its first discharge where it can, so its
             history is as long as a control's) on, and may come back; its history is emissions
             only.
To add a latent: PATIENT_LATENTS (or _STAY_FROM), pools in _CODES, _DRUGS, _PHRASES, weights in
_HOURLY; a label: _OUTCOMES.

MIMIC conventions kept: GCS (220739/223900/223901) and RASS (228096) carry text in `value` and the
score in `valuenum`; 'Alarms On' (224641) is a checkbox '1'/'0'; other text items have no
`valuenum`; CareVue stays (~15%, MIMIC-III only) chart CareVue itemids and have no *_MV rows;
discharge summaries have a date-only `chartdate`, ~1% are error rows; outpatient labs have no
`hadm_id`; patients over 89 are born ~300 years back (MIMIC-III); MIMIC-IV and TriNetX patients
switch from ICD-9 to ICD-10 at a point of their history (before it, after it, or between two
admissions: about half the admissions are coded in ICD-10), each ICD-9 code becoming one ICD-10 code
(a task code its ICD-10-CM equivalent in tasks.TASKS). Chunks of patients bound the
memory; the same config gives the same bytes (a numpy `default_rng` per chunk and table, gzip
`mtime=0`); output goes to a staging folder (folders.Staged), swapped in when complete: a folder
that exists is always whole. An existing OUT (a CSV extract or a MEDS root) is replaced only when
synth wrote it (its MARKER file) or with `--overwrite` (`overwrite=True`).
"""
from __future__ import annotations

import dataclasses
import gzip
import re
import zlib
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from folders import InputError, Staged
from preprocessing.meds_etl import MedsWriter
from preprocessing.tables import group_rank
from progress import Reporter
from tasks import names_at

# meds: MIMIC_IV_MEDS, meds-eicu: eICU_MEDS shape
LAYOUTS = ("mimic3", "mimic4", "trinetx", "meds", "meds-eicu")
# the MIMIC_IV_MEDS versions whose hospital lab codes the meds layout can write
MEDS_ETLS = ("0.0.7", "0.1.0")


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` writes. Defaults give the demo cohort in a few seconds."""
    out: Path = Path("data/raw")
    patients: int = 400
    layout: str = "mimic3"     # one of LAYOUTS
    seed: int = 0
    # multiplies chart rows per stay-hour (extra measurements; < 1 drops rows), not stays
    event_scale: float = 1.0
    # the realism dial (World): how strongly the latents drive codes, drugs, note phrases, hourly
    # values and labels (1: as designed; 0.5 or 0.25: weaker, rates kept), and the share of each
    # label drawn at its base rate
    strength: float = 1.0
    label_noise: float = 0.0
    # 0: the designed latent-to-item loadings; another: re-drawn (an unrelated world)
    loadings_seed: int = 0
    overwrite: bool = False    # replace an existing extract that synth did not write (MARKER)
    # meds layout: LAB//{itemid} (0.0.7) or LAB//RESULT//{itemid} (0.1.0) hospital labs
    meds_etl: str = "0.1.0"
    quiet: bool = False


# ------------------------------------------------------------------------------------- latent model
PATIENT_LATENTS = ("cardiac", "pulmonary", "renal", "cognitive", "frailty", "social")
ADMISSION_LATENTS = PATIENT_LATENTS + ("acuity",)
STAY_LATENTS = ("resp", "circ", "sev")
# what emissions load on (an admission sees the mean of its stays)
_ALL = ADMISSION_LATENTS + STAY_LATENTS
_AGE_LOADING = (0.35, 0.15, 0.3, 0.45, 0.45, -0.15)  # correlation of each patient latent with age
# sd of an admission's drift from its patient's latents
_DRIFT = 0.2
_STAY_FROM = {"resp": {"pulmonary": .45, "acuity": .45}, "circ": {"cardiac": .45, "acuity": .45},
              "sev": {"frailty": .3, "renal": .25, "acuity": .5}}
_STAY_NOISE = 0.75                                   # sd of a stay latent's own part
# sd of a stay's own level of an hourly variable (sd units)
_OFFSET = 0.7
# outcome -> (intercept, {latent: loading}): a Bernoulli draw of sigmoid(logit) unless noted
_OUTCOMES = {
    # log mean of Poisson(further admissions)
    "admissions": (1.2, {"frailty": .25, "social": .2, "cardiac": .1}),
    "icu": (0.9, {"acuity": .8}),
    "readmission": (-3.4, {"social": 2.8, "frailty": 1.2, "renal": .6}),  # in 30 days
    # late: in stays of >= 48 h only
    "arf_early": (-2.3, {"resp": .8}), "arf": (-4.0, {"resp": 3.5}),
    "shock_early": (-2.5, {"circ": .8}), "shock": (-4.2, {"circ": 3.5}),
    # ICU / not
    "death": (-4.0, {"sev": 3.0, "frailty": .8}),
    "death_ward": (-4.5, {"frailty": .8, "acuity": .5}),
    "hf": (-2.35, {"cardiac": 4.5, "renal": .5}), "copd": (-2.35, {"pulmonary": 4.5, "social": .4}),
    "amnesia": (-2.35, {"cognitive": 4.5, "frailty": .4}),
}
# codes emitted per group, usual first
_TASKS = dict(zip(names_at("patient"), (("4280", "4281", "42822", "42832", "40491"),
                                        ("496", "49121", "4928"),
                                        ("78093", "2940", "2911", "29283"))))
# ICD-10-CM codes (with a digit added: one per ICD-9 code) for the admissions coded in ICD-10
_ICD10 = (
    "E785 E039 K219 F329 E871 N390 E1122 Z794 G4733 Z87891 E1165 K5900 N183 D62 E876 F419 R6521 "
    "A419 J9601 I4891 I2510 I10 J189 N179 G309 F1020 Z9114 Z602 R4182 D649 Z7901 J45909 F17210 "
    "L89154 Z66 I959").split()
# latent -> ICD-9 codes it raises, most frequent first; none in a task group (tasks.TASKS)
_CODES = {
    "cardiac": "4019 41401 42731 2724 4240 41071 V4581 V4582 4241 42789 4271 412 4254 V5861 4439 "
               "42732 4168 4160 41400 V4501 4373 4532 44021 7850 42741 4210 4111 41091 4233 4242 "
               "4251 4255 42611 4409 4414 V1251",
    "pulmonary": "49390 5180 5119 486 5070 32723 51883 V462 4660 515 49392 4829 5121 5181 79902 "
                 "7862 49320 4870 5168 5178 78605 7863 5128 4940 4941 5078 5100 5163 49322 27700 "
                 "135",
    "renal": "5859 40391 5856 25000 25060 2761 2767 5853 V4511 2859 28521 2449 2720 27801 25002 "
             "3572 V5867 58881 2753 2749 40390 25040 5854 5855 25050 36201 25080 2762 27800 2752 "
             "27541 5939 40301 7910 25001",
    "cognitive": "3310 2948 311 29410 78097 3320 2930 30000 43820 43811 V1254 34590 2900 29620 "
                 "3331 7813 3314 3319 29690 2939 29570 78039 3004 29630 43852 2989 33182 3441 "
                 "43889 3090",
    "frailty": "70703 5990 2639 261 73300 E8889 E8859 70705 70722 7812 V1588 2800 6826 7993 70723 "
               "70724 2809 V1541 78820 7837 70725 73301 82020 70707 2638 7832 78791 73313 E8809 "
               "5997",
    "social": "V603 V1581 30390 30500 30401 30590 V600 29181 5712 07054 3051 V6284 2920 V1582 "
              "E9500 30300 30391 30501 30561 30550 30470 30393 07070 5715 5711 V6441 V6282 2910 "
              "30560",
    "acuity": "99591 0389 5849 2851 5789 2875 2768 2760 5770 03849 03811 5672 56210 E8781 E8788 "
              "9971 99812 99662 V090 00845",
    "resp": "51881 5185 51882 51884 5184 48241 48242 V4611 78609 7991 V440 4821 5064",
    "circ": "78552 4589 45829 78551 99811 99682 4580 4275 9980 2874 4263 4260",
    "sev": "99592 5845 5722 2866 34830 570 V667 27652 2848 2869 2867 3481 51889 78959",
    "background": "53081 V1046 1977 1970 1985 V103 V1042 1628 60000 7907 V8741 E8497 4538 3659 "
                  "6000 7140 V1005 1539 1749 71590 7245 V5865 7840 4556 2113",
}
_DRUGS = {  # latent -> drugs (PRESCRIPTIONS `drug`, as MIMIC-III spells them)
    "cardiac": "Furosemide|Metoprolol Tartrate|Carvedilol|Lisinopril|Spironolactone|Digoxin|"
               "Amiodarone HCl|Warfarin|Aspirin|Atorvastatin|Diltiazem|Hydralazine HCl|"
               "Isosorbide Mononitrate|Clopidogrel Bisulfate",
    "pulmonary": "Albuterol 0.083% Neb Soln|Ipratropium Bromide Neb|Tiotropium Bromide|Prednisone|"
                 "Azithromycin|Fluticasone-Salmeterol Diskus (250/50)|Guaifenesin|"
                 "Montelukast Sodium|Albuterol Inhaler",
    "renal": "Insulin|Sevelamer|Calcium Acetate|Sodium Bicarbonate|Epoetin Alfa|Calcitriol|"
             "Glipizide|MetFORMIN (Glucophage)|Nephrocaps|Levothyroxine Sodium",
    "cognitive": "Donepezil|Memantine|Quetiapine Fumarate|Haloperidol|OLANZapine|Trazodone|"
                 "Citalopram Hydrobromide|Mirtazapine",
    "frailty": "Docusate Sodium|Senna|Bisacodyl|Multivitamins|Calcium Carbonate|Vitamin D|"
               "Miconazole Powder 2%|Polyethylene Glycol|Enoxaparin Sodium|Heparin",
    "social": "Nicotine Patch|Thiamine|FoLIC Acid|Methadone|Naloxone|Lorazepam|"
              "Chlordiazepoxide HCl",
    "acuity": "Vancomycin|Piperacillin-Tazobactam|CefePIME|Meropenem|Pantoprazole Sodium|"
              "Ondansetron|Morphine Sulfate|HYDROmorphone (Dilaudid)",
    "resp": "Propofol|Fentanyl Citrate|Midazolam|Chlorhexidine Gluconate 0.12% Oral Rinse|"
            "Levofloxacin|Acetylcysteine 20%",
    "circ": "Norepinephrine|Vasopressin|Phenylephrine HCl|Albumin 25% (12.5g / 50mL)|"
            "Hydrocortisone Na Succ.|LR",
    "sev": "Potassium Chloride|Magnesium Sulfate|Calcium Gluconate|Potassium Phosphate|"
           "Dextrose 50%|Famotidine",
    "background": "D5W|0.9% Sodium Chloride|NS|Acetaminophen|SW|5% Dextrose|Iso-Osmotic Dextrose|"
                  "Simethicone|Sodium Chloride 0.9%  Flush|Influenza Virus Vaccine|"
                  "Zolpidem Tartrate|DiphenhydrAMINE|Gabapentin",
}
# latent -> discharge-summary phrases; social ones go to Social History, the others to the course
_PHRASES = {
    "cardiac": "Orthopnea|Pitting edema|Elevated JVP|Reduced ejection fraction|Troponin leak|"
               "Atrial fibrillation|Cardiology consulted|Diuresed|Coronary artery disease",
    "pulmonary": "Wheezing|Productive cough|Home oxygen|Prolonged expiration|40 pack-years|"
                 "Hyperinflated lungs|Nebulizers|Pulmonology consulted",
    "renal": "Creatinine above baseline|Renally dosed|Poorly controlled diabetes|"
             "Insulin sliding scale|Renal consulted|Fluid restriction|Hemodialysis|"
             "Diabetic neuropathy",
    "cognitive": "Pleasantly confused|Oriented to self|Baseline dementia|Sundowning|Sitter|"
                 "Geriatrics consulted|Unreliable historian|Poor memory",
    "frailty": "Deconditioned|Rehab recommended|Sacral decubitus|Poor oral intake|Falls at home|"
               "Walker|Nutrition consulted|Cachectic",
    "social": "Lives alone|Missed appointments|Noncompliant with medications|Alcohol use|"
              "Intravenous drug use|Little support|Unstable housing|Social work consulted",
    "acuity": "Emergency department|Febrile|Blood cultures|Broad spectrum antibiotics|"
              "Infectious disease consulted|Transfused",
    "resp": "Increasing oxygen requirement|Hypoxemic|Tachypneic|Bilateral infiltrates|BiPAP|"
            "Respiratory therapy",
    "circ": "Hypotensive|Fluid boluses|Elevated lactate|Central line|Mottled|Arterial line",
    "sev": "Critically ill|Goals of care|Acute kidney injury|Encephalopathic|Coagulopathic|"
           "Prolonged ICU course|Palliative care",
    "background": "Tolerating diet|Pain controlled|Ambulating|Stable|No events overnight|"
                  "Labs unremarkable|Examined",
}

# Hourly ICU variables: table, MetaVision itemid, CareVue itemid (0: none), every n-th round, kind,
# mean, sd, clip range, decimals, then weights: 'latent+w' moves the level (sd units; the category
# of text items; an input's amount), '@latent+w' the logit of being charted at a round (default 2),
# '!latent+w' the logit of being used in a stay at all ('one' is 1). An input or procedure row lasts
# until its next round. The label items are apart (_write_chunk).
_HOURLY = """
chart    220045 211   1  num   86   12   30   200  0  circ+.35 sev+.3 resp+.25 cardiac+.15 @sev+.4
chart    220179 455   1  num   121  16   55   230  0  circ-.4 sev-.2 cardiac+.15 @circ+.4
chart    220180 8441  1  num   64   10   25   130  0  circ-.35 sev-.15
chart    220181 456   1  num   82   11   35   160  0  circ-.4 sev-.2
chart    220210 618   1  num   18   4    5    50   0  resp+.4 sev+.2 pulmonary+.15 @resp+.4
chart    220277 646   1  num   97   2    70   100  0  resp-.4 pulmonary-.2 circ-.1
chart    223761 678   4  num   98.6 .8   93   106  1  sev+.35 resp+.25 acuity+.15 @sev+.5
chart    223835 0     4  num   35   8    21   100  0 resp+.45 pulmonary+.2 @resp+.6 !one-.5 !resp+.8
chart    220052 0     1  num   80   11   35   160  0  circ-.45 sev-.2 !one-.4 !circ+.7 !sev+.4
chart    225664 807   4  num   140  35   40   450  0  renal+.35 sev+.25 @renal+.6
chart    220339 0     1  vent  8    2    5    20   0
chart    220739 0     4  score 0    0    0    0    0  sev-.5 cognitive-.3
chart    223900 0     4  score 0    0    0    0    0  sev-.5 cognitive-.45
chart    223901 0     4  score 0    0    0    0    0  sev-.5 frailty-.2
chart    228096 0     4  score 0    0    0    0    0  sev-.45 resp-.2
chart    224641 0     4  score 0    0    0    0    0
chart    226732 0     2  text  0    0    0    0    0  resp+.45 pulmonary+.3 @resp+.3
chart    220048 0     4  text  0    0    0    0    0  circ+.4 cardiac+.5
chart    227969 0     12 text  0    0    0    0    0  cognitive+.5 frailty+.3
lab      50813  0     6  log   1.6  .35  .3   20   1  circ+.5 sev+.35 resp+.15 @circ+.6
lab      50912  0     12 log   1.0  .3   .2   15   1  renal+.6 sev+.25
lab      51301  0     12 log   9    .3   .5   60   1  sev+.45 acuity+.2 resp+.2
lab      51222  0     12 num   11   1.5  5    18   1  frailty-.35 sev-.3 renal-.2
lab      50971  0     12 num   4.2  .5   2.2  7.5  1  renal+.4
lab      50931  0     12 num   125  30   40   500  0  renal+.35 sev+.25
lab      51006  0     12 log   18   .35  3    150  0  renal+.55 sev+.3 cardiac+.15
lab      50882  0     12 num   24   3    8    45   0  circ-.4 renal-.35 pulmonary+.3
lab      50821  0     6  num   90   25   40   400  0  resp-.4 @resp+.8 !one-1 !resp+.8
lab      50818  0     6  num   42   7    20   100  0  resp+.35 pulmonary+.4 !one-1 !resp+.8
lab      50820  0     6  num   7.38 .05  6.9  7.6  2  resp-.3 circ-.3 !one-1 !resp+.8
lab      51003  0     12 log   .05  .8   .01  10   2  cardiac+.5 circ+.3 !one-.5 !cardiac+.6
lab      50963  0     24 log   800  .9   20   35000 0 cardiac+.6 !one-1 !cardiac+.8
lab      50862  0     24 num   3.3  .5   1.2  5.2  1  frailty-.4 sev-.3
output   226559 40055 2  log   110  .4   0    1500 0  circ-.35 sev-.3 renal-.3 @sev+.3
datetime 225754 0     12 none  0    0    0    0    0  !one+.4 !frailty+.3
input    225158 0     4  log   80   .4   5    500  1  circ+.3 !one+1.5 !sev+.3
input    220949 0     4  log   100  .2   10   500  0  @one-1 !one-1.2 !renal+.5
input    225152 0     4  log   1200 .3   100  3000 0  !one-1 !cardiac+.6
input    223258 0     2  log   3    .5   .5   30   1  renal+.3 !one-1.5 !renal+.7 !sev+.3
input    221794 0     12 log   40   .3   10   200  0  @one-1 !one-1.8 !cardiac+.7 !circ+.3
input    222168 0     2  log   50   .5   5    300  0  !one-2 !resp+.8 !sev+.3
input    225166 0     12 log   20   .2   10   40   0  @one-1 !one-1 !sev+.4
procedure 225752 0    24 none  0    0    0    0    0  !one-.4 !circ+.7 !sev+.4
procedure 224263 0    24 none  0    0    0    0    0  !one-1 !circ+.6 !sev+.5
procedure 225802 0    24 none  0    0    0    0    0  !one-3 !renal+1.2 !sev+.5
"""
# text item -> (score of the first category, or None: no valuenum; "category:baseline share|...")
_TEXT = {
    223900: (1, "No Response:.05|Incomprehensible sounds:.05|Inappropriate Words:.1|Confused:.2|"
                "Oriented:.6"),
    223901: (1, "No response:.02|Abnormal extension:.02|Abnormal Flexion:.03|Flex-withdraws:.08|"
                "Localizes Pain:.15|Obeys Commands:.7"),
    228096: (-5, "-5 Unarousable:.02|-4 Deep sedation:.03|-3 Moderate sedation:.05|"
                 "-2 Light sedation:.1|-1 Drowsy:.15| 0  Alert and calm:.55|"
                 "+1 Anxious, apprehensive, but not aggressive:.07|+2 Agitated:.03"),
    224641: (0, "0:.03|1:.97"),
    220739: (1, "No Response:.03|To Pain:.07|To Speech:.2|Spontaneously:.7"),
    226732: (None, "None:.35|Nasal cannula:.4|Face tent:.1|High flow nasal cannula:.1|"
                   "Non-rebreather:.05"),
    220048: (None, "SR (Sinus Rhythm):.7|ST (Sinus Tachycardia):.15|AF (Atrial Fibrillation):.15"),
    227969: (None, "Bed locked in low position:.3|Call light within reach:.3|"
                   "Bed alarm activated:.15|Quiet, calm space:.15|Clear, firm limit setting:.1"),
}
_PRESSORS, _PRESSOR_P = np.array([221906, 221749, 222315, 221662, 221289]), (.6, .2, .08, .07, .05)
# static column -> (shares, labels as MIMIC-III writes them, in every layout), drawn at random
_CATEGORIES = {
    "race": ((.7, .09, .05, .03, .05, .08), "WHITE|BLACK/AFRICAN AMERICAN|"
                                            "HISPANIC/LATINO - PUERTO RICAN|ASIAN|OTHER|"
                                            "UNKNOWN/NOT SPECIFIED"),
    "religion": ((.45, .15, .14, .1, .08, .08), "CATHOLIC|NOT SPECIFIED|UNOBTAINABLE|"
                                                "PROTESTANT QUAKER|JEWISH|OTHER"),
    "language": ((.55, .3, .1, .05), "ENGL||SPAN|RUSS")}
_HOUR, _DAY, _YEAR = 3600, 86400, 365.2425 * 86400
# patients per chunk; stays per chart batch; level 1 is 4x faster
_CHUNK, _STAY_BATCH, _GZIP_LEVEL = 1000, 400, 1
_FIRST_IDS = {"mimic3": (10001, 100001, 200001), "mimic4": (10000001, 20000001, 30000001),
              "trinetx": (1000001, 5000001, 0)}
# first admissions
_YEARS = {"mimic3": (2100, 2180), "mimic4": (2110, 2185), "trinetx": (2003, 2012)}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _ramp(hours):
    """How much of a stay latent shows at `hours` after intime: a third at once, all of it by
    48 h."""
    return 0.35 + 0.65 * np.clip(hours / 48, 0, 1.5)


def _spec(text: str) -> dict:
    """_HOURLY as {column: array}, plus its weights as "w" (rows, 3, latents and 'one'): 'latent+w'
    terms in row 0, '@latent+w' in row 1, '!latent+w' in row 2."""
    names, rows = ("table item cv every kind mean sd lo hi dec".split(),
                   [x.split() for x in text.strip().split("\n")])
    out = {c: np.array([r[i] for r in rows], object if c in ("table", "kind") else float)
           for i, c in enumerate(names)}
    out["w"] = np.zeros((len(rows), 3, len(_ALL) + 1))
    for i, r in enumerate(rows):
        for kind, name, w in re.findall(r"([@!]?)([a-z]+)([+-][\d.]+)", " ".join(r[len(names):])):
            out["w"][i, " @!".index(kind or " "), (_ALL + ("one",)).index(name)] += float(w)
    return out


_VARS = _spec(_HOURLY)


def _items(pools: dict, seed: int, top: float, bottom: float, scale: float = 1.0):
    """Emission table of per-latent pools: (names, base logits from `top` down to `bottom` along
    each pool, loadings (items, len(_ALL)), pools). An item loads `scale` x 0.5-0.9 (plus up to 1.2,
    the rarer the more) on its pool's latent, and a third of the items 0.15-0.35 on a second one."""
    rng, rows = np.random.default_rng(seed), []
    for latent, text in pools.items():
        items = text.split("|") if "|" in text else text.split()
        for rank, name in enumerate(items):
            w = np.zeros(len(_ALL))
            if latent != "background":
                w[_ALL.index(latent)] = scale * (rng.uniform(0.5, 0.9) + 1.2 * rank / len(items))
                w[rng.integers(len(_ALL))] += rng.uniform(0.15, 0.35) * (rng.random() < 1 / 3)
            rows.append((name, top + (bottom - top) * (rank / max(len(items) - 1, 1)) ** 0.7, w,
                         latent))
    return tuple(np.array(c, dtype=object if i in (0, 3) else float)
                 for i, c in enumerate(zip(*rows)))


_CODE_TABLE = _items(_CODES, 1, -2.0, -5.6)
_DRUG_TABLE = _items(_DRUGS, 2, -0.6, -3.6)
_PHRASE_TABLE = _items(_PHRASES, 3, -1.0, -2.6, 0.7)
# label_noise applies
_LABELS = ("arf", "shock", "death", "death_ward", "readmission", "hf", "copd", "amnesia")
_FIXED = ("admissions", "icu")   # cohort structure, not driven by the realism dial


def _keep_rate(intercept, weights, strength: float):
    """The intercept that keeps E[sigmoid(intercept + z @ weights)] about the same when the loadings
    are scaled by `strength`, for z ~ N(0, I) (the probit approximation:
    sigmoid(a / sqrt(1 + pi |w|^2 / 8)))."""
    w2 = np.sum(np.square(weights), axis=-1)
    return intercept * np.sqrt(1 + np.pi * strength ** 2 * w2 / 8) / np.sqrt(1 + np.pi * w2 / 8)


@dataclass(frozen=True)
class World:
    """The latent-to-data mapping one extract is drawn from: emission tables (names, base logits,
    loadings, pools) of codes, drugs and note phrases, the hourly variables' weights, the outcomes,
    and the label noise. `World.make()` is the designed one; `strength` scales every loading (rates
    kept), `label_noise` mixes each label's probability with its mean, and `loadings_seed` re-draws
    which latent each item and hourly variable loads on (a random permutation per item), so that the
    world has structure but not the designed world's."""
    codes: tuple
    drugs: tuple
    phrases: tuple
    hourly: dict
    outcomes: dict
    label_noise: float = 0.0

    @classmethod
    def make(cls, strength: float = 1.0, label_noise: float = 0.0,
             loadings_seed: int = 0) -> "World":
        rng = np.random.default_rng([loadings_seed, 7]) if loadings_seed else None

        def table(t: tuple) -> tuple:
            names, base, w, pools = t
            if rng is not None:
                w = np.stack([row[rng.permutation(len(row))] for row in w])
            return (names, _keep_rate(base, w, strength), w * strength, pools) \
                if strength != 1 else (names, base, w, pools)
        hourly = dict(_VARS, w=_VARS["w"].copy())
        if rng is not None:   # one permutation of the latents per variable, for all three rows
            for v in range(len(hourly["w"])):
                hourly["w"][v, :, :len(_ALL)] = hourly["w"][v][:, rng.permutation(len(_ALL))]
        if strength != 1:
            one = hourly["w"][:, 2, -1]
            hourly["w"][:, 2, -1] = _keep_rate(one, hourly["w"][:, 2, :-1], strength)
            hourly["w"][:, :, :-1] *= strength
        outcomes = {k: (a, w) if k in _FIXED or strength == 1 else
                    (float(_keep_rate(a, np.array(list(w.values())), strength)),
                     {j: strength * x for j, x in w.items()})
                    for k, (a, w) in _OUTCOMES.items()}
        return cls(table(_CODE_TABLE), table(_DRUG_TABLE), table(_PHRASE_TABLE), hourly,
                   outcomes, label_noise)

    def logit(self, name: str, lat: dict) -> np.ndarray:
        """The logit of outcome `name` for rows whose latents are the arrays of `lat`."""
        intercept, weights = self.outcomes[name]
        return intercept + sum(w * lat[k] for k, w in weights.items())

    def chance(self, name: str, lat: dict) -> np.ndarray:
        """The probability of outcome `name`; for a label, (1 - label_noise) of it from the latents
        and the rest at the rows' mean probability (so the prevalence stays)."""
        p = _sigmoid(self.logit(name, lat))
        if name in _LABELS and self.label_noise and len(p):
            p = (1 - self.label_noise) * p + self.label_noise * p.mean()
        return p


def world_of(cfg: "SynthConfig") -> World:
    return World.make(cfg.strength, cfg.label_noise, cfg.loadings_seed)


def _emit(rng, table, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Items present per row (Bernoulli, logit = base + lat @ loadings): (row, item) pairs, rows in
    order."""
    rows, items = np.nonzero(rng.random((len(lat), len(table[1])))
                             < _sigmoid(table[1] + lat @ table[2].T))
    order = np.lexsort((rng.random(len(rows)), rows))
    return rows[order], items[order]


# ------------------------------------------------------------------------------------------- cohort
def _stays(rng, adm: dict, world: World) -> dict:
    """ICU stays of the admissions: latents, length of stay (hours), and the first ventilation (arf)
    and vasopressor (shock) episodes: starting before 48 h with _OUTCOMES[kind + "_early"], else
    after 48 h (before outtime) in stays of >= 48 h with _OUTCOMES[kind]; NaN for none."""
    a = np.repeat(np.arange(len(adm["pat"])), adm["n_stays"])
    n = len(a)
    st = {k: adm[k][a] for k in ADMISSION_LATENTS}
    for k, w in _STAY_FROM.items():
        st[k] = sum(v * st[j] for j, v in w.items()) + _STAY_NOISE * rng.standard_normal(n)
    st.update(adm=a, pat=adm["pat"][a], j=group_rank(adm["n_stays"]), mv=adm["mv"][a])
    los = st["los"] = np.clip(np.exp(np.log(58) + 0.8 * rng.standard_normal(n) + 0.15 * st["sev"]),
                              6, 960)
    for kind, median in (("arf", 40), ("shock", 20)):
        early = rng.random(n) < world.chance(kind + "_early", st)
        late = ~early & (los >= 48.2) & (rng.random(n) < world.chance(kind, st))
        on = np.full(n, np.nan)
        on[early] = rng.uniform(0.2, 0.95, early.sum()) * np.minimum(los[early], 47.5)
        on[late] = 48.05 + rng.uniform(0.02, 0.85, late.sum()) * (los[late] - 48.1)
        st[kind + "_on"] = on
        st[kind + "_off"] = np.maximum(np.minimum(on + rng.lognormal(np.log(median), 0.8, n),
                                                  los - 0.02), on + 0.02)
    st["niv"], st["pressor"] = rng.random(n) < 0.2, rng.choice(5, n, p=_PRESSOR_P)
    st["weight"] = np.clip(rng.normal(80, 16, n), 40, 180)
    return st


def _cohort(rng, n: int, ids: dict, layout: str, world: World) -> tuple[dict, dict, dict]:
    """Patients, admissions and ICU stays of one chunk: latents, outcomes, times and ids (continuing
    `ids`)."""
    u = rng.random(n)
    age = np.clip(rng.normal(64, 15, n), 20, 88.9)
    age = np.where(u < 0.02, rng.uniform(1, 17.9, n), age)                    # ~2% minors
    # MIMIC-III shifts these to ~300
    age = np.where((u >= 0.02) & (u < 0.05), rng.uniform(90, 99, n), age)
    a = np.array(_AGE_LOADING)
    z = (rng.standard_normal((n, len(a))) * np.sqrt(1 - a ** 2)
         + ((np.clip(age, 18, 95) - 64) / 15)[:, None] * a)
    pat = dict(zip(PATIENT_LATENTS, z.T), age=age, male=rng.random(n) < 0.56,
               **{c: rng.choice(len(p), n, p=np.array(p) / sum(p))
                  for c, (p, _) in _CATEGORIES.items()})
    # a TriNetX-style network records more encounters per patient
    more = 0.6 * (layout == "trinetx")
    pat["n_base"] = 1 + np.minimum(rng.poisson(np.exp(world.logit("admissions", pat) + more)), 11)
    for task in _TASKS:
        pat[task] = rng.random(n) < world.chance(task, pat)
    # a case is diagnosed at its last planned admission (so its history is as long as a control's)
    # and comes back
    pat["n_plan"] = pat["n_base"] + rng.poisson(0.8, n) * np.any([pat[t] for t in _TASKS], axis=0)
    p = np.repeat(np.arange(n), pat["n_plan"])
    adm = {k: pat[k][p] + _DRIFT * rng.standard_normal(len(p)) for k in PATIENT_LATENTS}
    adm.update(pat=p, k=group_rank(pat["n_plan"]),
               acuity=0.3 * pat["frailty"][p] + 0.95 * rng.standard_normal(len(p)))
    adm["icu"] = rng.random(len(p)) < world.chance("icu", adm)
    adm["n_stays"] = adm["icu"] * (1 + (rng.random(len(p)) < 0.1))
    # MIMIC-III: ~15% CareVue admissions
    adm["mv"] = (rng.random(len(p)) < 0.85) | (layout == "mimic4")
    st = _stays(rng, adm, world)
    # death follows the last ICU stay
    last = st["j"] == adm["n_stays"][st["adm"]] - 1
    chance = world.chance("death_ward", adm)
    chance[st["adm"][last]] = world.chance("death", {k: v[last] for k, v in st.items()})
    adm["died"] = rng.random(len(p)) < chance
    first_death = np.full(n, 99)
    np.minimum.at(first_death, p, np.where(adm["died"], adm["k"], 99))
    # a death ends the admissions
    keep = adm["k"] <= first_death[p]
    adm, st = {k: v[keep] for k, v in adm.items()}, {k: v[keep[st["adm"]]] for k, v in st.items()}
    st["adm"] = (np.cumsum(keep) - 1)[st["adm"]]
    pat["n_adm"] = np.bincount(adm["pat"], minlength=n)
    # an admission sees its stays' mean, else their expected value
    for k, w in _STAY_FROM.items():
        mean = np.bincount(st["adm"], st[k], len(adm["pat"])) / np.maximum(adm["n_stays"], 1)
        adm[k] = np.where(adm["n_stays"] > 0, mean, sum(v * adm[j] for j, v in w.items()))
    _timeline(rng, pat, adm, st, layout, world)
    for key, table, count in (("subject", pat, n), ("hadm", adm, len(adm["pat"])),
                              ("stay", st, len(st["adm"]))):
        table["id"] = ids[key] + np.arange(count)
        ids[key] += count
    adm["subject_id"] = pat["id"][adm["pat"]]
    st["subject_id"], st["hadm_id"] = pat["id"][st["pat"]], adm["id"][st["adm"]]
    return pat, adm, st


def _timeline(rng, pat: dict, adm: dict, st: dict, layout: str, world: World) -> None:
    """Epoch seconds: stays inside their admission, admissions spread over years; the gap to the
    next admission is under 30 days with the probability of _OUTCOMES["readmission"]. Then
    adm[task]: admissions since a case's first diagnosis (negative before it, and for non-cases),
    its last planned admission >= 182 days after its first discharge (or its last planned one); and
    the admissions coded in ICD-10: MIMIC-IV and TriNetX patients switch at a time drawn around
    their history (from a quarter of its span before its first admission to a quarter after its
    last)."""
    n, p, a = len(adm["pat"]), adm["pat"], st["adm"]
    pre, between = (np.clip(rng.lognormal(np.log(8), 0.8, n), 0.5, 72) * _HOUR,
                    rng.uniform(24, 96, n) * _HOUR)
    los = np.round(st["los"] * _HOUR)
    # stays ordered by admission, j
    offset = pre[a] + np.where(st["j"] == 1, np.roll(los, 1) + between[a], 0)
    end_icu, last_in = np.zeros(n), np.zeros(n)
    last = st["j"] == adm["n_stays"][a] - 1
    end_icu[a[last]], last_in[a[last]] = offset[last] + los[last], offset[last]
    post = np.clip(rng.lognormal(np.log(60), 0.8, n), 4, 720) * _HOUR
    length = np.where(adm["icu"], end_icu + post,
                      np.clip(rng.lognormal(np.log(96), 0.7, n), 8, 1000) * _HOUR)
    # deaths at least 72 h after the last intime, so even the death *date* is after intime + 48 h
    dying = np.maximum(end_icu + rng.uniform(0.05, 2, n) * _HOUR,
                       last_in + rng.uniform(72.1, 84, n) * _HOUR)
    length = np.where(adm["died"] & adm["icu"], dying, length)
    soon = rng.random(n) < world.chance("readmission", adm)
    gap = np.where(soon, rng.uniform(0.5, 29.5, n),
                   31 + np.minimum(rng.exponential(500, n), 1800)) * _DAY
    y0, y1 = (np.datetime64(f"{y}-01-01", "s").astype(np.int64) for y in _YEARS[layout])
    first = rng.uniform(y0, y1, len(pat["age"]))
    before = np.cumsum(length + gap) - (length + gap)
    starts = np.cumsum(pat["n_adm"]) - pat["n_adm"]
    admit = (first[p] + before - np.repeat(before[starts], pat["n_adm"])) // 60 * 60
    adm["admit"], adm["disch"] = (admit.astype(np.int64),
                                  (-(-(admit + length) // 60) * 60).astype(np.int64))
    st["intime"] = (admit[a] + offset + rng.integers(0, 60, len(a))).astype(np.int64)
    st["outtime"] = st["intime"] + los.astype(np.int64)
    pat["first"] = first.astype(np.int64)
    eligible = adm["admit"] >= adm["disch"][starts][p] + 182 * _DAY
    for task in _TASKS:
        base = adm["k"] < pat["n_base"][p]
        pick = np.lexsort((adm["k"] + 100 * base + 1000 * (base & eligible), p))[
            np.cumsum(pat["n_adm"]) - 1]
        adm[task] = adm["k"] - np.where(pat[task], adm["k"][pick], 99)[p]
    # one draw per admission (as many as before), the first's per patient
    u = rng.random(n)[starts]
    # (patients,)
    span = adm["admit"][starts + pat["n_adm"] - 1] - adm["admit"][starts] + 365 * _DAY
    switch = adm["admit"][starts] + (1.5 * u - 0.25) * span
    adm["icd10"] = (adm["admit"] >= switch[p]) & (layout != "mimic3")


def _notes(rng, pat: dict, adm: dict, drug_rows, drugs, layout: str, world: World) -> list[str]:
    """One discharge summary per admission: phrases its latents emit among neutral ones, and its
    drugs."""
    rows, idx = _emit(rng, world.phrases, np.column_stack([adm[k] for k in _ALL]))
    course, home, meds = ([[] for _ in adm["pat"]] for _ in range(3))
    for r, i in zip(rows.tolist(), idx.tolist()):
        (home if world.phrases[3][i] == "social" else course)[r].append(world.phrases[0][i])
    for r, d in zip(drug_rows.tolist(), drugs.tolist()):
        meds[r].append(f"{len(meds[r]) + 1}. {_DRUG_TABLE[0][d]}")
    age = (pat["age"][adm["pat"]] + (adm["admit"] - pat["first"][adm["pat"]]) / _YEAR).astype(int)
    mark = [[f"[**{int(y)}-{int(m)}-{int(d)}**]" if layout == "mimic3" else "___" for y, m, d in
             (x.split("-") for x in _ts(adm[t], "date"))] for t in ("admit", "disch")]
    male, died = pat["male"][adm["pat"]].astype(int), adm["died"].astype(int)
    return [f"Admission Date:  {mark[0][i]}              Discharge Date:   {mark[1][i]}\n\n"
            f"Sex:   {'FM'[male[i]]}\n\nService: MEDICINE\n\n"
            f"History of Present Illness:\n{min(age[i], 91)} y/o {('woman', 'man')[male[i]]} "
            f"admitted for evaluation.\n\nBrief Hospital Course:\n"
            f"{'. '.join(course[i]) or 'Uneventful'}.\n\nSocial History:\n"
            f"{'. '.join(home[i]) or 'Lives with family'}.\n\nDischarge Medications:"
            f"\n{chr(10).join(meds[i][:8]) or 'None.'}\n\nDischarge Disposition:\n"
            f"{('Home', 'Expired')[died[i]]}\n\nFollowup Instructions:\nFollow up with your PCP "
            f"within 1 week. Please call if you have \"chest pain, shortness of breath\" or "
            f"fever.\n" for i in range(len(adm["pat"]))]


# --------------------------------------------------------------------------------------- ICU events
def _lat(table: dict) -> np.ndarray:
    """Rows' latents in _ALL order plus a column of ones (the 'one' of the weight tables)."""
    return np.column_stack([table[k] for k in _ALL] + [np.ones(len(table[_ALL[0]]))])


def _schedule(rng, st: dict, table: str, hourly: dict):
    """Which variables of `table` are measured when: rounds are on the clock hour, hourly for 72 h
    and then every 4 h; a variable is charted at every n-th round, with a probability, in the stays
    that use it (CareVue stays: labs and variables with a CareVue itemid); PEEP ('vent') while on
    invasive ventilation. Returns (stay, variable, round time, hours since intime), ordered by
    stay."""
    first = (st["intime"] // _HOUR + 1) * _HOUR
    count = np.maximum(0, -(-(st["outtime"] - first) // _HOUR))
    s, k = np.repeat(np.arange(len(first)), count), group_rank(count)
    t = first[s] + k * _HOUR
    h, lat, picks = (t - st["intime"][s]) / _HOUR, _lat(st), []
    rounds, mine = (h < 72) | (k % 4 == 0), np.flatnonzero(hourly["table"] == table)
    for v in mine:
        w = hourly["w"][v]
        if hourly["kind"][v] == "vent":
            m = (rounds & st["mv"][s] & ~st["niv"][s] & (h >= st["arf_on"][s])
                 & (h <= st["arf_off"][s]))
        else:
            use = (st["mv"] | (hourly["cv"][v] > 0) | (table == "lab")) & \
                (rng.random(len(lat)) < (_sigmoid(lat @ w[2]) if w[2].any() else 1))
            p = _sigmoid(2 + w[1, -1] + _ramp(h) * (lat[:, :-1] @ w[1, :-1])[s])
            m = rounds & (k % int(hourly["every"][v]) == 0) & use[s] & (rng.random(len(s)) < p)
        picks.append(np.flatnonzero(m))
    g, var = np.concatenate(picks), np.repeat(mine, [len(m) for m in picks])
    order = np.argsort(s[g], kind="stable")
    return s[g][order], var[order], t[g][order], h[g][order]


def _values(rng, v: int, lat, ramp, offset, hourly: dict) -> tuple[np.ndarray, np.ndarray]:
    """value and valuenum text of variable v for rows with latents `lat`: numbers around the
    variable's mean plus a per-stay offset, categories of text items by an ordered logit; the latent
    part scales with `ramp`."""
    shift, kind, n = ramp * (lat @ hourly["w"][v, 0]), hourly["kind"][v], len(ramp)
    if kind in ("num", "log", "vent"):
        z = _OFFSET * offset + shift + 0.6 * rng.standard_normal(n)
        mean, sd = hourly["mean"][v], hourly["sd"][v]
        text = _num(np.clip(mean * np.exp(sd * z) if kind == "log" else mean + sd * z,
                            hourly["lo"][v], hourly["hi"][v]), int(hourly["dec"][v]))
        return text, text
    if kind == "none":
        return np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    first, cats = _TEXT[int(hourly["item"][v])]
    names, shares = zip(*(c.rsplit(":", 1) for c in cats.split("|")))
    cum = np.cumsum(np.array(shares[:-1], dtype=float))
    c = np.searchsorted(np.log(cum / (1 - cum)),
                        shift + 2 * _OFFSET * offset + rng.logistic(size=n))
    return _vocab(names)[c], (_num(c + first) if first is not None
                              else np.full(n, "", dtype=object))


def _measure(rng, st: dict, offsets, s, v, t, h, hourly: dict, scale: float = 1.0):
    """(stay, variable, itemid, time, value, valuenum) of scheduled measurements, 70% on the hour;
    `scale` repeats rows (the extra ones at random minutes of the same hour) or drops them."""
    reps = (np.ones(len(s), np.int64) if scale >= 1
            else (rng.random(len(s)) < scale).astype(np.int64))
    if scale > 1:
        reps += int(scale - 1) + (rng.random(len(s)) < (scale - 1) % 1)
    extra = group_rank(reps) > 0
    s, v, t, h = (np.repeat(x, reps) for x in (s, v, t, h))
    # seconds left in the hour and the stay
    room = np.minimum(3540, st["outtime"][s] - t - 1)
    minute = np.where(~extra & (rng.random(len(s)) < 0.7), 0, rng.random(len(s)) * room) // 60 * 60
    value, num, lat = np.empty(len(s), object), np.empty(len(s), object), _lat(st)
    for i in np.unique(v):
        m = v == i
        value[m], num[m] = _values(rng, i, lat[s[m]], _ramp(h[m]), offsets[s[m], i], hourly)
    item = np.where(st["mv"][s] | (hourly["cv"][v] == 0), hourly["item"][v],
                    hourly["cv"][v]).astype(np.int64)
    return s, v, item, t + minute.astype(np.int64), value, num


# --------------------------------------------------------------------------------------- formatting
def _vocab(words) -> np.ndarray:
    """CSV fields quoted as csv.writer quotes them (once here, not per row), as an object array for
    fancy indexing."""
    return np.array(['"' + w.replace('"', '""') + '"' if any(c in w for c in ',"\n\r') else w
                     for w in words], object)


def _spread(values, fmt) -> np.ndarray:
    """fmt(distinct values) spread back over all rows: event tables repeat times and values, so this
    is fast."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return fmt(uniq).astype(object)[inverse.reshape(-1)]


def _ts(t, fmt: str = "datetime", missing=None) -> np.ndarray:
    """Epoch seconds as 'YYYY-MM-DD HH:MM:SS' ('date': 'YYYY-MM-DD'; 'compact': 'YYYYMMDD'); ''
    where missing."""
    def text(u):
        out = np.datetime_as_string(u.astype("datetime64[s]")).astype("U19")
        out.view(np.uint32).reshape(-1, 19)[:, 10] = ord(" ")
        return out if fmt == "datetime" else out.astype("U10") if fmt == "date" else \
            np.char.replace(out.astype("U10"), "-", "")
    out = _spread(np.asarray(t, dtype=np.int64), text)
    return out if missing is None else np.where(missing, "", out)


def _num(x, dec: int = 0) -> np.ndarray:
    """Numbers (and ids) as text with `dec` decimals ('72', '98.6')."""
    x = np.round(np.asarray(x, dtype=float), dec)
    return _spread(x, lambda u: u.astype(np.int64).astype(str) if dec == 0 else u.astype(str))


# ------------------------------------------------------------------------------------------- tables
# gsn, ndc made up
_DRUG_CSV, _DRUG_CODE = _vocab(_DRUG_TABLE[0]), np.arange(len(_DRUG_TABLE[0])) * 7919 + 1013


def _hospital_tables(rng, pat: dict, adm: dict, st: dict) -> dict:
    """{table: (rows, columns)} of patients, admissions and ICU stays; the static categories follow
    the latents."""
    p, sex = adm["pat"], np.where(pat["male"], "M", "F").astype(object)
    age = pat["age"][p] + (adm["admit"] - pat["first"][p]) / _YEAR
    # elective/urgent/emergency
    kind = np.digitize(adm["acuity"] + 0.5 * rng.logistic(size=len(p)), [-1.2, -0.6])
    insurance = np.where(age >= 65, 0,
                         np.where(adm["social"] + rng.standard_normal(len(p)) > 1.2, 2, 1))
    married = np.digitize(np.clip(age, 18, 95) / 25 + adm["social"] / 2
                          + rng.standard_normal(len(p)), [2.2, 3.6, 4.6])
    year = pat["first"].astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    # MIMIC-III: over 89 shown as ~300
    years = np.where(pat["age"] >= 90, 300 + pat["age"] - 90, pat["age"])
    patients = dict(subject_id=_num(pat["id"]), gender=sex, sex=sex, anchor_year=_num(year),
                    dob=_ts((pat["first"] - years * _YEAR).astype(np.int64) // _DAY * _DAY),
                    anchor_age=_num(np.where(pat["age"] >= 90, 91, np.clip(pat["age"], 18, 89))),
                    year_of_birth=_num(year - np.floor(pat["age"])))
    admissions = dict(
        subject_id=_num(adm["subject_id"]), hadm_id=_num(adm["id"]), admittime=_ts(adm["admit"]),
        dischtime=_ts(adm["disch"]), deathtime=_ts(adm["disch"], missing=~adm["died"]),
        admission_type=_vocab(["ELECTIVE", "URGENT", "EMERGENCY"])[kind],
        hospital_expire_flag=_num(adm["died"]),
        admission_location=_vocab(["PHYS REFERRAL/NORMAL DELI", "TRANSFER FROM HOSP/EXTRAM",
                                   "EMERGENCY ROOM ADMIT"])[kind],
        insurance=_vocab(["Medicare", "Private", "Medicaid"])[insurance],
        marital_status=_vocab(["SINGLE", "MARRIED", "DIVORCED", "WIDOWED"])[married],
        **{c: _vocab(names.split("|"))[pat[c][p]] for c, (_, names) in _CATEGORIES.items()})
    # MICU, CCU
    unit = np.argmax(np.column_stack([st["resp"] + .5, 0 * st["resp"],
                                      st["cardiac"] + st["circ"] - .3, st["cardiac"] - .5,
                                      0 * st["resp"] - .7])
                     + rng.gumbel(size=(len(st["id"]), 5)), 1)
    stays = dict(subject_id=_num(st["subject_id"]), hadm_id=_num(st["hadm_id"]),
                 stay_id=_num(st["id"]),
                 dbsource=np.where(st["mv"], "metavision", "carevue").astype(object),
                 intime=_ts(st["intime"]), outtime=_ts(st["outtime"]),
                 first_careunit=_vocab(["MICU", "SICU", "CCU", "CSRU", "TSICU"])[unit])
    return {"patients": (len(pat["id"]), patients), "admissions": (len(p), admissions),
            "icustays": (len(st["id"]), stays)}


# each ICD-9 code of _TASKS -> its ICD-10-CM equivalent
_TASK_ICD10 = dict(zip(sum(_TASKS.values(), ()),
                       "I509 I501 I5022 I5032 I130 J449 J441 J439 R413 F04 F1096 F1996".split()))


def _icd10(code: str) -> str:
    """The ICD-10-CM code of an ICD-9 code once a patient's admissions are coded in ICD-10: a task
    code's equivalent (within tasks.TASKS' ICD-10 sets), else a stand-in from _ICD10 with a digit
    added, fixed per code."""
    if code in _TASK_ICD10:
        return _TASK_ICD10[code]
    h = zlib.crc32(code.encode())
    return _ICD10[h % len(_ICD10)] + str(h // len(_ICD10) % 10)


def _diagnosis_table(rng, adm: dict, codes_table: tuple) -> tuple[int, dict]:
    """DIAGNOSES_ICD / hosp/diagnoses_icd / diagnosis: the codes the latents emit and, from a case's
    first diagnosis on, its task group (the usual code in 60% of admissions, another one in the
    rest, now and then a second one). Admissions coded in ICD-10 get each code's ICD-10 code
    (_icd10; deduplicated)."""
    rows, idx = _emit(rng, codes_table, np.column_stack([adm[k] for k in _ALL]))
    rows, codes = [rows], [codes_table[0][idx]]
    for task, group in _TASKS.items():
        main = np.where(rng.random(len(adm[task])) < 0.6, 0,
                        rng.integers(1, len(group), len(adm[task])))
        for i, code in enumerate(group):
            p = np.where(main == i, np.where(adm[task] == 0, 1.0, 0.85), 0.1)
            rows.append(np.flatnonzero((adm[task] >= 0) & (rng.random(len(p)) < p)))
            codes.append(np.full(len(rows[-1]), code, dtype=object))
    rows, codes = np.concatenate(rows), np.concatenate(codes)
    order = np.lexsort((rng.random(len(rows)), rows))
    rows, codes = rows[order], codes[order]
    ten = adm["icd10"][rows]
    codes[ten] = [_icd10(c) for c in codes[ten]]
    keep = np.sort(np.unique(np.char.add(rows.astype(str), "|" + codes.astype(str)),
                             return_index=True)[1])
    rows, codes, ten = rows[keep], codes[keep], ten[keep]
    # '4280' -> '428.0', 'E8497' -> 'E849.7'
    cut = np.where(np.char.startswith(codes.astype(str), "E") & ~ten, 4, 3)
    return len(rows), dict(
        subject_id=_num(adm["subject_id"][rows]), hadm_id=_num(adm["id"][rows]), icd_code=codes,
        icd_version=np.where(ten, "10", "9").astype(object),
        date=_ts(adm["admit"][rows], "compact"),
        code_system=np.where(ten, "ICD-10-CM", "ICD-9-CM").astype(object),
        code=np.array([c if len(c) <= k else f"{c[:k]}.{c[k:]}" for c, k in zip(codes, cut)],
                      dtype=object))


# preprocessing never reads
def _write_latents(sink, pat: dict, adm: dict, st: dict, a_ids: dict, s_ids: dict) -> None:
    sink.write("latent_patients", len(pat["id"]),
               dict(subject_id=_num(pat["id"]), **{t: _num(pat[t]) for t in _TASKS},
                    **{k: _num(pat[k], 4) for k in PATIENT_LATENTS}))
    sink.write("latent_admissions", len(adm["id"]),
               dict(a_ids, **{k: _num(adm[k], 4) for k in ADMISSION_LATENTS}))
    sink.write("latent_stays", len(st["id"]),
               dict(s_ids, **{k: _num(st[k], 4) for k in STAY_LATENTS}))


def _write_chunk(sink, cfg: SynthConfig, world: World, chunk: int, pat: dict, adm: dict,
                 st: dict) -> None:
    """Generate every table of one chunk of patients and append it to the open files. Each table
    draws from its own random stream, so `event_scale` changes the chart rows and nothing else."""
    def rng(purpose: int):
        return np.random.default_rng([cfg.seed & (2 ** 63 - 1), chunk, purpose])

    def ids(s):
        return dict(subject_id=_num(st["subject_id"][s]), hadm_id=_num(st["hadm_id"][s]),
                    stay_id=_num(st["id"][s]))
    a_ids = dict(subject_id=_num(adm["subject_id"]), hadm_id=_num(adm["id"]))
    _write_latents(sink, pat, adm, st, a_ids, ids(slice(None)))
    sink.write("diagnoses", *_diagnosis_table(rng(1), adm, world.codes))
    for table, rows_cols in _hospital_tables(rng(2), pat, adm, st).items():
        sink.write(table, *rows_cols)
    if cfg.layout == "trinetx":
        return
    d_rows, drugs = _emit(rng(3), world.drugs, _lat(adm)[:, :-1])
    sink.write("prescriptions", len(d_rows),
               {**{k: v[d_rows] for k, v in a_ids.items()}, "drug": _DRUG_CSV[drugs],
                "gsn": np.char.zfill(_DRUG_CODE[drugs].astype(str), 6),
                "ndc": np.char.zfill((_DRUG_CODE[drugs] * 100003).astype(str), 11)})
    r = rng(4)
    texts = _notes(r, pat, adm, d_rows, drugs, cfg.layout, world)
    # ~90% of admissions have a summary
    k = np.flatnonzero(r.random(len(adm["id"])) < 0.9)
    sink.write("notes", len(k), dict(
        {c: v[k] for c, v in a_ids.items()}, text=_vocab([texts[i] for i in k]),
        category="Discharge summary",
        iserror=np.where(r.random(len(k)) < 0.01, "1", "").astype(object),
        note_seq=_num(adm["k"][k] + 1),
        note_id=a_ids["subject_id"][k] + "-DS-" + _num(adm["k"][k] + 1),
        # MIMIC-III: a date, MIMIC-IV: midnight
        **{"chartdate" if cfg.layout == "mimic3" else "charttime":
           _ts(adm["disch"][k] // _DAY * _DAY, "date" if cfg.layout == "mimic3" else "datetime")}))
    _write_icu_events(sink, cfg, world, rng, ids, a_ids, adm, st)


def _write_icu_events(sink, cfg: SynthConfig, world: World, rng, ids, a_ids: dict, adm: dict,
                      st: dict) -> None:
    """The event tables of one chunk (labs, outputs, datetime, input, procedure and chart events;
    _write_chunk's second half): `rng(purpose)` is the chunk's random stream of a table, `ids(rows)`
    the id columns of stays `rows`."""
    hourly = world.hourly
    offsets = rng(5).standard_normal((len(st["id"]), len(hourly["item"])))   # per stay and variable
    for table, purpose in (("lab", 6), ("output", 7), ("datetime", 8), ("input", 9),
                           ("procedure", 10)):
        r = rng(purpose)
        s, v, item, when, value, num = _measure(r, st, offsets,
                                                *_schedule(r, st, table, hourly), hourly)
        end = np.maximum(np.minimum(when + hourly["every"][v].astype(np.int64) * _HOUR,
                                    st["outtime"][s]), when + 60)
        sink.write(table + "events", len(s),
                   dict(ids(s), itemid=_num(item), charttime=_ts(when), value=value, valuenum=num,
                        starttime=_ts(when), endtime=_ts(end // 60 * 60), amount=value))
    r = rng(11)
    # outpatient labs weeks before admissions: no hadm_id
    k = np.flatnonzero(r.random(len(adm["id"])) < 0.35)
    when = _ts((adm["admit"][k] - r.uniform(5, 60, len(k)) * _DAY).astype(np.int64) // 60 * 60)
    for v in np.flatnonzero((hourly["table"] == "lab") & ~hourly["w"][:, 2].any(1)):
        value, _ = _values(r, v, _lat(adm)[k], np.full(len(k), 0.35),
                           r.standard_normal(len(k)), hourly)
        sink.write("labevents", len(k), dict(subject_id=a_ids["subject_id"][k],
                                             itemid=str(int(hourly["item"][v])), charttime=when,
                                             value=value, valuenum=value))
    v, p = (np.flatnonzero(st["mv"] & ~np.isnan(st["arf_on"])),
            np.flatnonzero(st["mv"] & ~np.isnan(st["shock_on"])))
    dose = (r.uniform(0.05, 0.3, len(p)) * 60 * (st["shock_off"][p] - st["shock_on"][p])
            * st["weight"][p] / 1000)
    for table, item, s, kind, amount in (
            ("procedure", np.where(st["niv"][v], 225794, 225792), v, "arf", ""),
            ("input", _PRESSORS[st["pressor"][p]], p, "shock", _num(dose, 2))):
        start, end = ((st["intime"][s] + st[kind + x][s] * _HOUR).astype(np.int64) // 60 * 60
                      for x in ("_on", "_off"))
        # the label episodes
        sink.write(table + "events", len(s),
                   dict(ids(s), itemid=_num(item), starttime=_ts(start), amount=amount,
                        endtime=_ts(np.maximum(end, start + 60))))
    s, v, t, h = _schedule(rng(12), st, "chart", hourly)
    # chart rows: most of the extract
    val, batch = rng(13), max(10, int(_STAY_BATCH / max(cfg.event_scale, 1.0)))
    bounds = np.searchsorted(s, np.arange(0, len(st["id"]) + batch, batch))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s2, _, item, when, value, num = _measure(val, st, offsets, s[lo:hi], v[lo:hi],
                                                 t[lo:hi], h[lo:hi], hourly, cfg.event_scale)
        sink.write("chartevents", len(s2),
                   dict(ids(s2), itemid=_num(item), charttime=_ts(when), value=value,
                        valuenum=num))


# Real column lists: per layout, 'table FILE column ...' (column=key: the column takes the data's
# key); mimic3 names are upper-cased on write. Continuation lines are indented.
_SCHEMAS = {layout: {t[0]: (t[1], " ".join(t[2:]))
                     for t in map(str.split, re.split(r"\n(?=\S)", text.strip()))}
            for layout, text in dict(mimic3="""
patients PATIENTS row_id subject_id gender dob dod dod_hosp dod_ssn expire_flag
admissions ADMISSIONS row_id subject_id hadm_id admittime dischtime deathtime admission_type
  admission_location discharge_location insurance language religion marital_status ethnicity=race
  edregtime edouttime diagnosis hospital_expire_flag has_chartevents_data
icustays ICUSTAYS row_id subject_id hadm_id icustay_id=stay_id dbsource first_careunit last_careunit
  first_wardid last_wardid intime outtime los
chartevents CHARTEVENTS row_id subject_id hadm_id icustay_id=stay_id itemid charttime storetime cgid
  value valuenum valueuom warning error resultstatus stopped
labevents LABEVENTS row_id subject_id hadm_id itemid charttime value valuenum valueuom flag
outputevents OUTPUTEVENTS row_id subject_id hadm_id icustay_id=stay_id charttime itemid value
  valueuom storetime cgid stopped newbottle iserror
inputevents INPUTEVENTS_MV row_id subject_id hadm_id icustay_id=stay_id starttime endtime itemid
  amount amountuom rate rateuom storetime cgid orderid linkorderid ordercategoryname
  secondaryordercategoryname ordercomponenttypedescription ordercategorydescription patientweight
  totalamount totalamountuom isopenbag continueinnextdept cancelreason statusdescription
  comments_editedby comments_canceledby comments_date originalamount originalrate
procedureevents PROCEDUREEVENTS_MV row_id subject_id hadm_id icustay_id=stay_id starttime endtime
  itemid value valueuom location locationcategory storetime cgid orderid linkorderid
  ordercategoryname secondaryordercategoryname ordercategorydescription isopenbag continueinnextdept
  cancelreason statusdescription comments_editedby comments_canceledby comments_date
datetimeevents DATETIMEEVENTS row_id subject_id hadm_id icustay_id=stay_id itemid charttime
  storetime cgid value valueuom warning error resultstatus stopped
diagnoses DIAGNOSES_ICD row_id subject_id hadm_id seq_num icd9_code=icd_code
prescriptions PRESCRIPTIONS row_id subject_id hadm_id icustay_id=stay_id startdate enddate drug_type
  drug drug_name_poe drug_name_generic formulary_drug_cd gsn ndc prod_strength dose_val_rx
  dose_unit_rx form_val_disp form_unit_disp route
notes NOTEEVENTS row_id subject_id hadm_id chartdate charttime storetime category description cgid
  iserror text
""", mimic4="""
patients hosp/patients subject_id gender anchor_age anchor_year anchor_year_group dod
admissions hosp/admissions subject_id hadm_id admittime dischtime deathtime admission_type
  admit_provider_id admission_location discharge_location insurance language marital_status race
  edregtime edouttime hospital_expire_flag
diagnoses hosp/diagnoses_icd subject_id hadm_id seq_num icd_code icd_version
prescriptions hosp/prescriptions subject_id hadm_id pharmacy_id poe_id poe_seq order_provider_id
  starttime stoptime drug_type drug formulary_drug_cd gsn ndc prod_strength form_rx dose_val_rx
  dose_unit_rx form_val_disp form_unit_disp doses_per_24_hrs route
labevents hosp/labevents labevent_id subject_id hadm_id specimen_id itemid order_provider_id
  charttime storetime value valuenum valueuom ref_range_lower ref_range_upper flag priority comments
icustays icu/icustays subject_id hadm_id stay_id first_careunit last_careunit intime outtime los
chartevents icu/chartevents subject_id hadm_id stay_id caregiver_id charttime storetime itemid value
  valuenum valueuom warning
outputevents icu/outputevents subject_id hadm_id stay_id caregiver_id charttime storetime itemid
  value valueuom
inputevents icu/inputevents subject_id hadm_id stay_id caregiver_id starttime endtime storetime
  itemid amount amountuom rate rateuom orderid linkorderid ordercategoryname
  secondaryordercategoryname ordercomponenttypedescription ordercategorydescription patientweight
  totalamount totalamountuom isopenbag continueinnextdept statusdescription originalamount
  originalrate
procedureevents icu/procedureevents subject_id hadm_id stay_id caregiver_id starttime endtime
  storetime itemid value valueuom location locationcategory orderid linkorderid ordercategoryname
  ordercategorydescription patientweight isopenbag continueinnextdept statusdescription
  originalamount originalrate
datetimeevents icu/datetimeevents subject_id hadm_id stay_id caregiver_id charttime storetime itemid
  value valueuom warning
notes note/discharge note_id subject_id hadm_id note_type note_seq charttime storetime text
""", trinetx="""
patients patient patient_id=subject_id sex year_of_birth race ethnicity marital_status
diagnoses diagnosis patient_id=subject_id encounter_id=hadm_id code_system code
  principal_diagnosis_indicator date
""").items()}
# the true latents beside the extract (preprocessing never reads them)
for _layout, _tables in _SCHEMAS.items():
    _p, _a = (("patient_id=subject_id", "encounter_id=hadm_id") if _layout == "trinetx"
              else ("subject_id", "hadm_id"))
    _tables["latent_patients"] = ("latents/patients",
                                  " ".join((_p,) + PATIENT_LATENTS + tuple(_TASKS)))
    _tables["latent_admissions"] = ("latents/"
                                    + ("encounters" if _layout == "trinetx" else "admissions"),
                                    " ".join((_a, _p) + ADMISSION_LATENTS))
    if _layout != "trinetx":
        _tables["latent_stays"] = ("latents/stays", " ".join(("stay_id", "hadm_id") + STAY_LATENTS))


class _Sink:
    """The open gzip writers of one extract. `write(table, n, cols)` appends n rows whose fields
    come from `cols` (source key -> column of ready-made text, or one constant) in the layout's
    column order; a column without a key stays blank and a table the layout lacks is skipped."""

    def __init__(self, root: Path, layout: str, only: tuple[str, ...] | None = None):
        self.schema, self.files, self.rows, self.layout = {}, {}, {}, layout
        for table, (name, spec) in _SCHEMAS[layout].items():
            if only is not None and table not in only:
                continue
            columns = [c.split("=") if "=" in c else (c, c) for c in spec.split()]
            upper = layout == "mimic3" and not name.startswith("latents/")
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            # mtime=0 and a fixed inner name make the bytes depend on the data only
            raw = open(root / f"{name}.csv.gz", "wb")
            self.files[table] = (raw, gzip.GzipFile(f"{Path(name).name}.csv", "wb", _GZIP_LEVEL,
                                                    raw, mtime=0))
            self.files[table][1].write((",".join(h.upper() if upper else h for h, _ in columns)
                                        + "\n").encode())
            self.schema[table], self.rows[table] = columns, 0

    def write(self, table: str, n: int, cols: dict) -> None:
        if n and table in self.schema:
            fields = [repeat(c, n) if isinstance(c, str) else c.tolist()
                      for c in (cols.get(k, "") for _, k in self.schema[table])]
            self.files[table][1].write(("\n".join(map(",".join, zip(*fields))) + "\n").encode())
            self.rows[table] += n

    def end_chunk(self) -> None:
        """Nothing: rows go to the files as they are written."""

    def tables(self) -> dict:
        return {_SCHEMAS[self.layout][t][0]: rows for t, rows in self.rows.items()}

    def close(self) -> None:
        for raw, gz in self.files.values():
            gz.close()
            raw.close()


class _MedsSink:
    """The sink of the meds layouts: the MIMIC-IV tables become MEDS events
    (preprocessing.meds_etl.MedsWriter), written sorted at the end of each chunk; the discharge
    notes (MIMIC-IV-Note, which no MEDS ETL reads; eICU has none) and the latents stay CSV, in note/
    and latents/ beside data/ and metadata/."""

    def __init__(self, root: Path, cfg: SynthConfig):
        eicu = cfg.layout == "meds-eicu"
        self.csv = _Sink(root, "mimic4", only=("latent_patients", "latent_admissions",
                                               "latent_stays", *(() if eicu else ("notes",))))
        self.meds = MedsWriter(root, "eicu" if eicu else cfg.meds_etl, cfg.seed)

    @property
    def rows(self) -> dict:
        return {**self.csv.rows, "MEDS events": self.meds.rows}

    def write(self, table: str, n: int, cols: dict) -> None:
        (self.csv.write if table in self.csv.schema or table == "notes"
         else self.meds.add)(table, n, cols)

    def end_chunk(self) -> None:
        self.meds.end_chunk()

    def tables(self) -> dict:
        return {**self.csv.tables(), "data/**/*.parquet (MEDS events)": self.meds.rows}

    def close(self) -> None:
        self.csv.close()
        self.meds.close()


def _generator_layout(layout: str) -> str:
    """The CSV layout whose tables the generator draws: a MEDS extract is written from
    MIMIC-IV's."""
    return "mimic4" if layout.startswith("meds") else layout


# written into every extract synth writes: only such a folder is replaced without --overwrite
MARKER = ".medhmp-synth"
EXTRACT_FOLDERS = ("hosp", "icu", "note", "latents",            # CSV layouts (MIMIC-IV's folders)
                   # a MEDS root and its split folders
                   "data", "metadata", "train", "tuning", "held_out")
# tables; MEDS data, metadata, dataset.json
EXTRACT_FILES = (".csv", ".csv.gz", ".parquet", ".json")


def _extract_only(folder: Path) -> bool:
    """Whether `folder` holds nothing but an extract, CSV or MEDS (and synth's marker), so replacing
    it loses nothing else."""
    return all(p.name.lower() in EXTRACT_FOLDERS and _extract_only(p) if p.is_dir()
               else p.name.lower().endswith(EXTRACT_FILES) or p.name == MARKER
               for p in folder.iterdir())


def _check_out(out: Path, overwrite: bool) -> None:
    """An existing --out is replaced only when it holds an extract only (CSV or MEDS), written by
    synth (its MARKER) or replaced on purpose (--overwrite): a user's own extract is never deleted
    without asking."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir() or out.resolve() == Path.cwd().resolve() or not _extract_only(out):
        raise InputError(f"{out} exists and is not a CSV extract (only .csv[.gz] files, hosp/ icu/ "
                         "note/ latents/) nor a MEDS root (data/, metadata/); remove it or choose "
                         "another --out")
    if not (out / MARKER).is_file() and not overwrite:
        raise InputError(f"{out} holds an extract that synth did not write; pass --overwrite to "
                         "replace it, or choose another --out")


def synthesize(cfg: SynthConfig) -> dict:
    """Write a synthetic extract to `cfg.out` and return {"tables": {name: rows}, "patients",
    "admissions", "stays", "out"}. Nothing half-written is ever left at `cfg.out`."""
    rep, out = Reporter(quiet=cfg.quiet), Path(cfg.out)
    for bad, what in ((cfg.layout not in LAYOUTS,
                       f"layout must be one of {', '.join(LAYOUTS)}, not {cfg.layout!r}"),
                      (cfg.patients < 1, f"patients must be at least 1, not {cfg.patients}"),
                      (not cfg.event_scale > 0,
                       f"event_scale must be positive, not {cfg.event_scale}"),
                      (not 0 <= cfg.strength, f"strength must be at least 0, not {cfg.strength}"),
                      (not 0 <= cfg.label_noise <= 1,
                       f"label_noise must be in [0, 1], not {cfg.label_noise}"),
                      (cfg.meds_etl not in MEDS_ETLS,
                       f"meds_etl must be one of {', '.join(MEDS_ETLS)}")):
        if bad:
            raise ValueError(what)
    _check_out(out, cfg.overwrite)
    tables = _generator_layout(cfg.layout)
    ids, totals = (dict(zip(("subject", "hadm", "stay"), _FIRST_IDS[tables])),
                   dict(patients=0, admissions=0))
    world = world_of(cfg)
    # written whole under a staging name, then swapped in
    with Staged(cfg.out, "--out", log=rep.log) as stage:
        out = stage.out
        rep.log(f"synth: {cfg.patients:,} patients, {cfg.layout}, seed {cfg.seed}, event scale "
                f"{cfg.event_scale:g}: {out}")
        sink = _Sink(stage.tmp, cfg.layout) if tables == cfg.layout else _MedsSink(stage.tmp, cfg)
        try:
            with rep.task("synth patients", total=cfg.patients, unit="patients") as advance:
                for chunk, start in enumerate(range(0, cfg.patients, _CHUNK)):
                    n = min(_CHUNK, cfg.patients - start)
                    pat, adm, st = _cohort(np.random.default_rng([cfg.seed & (2 ** 63 - 1), chunk]),
                                           n, ids, tables, world)
                    _write_chunk(sink, dataclasses.replace(cfg, layout=tables), world, chunk, pat,
                                 adm, st)
                    sink.end_chunk()
                    for key, rows in (("patients", n), ("admissions", len(adm["id"])),
                                      ("stays", len(st["id"]))):
                        totals[key] = (totals.get(key, 0)
                                       + rows * (key != "stays" or cfg.layout != "trinetx"))
                    advance(n, status=f"{sum(sink.rows.values()):,} rows")
        finally:
            sink.close()
        (stage.tmp / MARKER).write_text("written by `python medhmp.py synth`; the next synth into "
                                        "this folder replaces it\n")
        stage.commit()
    tables = sink.tables()
    rep.log(f"synth: wrote {out} "
            f"({', '.join(f'{name} {rows:,}' for name, rows in tables.items())})")
    return dict(tables=tables, out=str(out), **totals)


def read_latents(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """The true latents `synthesize` wrote beside an extract, for probes and benchmarks:
    {"patients", "admissions" (TriNetX: "encounters"), "stays": {column: array}}, ids int64
    (TriNetX: patient_id, encounter_id), case flags (hf, copd, amnesia) bool, latents float64."""
    found = {}
    for path in sorted((Path(out) / "latents").glob("*.csv.gz")):
        with gzip.open(path, "rt") as f:
            head, *rows = (line.split(",") for line in f.read().splitlines())
        values = np.array(rows, dtype=float).reshape(-1, len(head))
        found[path.name[:-7]] = {c: values[:, i].astype(np.int64) if c.endswith("_id") else
                                 values[:, i] > 0 if c in _TASKS else values[:, i]
                                 for i, c in enumerate(head)}
    if not found:
        raise InputError(f"{out}: no latents/ folder here (extracts written by synthetic.py have "
                         "one)")
    return found
