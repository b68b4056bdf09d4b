"""Tasks: the registry of the downstream tasks, the only list of their names.

Usage: `from tasks import TASKS`; `TASKS["arf"].level` -> "stay"; `names_at("patient")` -> ("hf", "copd",
"amnesia"). Each entry says at which level the task is fine-tuned (stay, admission or patient: which encoder
and dataset it uses), what it predicts, and what defines it in the raw data: the MetaVision items whose first
event marks an onset (ARF, shock) or the ICD-9 code groups of a diagnosis (the patient-level tasks).
Preprocessing builds the cohorts and labels from it (preprocessing/extract.py, preprocessing/cohorts.py),
evaluation fine-tunes on it (evaluate.py), and the synthetic generator can plant its signal with it.
A module of its own that imports nothing, so that every one of them, the generator included, can share it
without pulling in torch.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    level: str                                   # stay | admission | patient
    description: str
    onset_items: tuple[tuple[str, int], ...] = ()  # (event table, itemid): the first such event is the onset
    icd9_prefixes: tuple[str, ...] = ()          # a diagnosis: ICD-9 codes (without dots) by prefix


TASKS = {
    # FIDDLE generate_labels.py: PEEP set, invasive or non-invasive ventilation
    "arf": Task("stay", "acute respiratory failure onset after hour 48",
                onset_items=(("chartevents", 220339), ("procedureevents", 225792), ("procedureevents", 225794))),
    # FIDDLE generate_labels.py: any of five vasopressors
    "shock": Task("stay", "shock (vasopressor) onset after hour 48",
                  onset_items=tuple(("inputevents", i) for i in (221906, 221289, 221662, 222315, 221749))),
    "mortality": Task("stay", "in-hospital death, from the first 48 h"),
    "readmission": Task("admission", "next admission within 30 days of discharge"),
    "hf": Task("patient", "heart failure diagnosed >= 180 days after the history",
               icd9_prefixes=("428", "39891", "40201", "40211", "40291", "40401", "40403", "40411", "40413",
                              "40491", "40493")),
    "copd": Task("patient", "COPD diagnosed >= 180 days after the history", icd9_prefixes=("491", "492", "496")),
    "amnesia": Task("patient", "amnesia diagnosed >= 180 days after the history",
                    icd9_prefixes=("78093", "2940", "2911", "29283")),
}


def names_at(level: str) -> tuple[str, ...]:
    """The names of the tasks of one level, in registry order."""
    return tuple(name for name, task in TASKS.items() if task.level == level)
