"""Synthetic MIMIC-style extracts with planted, learnable signal, for the demo, the tests and benchmarks.

Usage: `python medhmp.py synth --out data/raw [--patients 400] [--layout mimic3|mimic4|trinetx] [--seed 0]`,
or `synthesize(SynthConfig(out=Path("data/raw")))`, which returns a summary of what it wrote.
Writes one extract of `.csv.gz` tables in the layout data.py reads:
  mimic3   one folder, upper-case file and column names, full MIMIC-III column lists
  mimic4   hosp/, icu/ and note/ (MIMIC-IV v2.2 and MIMIC-IV-Note column lists, lower case)
  trinetx  patient.csv.gz and diagnosis.csv.gz of a TriNetX-style diagnosis extract (dotted ICD codes)
Per-patient latent factors (frailty, cardiac, pulmonary, cognitive, chronic, social) drive codes, drugs,
notes, vitals and labs together, so every downstream task of DESIGN.md §6 is learnable from the modality it
is evaluated on and the modalities share structure that pretraining can exploit.

Formats worth knowing (they copy MIMIC): GCS (220739/223900/223901) and RASS (228096) rows carry text in
`value` and the score in `valuenum`; 'Alarms On' (224641) is a checkbox '1'/'0'; other text items have an
empty `valuenum`; CareVue stays (~15%, MIMIC-III only) chart CareVue itemids and have no *_MV rows;
NOTEEVENTS discharge summaries have a date-only `chartdate` and no `charttime`; outpatient labs have no
`hadm_id`; MIMIC-III shows patients over 89 with a date of birth ~300 years back. In MIMIC-IV and TriNetX ~15%
of admissions are coded in ICD-10 only, never a task case's admissions up to its first diagnosis.

It is its own module so that data.py stays a readable reader: the generator is as long as the reader and
shares nothing with it but the progress `Reporter` and `InputError` (it imports neither torch nor data).
Patients are generated and written in chunks, so memory is bounded by a chunk, not by the extract (a
MIMIC-III-sized extract is fine). The same config gives byte-identical files (numpy `default_rng` per chunk,
gzip `mtime=0`). Output goes to `OUT.tmp-PID` and is renamed to OUT when complete, replacing an existing OUT,
so a folder that exists is always whole.
"""
from __future__ import annotations

import gzip
import queue
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import repeat
from pathlib import Path

import numpy as np

from folders import InputError, Staged
from preprocessing.tables import group_rank
from progress import Reporter

LAYOUTS = ("mimic3", "mimic4", "trinetx")


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` writes. Defaults give the demo cohort in a few seconds."""
    out: Path = Path("data/raw")
    patients: int = 400
    layout: str = "mimic3"     # one of LAYOUTS
    seed: int = 0
    event_scale: float = 1.0   # multiplies chart rows per stay-hour (extra measurements; < 1 drops rows), not stays
    quiet: bool = False


_CHUNK = 1000          # patients generated and written together; bounds memory
_STAY_BATCH = 400      # ICU stays whose chart rows are built together (divided by event_scale)
_GZIP_LEVEL = 1        # level 6 is 4x slower for 20% smaller files; synthetic extracts are regenerated
_HOUR, _DAY = 3600, 86400
_YEAR = 365.2425 * _DAY
_FIRST_IDS = {"mimic3": (10001, 100001, 200001), "mimic4": (10000001, 20000001, 30000001),
              "trinetx": (1000001, 5000001, 0)}
_YEARS = {"mimic3": (2100, 2180), "mimic4": (2110, 2185), "trinetx": (2003, 2012)}  # first admissions


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _ramp(hours):
    """How much of a stay latent shows at `hours` after intime: a third at once, all of it by 48 h."""
    return 0.35 + 0.65 * np.clip(hours / 48, 0, 1.5)


def _on(hours, start, end=None):
    """Whether an episode [start, end] (hours, NaN = none) is running at `hours`."""
    running = hours >= start
    return running if end is None else running & (hours <= end)


def _gather(values, idx):
    """values[idx] as floats, NaN where idx is -1 (no such stay)."""
    out = np.full(len(idx), np.nan)
    out[idx >= 0] = values[idx[idx >= 0]]
    return out


def _quote(s: str) -> str:
    """One CSV field as csv.writer writes it: quoted, quotes doubled, when it holds , " or a line break."""
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n\r') else s


def _vocab(words) -> np.ndarray:
    """CSV-ready strings (quoted once here, not per row) as an object array for fancy indexing."""
    return np.array([_quote(w) for w in words], dtype=object)


# ------------------------------------------------------------------------------------------ vocabularies
# Background ICD-9 codes: the 300 most frequent of the MIMIC-III demo after removing the planted ones
# below, in frequency order (sampling weights fall with rank).
_ICD9_BACKGROUND = tuple("""
2724 5990 2449 2760 2761 5070 311 2762 53081 70703 3572 4439 25060 99591 4240 2875 2851 5119 41071 2948
1977 V4581 V440 V5867 0414 1970 40391 V103 2930 00845 41400 32723 V1251 2768 4241 2749 570 5845 1985 7907
V1582 V4582 2800 5789 5180 28529 78551 3970 2765 2767 2720 73300 42789 45829 5185 5712 70722 78959 20280 5722
79092 5856 53390 2763 45981 4271 1983 V153 3320 1628 1976 28521 70720 99662 7850 V090 E8859 5770 78559 431
51919 E8889 412 2554 E8781 9971 4160 6826 V1042 78039 5715 452 45620 5723 1510 4275 2639 E9331 261 V1201
27651 2273 42781 3481 5750 V667 70705 4168 56400 5121 41519 3659 V0254 V1302 1961 70724 V8741 78820 27801 45340
03849 4239 E8798 43853 70723 V442 V4501 79902 72400 5672 2874 56211 E9342 99812 E8788 V1259 5781 2848 5711 3569
0380 5761 4538 51882 99659 43811 43310 29410 725 5939 28522 0383 2867 07070 5724 7895 1962 319 3962 1972
27652 5780 53019 4370 V441 490 56210 7806 E8120 E8495 28959 42741 20300 1120 2766 51884 03811 99811 99682 1122
78009 30000 48241 20020 2530 56409 2753 V1204 E9308 48242 2764 1629 99731 5601 34590 25002 2841 29562 V433 V4611
V1254 59970 3441 43810 48283 53649 43819 03812 99664 78720 43889 E8796 41041 4588 53789 34290 5853 60000 V8801 04112
4589 V1083 4254 V1272 36250 1508 V420 V1003 03819 E8791 07030 07054 30401 4582 81201 8028 8024 41511 7299 4010
4266 5691 99673 57451 7211 V1588 2380 V4502 V1046 81249 24220 6000 99667 71105 99677 7837 E8498 04102 2809 44422
56969 4471 41072 1179 V446 48282 80125 8602 E8348 1978 9992 7140 86404 8504 9584 E8232 86389 73689 34591 78001
""".split())
# Background ICD-10-CM codes for the admissions coded in ICD-10 only (MIMIC-IV; TriNetX); none is an
# equivalent of a task group or a planted code.
_ICD10_BACKGROUND = tuple("""
E785 E039 K219 F329 E871 N390 E1122 Z794 G4733 Z87891 E1165 K5900 M109 Z86718 E872 N183 D62 E876 F419 G8929
K922 R0902 Z66 Z515 I959 J690 E43 L89154 Z993 E1140 Z7902 I252 Z955 Z8673 Z79899 E669 Z6841 G4700 K7030 K766
B182 C3490 C189 C61 Z853 I739 I639 I615 S065X0A S72001A W1830XA Y92009 T814XXA K5730 K8590 K831 K800 N400 D696
D689 R531 M810 M4806 G9341 G936 E860 E8809 E8342 E833 D509 D500 E559 E538 H409 H269 I2720 I340 I350 I951 J9811
J90 K5660 K529 K921 L03115 M6281 N2581 R001 R079 R109 R262 R296 R339 R509 R7881 T380X5A Y929 Z1611 Z21 Z23
""".split())
# Patient-level task groups (data.py's definitions); the first code of each is the usual first diagnosis.
_TASK_CODES = {"hf": ("4280", "4281", "42822", "42832", "40491"), "copd": ("496", "49121", "4928"),
               "amn": ("78093", "2940", "2911", "29283")}
_TASK_LATENT = {"hf": "cardiac", "copd": "pulm", "amn": "cog"}
# ICD-10 equivalents of every planted code, for admissions coded in ICD-10 only.
_ICD10_OF = {"4280": "I509", "4281": "I501", "42822": "I5022", "42832": "I5032", "40491": "I130",
             "496": "J449", "49121": "J441", "4928": "J439", "78093": "R413", "2940": "F04", "2911": "F1096",
             "29283": "F19921", "4019": "I10", "41401": "I2510", "42731": "I4891", "25000": "E119",
             "3051": "F17210", "49390": "J45909", "486": "J189", "3310": "G309", "78097": "R4182",
             "30390": "F1020", "78552": "R6521", "0389": "A419", "99592": "R6520", "51881": "J9600",
             "5849": "N179", "5859": "N186", "40390": "I129", "2859": "D649", "V5861": "Z7901",
             "V1581": "Z9114", "V603": "Z602"}
# Plain-language names of the planted codes, for the history sections of notes.
_CODE_WORDS = {"4280": "congestive heart failure", "4019": "hypertension", "41401": "coronary artery disease",
               "42731": "atrial fibrillation", "25000": "type 2 diabetes mellitus", "496": "COPD",
               "3051": "tobacco use", "49390": "asthma", "486": "recent pneumonia", "3310": "Alzheimer's disease",
               "78097": "altered mental status", "30390": "alcohol use disorder", "78093": "memory loss",
               "5859": "chronic kidney disease", "2859": "anemia", "V5861": "long-term anticoagulation"}

# Drugs: the most frequent MIMIC-III demo prescriptions, one representative row each, in frequency order:
# drug | drug_type | drug_name_generic | formulary_drug_cd | gsn | ndc | prod_strength | dose_val_rx |
# dose_unit_rx | form_val_disp | form_unit_disp | route. Planted drugs are picked by name.
_DRUG_TABLE = """
Potassium Chloride|MAIN||KCL20PM|045309|00338070341|20mEq/50mL Premix|40|mEq|2|BAG|IV
D5W|BASE||D5W250|001972|00338001702|250mL Bag|250|ml|250|ml|IV DRIP
0.9% Sodium Chloride|BASE||NS1000|001210|00338004904|1000mL Bag|1000|mL|1|BAG|IV
NS|BASE||NS500|001210|00338004903|500mL Bag|500|ml|500|ml|IV
Furosemide|MAIN|Furosemide|FURO40I|008205|00517570425|40mg/4mL Vial|20|mg|0.5|VIAL|IV
Insulin|MAIN|Insulin - Sliding Scale|INSULIN|001723|0|Dummy Package for Sliding Scale|0|UNIT|0|VIAL|SC
Iso-Osmotic Dextrose|BASE||VANCOBASE||0|200ml Bag|200|mL|200|mL|IV
5% Dextrose|BASE||D5W1000|001972|00338001704|1000mL Bag|1000|mL|1|mL|IV
SW|BASE||SW50||0|50 mL Bag|50|mL|1|BAG|IV
Sodium Chloride 0.9%  Flush|MAIN|Sodium Chloride 0.9%  Flush|NACLFLUSH||0|Syringe|3|mL|0.6|SYR|IV
Morphine Sulfate|MAIN||MORP100PM|059940|00409606211|100mg/100mL Premix|100|mg|1|BTL|IV DRIP
Magnesium Sulfate|MAIN||MAG2PM|016546|00409672924|2 g / 50 mL Premix Bag|2|gm|1|BAG|IV
Acetaminophen|MAIN|Acetaminophen|ACET325|004489|00182844789|325mg Tablet|325-650|mg|1-2|TAB|PO
Heparin|MAIN|Heparin Sodium|HEPA5I|006549|63323026201|5000 Units / mL- 1mL Vial|5000|UNIT|1|mL|SC
Calcium Gluconate|MAIN|Calcium Gluconate|CALG1I|001356|00517391025|1g/10mL Vial|2|gm|2|VIAL|IV
Metoprolol Tartrate|MAIN|Metoprolol Tartrate|METO25|050631|51079025520|25mg Tablet|25|mg|1|TAB|PO
Vancomycin|MAIN||VANC1F|043952|00338355248|1g Frozen Bag|1000|mg|1|BAG|IV
Lorazepam|MAIN|Lorazepam|LORA2I|003753|00409198530|2mg/mL Syringe|1|mg|0.5|mL|IV
Bisacodyl|MAIN|Bisacodyl (Rectal)|BISA10R|002944|00574705050|10mg Suppository|10|mg|1|SUPP|PR
Metoprolol|MAIN|Metoprolol|METO5I|019808|55390007310|5mg/5mL Vial|5|mg|1|VIAL|IV
LR|BASE||LR1000|001187|00338011704|1000ml Bag|1000|mL|1|BAG|IV
Senna|MAIN|Senna|SENN187|019964|00904516561|1 Tablet|1|TAB|1|TAB|PO
Fentanyl Citrate|MAIN||FENT2.5I|041385|10019003783|2.5mg/50mL Vial|2.5|mg|50|mL|IV DRIP
Docusate Sodium|MAIN|Docusate Sodium|DOCU100|003009|00904224461|100mg Capsule|100|mg|1|CAP|PO
Sodium Bicarbonate|MAIN||NABC50I|001185|00409662502|50mEq Vial|150|mEq|3|VIAL|IV
Albuterol 0.083% Neb Soln|MAIN|Albuterol 0.083% Neb Soln|ALBU3H|005039|49502069724|0.083%;3mL Vial|1|NEB|1|VIAL|IH
Warfarin|MAIN|Warfarin|WARF5|006562|00056017275|5mg Tablet|5|mg|1|TAB|PO
Pantoprazole Sodium|MAIN||PANT40I|047635|00008092355|40mg Vial|40|mg|1|VIAL|IV
Pantoprazole|MAIN|Pantoprazole|PANT40|027462|00008084199|40mg Tablet|40|mg|1|TAB|PO
Heparin Sodium|MAIN||HEPPREMIX|060301|00338055002|25,000 unit Premix Bag|25,000|UNIT|1|BAG|IV
Ipratropium Bromide Neb|MAIN|Ipratropium Bromide Neb|IPRA2H|021700|00487980125|2.5mL Vial|1|NEB|1|VIAL|IH
HYDROmorphone (Dilaudid)|MAIN|HYDROmorphone PCA|HYD12.5PCA|004101|00074233411|12.5mg/50mL Syringe|12.5|mg|1|SYR|IVPCA
Lactulose|MAIN|Lactulose|LACT30L|003067|00054848616|20g/30mL Cup|30|mL|1|UDCUP|PO
Aspirin|MAIN|Aspirin|ASA325|004376|63739002401|325mg Tablet|325|mg|1|TAB|PO
Propofol|MAIN|Propofol|PROP100IG|016796|63323026965|1000mg/100mL Vial|1000|mg|1|VIAL|IV DRIP
Neutra-Phos|MAIN|Neutra-Phos|NEUT|063337|60258000601|Powder Packet|2|PKT|2|PKT|PO/NG
D5 1/2NS|BASE||D545NS1000|002006|00338008504|1000mL Bag|1000|mL|1|mL|IV
Levofloxacin|MAIN||LEVO250PM|029925|00045006701|250mg Premix Bag|250|mg|1|BAG|IV
Potassium Phosphate|MAIN||KPHO45I|001285|00409729501|3mM/mL-15mL|15|mmol|5|mL|IV
Norepinephrine|MAIN||LEVO4I|028633|00703115303|4mg/4mL Amp|8|mg|2|AMP|IV DRIP
Tacrolimus|MAIN|Tacrolimus|TACR0.5|041832|00469060773|0.5mg Capsule|0.5|mg|1|CAP|PO
Ondansetron|MAIN|Ondansetron|ONDAN4I|061716|00781305714|2mg/mL-2mL|4|mg|1|VIAL|IV
Gabapentin|MAIN|Gabapentin|GABA300|021414|00172438210|300mg Capsule|300|mg|1|CAP|PO/NG
Midazolam|MAIN||MIDA50I|003780|10019002710|50mg/10mL Vial|100|mg|20|mL|IV DRIP
Lisinopril|MAIN|Lisinopril|LISI5|000393|00172375810|5mg Tablet|5|mg|1|TAB|PO
Prednisone|MAIN|Prednisone|PRED20|006751|00054872625|20mg Tab|40|mg|2|TAB|PO
Multivitamins|MAIN|Multivitamins|MVI|002532|00904053061|1 Tablet|1|TAB|1|TAB|PO
Levothyroxine Sodium|MAIN|Levothyroxine Sodium|LEVO25|006648|00074434113|25mcg Tablet|25|mcg|1|TAB|PO/NG
Haloperidol|MAIN|Haloperidol|HALD5I|003970|55390014710|5mg/mL Vial|0.5|mg|0.1|VIAL|IV
CefePIME|MAIN||CEFE2I|024095|60505068104|2g Vial|2|g|10|mL|IV
Phytonadione|MAIN|Phytonadione|PHYT10I|002301|00074915801|10mg/mL Amp|10|mg|1|AMP|SC
Pneumococcal Vac Polyvalent|MAIN|PNEUMOcoccal Vac Polyvalent|PNEU25I|048548|00006494300|25mcg/0.5mL Vial|0.5|mL|1|VIAL|IM
Famotidine|MAIN||FAMO20PM|021732|00006353750|20mg Premix Bag|20|mg|1|BAG|IV
Ciprofloxacin HCl|MAIN|Ciprofloxacin HCl|CIPR500|009510|00172531210|500mg Tab|500|mg|1|TAB|PO
Amiodarone HCl|MAIN|Amiodarone HCl|AMID200|000266|51079090601|200 mg Tab|400|mg|2|TAB|PO
Atorvastatin|MAIN|Atorvastatin|ATOR10|029967|00071015540|10mg Tablet|10|mg|1|TAB|PO
Metronidazole|MAIN||METR500PM|009588|00074781124|500mg Premix Bag|500|mg|1|BAG|IV
Dexamethasone|MAIN|Dexamethasone Sod Phosphate|DEXA10I|006776|00641036725|10mg/mL Vial|10|mg|1|VIAL|IV
Fentanyl Patch|MAIN|Fentanyl Patch|FENT50P|015881|00781711255|50mcg/hr Patch|50|mcg/hr|1|PTCH|TP
Chlorhexidine Gluconate 0.12% Oral Rinse|MAIN|Chlorhexidine Gluconate|CHLO15L|057959|54569523500|15ml Cup|15|mL|1|UDCUP|ORAL
Acetylcysteine 20%|MAIN|Acetylcysteine 20%|ACET20/4I|000592|00517760425|800mg/4ml Vial|600|mg|0.75|VIAL|PO
Dextrose 50%|MAIN|Dextrose 50%|DEX50SY|001989|00409490234|50mL Syringe|12.5|gm|0.5|SYR|IV
Influenza Virus Vaccine|MAIN|Influenza Virus Vaccine|INFV|064182|58160087546|0.5mL Syringe|0.5|mL|1|SYR|IM
Meropenem|MAIN||MERO500I|026488|00310032520|500mg Vial|500|mg|1|VIAL|IV
Azithromycin|MAIN|Azithromycin|ZITHR250|026721|59762306003|250 mg Tab|250|mg|1|TAB|PO
Hydralazine HCl|MAIN|Hydralazine HCl|HYDZ20I|000283|00517090125|20mg/mL Vial|10|mg|0.5|VIAL|IV
1/2 NS|BASE||NS451000|001209|00338004304|1000mL Bag|1000|mL|1000|mL|IV
Albumin 25% (12.5g / 50mL)|MAIN|Albumin 25% (12.5g / 50mL)|ALBU25|006329|67467064301|25%-50mL|25|g|2|VIAL|IV
Zolpidem Tartrate|MAIN|Zolpidem Tartrate|AMBI5|019187|60505260400|5mg Tablet|5|mg|1|TAB|PO
CeftriaXONE|MAIN||CEFX1F|059424|00338500241|1g Frozen Bag|1|gm|1|BAG|IV
Ipratropium Bromide MDI|MAIN|Ipratropium Bromide HFA|IPRAPF|059081|00597008717|12.9g Inhaler|2|PUFF|0.01|INH|IH
Enoxaparin Sodium|MAIN|Enoxaparin Sodium|ENOX80I|027994|00075062280|80mg Syringe|80|mg|1|SYR|SC
Hydrocortisone Na Succ.|MAIN||HC100I|006696|00074567102|100mg/2mL Vial|50|mg|0.5|VIAL|IV
Miconazole Powder 2%|MAIN|Miconazole Powder 2%|MICO2P|007367|00064065001|30g Bottle|1|Appl|1|BTL|TP
Ranitidine|MAIN|Ranitidine|RANI150|011673|00904526161|150mg Tablet|150|mg|1|TAB|PO
DiphenhydrAMINE|MAIN|DiphenhydrAMINE|DIPH25|011582|17714002001|25mg Cap|25|mg|1|CAP|PO
Calcium Carbonate|MAIN|Calcium Carbonate (Tums)|CALC500|002689|66553000401|500mg Tablet|500|mg|1|TAB|PO
Lansoprazole Oral Disintegrating Tab|MAIN|Lansoprazole Oral Disintegrating Tab|LANS30ST|051654|00300154430|30mg SoluTab|30|mg|1|TAB|PO
Fluconazole|MAIN|Fluconazole|FLUC200|013724|59762501801|200mg Tab|200|mg|1|TAB|PO
Oxycodone-Acetaminophen|MAIN|Oxycodone-Acetaminophen|PERC|004222|00406051262|5mg/325mg Tablet|1-2|TAB|1-2|TAB|PO
Metoclopramide|MAIN|Metoclopramide|METO10I|005229|00703450204|5mg/mL-2mL Vial|10|mg|1|VIAL|IV
Diltiazem|MAIN|Diltiazem|DILT60|000575|51079074620|60 mg Tab|60|mg|1|TAB|PO
Albuterol Inhaler|MAIN|Albuterol Inhaler (ProAir)|PROAIR8.5H|028090|59310057920|8.5 g Inhaler|2|PUFF|0.01|INH|IH
Morphine Sulfate IR|MAIN|Morphine Sulfate (Immediate Release)|MORP15|004091|00054023524|15mg Tab|15|mg|1|TAB|PO
Phenylephrine HCl|MAIN||PHEN10I|005068|10019016312|10mg/1mL Vial|60|mg|6|VIAL|IV DRIP
Baclofen|MAIN|Baclofen|BACL10|004679|00904336561|10mg Tablet|15|mg|1.5|TAB|PO/NG
Octreotide Acetate|MAIN||OCTR0.1I|053978|55390016110|0.1 mg Amp|0.6|mg|6|mL|IV DRIP
Aspirin EC|MAIN|Aspirin EC|ASAEC325|004381|17714001110|325mg Tab|325|mg|1|TAB|PO
Tiotropium Bromide|MAIN|Tiotropium Bromide|TIOT|050714|00597007575|18mcg Capsule-Inhalation Device|1|CAP|1|CAP|IH
Donepezil|MAIN|Donepezil|DONE5|029335|62856024541|5mg Tablet|10|mg|2|TAB|PO
Thiamine|MAIN|Thiamine|THIA100|002451|00182004701|100mg Tablet|100|mg|1|TAB|PO
Piperacillin-Tazobactam|MAIN||ZOSY4.5I|021187|00206885516|4.5 g Vial|4.5|gm|1|VIAL|IV
Nicotine Patch|MAIN|Nicotine Patch|NICO14P|016426|37205036174|14mg/24Hr Patch|14|mg|1|PTCH|TD
Fluticasone-Salmeterol Diskus (250/50)|MAIN|Fluticasone-Salmeterol Diskus (250/50)|ADVA250IH|043367|00173069602|250/50mcg Diskus|1|INH|0.0357|DEV|IH
Quetiapine Fumarate|MAIN|Quetiapine Fumarate|QUET25|034187|00310027539|25mg Tablet|12.5|mg|0.5|TAB|PO
Carvedilol|MAIN|Carvedilol|CARV3125|028108|51079077120|3.125mg Tablet|3.125|mg|1|TAB|PO
Spironolactone|MAIN|Spironolactone|SPIR25|006817|51079010320|25mg Tablet|25|mg|1|TAB|PO
Digoxin|MAIN|Digoxin|DIGO125|000018|00173024256|0.125MG TAB|0.0625|mg|0.5|TAB|PO
Vasopressin|MAIN||VASO20I|006612|54569391600|20U/ML VIAL|100|UNIT|5|ml|IV DRIP
"""
_DRUG_FIELDS = ("drug", "drug_type", "drug_name_generic", "formulary_drug_cd", "gsn", "ndc", "prod_strength",
                "dose_val_rx", "dose_unit_rx", "form_val_disp", "form_unit_disp", "route")
_DRUGS = {f: _vocab(col) for f, col in
          zip(_DRUG_FIELDS, zip(*(line.split("|") for line in _DRUG_TABLE.strip().splitlines())))}
_DRUG_INDEX = {name.strip('"'): i for i, name in enumerate(_DRUGS["drug"])}

# ICU charting. Numeric variables: MetaVision and CareVue itemid and unit, population mean, between-stay
# and within-stay sd, clip range, decimals, and the effect of the stay latents (resp, circ, sev), which
# grows over the first 48 h. Every 'hourly' variable is charted each round; others every 4th round.
_VITALS = (  # name, mv item, mv unit, cv item, cv unit, mean, sd stay, sd row, lo, hi, dec, effect, hourly
    ("hr", 220045, "bpm", 211, "BPM", 86, 9, 4, 30, 200, 0, (3, 9, 6), True),
    ("sbp", 220179, "mmHg", 51, "mmHg", 121, 13, 7, 55, 230, 0, (0, -14, -6), True),
    ("dbp", 220180, "mmHg", 8368, "mmHg", 64, 8, 5, 25, 130, 0, (0, -7, -3), True),
    ("mbp", 220181, "mmHg", 52, "mmHg", 82, 9, 5, 35, 160, 0, (0, -10, -4), True),
    ("rr", 220210, "insp/min", 618, "BPM", 18, 3, 2.5, 5, 50, 0, (4, 1, 2), True),
    ("spo2", 220277, "%", 646, "%", 97, 1.2, 1.2, 70, 100, 0, (-2.5, -0.3, -0.6), True),
    ("temp", 223761, "?F", 678, "Deg. F", 98.6, 0.6, 0.4, 93, 106, 1, (0, 0.3, 0.5), False),
    ("fio2", 223835, "", 0, "", 38, 6, 4, 21, 100, 0, (9, 0, 2), False),
    ("abpm", 220052, "mmHg", 0, "", 80, 9, 4, 35, 160, 0, (0, -10, -4), True),    # with an arterial line
    ("peep", 220339, "cmH2O", 0, "", 6, 1.5, 1, 5, 24, 0, (2, 0, 0.5), True),      # while ventilated (ARF)
    ("weight", 224639, "kg", 0, "", 0, 0, 0.5, 35, 250, 1, (0, 0, 0), False),      # daily, around stay weight
)
_V = {v[0]: i for i, v in enumerate(_VITALS)}
_VIT = {name: np.array(col, dtype=object if name in ("name", "mv_unit", "cv_unit") else None) for name, col in
        zip(("name", "mv", "mv_unit", "cv", "cv_unit", "mean", "sd_stay", "sd_row", "lo", "hi", "dec", "effect",
             "hourly"), zip(*_VITALS))}
# Text-valued MetaVision items (value text; valuenum only for the scored ones).
_GCS = {220739: ("No Response", "To Pain", "To Speech", "Spontaneously"),
        223900: ("No Response", "Incomprehensible sounds", "Inappropriate Words", "Confused", "Oriented"),
        223901: ("No response", "Abnormal extension", "Abnormal Flexion", "Flex-withdraws", "Localizes Pain",
                 "Obeys Commands")}
_RASS = _vocab(["-5 Unarousable, no response to voice or physical stimulation",
                "-4 Deep sedation, no response to voice, but movement or eye opening to physical stimulation",
                "-3 Moderate sedation, movement or eye opening; No eye contact",
                "-2 Light sedation, briefly awakens to voice (eye opening/contact) < 10 sec",
                "-1 Awakens to voice (eye opening/contact) > 10 sec", " 0  Alert and calm",
                "+1 Anxious, apprehensive, but not aggressive",
                "+2 Frequent nonpurposeful movement, fights ventilator"])
_SAFETY = _vocab(["Adequate lighting", "Bed locked in low position", "Lines and tubes concealed",
                  "Bed alarm activated", "Call light within reach", "Quiet, calm space",
                  "Clear, firm limit setting", "Family at bedside", "Intubated, trach secured"])
_ORAL = _vocab(["Teeth/Tissue WNL", "Loose Teeth", "Oral Ulcers", "Bleeding Gum", "Thrush",
                'Dentures ("partial plate")'])
_TEXT_ITEMS = (220739, 223900, 223901, 228096, 224641, 227969, 223999)  # GCS x3, RASS, alarms, safety, oral

# Labs: itemid, unit, centre, log-normal?, effect of (chronic, circ, sev), row sd, decimals, normal range
_LABS = (
    (50813, "mmol/L", 1.3, True, (0, 0.35, 0.2), 0.25, 1, 0.5, 2.0),       # lactate
    (50912, "mg/dL", 1.0, True, (0.35, 0, 0.15), 0.15, 1, 0.5, 1.2),       # creatinine
    (51301, "K/uL", 9.0, True, (0, 0.05, 0.25), 0.2, 1, 4.0, 11.0),        # white cells
    (51222, "g/dL", 11.5, False, (-0.3, 0, -0.6), 1.1, 1, 12.0, 16.0),     # haemoglobin
    (50983, "mEq/L", 139, False, (0, 0, -1), 3, 0, 133, 145),              # sodium
    (50971, "mEq/L", 4.2, False, (0.2, 0.1, 0), 0.45, 1, 3.3, 5.1),        # potassium
    (50931, "mg/dL", 125, False, (20, 0, 15), 25, 0, 70, 100),             # glucose
    (51006, "mg/dL", 18, True, (0.4, 0, 0.2), 0.25, 0, 6, 20),             # urea nitrogen
    (51265, "K/uL", 230, False, (0, 0, -40), 60, 0, 150, 440),             # platelets
    (50882, "mEq/L", 24, False, (-0.5, -2.5, -0.5), 2.5, 0, 22, 32),       # bicarbonate
)
_LAB = {name: np.array(col, dtype=object if name == "unit" else None) for name, col in
        zip(("item", "unit", "centre", "log", "effect", "sd", "dec", "lo", "hi"), zip(*_LABS))}
# Inputs: itemid, amount unit, rate unit, order category, secondary category, description, bag, rate range
_INPUTS = {
    "nacl": (225158, "ml", "mL/hour", "02-Fluids (Crystalloids)", "", "Continuous IV", 1000, (50, 125)),
    "bolus": (225158, "ml", "mL/hour", "03-IV Fluid Bolus", "", "Bolus", 500, (1000, 1000)),  # 500 mL, 30 min
    "dextrose": (220949, "ml", "mL/hour", "02-Fluids (Crystalloids)", "Additive (Crystalloid)",
                 "Continuous IV", 100, (50, 200)),
    "propofol": (222168, "mg", "mcg/kg/min", "01-Drips", "02-Fluids (Crystalloids)", "Continuous Med", 100,
                 (10, 50)),
    "norepinephrine": (221906, "mg", "mcg/kg/min", "01-Drips", "02-Fluids (Crystalloids)", "Continuous Med",
                       250, (0.03, 0.5)),
    "phenylephrine": (221749, "mg", "mcg/kg/min", "01-Drips", "02-Fluids (Crystalloids)", "Continuous Med",
                      250, (0.5, 3.0)),
    "vasopressin": (222315, "units", "units/hour", "01-Drips", "02-Fluids (Crystalloids)", "Continuous Med",
                    250, (0.8, 2.4)),
    "dopamine": (221662, "mg", "mcg/kg/min", "01-Drips", "02-Fluids (Crystalloids)", "Continuous Med", 250,
                 (2.0, 15.0)),
    "epinephrine": (221289, "mg", "mcg/kg/min", "01-Drips", "02-Fluids (Crystalloids)", "Continuous Med", 250,
                    (0.02, 0.2)),
}
_PRESSORS = ("norepinephrine", "phenylephrine", "vasopressin", "dopamine", "epinephrine")
_PRESSOR_P = (0.6, 0.2, 0.08, 0.07, 0.05)

# Demographic and administrative categories: one probability vector, labels per layout.
_CATEGORIES = {
    "race": ((0.70, 0.09, 0.05, 0.03, 0.05, 0.08), {
        "mimic3": ("WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN", "OTHER",
                   "UNKNOWN/NOT SPECIFIED"),
        "mimic4": ("WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN", "OTHER",
                   "UNKNOWN"),
        "trinetx": ("White", "Black or African American", "White", "Asian", "Other Race", "Unknown")}),
    "marital": ((0.45, 0.28, 0.13, 0.07, 0.07), {
        "mimic3": ("MARRIED", "SINGLE", "WIDOWED", "DIVORCED", ""),
        "mimic4": ("MARRIED", "SINGLE", "WIDOWED", "DIVORCED", ""),
        "trinetx": ("Married", "Single", "Widowed", "Divorced", "Unknown")}),
    "religion": ((0.45, 0.15, 0.14, 0.1, 0.08, 0.08), {
        "mimic3": ("CATHOLIC", "NOT SPECIFIED", "UNOBTAINABLE", "PROTESTANT QUAKER", "JEWISH", "OTHER")}),
    "language": ((0.55, 0.3, 0.1, 0.05), {"mimic3": ("ENGL", "", "SPAN", "RUSS"),
                                          "mimic4": ("ENGLISH", "ENGLISH", "?", "?")}),
    "admit_type": ((0.78, 0.16, 0.06), {"mimic3": ("EMERGENCY", "ELECTIVE", "URGENT"),
                                        "mimic4": ("EW EMER.", "ELECTIVE", "URGENT")}),
    "careunit": ((0.45, 0.17, 0.14, 0.12, 0.12), {
        "mimic3": ("MICU", "SICU", "CCU", "CSRU", "TSICU"),
        "mimic4": ("Medical Intensive Care Unit (MICU)", "Surgical Intensive Care Unit (SICU)",
                   "Coronary Care Unit (CCU)", "Cardiac Vascular Intensive Care Unit (CVICU)",
                   "Trauma SICU (TSICU)")}),
}
_ADMIT_LOCATION = {"mimic3": ("EMERGENCY ROOM ADMIT", "PHYS REFERRAL/NORMAL DELI", "TRANSFER FROM HOSP/EXTRAM"),
                   "mimic4": ("EMERGENCY ROOM", "PHYSICIAN REFERRAL", "TRANSFER FROM HOSPITAL")}
_DISCHARGE_LOCATION = {  # home, home health, skilled nursing, rehab, died
    "mimic3": ("HOME", "HOME HEALTH CARE", "SNF", "REHAB/DISTINCT PART HOSP", "DEAD/EXPIRED"),
    "mimic4": ("HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY", "REHAB", "DIED")}
_ADMIT_DIAGNOSIS = ("PNEUMONIA", "SEPSIS", "CONGESTIVE HEART FAILURE", "CHEST PAIN", "GASTROINTESTINAL BLEED",
                    "ALTERED MENTAL STATUS", "HYPOTENSION, RENAL FAILURE", "CORONARY ARTERY DISEASE\\CABG /SDA",
                    "FEVER", "SHORTNESS OF BREATH", 'FALL, R/O "FRACTURE"', "STROKE/TIA")


def _pick(rng, name: str, n: int) -> np.ndarray:
    """Category indices for `n` rows drawn with the probabilities of _CATEGORIES[name]."""
    p = np.asarray(_CATEGORIES[name][0], dtype=float)
    return rng.choice(len(p), size=n, p=p / p.sum())


def _label(name: str, layout: str, idx) -> np.ndarray:
    return _vocab(_CATEGORIES[name][1][layout])[idx]


# --------------------------------------------------------------------------------------------- formatting
def _civil(days):
    """(year, month, day) of days since 1970-01-01, vectorised (H. Hinnant's civil_from_days)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    month = np.where(mp < 10, mp + 3, mp - 9)
    return yoe + era * 400 + (month <= 2), month, doy - (153 * mp + 2) // 5 + 1


def _fixed_width(parts, n: int) -> np.ndarray:
    """Fixed-width strings from (int array, width) fields and literal separators, digit by digit in numpy:
    ten times faster than strftime or datetime_as_string for millions of timestamps."""
    width = sum(len(p) if isinstance(p, str) else p[1] for p in parts)
    out = np.empty((n, width), dtype=np.uint32)
    col = 0
    for p in parts:
        if isinstance(p, str):
            out[:, col:col + len(p)] = [ord(c) for c in p]
            col += len(p)
            continue
        values, w = p
        for i in range(w):
            out[:, col + w - 1 - i] = values // 10 ** i % 10 + 48
        col += w
    return out.view(f"<U{width}").ravel()


def _spread(values, fmt) -> np.ndarray:
    """fmt(distinct values) spread back over all rows: event tables repeat times and values a lot, so
    formatting each distinct value once is several times faster than formatting every row."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return fmt(uniq).astype(object)[inverse.reshape(-1)]


def _ts(t, fmt: str = "datetime", missing=None) -> np.ndarray:
    """Epoch seconds as 'YYYY-MM-DD HH:MM:SS' ('date': 'YYYY-MM-DD'; 'compact': 'YYYYMMDD'); '' where missing."""
    def text(t):
        days, sod = np.divmod(t, _DAY)
        y, m, d = _civil(days)
        parts = [(y, 4), (m, 2), (d, 2)] if fmt == "compact" else [(y, 4), "-", (m, 2), "-", (d, 2)]
        if fmt == "datetime":
            parts += [" ", (sod // 3600, 2), ":", (sod // 60 % 60, 2), ":", (sod % 60, 2)]
        return _fixed_width(parts, len(t))
    out = _spread(np.asarray(t, dtype=np.int64), text)
    if missing is not None:
        out[missing] = ""
    return out


def _num(x, dec: int = 0, missing=None) -> np.ndarray:
    """Numbers as text with `dec` decimals ('72', '98.6'); '' where missing (or NaN)."""
    x = np.round(np.asarray(x, dtype=float), dec)
    nan = np.isnan(x)
    out = _spread(np.where(nan, 0, x), lambda u: u.astype(np.int64).astype(str) if dec == 0 else u.astype(str))
    out[nan if missing is None else nan | missing] = ""
    return out


def _ids(x) -> np.ndarray:
    """Integers as text."""
    return _spread(np.asarray(x, dtype=np.int64), lambda u: u.astype(str))


def _csv_lines(columns: list, n: int) -> str:
    """n CSV lines from columns that are sequences of ready-made fields or one constant field."""
    cols = [repeat(c, n) if isinstance(c, str) else (c.tolist() if isinstance(c, np.ndarray) else c)
            for c in columns]
    return "\n".join(map(",".join, zip(*cols))) + "\n"


# ----------------------------------------------------------------------------------------- layouts / output
_SCHEMAS = {  # table -> (file, "column" or "column=source key" ...); mimic3 names are upper-cased on write
    "mimic3": {
        "patients": ("PATIENTS", "row_id subject_id gender dob dod dod_hosp dod_ssn expire_flag"),
        "admissions": ("ADMISSIONS", "row_id subject_id hadm_id admittime dischtime deathtime admission_type "
                       "admission_location discharge_location insurance language religion marital_status "
                       "ethnicity=race edregtime edouttime diagnosis hospital_expire_flag has_chartevents_data"),
        "icustays": ("ICUSTAYS", "row_id subject_id hadm_id icustay_id=stay_id dbsource first_careunit "
                     "last_careunit first_wardid last_wardid intime outtime los"),
        "chartevents": ("CHARTEVENTS", "row_id subject_id hadm_id icustay_id=stay_id itemid charttime storetime "
                        "cgid value valuenum valueuom warning error resultstatus stopped"),
        "labevents": ("LABEVENTS", "row_id subject_id hadm_id itemid charttime value valuenum valueuom flag"),
        "outputevents": ("OUTPUTEVENTS", "row_id subject_id hadm_id icustay_id=stay_id charttime itemid value "
                         "valueuom storetime cgid stopped newbottle iserror"),
        "inputevents": ("INPUTEVENTS_MV", "row_id subject_id hadm_id icustay_id=stay_id starttime endtime itemid "
                        "amount amountuom rate rateuom storetime cgid orderid linkorderid ordercategoryname "
                        "secondaryordercategoryname ordercomponenttypedescription ordercategorydescription "
                        "patientweight totalamount totalamountuom isopenbag continueinnextdept cancelreason "
                        "statusdescription comments_editedby comments_canceledby comments_date originalamount "
                        "originalrate"),
        "procedureevents": ("PROCEDUREEVENTS_MV", "row_id subject_id hadm_id icustay_id=stay_id starttime "
                            "endtime itemid value valueuom location locationcategory storetime cgid orderid "
                            "linkorderid ordercategoryname secondaryordercategoryname ordercategorydescription "
                            "isopenbag continueinnextdept cancelreason statusdescription comments_editedby "
                            "comments_canceledby comments_date"),
        "datetimeevents": ("DATETIMEEVENTS", "row_id subject_id hadm_id icustay_id=stay_id itemid charttime "
                           "storetime cgid value valueuom warning error resultstatus stopped"),
        "diagnoses": ("DIAGNOSES_ICD", "row_id subject_id hadm_id seq_num icd9_code=icd_code"),
        "prescriptions": ("PRESCRIPTIONS", "row_id subject_id hadm_id icustay_id=stay_id startdate enddate "
                          "drug_type drug drug_name_poe drug_name_generic formulary_drug_cd gsn ndc "
                          "prod_strength dose_val_rx dose_unit_rx form_val_disp form_unit_disp route"),
        "notes": ("NOTEEVENTS", "row_id subject_id hadm_id chartdate charttime storetime category description "
                  "cgid iserror text"),
    },
    "mimic4": {
        "patients": ("hosp/patients", "subject_id gender anchor_age anchor_year anchor_year_group dod"),
        "admissions": ("hosp/admissions", "subject_id hadm_id admittime dischtime deathtime admission_type "
                       "admit_provider_id admission_location discharge_location insurance language "
                       "marital_status race edregtime edouttime hospital_expire_flag"),
        "diagnoses": ("hosp/diagnoses_icd", "subject_id hadm_id seq_num icd_code icd_version"),
        "prescriptions": ("hosp/prescriptions", "subject_id hadm_id pharmacy_id poe_id poe_seq "
                          "order_provider_id starttime stoptime drug_type drug formulary_drug_cd gsn ndc "
                          "prod_strength form_rx dose_val_rx dose_unit_rx form_val_disp form_unit_disp "
                          "doses_per_24_hrs route"),
        "labevents": ("hosp/labevents", "labevent_id=row_id subject_id hadm_id specimen_id itemid "
                      "order_provider_id charttime storetime value valuenum valueuom ref_range_lower "
                      "ref_range_upper flag priority comments"),
        "icustays": ("icu/icustays", "subject_id hadm_id stay_id first_careunit last_careunit intime outtime los"),
        "chartevents": ("icu/chartevents", "subject_id hadm_id stay_id caregiver_id=cgid charttime storetime "
                        "itemid value valuenum valueuom warning"),
        "outputevents": ("icu/outputevents", "subject_id hadm_id stay_id caregiver_id=cgid charttime storetime "
                         "itemid value valueuom"),
        "inputevents": ("icu/inputevents", "subject_id hadm_id stay_id caregiver_id=cgid starttime endtime "
                        "storetime itemid amount amountuom rate rateuom orderid linkorderid ordercategoryname "
                        "secondaryordercategoryname ordercomponenttypedescription ordercategorydescription "
                        "patientweight totalamount totalamountuom isopenbag continueinnextdept "
                        "statusdescription originalamount originalrate"),
        "procedureevents": ("icu/procedureevents", "subject_id hadm_id stay_id caregiver_id=cgid starttime "
                            "endtime storetime itemid value valueuom location locationcategory orderid "
                            "linkorderid ordercategoryname ordercategorydescription patientweight isopenbag "
                            "continueinnextdept statusdescription originalamount originalrate"),
        "datetimeevents": ("icu/datetimeevents", "subject_id hadm_id stay_id caregiver_id=cgid charttime "
                           "storetime itemid value valueuom warning"),
        "discharge": ("note/discharge", "note_id subject_id hadm_id note_type note_seq charttime storetime text"),
        "radiology": ("note/radiology", "note_id subject_id hadm_id note_type note_seq charttime storetime text"),
    },
    "trinetx": {
        "patient": ("patient", "patient_id=subject_id sex year_of_birth race ethnicity marital_status"),
        "diagnosis": ("diagnosis", "patient_id=subject_id encounter_id=hadm_id code_system code "
                      "principal_diagnosis_indicator date"),
    },
}


class _Sink:
    """The open gzip writers of one extract. `write(table, n, cols)` appends n rows whose fields come from
    `cols` (source key -> column) in the layout's column order; row ids are numbered here. A worker thread
    compresses while the caller generates the next table (zlib releases the GIL)."""

    def __init__(self, root: Path, layout: str):
        self.schema, self.files, self.rows = {}, {}, {}
        for table, (name, spec) in _SCHEMAS[layout].items():
            columns = [c.split("=") if "=" in c else (c, c) for c in spec.split()]
            if layout == "mimic3":
                columns = [(header.upper(), key) for header, key in columns]
            path = root / f"{name}.csv.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = open(path, "wb")
            # mtime=0 and a fixed inner name make the bytes depend on the data only
            self.files[table] = (raw, gzip.GzipFile(path.name[:-3], "wb", _GZIP_LEVEL, raw, mtime=0))
            self.files[table][1].write((",".join(h for h, _ in columns) + "\n").encode())
            self.schema[table], self.rows[table] = columns, 0
        self.error = None
        self.queue = queue.Queue(maxsize=2)       # at most two blocks of text wait to be compressed
        self.worker = threading.Thread(target=self._compress, daemon=True)
        self.worker.start()

    def _compress(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    item[0].write(item[1])
                except BaseException as err:   # re-raised in the caller by write() or close()
                    self.error = err

    def write(self, table: str, n: int, cols: dict) -> None:
        if self.error is not None:
            raise self.error
        if n == 0:
            return
        first = self.rows[table] + 1
        ids = list(map(str, range(first, first + n)))
        fields = [ids if key == "row_id" else cols[key] for _, key in self.schema[table]]
        self.queue.put((self.files[table][1], _csv_lines(fields, n).encode()))
        self.rows[table] += n

    def close(self) -> None:
        self.queue.put(None)
        self.worker.join()
        for raw, gz in self.files.values():
            gz.close()
            raw.close()
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------------------------------------- cohort
def _patients(rng, n: int) -> dict:
    """Demographics, latent factors and the planned number of admissions of n patients."""
    u = rng.random(n)
    age = np.clip(rng.normal(64, 15, n), 20, 88.9)
    age = np.where(u < 0.02, rng.uniform(1, 17.9, n), age)                    # ~2% minors
    age = np.where((u >= 0.02) & (u < 0.05), rng.uniform(90, 99, n), age)    # MIMIC shifts these to ~300
    z = rng.standard_normal((n, 6))
    az = (np.clip(age, 18, 95) - 64) / 15
    frailty = 0.8 * z[:, 0] + 0.5 * az
    cardiac = 0.75 * z[:, 1] + 0.3 * frailty + 0.3 * az
    return dict(age=age, male=rng.random(n) < 0.56, frailty=frailty, cardiac=cardiac,
                pulm=0.85 * z[:, 2] + 0.3 * frailty, cog=0.8 * z[:, 3] + 0.5 * az,
                chronic=0.65 * z[:, 4] + 0.45 * cardiac + 0.2 * frailty, social=z[:, 5],
                race=_pick(rng, "race", n), marital=_pick(rng, "marital", n),
                religion=_pick(rng, "religion", n), language=_pick(rng, "language", n),
                n_plan=1 + np.minimum(rng.poisson(2.0 * np.exp(0.25 * z[:, 5] + 0.15 * z[:, 4])), 11))


def _onsets(rng, los, early_p, late_logit):
    """Hours from intime of the first event of a kind: before 48 h with probability early_p, else after 48 h
    (and before outtime) with probability sigmoid(late_logit) in stays of at least 48 h; NaN for none."""
    n = len(los)
    early = rng.random(n) < early_p
    late = ~early & (los >= 48.2) & (rng.random(n) < _sigmoid(late_logit))
    onset = np.full(n, np.nan)
    onset[early] = rng.uniform(0.2, 0.95, early.sum()) * np.minimum(los[early], 47.5)
    onset[late] = 48.05 + rng.uniform(0.02, 0.85, late.sum()) * (los[late] - 48.1)
    return onset


def _ends(rng, onset, los, median_h):
    """End (hours) of an episode that starts at onset: log-normal duration, at most the stay."""
    end = np.minimum(onset + rng.lognormal(np.log(median_h), 0.8, len(onset)), los - 0.02)
    return np.maximum(end, onset + 0.02)


def _stays(rng, pat: dict, adm: dict) -> dict:
    """ICU stays of the admissions: latent acuity, length of stay, ventilation, vasopressors and lines."""
    a = np.repeat(np.arange(len(adm["pat"])), adm["n_stays"])
    p = adm["pat"][a]
    n = len(a)
    acute = adm["acute"][a]
    z = rng.standard_normal((n, 4))
    resp = 0.55 * pat["pulm"][p] + 0.35 * acute + 0.75 * z[:, 0]
    circ = 0.35 * pat["cardiac"][p] + 0.45 * acute + 0.8 * z[:, 1]
    sev = 0.35 * pat["frailty"][p] + 0.55 * acute + 0.75 * z[:, 2]
    los = np.clip(np.exp(np.log(58) + 0.85 * z[:, 3] + 0.15 * sev), 6, 960)   # hours; ~60% >= 48 h
    # ARF: ventilation (PEEP set, 225792/225794) starts early in ~15% of stays, late with resp
    vent_on = _onsets(rng, los, 0.15, -3.1 + 2.5 * resp)
    # shock: a vasopressor starts early in ~12% of stays, late with circ
    press_on = _onsets(rng, los, 0.12, -3.4 + 2.5 * circ)
    art = rng.random(n) < _sigmoid(-0.4 + 0.5 * circ + 0.4 * sev)
    cvl = rng.random(n) < _sigmoid(-0.9 + 0.5 * circ + 0.5 * sev)
    return dict(adm=a, pat=p, j=group_rank(adm["n_stays"]), resp=resp, circ=circ, sev=sev, los=los,
                vent_on=vent_on, vent_off=_ends(rng, vent_on, los, 40), vent_niv=rng.random(n) < 0.2,
                press_on=press_on, press_off=_ends(rng, press_on, los, 20),
                pressor=rng.choice(len(_PRESSORS), n, p=_PRESSOR_P), second=rng.random(n) < 0.25,
                art_on=np.where(art, rng.uniform(0.1, 0.5, n) * np.minimum(los, 8), np.nan),
                cvl_on=np.where(cvl, rng.uniform(0.1, 0.8, n) * np.minimum(los, 12), np.nan),
                weight=np.clip(rng.normal(78, 16, n) + 8 * pat["male"][p], 40, 180),
                unit=_pick(rng, "careunit", n))


def _admissions(rng, pat: dict, layout: str) -> tuple[dict, dict]:
    """Planned admissions and their stays; in-hospital deaths end a patient's sequence of admissions."""
    n_plan = pat["n_plan"]
    p = np.repeat(np.arange(len(n_plan)), n_plan)
    n = len(p)
    icu = rng.random(n) < 0.8
    adm = dict(pat=p, k=group_rank(n_plan), icu=icu, n_stays=icu * (1 + (rng.random(n) < 0.1)),
               acute=0.5 * pat["frailty"][p] + 0.85 * rng.standard_normal(n),
               mv=(rng.random(n) < 0.85) | (layout == "mimic4"), atype=_pick(rng, "admit_type", n))
    st = _stays(rng, pat, adm)
    # in-hospital death follows the acuity of the admission's last ICU stay
    last = st["j"] == adm["n_stays"][st["adm"]] - 1
    logit = np.full(n, -3.8) + 0.6 * pat["frailty"][p]
    logit[st["adm"][last]] = -2.9 + 2.0 * st["sev"][last] + 0.8 * st["circ"][last] + 0.5 * st["resp"][last]
    adm["died"] = rng.random(n) < _sigmoid(logit)
    first_death = np.full(len(n_plan), 99)
    np.minimum.at(first_death, p, np.where(adm["died"], adm["k"], 99))
    keep = adm["k"] <= first_death[p]
    adm = {key: v[keep] for key, v in adm.items()}
    new_index = np.cumsum(keep) - 1
    keep_stay = keep[st["adm"]]
    st = {key: v[keep_stay] for key, v in st.items()}
    st["adm"] = new_index[st["adm"]]
    pat["n_adm"] = np.bincount(adm["pat"], minlength=len(n_plan))
    return adm, st


def _diseases(rng, pat: dict, adm: dict) -> None:
    """Heart failure, COPD and amnesia cases: first diagnosed at a later admission of a patient with history."""
    n_adm, p, k = pat["n_adm"], adm["pat"], adm["k"]
    eligible = n_adm >= 2
    adm["dx_history"] = np.zeros(len(p), bool)    # a case's admissions up to its first diagnosis
    for name, latent in _TASK_LATENT.items():
        case = eligible & (rng.random(len(n_adm)) < _sigmoid(-1.9 + 1.3 * pat[latent]))
        first = np.where(case, 1 + (rng.random(len(n_adm)) * (n_adm - 1)).astype(int), 99)
        pat[name], pat[name + "_j"] = case, first
        others = len(_TASK_CODES[name]) - 1        # the group's first code is the usual first diagnosis
        pat[name + "_code"] = rng.choice(others + 1, len(n_adm), p=[0.6] + [0.4 / others] * others)
        adm[name + "_dx"] = k >= first[p]
        adm[name + "_first"] = k == first[p]
        adm["dx_history"] |= case[p] & (k <= first[p])


def _gaps(rng, pat: dict, adm: dict) -> np.ndarray:
    """Seconds from each discharge to the next admission. A return within 30 days (readmission) follows
    what the admission's notes (noncompliance, living alone), codes (V1581, V603, chronic disease) and
    drug count show; other gaps are months to years, and >= 180 days before a first task diagnosis."""
    n, p = len(adm["pat"]), adm["pat"]
    social = pat["social"][p]
    adm["noncompliant"] = rng.random(n) < _sigmoid(-1.6 + 1.4 * social)
    adm["alone"] = rng.random(n) < _sigmoid(-1.0 + 1.0 * social)
    adm["n_drugs"] = 3 + rng.poisson(2 + 4 * _sigmoid(pat["chronic"][p]) + 3 * adm["icu"])
    soon = rng.random(n) < _sigmoid(-3.4 + 3.6 * adm["noncompliant"] + 1.5 * adm["alone"] + 0.9 * pat["chronic"][p]
                                     + 0.15 * (adm["n_drugs"] - 9) + 0.3 * np.minimum(adm["k"], 3))
    gap = np.where(soon, rng.uniform(0.5, 29.5, n), 31 + np.minimum(rng.exponential(500, n), 1800)) * _DAY
    starts = np.cumsum(pat["n_adm"]) - pat["n_adm"]
    for name in _TASK_LATENT:
        cases = np.flatnonzero(pat[name])
        before = starts[cases] + pat[name + "_j"][cases] - 1
        gap[before] = np.maximum(gap[before], rng.uniform(190, 700, len(before)) * _DAY)
    return gap


def _timeline(rng, pat: dict, adm: dict, st: dict, layout: str) -> None:
    """Absolute times: ICU stays inside their admission, admissions spread over years after a first one."""
    n, p, a = len(adm["pat"]), adm["pat"], st["adm"]
    pre = np.clip(rng.lognormal(np.log(8), 0.8, n), 0.5, 72) * _HOUR
    between = rng.uniform(24, 96, n) * _HOUR
    los = np.round(st["los"] * _HOUR)
    prev_los = np.where(st["j"] == 1, np.roll(los, 1), 0)    # stays are ordered by admission, then j
    offset = pre[a] + np.where(st["j"] == 1, prev_los + between[a], 0)
    end_icu, last_in = np.zeros(n), np.zeros(n)
    last = st["j"] == adm["n_stays"][a] - 1
    end_icu[a[last]], last_in[a[last]] = offset[last] + los[last], offset[last]
    post = np.clip(rng.lognormal(np.log(60), 0.8, n), 4, 720) * _HOUR
    length = np.where(adm["icu"], end_icu + post, np.clip(rng.lognormal(np.log(96), 0.7, n), 8, 1000) * _HOUR)
    # deaths: at least 72 h after the last intime, so even the death *date* is after intime + 48 h
    dying = np.maximum(end_icu + rng.uniform(0.05, 2, n) * _HOUR, last_in + rng.uniform(72.1, 84, n) * _HOUR)
    length = np.where(adm["died"] & adm["icu"], dying, length)
    gap = _gaps(rng, pat, adm)
    y0, y1 = (np.datetime64(f"{y}-01-01", "s").astype(np.int64) for y in _YEARS[layout])
    first = rng.uniform(y0, y1, len(pat["age"]))
    starts = np.cumsum(pat["n_adm"]) - pat["n_adm"]
    step = length + gap
    before_me = np.cumsum(step) - step
    admit = (first[p] + before_me - np.repeat(before_me[starts], pat["n_adm"])) // 60 * 60
    adm["admit"] = admit.astype(np.int64)
    adm["disch"] = (-(-(admit + length) // 60) * 60).astype(np.int64)
    st["intime"] = (admit[a] + offset + rng.integers(0, 60, len(a))).astype(np.int64)
    st["outtime"] = st["intime"] + los.astype(np.int64)
    pat["first"] = first.astype(np.int64)


def _cohort(rng, n: int, ids: dict, layout: str) -> tuple[dict, dict, dict]:
    """Patients, admissions and ICU stays of one chunk, with ids continuing from `ids` (updated)."""
    pat = _patients(rng, n)
    adm, st = _admissions(rng, pat, layout)
    _diseases(rng, pat, adm)
    _timeline(rng, pat, adm, st, layout)
    pat["subject_id"] = _ids(ids["subject"] + np.arange(n))
    adm["hadm_id"] = _ids(ids["hadm"] + np.arange(len(adm["pat"])))
    st["stay_id"] = _ids(ids["stay"] + np.arange(len(st["adm"])))
    ids["subject"] += n
    ids["hadm"] += len(adm["pat"])
    ids["stay"] += len(st["adm"])
    adm["subject_id"] = pat["subject_id"][adm["pat"]]
    st["subject_id"], st["hadm_id"] = pat["subject_id"][st["pat"]], adm["hadm_id"][st["adm"]]
    st["mv"] = adm["mv"][st["adm"]]
    st["lat"] = np.column_stack([st["resp"], st["circ"], st["sev"]])
    st["cg"] = rng.integers(14000, 22000, (len(st["adm"]), 3))
    st["cog"] = pat["cog"][st["pat"]]
    _admission_features(adm, st)
    return pat, adm, st


def _admission_features(adm: dict, st: dict) -> None:
    """Per-admission summaries of its stays (any ventilation, shock; worst acuity) used by codes and notes."""
    n, a = len(adm["pat"]), st["adm"]
    for key, source in (("vent", st["vent_on"]), ("shock", st["press_on"])):
        adm[key] = np.zeros(n, bool)
        adm[key][a[~np.isnan(source)]] = True
    for key in ("resp", "circ", "sev"):
        adm[key] = 0.6 * adm["acute"]
        np.maximum.at(adm[key], a, st[key])


# ----------------------------------------------------------------------------------------- code and drugs
def _code_probs(pat: dict, adm: dict) -> dict:
    """Probability of each planted ICD-9 code in each admission, from latents, stays and task status."""
    p = adm["pat"]
    f = {key: pat[key][p] for key in ("cardiac", "pulm", "cog", "chronic", "social", "frailty")}
    sig = _sigmoid
    # precursor codes precede a first diagnosis (and occur, more rarely, in patients never diagnosed)
    pre = {d: -2.8 + 0.8 * f[lat] + 2.6 * pat[d][p] for d, lat in _TASK_LATENT.items()}
    vent, shock, died = adm["vent"], adm["shock"], adm["died"]
    probs = {
        "4019": sig(pre["hf"] + 1.2), "41401": sig(pre["hf"]), "42731": sig(pre["hf"] - 0.2),
        "25000": sig(pre["hf"] - 0.4 + 0.9 * f["chronic"]),
        "3051": sig(pre["copd"] + 0.4), "49390": sig(pre["copd"] - 0.4), "486": sig(pre["copd"] + 0.8 * vent),
        "3310": sig(pre["amn"] - 0.3), "78097": sig(pre["amn"]), "30390": sig(pre["amn"] - 0.3),
        "78552": sig(-4.5 + 3.5 * shock + 1.5 * died + 0.5 * adm["circ"]),
        "0389": sig(-3.2 + 1.0 * adm["sev"] + 1.2 * died + 1.2 * shock),
        "99592": sig(-3.6 + 0.9 * adm["sev"] + 1.0 * died + 1.8 * shock),
        "51881": sig(-3.4 + 3.2 * vent + 1.2 * died + 0.6 * adm["resp"]),
        "5849": sig(-2.4 + 0.8 * f["chronic"] + 0.7 * adm["sev"]),
        "5859": sig(-2.8 + 1.5 * f["chronic"]), "40390": sig(-3.2 + 1.3 * f["chronic"]),
        "2859": sig(-2.0 + 0.5 * f["chronic"] + 0.4 * f["frailty"]), "V5861": sig(-3.0 + 0.9 * f["cardiac"]),
        "V1581": np.where(adm["noncompliant"], 0.75, 0.02), "V603": np.where(adm["alone"], 0.6, 0.02),
    }
    for d, codes in _TASK_CODES.items():   # the task group: one main code at and after the first diagnosis
        main = pat[d + "_code"][p]
        for i, code in enumerate(codes):
            probs[code] = np.where(adm[d + "_dx"], np.where(main == i, np.where(adm[d + "_first"], 1, 0.85),
                                                                 0.12), 0.0)
    return probs


def _top_k(rng, weights, counts) -> tuple[np.ndarray, np.ndarray]:
    """For each row, `counts[row]` distinct items drawn with probability ~ weights (Gumbel top-k)."""
    keys = np.log(weights)[None, :] - np.log(-np.log(rng.random((len(counts), len(weights)))))
    order = np.argsort(-keys, axis=1)
    take = np.arange(len(weights))[None, :] < np.minimum(counts, len(weights))[:, None]
    return np.nonzero(take)[0], order[take]


def _codes(rng, pat: dict, adm: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Diagnosis codes per admission: (admission index, ICD-9 code) rows in random order, and the planted
    codes' presence (code -> bool per admission) for the notes."""
    n = len(adm["pat"])
    bg = len(_ICD9_BACKGROUND)
    rows, codes = _top_k(rng, 1 / (np.arange(bg) + 8.0), 4 + rng.poisson(4 + 2 * adm["icu"]))
    probs = _code_probs(pat, adm)
    planted = np.array(list(probs), dtype=object)
    present = rng.random((n, len(planted))) < np.column_stack(list(probs.values()))
    pr, pc = np.nonzero(present)
    vocab = np.concatenate([np.array(_ICD9_BACKGROUND, dtype=object), planted])
    rows, codes = np.concatenate([rows, pr]), np.concatenate([codes, pc + bg])
    order = np.lexsort((rng.random(len(rows)), rows))
    return rows[order], vocab[codes[order]], dict(zip(planted, present.T))


def _drug_probs(pat: dict, adm: dict, has: dict) -> dict:
    """Probability of each planted drug per admission, following codes, task status and stay events."""
    p = adm["pat"]
    sig = _sigmoid
    hf, copd, amn = (pat[d][p] for d in ("hf", "copd", "amn"))
    c, pu = pat["cardiac"][p], pat["pulm"][p]
    return {
        "Furosemide": np.where(adm["hf_dx"], 0.9, sig(-2.6 + 0.8 * c + 1.8 * hf)),
        "Metoprolol Tartrate": np.where(adm["hf_dx"], 0.8, sig(-2.3 + 0.7 * c + 1.6 * hf)),
        "Carvedilol": np.where(adm["hf_dx"], 0.4, 0.02), "Spironolactone": np.where(adm["hf_dx"], 0.3, 0.02),
        "Lisinopril": np.where(has["4019"], 0.5, 0.08),
        "Albuterol 0.083% Neb Soln": np.where(adm["copd_dx"], 0.9, sig(-2.6 + 0.8 * pu + 1.8 * copd)),
        "Ipratropium Bromide Neb": np.where(adm["copd_dx"], 0.8, sig(-3.0 + 0.8 * pu + 1.6 * copd)),
        "Tiotropium Bromide": np.where(adm["copd_dx"], 0.6, 0.02),
        "Fluticasone-Salmeterol Diskus (250/50)": np.where(adm["copd_dx"] | has["49390"], 0.4, 0.02),
        "Nicotine Patch": np.where(has["3051"], 0.6, 0.03),
        "Donepezil": np.where(adm["amn_dx"], 0.6, np.where(has["3310"], 0.4, 0.01)),
        "Thiamine": np.where(has["30390"], 0.7, 0.05), "Haloperidol": sig(-3.0 + 0.8 * pat["cog"][p]),
        "Insulin": np.where(has["25000"], 0.85, 0.25 * adm["icu"]),
        "Norepinephrine": np.where(adm["shock"], 0.9, 0.0), "Vasopressin": np.where(adm["shock"], 0.25, 0.0),
        "Propofol": np.where(adm["vent"], 0.85, 0.03),
        "Vancomycin": np.where(has["0389"] | has["99592"], 0.8, 0.15),
        "Piperacillin-Tazobactam": np.where(has["0389"] | has["99592"], 0.6, 0.06),
    }


def _drugs(rng, pat: dict, adm: dict, has: dict) -> tuple[np.ndarray, np.ndarray]:
    """Prescribed drugs per admission as (admission index, drug table index) rows: a skewed background
    whose size grows with chronic disease (a readmission signal), plus the planted drugs."""
    n = len(adm["pat"])
    probs = _drug_probs(pat, adm, has)
    planted = np.array([_DRUG_INDEX[name] for name in probs])
    background = np.setdiff1d(np.arange(len(_DRUGS["drug"])), planted)
    rows, idx = _top_k(rng, 1 / (np.arange(len(background)) + 4.0), adm["n_drugs"])
    pr, pc = np.nonzero(rng.random((n, len(planted))) < np.column_stack(list(probs.values())))
    rows, drugs = np.concatenate([rows, pr]), np.concatenate([background[idx], planted[pc]])
    order = np.lexsort((rng.random(len(rows)), rows))
    return rows[order], drugs[order]


# ---------------------------------------------------------------------------------------- hospital tables
_ICD10_MAP = {**{c: _ICD10_BACKGROUND[i % len(_ICD10_BACKGROUND)] for i, c in enumerate(_ICD9_BACKGROUND)},
              **_ICD10_OF}
_WARDS = np.array([[52, 50], [33, 57], [7, 57], [14, 12], [14, 33]])


def _dotted(code: str, icd10: bool) -> str:
    """An ICD code as TriNetX writes it: '4280' -> '428.0', 'E8497' -> 'E849.7', 'I509' -> 'I50.9'."""
    cut = 4 if code.startswith("E") and not icd10 else 3
    return code if len(code) <= cut else f"{code[:cut]}.{code[cut:]}"


def _patients_table(rng, pat: dict, adm: dict, layout: str) -> tuple[int, dict]:
    """PATIENTS (mimic3: dob, dod), hosp/patients (mimic4: anchor_age, anchor_year) or patient (trinetx)."""
    n = len(pat["age"])
    last = np.cumsum(pat["n_adm"]) - 1
    died = adm["died"][last]
    later = ~died & (rng.random(n) < 0.15)                 # deaths after the last discharge
    dod = np.where(died, adm["disch"][last], adm["disch"][last] + (rng.uniform(31, 1500, n) * _DAY).astype(np.int64))
    dod, dead = dod // _DAY * _DAY, died | later
    sex = np.where(pat["male"], "M", "F").astype(object)
    first_year = _civil(pat["first"] // _DAY)[0]
    cols = dict(subject_id=pat["subject_id"])
    if layout == "mimic3":
        years = np.where(pat["age"] >= 90, 300 + pat["age"] - 90, pat["age"])   # MIMIC-III: over 89 shown as ~300
        dod_text = _ts(dod, missing=~dead)
        cols.update(gender=sex, dob=_ts((pat["first"] - years * _YEAR).astype(np.int64) // _DAY * _DAY),
                    dod=dod_text, dod_hosp=_ts(dod, missing=~died),
                    dod_ssn=np.where(dead & (rng.random(n) < 0.8), dod_text, ""), expire_flag=_ids(dead))
    elif layout == "mimic4":
        groups = np.array(["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019"], dtype=object)
        cols.update(gender=sex, anchor_age=_ids(np.where(pat["age"] >= 90, 91, np.clip(pat["age"], 18, 89))),
                    anchor_year=_ids(first_year), anchor_year_group=groups[rng.integers(0, 4, n)],
                    dod=_ts(dod, "date", missing=~dead))
    else:
        race = pat["race"]
        cols.update(sex=sex, year_of_birth=_ids(first_year - np.floor(pat["age"])),
                    race=_label("race", layout, race), marital_status=_label("marital", layout, pat["marital"]),
                    ethnicity=np.where(race == 2, "Hispanic or Latino",
                                       np.where(race == 5, "Unknown", "Not Hispanic or Latino")).astype(object))
    return n, cols


def _admissions_table(rng, pat: dict, adm: dict, layout: str) -> tuple[int, dict]:
    """ADMISSIONS / hosp/admissions: times, death, administrative categories."""
    n, p = len(adm["pat"]), adm["pat"]
    age = pat["age"][p] + (adm["admit"] - pat["first"][p]) / _YEAR
    ed = (adm["atype"] == 0) & (rng.random(n) < 0.85)
    location = np.where(ed, 0, np.where(adm["atype"] == 1, 1, 2))
    frail = pat["frailty"][p] + 0.5 * rng.standard_normal(n)
    goes = np.where(adm["died"], 4, np.digitize(frail, [-0.3, 0.4, 1.1]))
    insurance = np.where(age >= 65, np.where(rng.random(n) < 0.92, 0, 1), rng.choice(3, n, p=[0.55, 0.35, 0.1]) + 1)
    diagnosis = rng.integers(0, len(_ADMIT_DIAGNOSIS), n)
    diagnosis = np.where(adm["amn_dx"], 5, np.where(adm["hf_dx"], 2, diagnosis))
    diagnosis = np.where(adm["shock"], 1, np.where(adm["vent"], 0, diagnosis))
    edreg = adm["admit"] - (rng.uniform(1, 8, n) * _HOUR).astype(np.int64) // 60 * 60
    edout = adm["admit"] + (rng.uniform(0.1, 1, n) * _HOUR).astype(np.int64) // 60 * 60
    cols = dict(subject_id=adm["subject_id"], hadm_id=adm["hadm_id"], admittime=_ts(adm["admit"]),
                dischtime=_ts(adm["disch"]), deathtime=_ts(adm["disch"], missing=~adm["died"]),
                admission_type=_label("admit_type", layout, adm["atype"]),
                admission_location=_vocab(_ADMIT_LOCATION[layout])[location],
                discharge_location=_vocab(_DISCHARGE_LOCATION[layout])[goes],
                insurance=_vocab(("Medicare", "Private", "Medicaid", "Government") if layout == "mimic3"
                                 else ("Medicare", "Other", "Medicaid", "Other"))[insurance],
                language=_label("language", layout, pat["language"][p]),
                marital_status=_label("marital", layout, pat["marital"][p]),
                race=_label("race", layout, pat["race"][p]), edregtime=_ts(edreg, missing=~ed),
                edouttime=_ts(edout, missing=~ed), diagnosis=_vocab(_ADMIT_DIAGNOSIS)[diagnosis],
                hospital_expire_flag=_ids(adm["died"]), has_chartevents_data=_ids(adm["icu"]))
    if layout == "mimic3":
        cols["religion"] = _label("religion", layout, pat["religion"][p])
    else:
        cols["admit_provider_id"] = np.array([f"P{x:05X}" for x in rng.integers(0x10000, 0xFFFFF, n)], dtype=object)
    return n, cols


def _icustays_table(rng, st: dict, layout: str) -> tuple[int, dict]:
    """ICUSTAYS / icu/icustays: unit, times, length of stay in days."""
    n = len(st["adm"])
    moved = rng.random(n) < 0.1
    other = _pick(rng, "careunit", n)
    ward = _WARDS[st["unit"], rng.integers(0, 2, n)]
    return n, dict(subject_id=st["subject_id"], hadm_id=st["hadm_id"], stay_id=st["stay_id"],
                   dbsource=np.where(st["mv"], "metavision", "carevue").astype(object),
                   first_careunit=_label("careunit", layout, st["unit"]),
                   last_careunit=_label("careunit", layout, np.where(moved, other, st["unit"])),
                   first_wardid=_ids(ward), last_wardid=_ids(np.where(moved, _WARDS[other, 0], ward)),
                   intime=_ts(st["intime"]), outtime=_ts(st["outtime"]),
                   los=_num((st["outtime"] - st["intime"]) / _DAY, 4))


def _diagnoses_table(rng, adm: dict, rows, codes, layout: str) -> tuple[int, dict]:
    """DIAGNOSES_ICD / hosp/diagnoses_icd / diagnosis: ~15% of MIMIC-IV and TriNetX admissions are coded in
    ICD-10 only; never a case's history up to its first diagnosis, so an ICD-9 reader keeps every case."""
    n_adm = len(adm["pat"])
    icd10 = np.zeros(n_adm, bool)
    if layout != "mimic3":
        icd10 = (rng.random(n_adm) < 0.23) & ~adm["dx_history"]   # ~15% of all admissions
    ten = icd10[rows]
    codes = codes.copy()
    codes[ten] = [_ICD10_MAP[c] for c in codes[ten]]
    keep, seen = np.ones(len(rows), bool), set()
    for i in np.flatnonzero(ten):                    # two ICD-9 codes may map to one ICD-10 code
        keep[i] = (rows[i], codes[i]) not in seen
        seen.add((rows[i], codes[i]))
    rows, codes, ten = rows[keep], codes[keep], ten[keep]
    seq = group_rank(np.bincount(rows, minlength=n_adm)) + 1
    cols = dict(subject_id=adm["subject_id"][rows], hadm_id=adm["hadm_id"][rows], seq_num=_ids(seq),
                icd_code=codes, icd_version=np.where(ten, "10", "9").astype(object))
    if layout == "trinetx":
        cols.update(code_system=np.where(ten, "ICD-10-CM", "ICD-9-CM").astype(object),
                    code=np.array([_dotted(c, t) for c, t in zip(codes, ten)], dtype=object),
                    principal_diagnosis_indicator=np.where(seq == 1, "Y", "N").astype(object),
                    date=_ts(adm["admit"][rows], "compact"))
    return len(rows), cols


def _prescriptions_table(rng, adm: dict, rows, drugs, layout: str) -> tuple[int, dict]:
    """PRESCRIPTIONS / hosp/prescriptions: one order per (admission, drug), inside the admission."""
    n = len(rows)
    admit, disch = adm["admit"][rows], adm["disch"][rows]
    start = (admit + rng.random(n) * np.maximum(disch - admit - _HOUR, 0)).astype(np.int64) // 60 * 60
    stop = np.minimum(start + (rng.uniform(0.5, 6, n) * _DAY).astype(np.int64), disch)
    cols = {f: _DRUGS[f][drugs] for f in _DRUG_FIELDS}
    cols.update(subject_id=adm["subject_id"][rows], hadm_id=adm["hadm_id"][rows], stay_id="",
                drug_name_poe=np.where(cols["drug_type"] == "MAIN", cols["drug"], ""))
    if layout == "mimic3":
        cols.update(startdate=_ts(start // _DAY * _DAY), enddate=_ts(stop // _DAY * _DAY))
        return n, cols
    seq = group_rank(np.bincount(adm["pat"][rows], minlength=len(adm["pat"]))) + 1
    cols.update(starttime=_ts(start), stoptime=_ts(stop), pharmacy_id=_ids(rng.integers(10**7, 10**8, n)),
                poe_id=np.array([f"{s}-{q}" for s, q in zip(cols["subject_id"], seq)], dtype=object),
                poe_seq=_ids(seq), order_provider_id="", form_rx="",
                doses_per_24_hrs=_ids(rng.choice([1, 2, 3, 4], n, p=[0.5, 0.25, 0.15, 0.1])))
    return n, cols


def _lab_draws(rng, adm: dict, st: dict):
    """Blood draws: one at admission, every morning in hospital, every ~12 h in the first 72 h of each ICU
    stay, and some outpatient ones before admissions (no hadm_id). Returns (time, admission, stay, icu)."""
    n = len(adm["pat"])
    days = ((adm["disch"] - adm["admit"]) // _DAY + 1).astype(int)
    a1 = np.repeat(np.arange(n), days)
    morning = (rng.uniform(4, 6.5, len(a1)) * _HOUR).astype(np.int64)
    t1 = (adm["admit"][a1] // _DAY + group_rank(days) + 1) * _DAY + morning
    inside = t1 < adm["disch"][a1]
    a1, t1 = a1[inside], t1[inside]
    t0 = adm["admit"] + (rng.uniform(0.3, 2, n) * _HOUR).astype(np.int64)
    per_stay = np.ceil(np.minimum(st["los"], 72) / 12).astype(int)
    s2 = np.repeat(np.arange(len(st["adm"])), per_stay)
    t2 = st["intime"][s2] + ((rng.uniform(0.5, 2, len(s2)) + 12 * group_rank(per_stay)) * _HOUR).astype(np.int64)
    s2, t2 = s2[t2 < st["outtime"][s2]], t2[t2 < st["outtime"][s2]]
    a3 = np.flatnonzero(rng.random(n) < 0.35)
    t3 = adm["admit"][a3] - (rng.uniform(5, 60, len(a3)) * _DAY).astype(np.int64)
    time = np.concatenate([t0, t1, t2, t3]) // 60 * 60
    a = np.concatenate([np.arange(n), a1, st["adm"][s2], a3])
    stay = np.concatenate([np.full(n + len(a1), -1), s2, np.full(len(a3), -1)])
    outpatient = np.concatenate([np.zeros(n + len(a1) + len(s2), bool), np.ones(len(a3), bool)])
    for j in (0, 1):        # morning draws during an ICU stay show that stay's acuity too
        of_adm = np.full(n, -1)
        of_adm[st["adm"][st["j"] == j]] = np.flatnonzero(st["j"] == j)
        cand = np.where(outpatient | (stay >= 0), -1, of_adm[a])
        inside = (_gather(st["intime"], cand) <= time) & (time < _gather(st["outtime"], cand))
        stay[inside] = cand[inside]
    return time, a, stay, outpatient


def _labs_table(rng, pat: dict, adm: dict, st: dict, layout: str) -> tuple[int, dict]:
    """LABEVENTS / hosp/labevents: panels whose values follow chronic disease and the stay's acuity."""
    time, a, stay, outpatient = _lab_draws(rng, adm, st)
    d = len(time)
    in_icu = stay >= 0
    w = np.where(in_icu, _ramp((time - _gather(st["intime"], stay)) / _HOUR), 0.6)
    acute = np.where(outpatient, 0, 0.4 * adm["acute"][a])
    circ = np.where(in_icu, _gather(st["circ"], stay), acute)
    sev = np.where(in_icu, _gather(st["sev"], stay), acute)
    x = np.column_stack([pat["chronic"][adm["pat"][a]], w * circ, w * sev])
    lactate_p = np.where(in_icu, 0.6 + 0.3 * (circ > 0.5), 0.05)
    p = np.column_stack([lactate_p] + [np.full(d, 0.92)] * (len(_LABS) - 1))
    r, lab = np.nonzero(rng.random((d, len(_LABS))) < p)
    shift = (x[r] * _LAB["effect"][lab]).sum(1) + _LAB["sd"][lab] * rng.standard_normal(len(r))
    centre = _LAB["centre"][lab]
    value = np.where(_LAB["log"][lab], centre * np.exp(shift), centre + shift)
    value = np.clip(value, 0.1 * centre, 8 * centre)
    text = np.empty(len(r), dtype=object)
    for decimals in (0, 1):
        m = _LAB["dec"][lab] == decimals
        text[m] = _num(value[m], decimals)
    lo, hi = _LAB["lo"][lab], _LAB["hi"][lab]
    flag = np.where((value < lo) | (value > hi), "abnormal", "").astype(object)
    ar = a[r]
    cols = dict(subject_id=adm["subject_id"][ar], hadm_id=np.where(outpatient[r], "", adm["hadm_id"][ar]),
                itemid=_ids(_LAB["item"][lab]), charttime=_ts(time[r]), value=text, valuenum=text,
                valueuom=_LAB["unit"][lab], flag=flag)
    if layout == "mimic4":
        specimen = rng.integers(10**7, 10**8, d)
        cols.update(specimen_id=_ids(specimen[r]), order_provider_id="", comments="",
                    storetime=_ts(time[r] + rng.integers(20, 120, len(r)) * 60),
                    ref_range_lower=_num(lo, 1), ref_range_upper=_num(hi, 1),
                    priority=np.where(in_icu[r], "STAT", "ROUTINE").astype(object))
    return len(r), cols


# ---------------------------------------------------------------------------------------------- ICU tables
def _grid(st: dict):
    """Whole clock hours inside each stay: (stay index, epoch seconds, hours since intime, hour number)."""
    first = (st["intime"] // _HOUR + 1) * _HOUR
    count = np.maximum(0, -(-(st["outtime"] - first) // _HOUR))
    s = np.repeat(np.arange(len(first)), count)
    t = first[s] + group_rank(count) * _HOUR
    return s, t, (t - st["intime"][s]) / _HOUR, group_rank(count)


def _chart_rows(rng, st: dict, scale: float):
    """Which (grid hour, variable) pairs are charted: vitals each round (hourly for 72 h, then every 4 h),
    others every 4th round, PEEP only while ventilated; `scale` adds rows at random minutes of the hour."""
    s, t, h, k = _grid(st)
    mv = st["mv"][s]
    rounds = (h < 72) | (k % 4 == 0)
    four = rounds & (k % 4 == 0)
    masks = [np.where(hourly, rounds, four) for hourly in _VIT["hourly"]]
    masks[_V["fio2"]] = four & mv
    masks[_V["abpm"]] = rounds & mv & _on(h, st["art_on"][s])
    masks[_V["peep"]] = rounds & mv & _on(h, st["vent_on"][s], st["vent_off"][s])
    masks[_V["weight"]] = rounds & mv & (k % 24 == 0)
    masks += [four & mv] * 5 + [rounds & mv & (k % 12 == 0)] * 2        # _TEXT_ITEMS
    g = np.concatenate([np.flatnonzero(m) for m in masks])
    var = np.repeat(np.arange(len(masks)), [np.count_nonzero(m) for m in masks])
    if scale < 1:
        keep = rng.random(len(g)) < scale
        g, var = g[keep], var[keep]
    reps = np.ones(len(g), dtype=np.int64)
    if scale > 1:
        reps += int(scale - 1) + (rng.random(len(g)) < (scale - 1) % 1)
    g, var = np.repeat(g, reps), np.repeat(var, reps)
    extra = group_rank(reps) > 0
    room = np.minimum(3540, st["outtime"][s[g]] - t[g] - 1)      # seconds left in the hour and the stay
    minute = np.where(~extra & (rng.random(len(g)) < 0.7), 0, rng.random(len(g)) * room) // 60 * 60
    when = t[g] + minute.astype(np.int64)
    order = np.lexsort((var, when, s[g]))
    return s[g][order], var[order], when[order]


def _chart_values(rng, st: dict, s, var, when):
    """value / valuenum / unit text of chart rows; numeric vitals drift with the stay latents over 48 h."""
    n, nv = len(s), len(_VITALS)
    hours = (when - st["intime"][s]) / _HOUR
    ramp = _ramp(hours)
    vent = _on(hours, st["vent_on"][s], st["vent_off"][s])
    v = np.minimum(var, nv - 1)
    offsets = rng.standard_normal((len(st["adm"]), nv)) * _VIT["sd_stay"]
    num = (_VIT["mean"][v] + offsets[s, v] + ramp * (st["lat"][s] * _VIT["effect"][v]).sum(1)
           + _VIT["sd_row"][v] * rng.standard_normal(n) + 12 * (vent & (var == _V["fio2"])))
    num = np.where(var == _V["weight"], st["weight"][s] + 0.5 * rng.standard_normal(n), num)
    num = np.clip(num, _VIT["lo"][v], _VIT["hi"][v])
    # consciousness: worse with acuity, dementia and sedation on the ventilator
    cons = -1.2 * st["sev"][s] * ramp - 0.3 * st["cog"][s] - 1.5 * vent + 0.6 * rng.standard_normal(n)
    value, valuenum = np.empty(n, dtype=object), np.empty(n, dtype=object)
    for i in range(nv):
        m = var == i
        value[m] = valuenum[m] = _num(num[m], int(_VIT["dec"][i]))
    for i, (item, words) in enumerate(_GCS.items()):
        m = var == nv + i
        level = np.clip(np.round(len(words) - 0.3 + (1 + 0.2 * i) * cons[m]), 1, len(words)).astype(int)
        text = _vocab(words)[level - 1]
        if item == 223900:
            level, text = np.where(vent[m], 1, level), np.where(vent[m], "No Response-ETT", text)
        value[m], valuenum[m] = text, _ids(level)
    m = var == nv + 3                                          # RASS: sedation with acuity, some agitation
    level = np.clip(np.round(0.9 * np.minimum(cons[m], 0.4) - vent[m]), -5, 0).astype(int)
    level = np.where((rng.random(m.sum()) < 0.1) & ~vent[m], rng.integers(1, 3, m.sum()), level)
    value[m], valuenum[m] = _RASS[level + 5], _ids(level)
    m = var == nv + 4                                                          # alarms on (a checkbox)
    value[m] = valuenum[m] = np.where(rng.random(m.sum()) < 0.97, "1", "0").astype(object)
    for i, words in ((5, _SAFETY), (6, _ORAL)):
        m = var == nv + i
        value[m], valuenum[m] = words[rng.integers(0, len(words), m.sum())], ""
    return value, valuenum


def _chart_table(rng, st: dict, scale: float) -> tuple[int, dict]:
    """CHARTEVENTS / icu/chartevents of a batch of stays (MetaVision or CareVue itemids per stay)."""
    s, var, when = _chart_rows(rng, st, scale)
    value, valuenum = _chart_values(rng, st, s, var, when)
    n, mv = len(s), st["mv"][s]
    text_item = np.array(_TEXT_ITEMS)
    item_mv = np.concatenate([_VIT["mv"], text_item])
    item_cv = np.concatenate([_VIT["cv"], text_item])
    unit_mv = np.concatenate([_VIT["mv_unit"], np.full(len(text_item), "", dtype=object)])
    unit_cv = np.concatenate([_VIT["cv_unit"], np.full(len(text_item), "", dtype=object)])
    return n, dict(subject_id=st["subject_id"][s], hadm_id=st["hadm_id"][s], stay_id=st["stay_id"][s],
                   itemid=_ids(np.where(mv, item_mv[var], item_cv[var])), charttime=_ts(when),
                   storetime=_ts(when + rng.integers(1, 50, n) * 60),
                   cgid=_ids(st["cg"][s, rng.integers(0, 3, n)]), value=value, valuenum=valuenum,
                   valueuom=np.where(mv, unit_mv[var], unit_cv[var]),
                   warning=np.where(mv, "0", "").astype(object), error=np.where(mv, "0", "").astype(object),
                   resultstatus="", stopped=np.where(mv, "", "NotStopd").astype(object))


def _outputs_table(rng, st: dict) -> tuple[int, dict]:
    """OUTPUTEVENTS: urine every 2 h by Foley (or every 4 h voided), less with circulatory failure."""
    s, t, h, k = _grid(st)
    void = (rng.random(len(st["adm"])) < 0.15) & st["mv"]
    keep = np.where(void[s], k % 4 == 0, k % 2 == 0)
    s, t, h = s[keep], t[keep], h[keep]
    hours = np.where(void[s], 4, 2)
    ramp = _ramp(h)
    ml = hours * 55 * np.exp(-0.35 * st["circ"][s] * ramp - 0.2 * st["sev"][s] * ramp
                             + 0.35 * rng.standard_normal(len(s)))
    mv = st["mv"][s]
    item = np.where(mv, np.where(void[s], 226560, 226559), 40055)
    n = len(s)
    return n, dict(subject_id=st["subject_id"][s], hadm_id=st["hadm_id"][s], stay_id=st["stay_id"][s],
                   charttime=_ts(t), itemid=_ids(item), value=_num(ml),
                   valueuom=np.where(mv, "mL", "ml").astype(object),
                   storetime=_ts(t + rng.integers(5, 90, n) * 60), cgid=_ids(st["cg"][s, rng.integers(0, 3, n)]),
                   stopped="", newbottle="", iserror="")


def _segments(stay, start, end, length):
    """Consecutive segments of about `length` hours covering each episode [start, end) (hours)."""
    count = np.maximum(1, np.ceil((end - start) / length)).astype(int)
    e = np.repeat(np.arange(len(stay)), count)
    i = group_rank(count)
    size = ((end - start) / count)[e]
    return stay[e], start[e] + i * size, start[e] + (i + 1) * size, i == count[e] - 1, e


def _episodes(rng, st: dict):
    """Infusion episodes of MetaVision stays as (kind, stay, start h, end h, segment length h)."""
    n, los = len(st["adm"]), st["los"]
    mv = np.flatnonzero(st["mv"])
    out = [("nacl", mv, rng.uniform(0.5, 3, len(mv)), np.maximum(0.9 * los[mv], 4), 12.0)]
    boluses = rng.poisson(0.3 + 1.2 * np.maximum(st["circ"], 0)) * st["mv"]   # fluid challenges, first 48 h
    b = np.repeat(np.arange(n), boluses)
    start = rng.random(len(b)) * np.maximum(np.minimum(los[b], 48) - 0.5, 0.1)
    out.append(("bolus", b, start, start + 0.5, 1.0))
    d = mv[rng.random(len(mv)) < 0.25]
    start = rng.random(len(d)) * (los[d] - 0.6)
    out.append(("dextrose", d, start, start + 0.5, 1.0))
    v = np.flatnonzero(st["mv"] & ~np.isnan(st["vent_on"]) & ~st["vent_niv"])
    out.append(("propofol", v, st["vent_on"][v], st["vent_off"][v], 6.0))
    p = np.flatnonzero(st["mv"] & ~np.isnan(st["press_on"]))
    for i, kind in enumerate(_PRESSORS):   # the shock onset: first start of any of the five vasopressors
        q = p[st["pressor"][p] == i]
        out.append((kind, q, st["press_on"][q], st["press_off"][q], 4.0))
    q = p[st["second"][p] & (st["pressor"][p] != 2)]
    start = st["press_on"][q] + rng.uniform(1, 6, len(q))
    q, start = q[start < st["press_off"][q]], start[start < st["press_off"][q]]
    out.append(("vasopressin", q, start, st["press_off"][q], 4.0))
    return out


def _inputs_table(rng, st: dict) -> tuple[int, dict]:
    """INPUTEVENTS_MV / icu/inputevents: fluids, propofol while ventilated, vasopressors during shock."""
    parts = []
    for kind, stay, start, end, length in _episodes(rng, st):
        s, a, b, last, e = _segments(stay, start, end, length)
        lo, hi = _INPUTS[kind][7]
        parts.append((np.full(len(s), list(_INPUTS).index(kind)), s, a, b, last, e + len(parts) * 10**6,
                      rng.uniform(lo, hi, len(s))))
    kind, s, a, b, last, episode, rate = (np.concatenate(c) for c in zip(*parts))
    intime = st["intime"][s]
    start = (intime + a * _HOUR).astype(np.int64) // 60 * 60
    end = np.maximum((intime + b * _HOUR).astype(np.int64) // 60 * 60, start + 60)
    meta = list(zip(*_INPUTS.values()))
    item, amount_unit, rate_unit, category, secondary, description, bag = (np.array(c, dtype=object) for c in meta[:7])
    minutes = (end - start) / 60
    weight = st["weight"][s]
    per_kg = rate_unit[kind] == "mcg/kg/min"
    amount = np.where(per_kg, rate * weight * minutes / 1000, rate * minutes / 60)
    order = rng.integers(10**5, 10**7, len(s))
    _, first = np.unique(episode, return_index=True)
    link = order[first][np.unique(episode, return_inverse=True)[1]]
    status = np.where(last, np.where(rng.random(len(s)) < 0.8, "FinishedRunning", "Stopped"), "Changed")
    amount_text, rate_text = _num(amount, 4), _num(rate, 4)
    n = len(s)
    return n, dict(subject_id=st["subject_id"][s], hadm_id=st["hadm_id"][s], stay_id=st["stay_id"][s],
                   starttime=_ts(start), endtime=_ts(end), itemid=_ids(item[kind]), amount=amount_text,
                   amountuom=amount_unit[kind], rate=rate_text, rateuom=rate_unit[kind],
                   storetime=_ts(start + rng.integers(0, 30, n) * 60), cgid=_ids(st["cg"][s, rng.integers(0, 3, n)]),
                   orderid=_ids(order), linkorderid=_ids(link), ordercategoryname=category[kind],
                   secondaryordercategoryname=secondary[kind], ordercomponenttypedescription="Main order parameter",
                   ordercategorydescription=description[kind], patientweight=_num(weight, 1),
                   totalamount=_ids(bag[kind]), totalamountuom="ml", isopenbag="0", continueinnextdept="0",
                   cancelreason="0", statusdescription=status.astype(object), comments_editedby="",
                   comments_canceledby="", comments_date="", originalamount=amount_text, originalrate=rate_text)


def _procedures_table(rng, st: dict) -> tuple[int, dict]:
    """PROCEDUREEVENTS_MV / icu/procedureevents: ventilation (the ARF onset), arterial and central lines."""
    mv = st["mv"]
    v = np.flatnonzero(mv & ~np.isnan(st["vent_on"]))
    a = np.flatnonzero(mv & ~np.isnan(st["art_on"]))
    c = np.flatnonzero(mv & ~np.isnan(st["cvl_on"]))
    s = np.concatenate([v, a, c])
    kind = np.repeat([0, 1, 2], [len(v), len(a), len(c)])
    start_h = np.concatenate([st["vent_on"][v], st["art_on"][a], st["cvl_on"][c]])
    end_h = np.concatenate([st["vent_off"][v], _ends(rng, st["art_on"][a], st["los"][a], 72),
                            _ends(rng, st["cvl_on"][c], st["los"][c], 96)])
    item = np.where(kind == 0, np.where(st["vent_niv"][s], 225794, 225792), np.where(kind == 1, 225752, 224263))
    start = (st["intime"][s] + start_h * _HOUR).astype(np.int64) // 60 * 60
    end = np.maximum((st["intime"][s] + end_h * _HOUR).astype(np.int64) // 60 * 60, start + 60)
    site = np.array(["", "Left Radial", "Right Radial", "Right Femoral.", "Right IJ", "Left Subclavian"], dtype=object)
    where = np.where(kind == 0, 0, np.where(kind == 1, rng.integers(1, 4, len(s)), rng.integers(4, 6, len(s))))
    n = len(s)
    order = _ids(rng.integers(10**5, 10**7, n))
    return n, dict(subject_id=st["subject_id"][s], hadm_id=st["hadm_id"][s], stay_id=st["stay_id"][s],
                   starttime=_ts(start), endtime=_ts(end), itemid=_ids(item), value=_ids((end - start) // 60),
                   valueuom="min", location=site[where],
                   locationcategory=np.array(["", "Invasive Arterial", "Invasive Venous"], dtype=object)[kind],
                   storetime=_ts(end + rng.integers(5, 60, n) * 60), cgid=_ids(st["cg"][s, rng.integers(0, 3, n)]),
                   orderid=order, linkorderid=order,
                   ordercategoryname=np.where(kind == 0, "Ventilation", "Invasive Lines").astype(object),
                   secondaryordercategoryname="", ordercategorydescription="Task",
                   patientweight=_num(st["weight"][s], 1),
                   isopenbag="1", continueinnextdept="0", cancelreason="0", statusdescription="FinishedRunning",
                   comments_editedby="", comments_canceledby="", comments_date="",
                   originalamount=_ids((end - start) // 60), originalrate="")


def _datetimes_table(rng, st: dict) -> tuple[int, dict]:
    """DATETIMEEVENTS: IV insertion date every 12 h, arterial line tubing change daily (value = a time)."""
    s, t, h, k = _grid(st)
    piv = (rng.random(len(st["adm"])) < 0.6) & st["mv"]
    inserted = (st["intime"] - rng.uniform(0, 2, len(st["adm"])) * _DAY).astype(np.int64) // _DAY * _DAY
    art_start = (st["intime"] + np.nan_to_num(st["art_on"]) * _HOUR).astype(np.int64) // 60 * 60
    a = (k % 12 == 0) & piv[s]
    b = (k % 24 == 0) & st["mv"][s] & _on(h, st["art_on"][s])
    rows = np.concatenate([np.flatnonzero(a), np.flatnonzero(b)])
    item = np.repeat([225754, 224290], [a.sum(), b.sum()])
    s, t = s[rows], t[rows]
    n = len(s)
    return n, dict(subject_id=st["subject_id"][s], hadm_id=st["hadm_id"][s], stay_id=st["stay_id"][s],
                   itemid=_ids(item), charttime=_ts(t), storetime=_ts(t + rng.integers(1, 40, n) * 60),
                   cgid=_ids(st["cg"][s, rng.integers(0, 3, n)]),
                   value=_ts(np.where(item == 225754, inserted[s], art_start[s])), valueuom="Date",
                   warning="0", error="0", resultstatus="", stopped="")


# --------------------------------------------------------------------------------------------------- notes
_HOME = ("Lives with spouse, who is very involved; good family support.",
         "Lives with daughter. Retired; independent in ADLs.",
         "Lives alone; a neighbour checks in weekly.")
_NONCOMPLIANT = " Noncompliant with medications and missed several follow-up appointments."
_COURSE = {  # admission feature -> hospital-course sentence
    "vent": "Intubated for hypoxemic respiratory failure and managed on the ventilator in the ICU.",
    "shock": "Developed septic shock requiring norepinephrine; lactate peaked at 6.1.",
    "hf_dx": "Diuresed with IV furosemide for acute on chronic systolic heart failure (EF 25%).",
    "copd_dx": "Treated for a COPD exacerbation with nebulizers, prednisone and azithromycin.",
    "amn_dx": "Noted to have significant short-term memory deficits; neurology consulted, MMSE 19/30.",
}


def _discharge_text(f: dict, mark) -> str:
    """One discharge summary in the MIMIC style; `mark` renders a de-identified date or name."""
    history = ", ".join(f["history"]) or "no significant past medical history"
    course = " ".join(f["course"]) or "The patient remained hemodynamically stable throughout the admission."
    if f["died"]:
        course += (" Despite maximal therapy the patient's condition continued to decline. After a family meeting"
                   " the goals of care were changed to comfort measures only given the poor prognosis. The"
                   f" patient expired on {mark(f['disch'])}.")
        condition, disposition = "Deceased.", "Expired"
    else:
        condition = ("Mental Status: Clear and coherent. Level of Consciousness: Alert and interactive. Activity "
                     "Status: Ambulatory - Independent. Stable, ambulating, tolerating a regular diet."
                     if f["frail"] < 0.5 else "Mental Status: Confused - sometimes. Activity Status: Out of Bed "
                     "with assistance to chair or wheelchair. Hemodynamically stable.")
        disposition = "Home" if f["frail"] < 0.5 else "Extended Care"
    meds = "\n".join(f"{i + 1}. {m}" for i, m in enumerate(f["meds"][:8])) or "None."
    return (f"Admission Date:  {mark(f['admit'])}              Discharge Date:   {mark(f['disch'])}\n\n"
            f"Date of Birth:  {mark(f['dob'])}             Sex:   {f['sex']}\n\nService: {f['service']}\n\n"
            f"Chief Complaint:\n{f['complaint']}\n\nHistory of Present Illness:\n{f['age']} y/o {f['person']} "
            f"with a history of {history} who presents with {f['complaint'].lower()}. {f['prior']}\n\n"
            f"Social History:\n{f['social']}\n\nBrief Hospital Course:\n{course}\n\n"
            f"Discharge Medications:\n{meds}\n\nDischarge Disposition:\n{disposition}\n\n"
            f"Discharge Condition:\n{condition}\n\nFollowup Instructions:\nFollow up with your PCP "
            f"{mark('name')} within 1 week. Please call if you have \"chest pain, shortness of breath\" or fever.\n")


def _note_features(rng, pat: dict, adm: dict, has: dict, drug_rows, drugs) -> list[dict]:
    """Per-admission facts a discharge summary mentions (history, course, social situation, drugs)."""
    n, p = len(adm["pat"]), adm["pat"]
    meds = [[] for _ in range(n)]
    for r, d, kind in zip(drug_rows.tolist(), _DRUGS["drug"][drugs].tolist(), _DRUGS["drug_type"][drugs]):
        if kind == "MAIN":                                   # no IV base solutions on a discharge list
            meds[r].append(d.strip('"'))
    home = np.where(adm["alone"], 2, rng.integers(0, 2, n))
    frail = pat["frailty"][p] + 0.5 * rng.standard_normal(n)
    history = {code: has[code] for code in _CODE_WORDS}
    history.update({"4280": adm["hf_dx"], "496": adm["copd_dx"], "78093": adm["amn_dx"]})
    complaints = np.array(["Chest pain", "Abdominal pain", "Fall at home", "Weakness", "Fever", "Melena"])
    complaint = complaints[rng.integers(0, len(complaints), n)]
    complaint = np.where(adm["hf_dx"], "Dyspnea on exertion and leg swelling", complaint)
    complaint = np.where(adm["copd_dx"], "Cough and wheezing", np.where(adm["amn_dx"], "Confusion", complaint))
    complaint = np.where(adm["vent"], "Shortness of breath", np.where(adm["shock"], "Hypotension", complaint))
    k, gap = adm["k"], (adm["admit"] - np.roll(adm["disch"], 1)) / _DAY
    age = pat["age"][p] + (adm["admit"] - pat["first"][p]) / _YEAR
    dob = pat["first"][p] - (age * _YEAR).astype(np.int64)
    out = []
    for i in range(n):
        out.append(dict(
            admit=adm["admit"][i], disch=adm["disch"][i], dob=dob[i], died=adm["died"][i], frail=frail[i],
            sex="M" if pat["male"][p[i]] else "F", person="man" if pat["male"][p[i]] else "woman",
            age=min(int(age[i]), 91), complaint=str(complaint[i]), meds=meds[i],
            social=_HOME[home[i]] + (_NONCOMPLIANT if adm["noncompliant"][i] else ""),
            service="CARDIOLOGY" if adm["hf_dx"][i] else "MEDICINE",
            history=[w for code, w in _CODE_WORDS.items() if history[code][i]],
            course=[s for key, s in _COURSE.items() if adm[key][i]],
            prior=(f"Last discharged from this hospital {gap[i]:.0f} days ago; this is admission number {k[i] + 1}."
                   if k[i] else "First admission to this hospital.")))
    return out


def _mimic_date(t) -> str:
    """A date the MIMIC-III way, '[**2150-1-7**]', or (for 'name') a de-identified name."""
    if isinstance(t, str):
        return "Dr. [**Last Name (STitle) 1234**]"
    d = datetime(1970, 1, 1) + timedelta(seconds=int(t))
    return f"[**{d.year}-{d.month}-{d.day}**]"


def _discharge_table(rng, pat: dict, adm: dict, has: dict, drug_rows, drugs, layout: str) -> tuple[int, dict]:
    """Discharge summaries (~90% of admissions; date-only, charted at discharge)."""
    feats = _note_features(rng, pat, adm, has, drug_rows, drugs)
    pick = np.flatnonzero(rng.random(len(feats)) < 0.9)
    mark = _mimic_date if layout == "mimic3" else (lambda t: "___")
    text = np.array([_quote(_discharge_text(feats[i], mark)) for i in pick], dtype=object)
    n, disch = len(pick), adm["disch"][pick]
    cols = dict(subject_id=adm["subject_id"][pick], hadm_id=adm["hadm_id"][pick], text=text)
    if layout == "mimic3":
        cols.update(chartdate=_ts(disch, "date"), charttime="", storetime="", category="Discharge summary",
                    description="Report", cgid="", iserror="")
    else:
        seq = adm["k"][pick] + 1
        cols.update(note_id=np.array([f"{s}-DS-{q}" for s, q in zip(cols["subject_id"], seq)], dtype=object),
                    note_type="DS", note_seq=_ids(seq), charttime=_ts(disch // _DAY * _DAY),
                    storetime=_ts(disch + rng.integers(2, 48, n) * _HOUR))
    return n, cols


_NURSING = {  # section -> phrases from better to worse
    "Neuro": ("Alert and oriented x3, follows commands, MAE.", "Lethargic but arousable, oriented x1, "
              "intermittently confused.", "Unresponsive to voice, withdraws to pain only."),
    "Resp": ("Lungs clear bilaterally, SpO2 96% on 2L NC.", "Coarse breath sounds, increasing O2 requirement, "
             "now on 4L NC with SpO2 92%.", "Tachypneic to the 30s, using accessory muscles, placed on 50% face "
             "tent; RT aware, ABG pending."),
    "CV": ("HR 80s NSR, BP stable.", "Soft BP, SBP 90s, 500cc NS bolus given with fair response.",
           "Hypotensive to SBP 80s, MAP 50s, lactate rising; team aware, discussing pressors."),
    "Social": ("Family called and updated.", "Family in to visit, updated by team; remains full code.",
               "Family meeting held, poor prognosis discussed; family considering comfort measures."),
}


def _stay_note_times(rng, st: dict):
    """Nursing notes / chest films: one ~6 h after intime, then every ~12 h (at most four) within the stay."""
    count = np.minimum(4, 1 + (st["los"] // 12).astype(int))
    s = np.repeat(np.arange(len(st["adm"])), count)
    hours = rng.uniform(3, 9, len(s)) + 12 * group_rank(count)
    keep = hours < st["los"][s] - 0.1
    return s[keep], hours[keep]


def _nursing_table(rng, st: dict) -> tuple[int, dict]:
    """NOTEEVENTS 'Nursing/other' notes charted inside ICU stays; each section follows a stay latent."""
    s, hours = _stay_note_times(rng, st)
    n, ramp = len(s), _ramp(hours)
    vent = _on(hours, st["vent_on"][s], st["vent_off"][s])
    press = _on(hours, st["press_on"][s], st["press_off"][s])
    level = {sec: np.digitize(st[key][s] * ramp + 0.4 * rng.standard_normal(n), [0.3, 1.0])
             for sec, key in (("Neuro", "sev"), ("Resp", "resp"), ("CV", "circ"))}
    level["Social"] = np.digitize(st["sev"][s] * ramp + 0.4 * rng.standard_normal(n), [0.5, 1.3])
    texts = []
    for i in range(n):
        lines = [f"{sec}: {_NURSING[sec][level[sec][i]]}" for sec in _NURSING]
        if vent[i]:
            lines[0], lines[1] = "Neuro: Sedated on propofol, RASS -3.", "Resp: Intubated, AC 500x14, PEEP 8, FiO2 50%."
        if press[i]:
            lines[2] = "CV: On norepinephrine gtt, titrating to MAP > 65."
        texts.append(_quote("Nursing Progress Note 7a-7p\n" + "\n".join(lines) + "\nPlan: Continue to monitor."))
    when = (st["intime"][s] + hours * _HOUR).astype(np.int64) // 60 * 60
    return n, dict(subject_id=st["subject_id"][s], hadm_id=st["hadm_id"][s], chartdate=_ts(when, "date"),
                   charttime=_ts(when), storetime=_ts(when + rng.integers(10, 120, n) * 60),
                   category="Nursing/other", description="Report", cgid=_ids(st["cg"][s, 0]),
                   iserror=np.where(rng.random(n) < 0.01, "1", "").astype(object), text=np.array(texts, dtype=object))


def _radiology_table(rng, st: dict) -> tuple[int, dict]:
    """note/radiology (MIMIC-IV-Note): portable chest films inside ICU stays, following resp and cardiac."""
    s, hours = _stay_note_times(rng, st)
    n = len(s)
    lungs = np.digitize(st["resp"][s] * _ramp(hours) + 0.4 * rng.standard_normal(n), [0.3, 1.0])
    big_heart = st["circ"][s] + 0.5 * rng.standard_normal(n) > 0.8
    findings = ("Lungs are clear. No pleural effusion or pneumothorax.",
                "Patchy bibasilar opacities, likely atelectasis; small left effusion.",
                "New diffuse bilateral airspace opacities, concerning for pulmonary edema or ARDS.")
    texts = np.array([_quote(f"EXAMINATION:  CHEST (PORTABLE AP)\n\nINDICATION:  ___ with hypoxia, eval.\n\n"
                             f"FINDINGS: \n\n{findings[lv]} {'Moderate cardiomegaly.' if h else 'Heart size normal.'}"
                             f"\n\nIMPRESSION: \n\n{findings[lv].split(',')[0].split(';')[0]}.\n")
                      for lv, h in zip(lungs, big_heart)], dtype=object)
    when = (st["intime"][s] + hours * _HOUR).astype(np.int64) // 60 * 60
    seq = group_rank(np.bincount(s, minlength=len(st["adm"]))) + 1
    return n, dict(note_id=np.array([f"{a}-RR-{b}" for a, b in zip(st["stay_id"][s], seq)], dtype=object),
                   subject_id=st["subject_id"][s], hadm_id=st["hadm_id"][s], note_type="RR", note_seq=_ids(seq),
                   charttime=_ts(when), storetime=_ts(when + rng.integers(20, 180, n) * 60), text=texts)


# ----------------------------------------------------------------------------------------------- writing
def _write_chunk(sink: _Sink, rng, pat: dict, adm: dict, st: dict, cfg: SynthConfig) -> None:
    """Generate every table of one chunk of patients and append it to the open files."""
    layout = cfg.layout
    rows, codes, has = _codes(rng, pat, adm)
    if layout == "trinetx":
        sink.write("patient", *_patients_table(rng, pat, adm, layout))
        sink.write("diagnosis", *_diagnoses_table(rng, adm, rows, codes, layout))
        return
    drug_rows, drugs = _drugs(rng, pat, adm, has)
    sink.write("patients", *_patients_table(rng, pat, adm, layout))
    sink.write("admissions", *_admissions_table(rng, pat, adm, layout))
    sink.write("icustays", *_icustays_table(rng, st, layout))
    sink.write("diagnoses", *_diagnoses_table(rng, adm, rows, codes, layout))
    sink.write("prescriptions", *_prescriptions_table(rng, adm, drug_rows, drugs, layout))
    sink.write("labevents", *_labs_table(rng, pat, adm, st, layout))
    sink.write("outputevents", *_outputs_table(rng, st))
    sink.write("inputevents", *_inputs_table(rng, st))
    sink.write("procedureevents", *_procedures_table(rng, st))
    sink.write("datetimeevents", *_datetimes_table(rng, st))
    if layout == "mimic3":
        sink.write("notes", *_discharge_table(rng, pat, adm, has, drug_rows, drugs, layout))
        sink.write("notes", *_nursing_table(rng, st))
    else:
        sink.write("discharge", *_discharge_table(rng, pat, adm, has, drug_rows, drugs, layout))
        sink.write("radiology", *_radiology_table(rng, st))
    batch = max(10, int(_STAY_BATCH / max(cfg.event_scale, 1.0)))
    for lo in range(0, len(st["adm"]), batch):   # chart rows are most of the extract: build them in batches
        sink.write("chartevents", *_chart_table(rng, {k: v[lo:lo + batch] for k, v in st.items()}, cfg.event_scale))


def _check(cfg: SynthConfig) -> None:
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {cfg.layout!r}")
    if cfg.patients < 1:
        raise ValueError(f"patients must be at least 1, not {cfg.patients}")
    if not cfg.event_scale > 0:
        raise ValueError(f"event_scale must be positive, not {cfg.event_scale}")
    out = Path(cfg.out)
    if out.exists() and not _replaceable(out):
        raise InputError(f"{out} exists and is not a CSV extract (only .csv[.gz] files, hosp/ icu/ note/); "
                         "remove it or choose another --out")


def _replaceable(folder: Path) -> bool:
    """Whether an existing output folder holds nothing but an extract, so replacing it loses nothing else."""
    if not folder.is_dir() or folder.resolve() == Path.cwd().resolve():
        return False
    for p in folder.iterdir():
        if p.is_dir() and not (p.name.lower() in ("hosp", "icu", "note") and _replaceable(p)):
            return False
        if p.is_file() and not p.name.lower().endswith((".csv", ".csv.gz")):
            return False
    return True


def synthesize(cfg: SynthConfig) -> dict:
    """Write a synthetic extract to `cfg.out` and return {"tables": {name: rows}, "patients", "admissions",
    "stays", "out"}. Nothing half-written is ever left at `cfg.out`."""
    _check(cfg)
    rep = Reporter(quiet=cfg.quiet)
    ids = dict(zip(("subject", "hadm", "stay"), _FIRST_IDS[cfg.layout]))
    totals = dict(patients=0, admissions=0, stays=0)
    with Staged(cfg.out, "--out", log=rep.log) as stage:    # written whole under a staging name, then swapped in
        out = stage.out
        rep.log(f"synth: {cfg.patients:,} patients, {cfg.layout} layout, seed {cfg.seed}, "
                f"event scale {cfg.event_scale:g} -> {out}")
        sink = _Sink(stage.tmp, cfg.layout)
        try:
            with rep.task("synth patients", total=cfg.patients, unit="patients") as advance:
                for chunk, start in enumerate(range(0, cfg.patients, _CHUNK)):
                    n = min(_CHUNK, cfg.patients - start)
                    rng = np.random.default_rng([cfg.seed & (2**63 - 1), chunk])
                    pat, adm, st = _cohort(rng, n, ids, cfg.layout)
                    _write_chunk(sink, rng, pat, adm, st, cfg)
                    totals["patients"] += n
                    totals["admissions"] += len(adm["pat"])
                    totals["stays"] += len(st["adm"]) if cfg.layout != "trinetx" else 0
                    advance(n, status=f"{sum(sink.rows.values()):,} rows")
        finally:
            sink.close()
        stage.commit()
    tables = {_SCHEMAS[cfg.layout][t][0]: rows for t, rows in sink.rows.items()}
    rep.log(f"synth: wrote {out} ({', '.join(f'{name} {rows:,}' for name, rows in tables.items())})")
    return dict(tables=tables, out=str(out), **totals)
