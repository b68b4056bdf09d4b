"""MEDS profiles: which codes of a MEDS extract play which role (admission, ICU stay, diagnosis,
drug, event).

Usage: `profile = load_profile(option, dataset_meta)` (option: --meds-profile, a built-in name or a
JSON file; None: chosen from metadata/dataset.json), then `codes = CodeTable(profile)` and
`codes.ids(strings)` for the global code ids of a batch's distinct codes, whose per-code arrays
(`codes.frozen()`: role, var, onset, values, died) the scan reads.
A profile is a small JSON file (its format: docs/meds.md, Profiles); the built-in ones, one per
public ETL, are in preprocessing/meds_profiles/. Each code is classified once, by the first rule
whose regular expression matches it whole, so a scan of millions of events costs one table look-up
per event. Imports the stdlib, numpy, the task registry and extract's event-table registry (so that
a MIMIC-IV item keeps the variable key the CSV reader gives it).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from folders import InputError
from preprocessing.extract import EVENT_TABLES, STATIC_CATEGORIES, VAR_SPAN
from tasks import TASKS

PROFILE_DIR = Path(__file__).with_name("meds_profiles")
# role -> the named groups its rule must capture
ROLES = {"admission": (), "discharge": (), "icu_admission": (), "icu_discharge": (),
         "diagnosis": ("version", "code"), "drug": ("drug",), "gender": ("gender",), "birth": (),
         "death": (), "category": (), "event": (), "event_start": (), "event_end": (), "ignore": ()}
ROLE_IDS = {name: i for i, name in enumerate(ROLES)}
UNKNOWN = -1                      # a code no rule matches: counted
# ids of items that are not numbers (eICU's lab names) start here, below VAR_SPAN
TEXT_ITEMS = 90_000_000
KEYS = {"name", "about", "match", "admission_id", "stay_id", "admission_columns",
        "tasks", "onsets", "rules"}
RULE_KEYS = {"role", "code", "table", "values", "died"}


def builtin_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.json"))}


def load_profile(option: str | None, dataset: dict) -> dict:
    """The profile named or given as a file by --meds-profile, else the built-in one whose `match`
    fits metadata/dataset.json (`dataset`); checked and compiled. Any problem is one InputError
    line."""
    builtin = builtin_profiles()
    if option is None:
        path = _choose(builtin, dataset)
    elif option in builtin:
        path = builtin[option]
    elif Path(option).is_file():
        path = Path(option)
    else:
        raise InputError(f"--meds-profile {option}: neither a built-in profile "
                         f"({', '.join(builtin)}) nor a file")
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable JSON profile ({err})") from None
    return compile_profile(profile, path)


def dataset_version(dataset: dict) -> str:
    """The ETL's version: after the ':' of dataset_version (MEDS-Extract writes '<release>:<ETL
    version>'), else etl_version."""
    version = str(dataset.get("dataset_version", ""))
    return version.split(":", 1)[1] if ":" in version else str(dataset.get("etl_version", ""))


def _choose(builtin: dict, dataset: dict) -> Path:
    name = f"{dataset.get('dataset_name', '')} {dataset.get('etl_name', '')}".strip()
    version = dataset_version(dataset)
    for path in builtin.values():
        match = json.loads(path.read_text()).get("match", {})
        named = any(re.fullmatch(match.get("dataset", "(?!)"), n, re.I) for n in name.split())
        if named and _version_fits(version, match.get("version")):
            return path
    raise InputError(f"metadata/dataset.json names dataset {name or '(none)'!r}, ETL version "
                     f"{version or '(none)'}: no built-in profile fits; pass --meds-profile "
                     f"{'|'.join(builtin)} or a profile file (docs/meds.md, Profiles)")


def _version_fits(version: str, condition: str | None) -> bool:
    """'0.0.4' against '<0.1.0' or '>=0.1.0' (None: any version)."""
    if not condition:
        return True
    op, bound = re.fullmatch(r"\s*(<=|>=|<|>|==)\s*(\S+)", condition).groups()
    numbers = [tuple(int(x) for x in re.findall(r"\d+", v)[:3]) for v in (version, bound)]
    if not numbers[0]:
        return False
    return {"<": numbers[0] < numbers[1], "<=": numbers[0] <= numbers[1],
            ">": numbers[0] > numbers[1], ">=": numbers[0] >= numbers[1],
            "==": numbers[0] == numbers[1]}[op]


def compile_profile(profile: dict, path: Path) -> dict:
    """The profile checked (unknown keys, roles, tasks, groups are one InputError line naming
    `path`) with its rules' regular expressions compiled and its event tables numbered."""
    def bad(what):
        return InputError(f"{path}: {what} (docs/meds.md, Profiles)")
    if not isinstance(profile, dict) or not isinstance(profile.get("rules"), list):
        raise bad("a profile is a JSON object with a list of rules")
    if set(profile) - KEYS:
        raise bad(f"unknown key {sorted(set(profile) - KEYS)[0]!r}")
    tasks = profile.get("tasks", list(TASKS))
    if unknown := [t for t in [*tasks, *profile.get("onsets", {})] if t not in TASKS]:
        raise bad(f"unknown task {unknown[0]!r} (tasks: {', '.join(TASKS)})")
    rules, tables = [], {name: spec["code"] for name, spec in EVENT_TABLES.items()}
    for i, rule in enumerate(profile["rules"]):
        rules.append(_compile_rule(rule, i, tables, bad))
    onsets = {task: [_regex(p, f"onsets.{task}", bad) for p in patterns]
              for task, patterns in profile.get("onsets", {}).items()}
    return {**profile, "path": str(path), "tasks": list(tasks), "rules": rules, "onsets": onsets,
            "tables": tables, "admission_columns": list(profile.get("admission_columns", []))}


def _compile_rule(rule: dict, i: int, tables: dict, bad) -> dict:
    if (not isinstance(rule, dict) or set(rule) - RULE_KEYS or rule.get("role") not in ROLES
            or "code" not in rule):
        raise bad(f"rule {i + 1} needs a role ({', '.join(ROLES)}) and a code, and no key beyond "
                  f"{', '.join(sorted(RULE_KEYS))}")
    regex = _regex(rule["code"], f"rule {i + 1}", bad)
    missing = [g for g in ROLES[rule["role"]] if g not in regex.groupindex]
    if rule["role"] in ("admission", "category", "icu_admission"):
        missing += [g for g in regex.groupindex if g not in STATIC_CATEGORIES]
    if missing:
        raise bad(f"rule {i + 1} ({rule['role']}): group {missing[0]!r} is missing or not a static "
                  "category")
    out = {**rule, "regex": regex, "values": set(rule.get("values", ("numeric", "text")))}
    if rule["role"].startswith("event"):
        if not rule.get("table"):
            raise bad(f"rule {i + 1} ({rule['role']}) needs a table")
        out["table_code"] = tables.setdefault(rule["table"], max(tables.values()) + 1)
    return out


def _regex(pattern: str, where: str, bad) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as err:
        raise bad(f"{where}: {pattern!r} is not a regular expression ({err})") from None


class CodeTable:
    """Every distinct code seen so far, numbered in order of appearance, with what the profile makes
    of it: `role` (ROLE_IDS, UNKNOWN), `var` (event variable key: table code x VAR_SPAN + item, -1
    for others), `onset` (index into `onset_tasks` of the task whose onset it marks, -1), `values`
    (bit 1: numeric_value, 2: text_value), `died` (a discharge that is a death) as numpy arrays
    (`frozen()`), and `fields` (the named groups) per code."""

    def __init__(self, profile: dict):
        self.profile, self.index, self.strings, self.fields = profile, {}, [], []
        self.onset_tasks = [t for t, task in TASKS.items()
                            if task.onset_items or t in profile["onsets"]]
        self.onset_vars = {} if profile["onsets"] else {
            EVENT_TABLES[table]["code"] * VAR_SPAN + item: self.onset_tasks.index(t)
            for t, task in TASKS.items() for table, item in task.onset_items}
        # (table code, item text) -> item id, for items that are not numbers
        self.items: dict = {}
        self.arrays = {k: [] for k in ("role", "var", "onset", "values", "died")}
        self._frozen: dict = {}

    def ids(self, strings: list) -> np.ndarray:
        """Global ids (int32) of `strings` (None: -1), classifying the new ones."""
        out = np.empty(len(strings), np.int32)
        for i, s in enumerate(strings):
            if s is None:
                out[i] = -1
            elif (k := self.index.get(s)) is not None:
                out[i] = k
            else:
                out[i] = self.index[s] = len(self.strings)
                self.strings.append(s)
                self._classify(s)
        return out

    def frozen(self) -> dict:
        """The per-code arrays {"role", "var", "onset", "values", "died"} over every code seen so
        far (rebuilt only when codes were added since the last call)."""
        if self._frozen.get("n") != len(self.strings):
            dtypes = {"role": np.int8, "var": np.int64, "onset": np.int8,
                      "values": np.uint8, "died": bool}
            self._frozen = {"n": len(self.strings),
                            **{k: np.array(v, dtypes[k]) for k, v in self.arrays.items()}}
        return self._frozen

    def _classify(self, code: str) -> None:
        rule = next((r for r in self.profile["rules"] if r["regex"].fullmatch(code)), None)
        fields = rule["regex"].fullmatch(code).groupdict() if rule else {}
        role = ROLE_IDS[rule["role"]] if rule else UNKNOWN
        var = self._var(rule, fields, code) if rule and rule["role"].startswith("event") else -1
        onset = self.onset_vars.get(var, -1)
        for task, patterns in self.profile["onsets"].items():
            if var >= 0 and any(p.fullmatch(code) for p in patterns):
                onset = self.onset_tasks.index(task)
        values = ((1 if rule and "numeric" in rule["values"] else 0)
                  | (2 if rule and "text" in rule["values"] else 0))
        for k, v in (("role", role), ("var", var), ("onset", onset), ("values", values),
                     ("died", bool(rule and rule.get("died")))):
            self.arrays[k].append(v)
        self.fields.append(fields)

    def _var(self, rule: dict, fields: dict, code: str) -> int:
        """table code x VAR_SPAN + item: the item's number, or an id given to a new item text in
        order of appearance."""
        item = fields.get("item", code)
        if item.isdigit() and int(item) < TEXT_ITEMS:
            return rule["table_code"] * VAR_SPAN + int(item)
        key = (rule["table_code"], item)
        number = self.items.setdefault(key, TEXT_ITEMS + len(self.items))
        return rule["table_code"] * VAR_SPAN + number

    def variable_names(self, keys) -> dict:
        """{variable key: readable name} as extract.variable_names spells them ('chart 220045',
        'vitals PERIODIC//HEARTRATE')."""
        short = {code: name[:-len("events")] if name.endswith("events") else name
                 for name, code in self.profile["tables"].items()}
        texts = {rule_code * VAR_SPAN + number: item
                 for (rule_code, item), number in self.items.items()}
        return {int(k): f"{short[int(k) // VAR_SPAN]} {texts.get(int(k), int(k) % VAR_SPAN)}"
                for k in keys}

    def unknown(self, limit: int = 5) -> list[str]:
        """The first codes no rule matched (for the warning line and meta.json)."""
        return [s for s, r in zip(self.strings, self.frozen()["role"].tolist())
                if r == UNKNOWN][:limit]
