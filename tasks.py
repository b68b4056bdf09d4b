"""Tasks: the registry of the downstream tasks, the only list of their names.

Usage: `from tasks import TASKS`; `TASKS["arf"].level` -> "stay"; `names_at("patient")` -> ("hf",
"copd", "amnesia"). Each entry says at which level the task is fine-tuned (stay, admission or
patient: which encoder and dataset it uses), what it predicts, and what defines it in the raw data:
the MetaVision items whose first event marks an onset (ARF, shock) or the ICD-9 and ICD-10-CM code
groups of a diagnosis (the patient-level tasks; a case diagnosed in either system is found).
Preprocessing builds the cohorts and labels from it (preprocessing/extract.py,
preprocessing/cohorts.py), evaluation fine-tunes on it (evaluate.py), and the synthetic generator
can plant its signal with it. A module of its own that imports nothing, so that every one of them,
the generator included, can share it without pulling in torch.
"""
from dataclasses import dataclass

# The ICD systems a diagnosis table may use and the prefix that namespaces their codes in a
# vocabulary, so that an ICD-9 and an ICD-10 code spelled alike (V and E codes exist in both) stay
# apart.
ICD_SYSTEMS = {"9": "ICD9:", "10": "ICD10:"}
LEVELS = ("stay", "admission", "patient")       # what a task is fine-tuned on (Task.level)


@dataclass(frozen=True)
class Task:
    level: str                                   # one of LEVELS
    description: str
    onset_items: tuple[tuple[str, int], ...] = ()  # (event table, itemid): the first is the onset
    icd9_prefixes: tuple[str, ...] = ()          # a diagnosis: ICD-9-CM codes (no dots) by prefix
    icd10_prefixes: tuple[str, ...] = ()         # the same diagnosis in ICD-10-CM, by prefix

    def code_prefixes(self) -> tuple[str, ...]:
        """Both sets as the processed data spells codes, namespaced by system: ('ICD9:428',
        'ICD10:I50', ...)."""
        return (tuple(ICD_SYSTEMS["9"] + p for p in self.icd9_prefixes)
                + tuple(ICD_SYSTEMS["10"] + p for p in self.icd10_prefixes))


TASKS = {
    # FIDDLE generate_labels.py: PEEP set, invasive or non-invasive ventilation
    "arf": Task("stay", "acute respiratory failure onset after hour 48",
                onset_items=(("chartevents", 220339), ("procedureevents", 225792),
                             ("procedureevents", 225794))),
    # FIDDLE generate_labels.py: any of five vasopressors
    "shock": Task("stay", "shock (vasopressor) onset after hour 48",
                  onset_items=tuple(("inputevents", i)
                                    for i in (221906, 221289, 221662, 222315, 221749))),
    "mortality": Task("stay", "in-hospital death, from the first 48 h"),
    "readmission": Task("admission", "next admission within 30 days of discharge"),
    # ICD-10-CM sets: the targets of the CMS ICD-9 -> ICD-10 general equivalence mappings (GEMs) of
    # each ICD-9 code, widened to the whole category where the ICD-9 set takes the whole category
    # (428 -> I50)
    "hf": Task("patient", "heart failure diagnosed >= 180 days after the history",
               icd9_prefixes=("428", "39891", "40201", "40211", "40291", "40401", "40403", "40411",
                              "40413", "40491", "40493"),
               # I50 heart failure; I0981 rheumatic HF; I110 hypertensive heart disease with HF;
               # I130, I132 hypertensive heart and chronic kidney disease with HF
               icd10_prefixes=("I50", "I0981", "I110", "I130", "I132")),
    # J41-J43 chronic bronchitis and emphysema (491, 492); J44 other COPD (496)
    "copd": Task("patient", "COPD diagnosed >= 180 days after the history",
                 icd9_prefixes=("491", "492", "496"), icd10_prefixes=("J41", "J42", "J43", "J44")),
    # R411-R413 amnesia (78093 memory loss); F04 amnestic disorder (2940); F1026, F1096
    # alcohol-induced persisting amnestic disorder (2911); F1326, F1396, F1916, F1926, F1996
    # drug-induced (29283)
    "amnesia": Task("patient", "amnesia diagnosed >= 180 days after the history",
                    icd9_prefixes=("78093", "2940", "2911", "29283"),
                    icd10_prefixes=("R411", "R412", "R413", "F04", "F1026", "F1096", "F1326",
                                    "F1396", "F1916", "F1926", "F1996")),
}


def names_at(level: str) -> tuple[str, ...]:
    """The names of the tasks of one level, in registry order."""
    return tuple(name for name, task in TASKS.items() if task.level == level)
