"""MEDS extracts from MIMIC-IV-shaped tables, as the public ETLs write them: the MEDS side of
`synth --layout meds`.

Usage: `writer = MedsWriter(root, etl, seed)`, then per chunk of patients
`writer.add(table, n, columns)` for each of the generator's tables (text columns as synthetic's CSV
writer gets them) and `writer.end_chunk()`, and finally `writer.close()`. It writes the events
MIMIC_IV_MEDS (lab codes up to 0.0.7 or from 0.1.0) or eICU_MEDS would make of those tables, sorted
by subject and time, one shard per chunk and split (data/<split>/<chunk>.parquet), then metadata/
(dataset.json, codes.parquet, subject_splits.parquet). Imports numpy and, inside its methods,
pyarrow (not torch: synthetic.py stays light).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# vitalPeriodic / vitalAperiodic columns
EICU_VITALS = {220045: "PERIODIC//HEARTRATE", 220210: "PERIODIC//RESPIRATION",
               220277: "PERIODIC//SAO2", 223761: "PERIODIC//TEMPERATURE",
               220052: "PERIODIC//BP//SYSTEMIC_MEAN", 220179: "APERIODIC//BP//NONINVASIVE_SYSTOLIC",
               220180: "APERIODIC//BP//NONINVASIVE_DIASTOLIC",
               220181: "APERIODIC//BP//NONINVASIVE_MEAN"}
EICU_LABS = {50813: "lactate//mmol/L", 50912: "creatinine//mg/dL", 51301: "WBC x 1000//K/mcL",
             51222: "Hgb//g/dL", 50971: "potassium//mmol/L", 50931: "glucose//mg/dL",
             51006: "BUN//mg/dL", 50882: "bicarbonate//mmol/L", 50821: "paO2//mm Hg",
             50818: "paCO2//mm Hg", 50820: "pH//", 51003: "troponin - T//ng/mL",
             50963: "BNP//pg/mL", 50862: "albumin//g/dL"}
EICU_TREATMENTS = {  # procedure and vasopressor itemids -> eICU treatmentstring
    225792: "pulmonary|ventilation and oxygenation|mechanical ventilation",
    225794: "pulmonary|ventilation and oxygenation|non-invasive ventilation",
    225752: "cardiovascular|vascular disorders|arterial line placement",
    225802: "renal|dialysis|hemodialysis",
    221906: "cardiovascular|shock|vasopressors|norepinephrine > 0.1 micrograms/kg/min",
    221289: "cardiovascular|shock|vasopressors|epinephrine > 0.1 micrograms/kg/min",
    221662: "cardiovascular|shock|vasopressors|dopamine  5-15 micrograms/kg/min",
    222315: "cardiovascular|shock|vasopressors|vasopressin",
    221749: "cardiovascular|shock|vasopressors|phenylephrine"}
ICU_TABLES = ("chartevents", "labevents", "outputevents", "inputevents",
              "procedureevents", "datetimeevents")
EVENT_COLUMNS = ("subject", "time", "code", "num", "text", "hadm", "stay", "insurance",
                 "language", "marital_status", "race")


class MedsWriter:
    """Writes a MEDS extract at `root` from MIMIC-IV-shaped tables, as a public ETL would: `etl` is
    "0.0.7" (MIMIC_IV_MEDS up to 0.0.7: hospital labs LAB//{itemid}//{unit}), "0.1.0"
    (LAB//SPECIMEN_COLLECTED//{itemid} and LAB//RESULT//{itemid}//{unit}) or "eicu" (eICU_MEDS: a
    subject per hospital stay, the hospital's id in hadm_id, vitals, named labs, treatments). `add`
    buffers one chunk's tables; `end_chunk` writes its events sorted by subject and time, split by
    subject into data/<split>/<chunk>.parquet; `close` writes metadata/. Tables the ETL does not
    read (datetimeevents; eICU: outputs, outpatient labs) are left out."""

    def __init__(self, root: Path, etl: str, seed: int):
        self.root, self.etl, self.eicu = Path(root), etl, etl == "eicu"
        # splits and drug start times
        self.rng = np.random.default_rng([seed & (2 ** 63 - 1), 20])
        self.tables, self.events, self.chunk, self.rows, self.splits = {}, [], 0, 0, []
        # every code and text value written, numbered: events are kept as numbers
        self.names: dict = {}
        self.used = np.zeros(0, bool)    # per name: written as a code (for codes.parquet)

    def add(self, table: str, n: int, cols: dict) -> None:
        """Event tables become compact events at once (their text would take gigabytes per chunk);
        the small tables wait for end_chunk (diagnoses come before the admissions that date
        them)."""
        if not n:
            return
        if table in ICU_TABLES:
            self.events += [self._compact(e) for e in self._icu_events({table: _join([(n, cols)])})]
        else:
            self.tables.setdefault(table, []).append((n, cols))

    def end_chunk(self) -> None:
        """Convert the buffered tables of one chunk of patients into events and write them all,
        sorted."""
        t = {name: _join(parts) for name, parts in self.tables.items()}
        adm = _admissions(t["admissions"])
        parts = [self._compact(e)
                 for e in (self._eicu(t, adm) if self.eicu else self._mimic(t, adm))] + self.events
        self.tables, self.events = {}, []
        events = {k: np.concatenate([p[k] for p in parts]) for k in EVENT_COLUMNS}
        order = np.lexsort((events["time"], events["subject"]))
        self._write({k: v[order] for k, v in events.items()})

    def _icu_events(self, t: dict) -> list[dict]:
        if self.eicu:
            return _eicu_icu(t)
        return (self._mimic_labs(t["labevents"]) if "labevents" in t else []) + _mimic_icu(t)

    def _compact(self, e: dict) -> dict:
        """An _ev part with its time as int64 microseconds (NaT: the smallest int64, first in order)
        and its strings (code, text, categories) as numbers into `names` (-1: null)."""
        return {**e, "time": e["time"].view(np.int64), "num": e["num"].astype(np.float32),
                **{k: self._ids(e[k]) for k in ("code", *EVENT_COLUMNS[4:5], *EVENT_COLUMNS[7:])}}

    def _ids(self, values) -> np.ndarray:
        values = np.asarray(values)
        if values.dtype == object:
            values = np.where(np.equal(values, None), "", values).astype(str)
        uniq, inverse = np.unique(values, return_inverse=True)
        ids = np.array([self.names.setdefault(u, len(self.names)) if u else -1
                        for u in uniq.tolist()], np.int32)
        return ids[inverse.reshape(-1)] if len(uniq) else np.zeros(0, np.int32)

    def _write(self, events: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        names = pa.array(list(self.names), pa.string())
        subjects = np.unique(events["subject"])
        split = np.array(["train", "tuning", "held_out"])[
            np.searchsorted([0.8, 0.9], self.rng.random(len(subjects)))]
        self.splits.append((subjects, split))
        of_row = split[np.searchsorted(subjects, events["subject"])]
        for name in ("train", "tuning", "held_out"):
            rows = of_row == name
            if rows.any():
                (self.root / "data" / name).mkdir(parents=True, exist_ok=True)
                pq.write_table(_arrow({k: v[rows] for k, v in events.items()}, pa, self.eicu,
                                      names),
                               self.root / "data" / name / f"{self.chunk}.parquet")
        self.used = np.append(self.used, np.zeros(len(names) - len(self.used), bool))
        self.used[np.unique(events["code"])] = True
        self.rows += len(events["subject"])
        self.chunk += 1

    def close(self) -> None:
        """metadata/: dataset.json (the version after ':' picks the profile), codes.parquet,
        subject_splits.parquet."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        (self.root / "metadata").mkdir(parents=True, exist_ok=True)
        name, release = ("eICU", "2.0") if self.eicu else ("MIMIC-IV", "2.2")
        version = "0.1.0" if self.eicu else self.etl
        (self.root / "metadata" / "dataset.json").write_text(json.dumps(
            {"dataset_name": name, "dataset_version": f"{release}:{version}",
             "etl_name": "medhmp synth", "etl_version": version, "meds_version": "0.4.0"},
            indent=1))
        words = list(self.names)
        codes = sorted(words[i] for i in np.flatnonzero(self.used))
        pq.write_table(pa.table({"code": pa.array(codes, pa.string()),
                                 "description": pa.nulls(len(codes), pa.string()),
                                 "parent_codes": pa.array([[] for _ in codes],
                                                          pa.list_(pa.string()))}),
                       self.root / "metadata" / "codes.parquet")
        ids = np.concatenate([s for s, _ in self.splits]) if self.splits else np.zeros(0, np.int64)
        names = np.concatenate([n for _, n in self.splits]) if self.splits else np.zeros(0, str)
        splits = pa.table({"subject_id": pa.array(ids, pa.int64()),
                           "split": pa.array(names.tolist(), pa.string())})
        pq.write_table(splits, self.root / "metadata" / "subject_splits.parquet")

    # -------------------------------------------------------------------------------- MIMIC_IV_MEDS
    def _mimic(self, t: dict, adm: dict) -> list[dict]:
        """The events of MIMIC_IV_MEDS's event configs (admissions, ICU stays, diagnoses at
        discharge, drug starts, labs, chart, output, input and procedure events); a drug start is
        placed at a random time of its admission, since the generator's prescriptions have none."""
        p, s = t["patients"], t["icustays"]
        subject = _ints(p["subject_id"])
        parts = [_ev(subject, None, _cat("GENDER//", _u(p["gender"]))),
                 _ev(subject, _year_start(_ints(p["anchor_year"]) - _ints(p["anchor_age"])),
                     "MEDS_BIRTH"),
                 _ev(adm["subject"][adm["died"]], adm["death"][adm["died"]], "MEDS_DEATH"),
                 _ev(adm["subject"], adm["admit"],
                     _cat("HOSPITAL_ADMISSION//", adm["type"], "//", adm["location"]),
                     hadm=adm["hadm"],
                     **{c: adm[c] for c in ("insurance", "language", "marital_status", "race")}),
                 _ev(adm["subject"], adm["disch"], "HOSPITAL_DISCHARGE//UNK", hadm=adm["hadm"])]
        stay = dict(hadm=_ints(s["hadm_id"]), stay=_ints(s["stay_id"]))
        parts += [_ev(_ints(s["subject_id"]), _times(s["intime"]),
                      _cat("ICU_ADMISSION//", _u(s["first_careunit"])), **stay),
                  _ev(_ints(s["subject_id"]), _times(s["outtime"]), "ICU_DISCHARGE//UNK", **stay)]
        d, at = t["diagnoses"], _position(adm["hadm"], _ints(t["diagnoses"]["hadm_id"]))
        parts.append(_ev(adm["subject"][at], adm["disch"][at],
                         _cat("DIAGNOSIS//ICD//", _u(d["icd_version"]), "//", _u(d["icd_code"])),
                         hadm=adm["hadm"][at]))
        r = t["prescriptions"]
        parts.append(_ev(_ints(r["subject_id"]), self._during(adm, _ints(r["hadm_id"])),
                         _cat("MEDICATION//START//", _u(r["drug"]))))
        return parts

    def _mimic_labs(self, lab: dict) -> list[dict]:
        item, when = _u(lab["itemid"]), _times(lab["charttime"])
        values = dict(num=_floats(lab["valuenum"]), text=_strings(lab["value"]),
                      hadm=_ints(_get(lab, "hadm_id")))
        subject = _ints(lab["subject_id"])
        if self.etl.startswith("0.0"):
            return [_ev(subject, when, _cat("LAB//", item, "//UNK"), **values)]
        stored = _times(lab.get("storetime")) if "storetime" in lab else when
        # the generator writes no storetime
        stored = np.where(np.isnat(stored), when, stored)
        return [_ev(subject, when, _cat("LAB//SPECIMEN_COLLECTED//", item), hadm=values["hadm"]),
                _ev(subject, stored, _cat("LAB//RESULT//", item, "//UNK"), **values)]

    def _during(self, adm: dict, hadm: np.ndarray) -> np.ndarray:
        """A random time inside each admission of `hadm`."""
        at = _position(adm["hadm"], hadm)
        admit, disch = adm["admit"][at].astype(np.int64), adm["disch"][at].astype(np.int64)
        return (admit + (self.rng.random(len(at)) * (disch - admit)).astype(np.int64)).astype(
            "datetime64[us]")

    # ----------------------------------------------------------------------------------- eICU_MEDS
    def _eicu(self, t: dict, adm: dict) -> list[dict]:
        """eICU_MEDS's shape: each admission is a subject (its hadm_id); the hadm_id column holds a
        hospital id."""
        p = t["patients"]
        who = _position(_ints(p["subject_id"]), adm["subject"])
        subject, hospital = adm["hadm"], 100 + adm["hadm"] % 7
        sex = np.where(_u(p["gender"])[who] == "F", "Female", "Male")
        status = np.where(adm["died"], "Expired//Death", "Alive//Home")
        parts = [_ev(subject, None, _cat("GENDER//", sex)),
                 _ev(subject, None, _cat("RACE//", _u(adm["race"]))),
                 _ev(subject, _year_start((_ints(p["anchor_year"]) - _ints(p["anchor_age"]))[who]),
                     "MEDS_BIRTH"),
                 _ev(subject[adm["died"]], adm["death"][adm["died"]], "MEDS_DEATH"),
                 _ev(subject, adm["admit"],
                     _cat("HOSPITAL_ADMISSION//", adm["location"], "//UNK//UNK//UNK"),
                     hadm=hospital),
                 _ev(subject, adm["disch"], _cat("HOSPITAL_DISCHARGE//", status), hadm=hospital)]
        s = t["icustays"]
        hadm = _ints(s["hadm_id"])
        stay = dict(hadm=100 + hadm % 7, stay=_ints(s["stay_id"]))
        parts += [_ev(hadm, _times(s["intime"]),
                      _cat("ICU_ADMISSION//", _u(s["first_careunit"]), "//admit"), **stay),
                  _ev(hadm, _times(s["outtime"]), "ICU_DISCHARGE//UNK//UNK", **stay)]
        d = t["diagnoses"]
        at = _position(adm["hadm"], _ints(d["hadm_id"]))
        parts.append(_ev(subject[at], adm["admit"][at] + np.timedelta64(60, "s"),
                         _cat("DIAGNOSIS//ICD//", _u(d["icd_version"]), "//",
                              _dotted(_u(d["icd_code"])))))
        r = t["prescriptions"]
        parts.append(_ev(_ints(r["hadm_id"]), self._during(adm, _ints(r["hadm_id"])),
                         _cat("MEDICATION//STARTED//", _u(r["drug"]))))
        return parts


def _mimic_icu(t: dict) -> list[dict]:
    """Chart, output, input and procedure events as MIMIC_IV_MEDS codes them (datetimeevents: not in
    its configs)."""
    parts = []
    for table, code, when, values in (
            ("chartevents", ("LAB//", "//UNK"), "charttime", ("valuenum", "value")),
            ("outputevents", ("SUBJECT_FLUID_OUTPUT//", "//UNK"), "charttime", ("value", None)),
            ("inputevents", ("INFUSION_START//", ""), "starttime", (None, None)),
            ("inputevents", ("INFUSION_END//", ""), "endtime", ("amount", None)),
            ("procedureevents", ("PROCEDURE//START//", ""), "starttime", (None, None)),
            ("procedureevents", ("PROCEDURE//END//", ""), "endtime", (None, None))):
        if table in t:
            e = t[table]
            parts.append(_ev(_ints(e["subject_id"]), _times(e[when]),
                             _cat(code[0], _u(e["itemid"]), code[1]),
                             num=_floats(e[values[0]]) if values[0] else None,
                             text=_strings(e[values[1]]) if values[1] else None,
                             hadm=_ints(e["hadm_id"]), stay=_ints(e["stay_id"])))
    return parts


def _eicu_icu(t: dict) -> list[dict]:
    """eICU_MEDS-shaped events of a hospital stay (subject = hadm_id): vitals, named labs,
    ventilation and vasopressor treatments (the ARF and shock onsets of the eicu profile), other
    infusions as INFUSION_DRUG."""
    parts = []
    c = t.get("chartevents", {})
    if c:
        name, num = _lookup(EICU_VITALS, c["itemid"]), _floats(c["valuenum"])
        keep = (name != "") & ~np.isnan(num)
        parts.append(_ev(_ints(c["hadm_id"])[keep], _times(c["charttime"])[keep],
                         _cat("VITALS//", name[keep]), num=num[keep]))
    lab = t.get("labevents", {})
    if lab:
        name, hadm = _lookup(EICU_LABS, lab["itemid"]), _ints(_get(lab, "hadm_id"))
        # eICU has no labs outside the hospital stay
        keep = (name != "") & (hadm >= 0)
        parts.append(_ev(hadm[keep], _times(lab["charttime"])[keep], _cat("LAB//", name[keep]),
                         num=_floats(lab["valuenum"])[keep], text=_strings(lab["value"])[keep]))
    for table in ("procedureevents", "inputevents"):
        e = t.get(table, {})
        if e:
            name, hadm, when = (_lookup(EICU_TREATMENTS, e["itemid"]), _ints(e["hadm_id"]),
                                _times(e["starttime"]))
            treat = name != ""
            parts.append(_ev(hadm[treat], when[treat], _cat("TREATMENT//ENTERED//", name[treat])))
            if table == "inputevents":
                drug = _cat("drug ", _u(e["itemid"]))
                parts.append(_ev(hadm[~treat], when[~treat], "INFUSION_DRUG",
                                 num=_floats(e["amount"])[~treat],
                                 text=drug[~treat].astype(object)))
    return parts


# ----------------------------------------------------------------------------------- text -> values
def _join(parts: list) -> dict:
    """(n, {key: text column or constant}) parts of one table as one dict of object arrays ('' where
    a part lacks a key, as the CSV writer leaves such a column blank)."""
    keys = list(dict.fromkeys(k for _, cols in parts for k in cols))
    return {k: np.concatenate([np.full(n, cols.get(k, ""), dtype=object)
                               if isinstance(cols.get(k, ""), str)
                               else np.asarray(cols[k], dtype=object) for n, cols in parts])
            for k in keys}


def _get(table: dict, key: str) -> np.ndarray:
    """A column of `table`, or blanks where the table was written without it (outpatient labs: no
    hadm_id)."""
    return (table[key] if key in table
            else np.full(len(next(iter(table.values()))), "", dtype=object))


def _u(a) -> np.ndarray:
    """Text as the CSV holds it -> plain unicode strings (csv quoting undone; '' stays '')."""
    u = np.asarray(a).astype(str)
    quoted = np.char.startswith(u, '"') if len(u) else np.zeros(0, bool)
    if quoted.any():
        u = u.astype(object)
        u[quoted] = [x[1:-1].replace('""', '"') for x in u[quoted]]
        u = u.astype(str)
    return u


def _strings(a) -> np.ndarray:
    out = _u(a).astype(object)
    out[out == ""] = None
    return out


def _ints(a) -> np.ndarray:
    u = _u(a)
    return np.where(u == "", "-1", u).astype(np.int64)


def _floats(a) -> np.ndarray:
    u = _u(a)
    return np.where(u == "", "nan", u).astype(np.float64)


def _times(a) -> np.ndarray:
    u = _u(a)
    return np.where(u == "", "NaT", u).astype("datetime64[us]")


def _year_start(years: np.ndarray) -> np.ndarray:
    return (np.asarray(years) - 1970).astype("datetime64[Y]").astype("datetime64[us]")


def _cat(*pieces) -> np.ndarray:
    """Codes built piece by piece, e.g. _cat("LAB//", itemids, "//UNK")."""
    out = pieces[0]
    for p in pieces[1:]:
        out = np.char.add(out, p)
    return np.asarray(out)


def _lookup(table: dict, items) -> np.ndarray:
    """table[itemid] per row ('' where absent)."""
    ids, inverse = np.unique(_ints(items), return_inverse=True)
    return np.array([table.get(int(i), "") for i in ids] or [""],
                    dtype=object).astype(str)[inverse.reshape(-1)]


def _dotted(codes: np.ndarray) -> np.ndarray:
    """'4280' -> '428.0', 'E8497' -> 'E849.7' (eICU writes ICD codes with their dot)."""
    return np.array([c if len(c) <= (4 if c.startswith("E") else 3) else
                     f"{c[:4]}.{c[4:]}" if c.startswith("E") else f"{c[:3]}.{c[3:]}"
                     for c in codes.tolist()] or [""],
                    dtype=str)[:len(codes)]


def _admissions(a: dict) -> dict:
    """The admissions table's columns as values, sorted by hadm_id."""
    out = {"hadm": _ints(a["hadm_id"]), "subject": _ints(a["subject_id"]),
           "admit": _times(a["admittime"]), "disch": _times(a["dischtime"]),
           "death": _times(a["deathtime"]), "type": _u(a["admission_type"]),
           "location": np.where(_u(a["admission_location"]) == "", "UNK",
                                _u(a["admission_location"])),
           **{c: _strings(a[c]) for c in ("insurance", "language", "marital_status", "race")}}
    out["died"] = (_u(a["hospital_expire_flag"]) == "1") & ~np.isnat(out["death"])
    order = np.argsort(out["hadm"])
    return {k: v[order] for k, v in out.items()}


def _ev(subject, time, code, num=None, text=None, hadm=None, stay=None, **categories) -> dict:
    """One part of a chunk's events, every EVENT_COLUMNS column filled (None / NaN / -1: null)."""
    n = len(subject)
    return {"subject": np.asarray(subject, np.int64),
            "time": np.full(n, np.datetime64("NaT"), "datetime64[us]") if time is None else
            np.asarray(time, "datetime64[us]"),
            "code": np.full(n, code) if isinstance(code, str) else np.asarray(code).astype(str),
            "num": np.full(n, np.nan) if num is None else np.asarray(num, np.float64),
            "text": np.full(n, None, object) if text is None else np.asarray(text, object),
            "hadm": np.full(n, -1, np.int64) if hadm is None else np.asarray(hadm, np.int64),
            "stay": np.full(n, -1, np.int64) if stay is None else np.asarray(stay, np.int64),
            **{c: np.asarray(categories[c], object) if c in categories else np.full(n, None, object)
               for c in EVENT_COLUMNS[7:]}}


def _arrow(e: dict, pa, eicu: bool, names):
    """Compact events as a MEDS data table: subject_id int64, time timestamp[us], code string,
    numeric_value float32, text_value string, then the ETL's id columns (and MIMIC's admission
    columns)."""
    def text(ids):
        return pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32(), mask=ids < 0),
                                              names).cast(pa.string())
    no_time = e["time"] == np.iinfo(np.int64).min
    cols = {"subject_id": pa.array(e["subject"], pa.int64()),
            "time": pa.array(e["time"], pa.int64(), mask=no_time).cast(pa.timestamp("us")),
            "code": text(e["code"]),
            "numeric_value": pa.array(e["num"], pa.float32(), mask=np.isnan(e["num"])),
            "text_value": text(e["text"]),
            "hadm_id": pa.array(e["hadm"], pa.int64(), mask=e["hadm"] < 0),
            "icustay_id": pa.array(e["stay"], pa.int64(), mask=e["stay"] < 0)}
    if not eicu:
        cols.update({c: text(e[c]) for c in EVENT_COLUMNS[7:]})
    return pa.table(cols)


def _position(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions of `ids` in `sorted_ids` (every id is there: the generator's own tables)."""
    return np.searchsorted(sorted_ids, ids)
