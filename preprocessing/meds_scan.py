"""MEDS scan: one pass over the events of a MEDS extract into the records `build.build_mimic` reads.

Usage: `scan = Scan(profile, hours=48, exclude_label_items=True)`, `scan.read(batches)` for every
file's record batches (preprocessing/meds.py opens them), then `scan.result()`. MEDS keeps each
subject in one file, contiguous and sorted by time, so the scan works on *units* of complete
subjects (a batch less its last subject, which waits for the next batch): from a unit's own rows it
builds the subjects' admissions, ICU stays, diagnoses and drugs, then places its events in those
stays and keeps the last value of each (stay, hour, variable) as the CSV reader's
`extract.EventStore` does (`Events`: one sort per unit, no merge). Events are kept for every ICU
stay read ("candidate" stays, numbered in reading order); `build_mimic` filters the stays and
`meds.MedsReader.stream_events` keeps the events of those left. Memory follows the kept values and
the small core records, never the size of the files.
Rows the scan cannot use are skipped and counted (`counts`): a null code or subject, rows of a
subject already read (split across files, or not contiguous), codes no profile rule matches;
subjects whose times are out of order are counted (read all the same: nothing here depends on the
order). Times are minutes since 1970 (negative before; tables.NO_TIME for a static event and for a
time that is missing, as in the CSV reader). An event inside two ICU stays of one subject that
overlap in time is an event of each (extract.StayIndex).
"""
from __future__ import annotations

import numpy as np

from data import lookup
from folders import InputError
from preprocessing.extract import EVENT_ARRAYS, STATIC_CATEGORIES, StayIndex
from preprocessing.meds_profile import ROLE_IDS, UNKNOWN, CodeTable
from preprocessing.tables import NO_TIME, group_rank, unique

R = ROLE_IDS
NEVER = np.iinfo(np.int64).max          # the running minimum of times not seen (-> NO_TIME)
PART_KEYS = ("patients", "admissions", "stays", "diagnoses", "drugs", "onsets")
OUTSIDE_STAYS = "event rows outside ICU stays (not used)"
# counts that describe the data, not a fault (hospital labs between stays; the CSV reader never
# reads such rows of a stay's admission as events either): in meta.json meds.skipped, left out of
# the warning line
BY_DESIGN = (OUTSIDE_STAYS,)


class Strings:
    """The strings of text_value and the admission columns, numbered in order of appearance, so that
    a batch's dictionary is mapped once and a unit carried over to the next batch keeps valid
    ids."""

    def __init__(self):
        self.index, self.values = {}, []

    def ids(self, strings: list) -> np.ndarray:
        out = np.empty(len(strings), np.int32)
        for i, s in enumerate(strings):
            out[i] = -1 if s is None else self.index.setdefault(s, len(self.index))
            if out[i] == len(self.values):
                self.values.append(s)
        return out


class Events:
    """The last value of every (stay, hour, variable), unit by unit. A unit's cells are unique and
    sorted (last_per_cell) and units hold consecutive candidate stays, so the parts laid end to end
    are already what extract.EventStore.result gives (same arrays, same order, categories numbered
    alike): no merge is needed."""

    def __init__(self):
        self.parts, self.categories = [], {}

    def category_ids(self, values: np.ndarray) -> np.ndarray:
        uniq, inverse = unique(values, return_inverse=True)
        ids = np.array([self.categories.setdefault(u, len(self.categories)) for u in uniq.tolist()],
                       np.int32)
        return ids[inverse] if len(uniq) else np.zeros(0, np.int32)

    def add(self, stay, hour, var, num, cat) -> None:
        if len(stay):
            self.parts.append((stay.astype(np.int32), hour.astype(np.uint8), var,
                               num.astype(np.float32), cat.astype(np.int32), unique(var)))

    def result(self) -> dict:
        """EventStore.result's arrays, filled part by part (each part freed once copied)."""
        var_keys = unique(np.concatenate([np.zeros(0, np.int64)] + [p[5] for p in self.parts]))
        out = {name: np.empty(sum(len(p[0]) for p in self.parts), dtype)
               for name, dtype in EVENT_ARRAYS.items()}
        at = 0
        while self.parts:
            stay, hour, var, num, cat, _ = self.parts.pop(0)
            rows = slice(at, at + len(stay))
            out["stay"][rows], out["hour"][rows], out["var"][rows] = (
                stay, hour, np.searchsorted(var_keys, var))
            out["num"][rows], out["cat"][rows] = num, cat
            at += len(stay)
        names = {v: k.decode("utf-8", "replace").strip() for k, v in self.categories.items()}
        return {**out, "var_keys": var_keys,
                "category_names": [names[i] for i in range(len(names))]}


class Scan:
    """The accumulators of one pass: per-unit parts of the core records (PART_KEYS), the events
    (`store`) and the counts of what was skipped. `counts` maps a reason to a number of rows (or
    subjects, where it says so)."""

    def __init__(self, profile: dict, *, hours: int, exclude_label_items: bool):
        self.profile, self.codes, self.strings = profile, CodeTable(profile), Strings()
        self.hours, self.exclude = hours, exclude_label_items
        self.store, self.parts = Events(), {k: [] for k in PART_KEYS}
        self.done, self.n_stays, self.counts = np.zeros(0, np.int64), 0, {}

    def count(self, reason: str, n) -> None:
        if int(n):
            self.counts[reason] = self.counts.get(reason, 0) + int(n)

    # ---------------------------------------------------------------------------------------- units
    def read(self, batches) -> None:
        """The column dicts (meds.columns) of one file's batches, cut into units of complete
        subjects: a batch's last subject waits for the rows of the next batch that continue it (only
        those are copied)."""
        carry = None
        for cols in batches:
            subject, start = cols["subject"], 0
            if not len(subject):
                continue
            if carry is not None:
                other = subject != carry["subject"][0]
                start = int(np.argmax(other)) if other.any() else len(subject)
                carry = {k: np.concatenate([carry[k], v[:start]]) for k, v in cols.items()}
                if start == len(subject):
                    continue
                self.unit(carry)
            last = np.flatnonzero(subject[start:] != subject[-1])
            cut = start + (int(last[-1]) + 1 if len(last) else 0)
            if cut > start:
                self.unit({k: v[start:cut] for k, v in cols.items()})
            carry = {k: v[cut:] for k, v in cols.items()}
        if carry is not None and len(carry["subject"]):
            self.unit(carry)

    def unit(self, cols: dict) -> None:
        """Every record and event of one unit of complete subjects."""
        cols = self._usable(cols)
        role = self.codes.frozen()["role"][cols["code"]]
        self.count("rows of codes no profile rule matches", (role == UNKNOWN).sum())
        subjects = unique(cols["subject"])
        adm = self._admissions(cols, role)
        stays = self._stays(cols, role, adm)
        self.parts["patients"].append(self._patients(cols, role, subjects))
        self.parts["admissions"].append(adm)
        self.parts["stays"].append(stays)
        self.parts["diagnoses"].append(self._coded(cols, role == R["diagnosis"], adm,
                                                   ("version", "code")))
        self.parts["drugs"].append(self._coded(cols, role == R["drug"], adm, ("drug",)))
        self.parts["onsets"].append(self._events(cols, role, stays))
        self.done = np.union1d(self.done, subjects)

    def _usable(self, cols: dict) -> dict:
        """The rows of `cols` with a subject and a code, of subjects not read before (each skipped
        row counted); subjects whose timed rows go back in time are counted. Nothing is copied when
        every row is usable."""
        subject = cols["subject"]
        # subjects are contiguous runs
        runs = np.flatnonzero(np.append(True, subject[1:] != subject[:-1]))
        seen = np.repeat(np.isin(subject[runs], self.done), np.diff(np.append(runs, len(subject))))
        keep = (cols["code"] >= 0) & (subject >= 0)
        self.count("rows with a null code or subject_id", (~keep).sum())
        self.count("rows of subjects already read (a subject split across files, or not "
                   "contiguous)", (seen & keep).sum())
        if not keep.all() or seen.any():
            cols = {k: v[keep & ~seen] for k, v in cols.items()}
        timed = cols["minutes"] != NO_TIME
        s, t = cols["subject"][timed], cols["minutes"][timed]
        back = (s[1:] == s[:-1]) & (t[1:] < t[:-1])
        self.count("subjects with events out of time order (read all the same)",
                   len(unique(s[1:][back])))
        return cols

    # -------------------------------------------------------------------------------------- records
    def _admission_key(self, cols: dict) -> np.ndarray:
        """The admission id of every row: its admission column, or its subject (one admission per
        subject)."""
        return cols["subject"] if self.profile["admission_id"] == "subject" else cols["hadm"]

    def _admissions(self, cols: dict, role: np.ndarray) -> dict:
        """The unit's admissions, sorted by id: hadm_id, subject_id, admittime, dischtime, died (a
        death discharge), and the static categories of the admission codes, columns and category
        codes."""
        key, t = self._admission_key(cols), cols["minutes"]
        rows = np.flatnonzero(role == R["admission"])
        ok = (key[rows] >= 0) & (t[rows] != NO_TIME)
        self.count("admission events without an admission id or time", (~ok).sum())
        rows = self._first_per_key(rows[ok], key, cols["subject"], "admission")
        adm = {"hadm_id": key[rows], "subject_id": cols["subject"][rows], "admittime": t[rows]}
        adm["dischtime"], adm["died"] = self._discharges(cols, role, key, adm["hadm_id"])
        adm.update(self._categories(cols, role, key, rows, adm["hadm_id"]))
        return adm

    def _first_per_key(self, rows: np.ndarray, key: np.ndarray, subject: np.ndarray,
                       what: str) -> np.ndarray:
        """The first row of each id among `rows`, sorted by id; an id under two subjects is one
        InputError line (eICU's hadm_id holds the hospital's id: it cannot tell admissions
        apart)."""
        order = rows[np.argsort(key[rows], kind="stable")]
        same = key[order][1:] == key[order][:-1]
        mixed = same & (subject[order][1:] != subject[order][:-1])
        if mixed.any():
            self._shared_id(what, key[order][1:][mixed][0], subject[order][:-1][mixed][0],
                            subject[order][1:][mixed][0])
        self.count(f"{what} events repeating an id", same.sum())
        return order[np.append(True, ~same)] if len(order) else order

    def _shared_id(self, what: str, key, a, b) -> None:
        column = self.profile["admission_id"] if what == "admission" else self.profile["stay_id"]
        raise InputError(f"{self.profile['path']}: {what} id {column}={int(key)} belongs to "
                         f"subjects {int(a)} and {int(b)}, so column {column!r} does not identify "
                         f"{what}s (eICU's ETL writes the hospital's id in hadm_id); use "
                         "--meds-profile eicu or a profile whose admission_id is \"subject\"")

    def _discharges(self, cols: dict, role: np.ndarray, key: np.ndarray, hadm: np.ndarray):
        """(dischtime, died) per admission of `hadm` (sorted): the earliest discharge event of its
        id (NO_TIME: none);
        died when any of its discharge codes is a death."""
        rows = np.flatnonzero((role == R["discharge"]) & (cols["minutes"] != NO_TIME))
        at = lookup(hadm, key[rows])
        self.count("discharge events without their admission", (at < 0).sum())
        rows, at = rows[at >= 0], at[at >= 0]
        disch = np.full(len(hadm), NEVER)
        np.minimum.at(disch, at, cols["minutes"][rows])
        died = np.zeros(len(hadm), bool)
        died[at[self.codes.frozen()["died"][cols["code"][rows]]]] = True
        return np.where(disch == NEVER, NO_TIME, disch), died

    def _categories(self, cols: dict, role: np.ndarray, key: np.ndarray, rows: np.ndarray,
                    hadm: np.ndarray) -> dict:
        """{static category: list[str]} per admission: the named groups of its admission code, then
        the profile's admission columns on that row, then category codes of the same id (the last
        one wins)."""
        fields, strings = self.codes.fields, self.strings.values
        out = {c: [""] * len(hadm) for c in self.category_names()}
        for i, r in enumerate(rows.tolist()):
            for c, v in fields[cols["code"][r]].items():
                out[c][i] = v or ""
        for c in self.profile["admission_columns"]:
            if c in out:
                out[c] = [strings[v] if v >= 0 else "" for v in cols[c][rows].tolist()]
        extra = np.flatnonzero(role == R["category"])
        for r, a in zip(extra.tolist(), lookup(hadm, key[extra]).tolist()):
            if a >= 0:
                for c, v in fields[cols["code"][r]].items():
                    out[c][a] = v or ""
        return out

    def category_names(self) -> list[str]:
        """The static categories of admissions this profile can fill (STATIC_CATEGORIES order)."""
        named = {g for r in self.profile["rules"] if r["role"] in ("admission", "category")
                 for g in r["regex"].groupindex}
        named |= set(self.profile["admission_columns"])
        return [c for c in STATIC_CATEGORIES
                if c in named and c not in ("gender", "first_careunit")]

    def _stays(self, cols: dict, role: np.ndarray, adm: dict) -> dict:
        """The unit's ICU stays: an ICU admission event and the ICU discharge of the same stay id
        (without a stay id column, the subject's next one), its admission by id or else by time;
        numbered globally."""
        t, subject = cols["minutes"], cols["subject"]
        rows = np.flatnonzero((role == R["icu_admission"]) & (t != NO_TIME))
        out_rows = np.flatnonzero((role == R["icu_discharge"]) & (t != NO_TIME))
        if self.profile.get("stay_id"):
            key = cols["stay"]
            self.count("ICU admission events without a stay id", (key[rows] < 0).sum())
            rows = self._first_per_key(rows[key[rows] >= 0], key, subject, "ICU stay")
            outtime = np.full(len(rows), NEVER)
            at = lookup(key[rows], key[out_rows])
            np.minimum.at(outtime, at[at >= 0], t[out_rows[at >= 0]])
            stay_id = key[rows]
        else:
            rows = rows[np.lexsort((t[rows], subject[rows]))]
            paired = pair_in_order(subject[rows], np.zeros(len(rows)), t[rows], subject[out_rows],
                                   np.zeros(len(out_rows)), t[out_rows])
            outtime = np.where(paired >= 0, t[out_rows[np.maximum(paired, 0)]], NEVER)
            # made-up ids, above any real one
            stay_id = 10 ** 12 + self.n_stays + np.arange(len(rows))
        hadm = self._admission_key(cols)[rows]
        unknown = hadm < 0
        hadm[unknown] = admission_at(adm, subject[rows][unknown], t[rows][unknown])
        stays = {"stay_id": stay_id, "hadm_id": hadm,
                 "subject_id": subject[rows], "intime": t[rows],
                 "outtime": np.where(outtime == NEVER, NO_TIME, outtime),
                 "first_careunit": [self.codes.fields[c].get("first_careunit") or ""
                                    for c in cols["code"][rows]],
                 "meds_row": self.n_stays + np.arange(len(rows))}
        self.n_stays += len(rows)
        return stays

    def _patients(self, cols: dict, role: np.ndarray, subjects: np.ndarray) -> dict:
        """Per subject of the unit: gender (its first gender code), year of birth (calendar year of
        its birth event; NaN: none) and death time (its earliest death event; NO_TIME: none)."""
        pos = lookup(subjects, cols["subject"])
        gender = [""] * len(subjects)
        g = np.flatnonzero(role == R["gender"])
        # reversed: the first one wins
        for i, c in zip(pos[g][::-1].tolist(), cols["code"][g][::-1].tolist()):
            gender[i] = self.codes.fields[c]["gender"] or ""
        birth, death = np.full(len(subjects), NEVER), np.full(len(subjects), NEVER)
        for times, r in ((birth, R["birth"]), (death, R["death"])):
            rows = np.flatnonzero((role == r) & (cols["minutes"] != NO_TIME))
            np.minimum.at(times, pos[rows], cols["minutes"][rows])
        known = birth != NEVER
        year = np.full(len(subjects), np.nan)
        year[known] = (birth[known].astype("datetime64[m]").astype("datetime64[Y]").astype(np.int64)
                       + 1970)
        self.count("subjects without a birth event (no age: not adult)", (~known).sum())
        return {"subject_id": subjects, "gender": gender, "year_of_birth": year,
                "death": np.where(death == NEVER, NO_TIME, death)}

    def _coded(self, cols: dict, mask: np.ndarray, adm: dict, groups: tuple) -> dict:
        """Diagnosis or drug rows as {"hadm_id", group: list[str]}: the admission of the row's id,
        else the admission the row's time falls in (diagnoses are stamped at discharge, drugs carry
        no admission); rows with neither are dropped (counted by meds.MedsReader)."""
        rows = np.flatnonzero(mask)
        hadm = self._admission_key(cols)[rows].copy()
        known = lookup(adm["hadm_id"], hadm) >= 0
        timed = ~known & (cols["minutes"][rows] != NO_TIME)
        hadm[~known] = -1
        hadm[timed] = admission_at(adm, cols["subject"][rows][timed], cols["minutes"][rows][timed])
        fields = [self.codes.fields[c] for c in cols["code"][rows].tolist()]
        return {"hadm_id": hadm, **{g: [f[g] or "" for f in fields] for g in groups}}

    # --------------------------------------------------------------------------------------- events
    def _events(self, cols: dict, role: np.ndarray, stays: dict) -> np.ndarray:
        """Place the unit's events in its stays: onsets over the whole stay, and the last value of
        each (stay, hour, variable) of the first `hours` hours into the store, intervals spread over
        the hours they cover (as extract.stream_events does). Returns the onset hours (stays, onset
        tasks), inf where none."""
        onsets = np.full((len(stays["stay_id"]), len(self.codes.onset_tasks)), np.inf)
        arrays, t, subject, code = (self.codes.frozen(), cols["minutes"], cols["subject"],
                                    cols["code"])
        rows = np.flatnonzero(((role == R["event"]) | (role == R["event_start"])) & (t != NO_TIME))
        end, value_row = self._interval_ends(cols, role)
        n_events = len(rows)
        if len(stays["stay_id"]):
            index = StayIndex(stays["subject_id"], stays["intime"], stays["outtime"])
            rows = rows[index.admissions(subject[rows])]
            # an event in two stays: once for each
            event, stay, since = index.match(subject[rows], t[rows])
            inside, rows = len(unique(event)), rows[event]
        else:
            inside, rows, stay, since = 0, rows[:0], rows[:0], rows[:0]
        self.count(OUTSIDE_STAYS, n_events - inside)
        onset = arrays["onset"][code[rows]]
        hit = onset >= 0
        np.minimum.at(onsets, (stay[hit], onset[hit]), since[hit] / 60.0)
        # features: first T hours only
        keep = (since < self.hours * 60) & ~(hit & self.exclude)
        rows, stay, since = rows[keep], stay[keep], since[keep]
        num = self._numbers(cols, rows, value_row)
        cat = self._texts(cols, rows, num)
        hour = since // 60
        last = np.where(end[rows] != NO_TIME, (end[rows] - t[rows] + since - 1) // 60, hour)
        span = np.clip(np.minimum(last, self.hours - 1) - hour + 1, 1, self.hours)
        # the hours an interval covers
        spread = np.repeat(np.arange(len(rows)), span)
        stay, hour, since = stay[spread], hour[spread] + group_rank(span), since[spread]
        rows, num, cat = rows[spread], num[spread], cat[spread]
        var = arrays["var"][code[rows]]
        keep = last_per_cell(stay, hour, var, since, self.hours)
        self.store.add(stays["meds_row"][stay[keep]], hour[keep], var[keep], num[keep], cat[keep])
        return onsets

    def _interval_ends(self, cols: dict, role: np.ndarray):
        """Per row: the time of the end event paired with an interval start (NO_TIME: none) and the
        row whose value it takes (its own, or its end's when only the end carries one, as
        INFUSION_END carries the amount)."""
        t, subject, var = cols["minutes"], cols["subject"], self.codes.frozen()["var"][cols["code"]]
        end, value_row = np.full(len(t), NO_TIME, np.int64), np.arange(len(t))
        starts = np.flatnonzero((role == R["event_start"]) & (t != NO_TIME))
        ends = np.flatnonzero((role == R["event_end"]) & (t != NO_TIME))
        if len(starts):
            paired = pair_in_order(subject[starts], var[starts], t[starts],
                                   subject[ends], var[ends], t[ends])
            self.count("interval starts without their end (their own hour only)",
                       (paired < 0).sum())
            has = paired >= 0
            end[starts[has]] = t[ends[paired[has]]]
            values = self.codes.frozen()["values"]
            takes = has.copy()
            takes[has] = ((values[cols["code"][starts[has]]] == 0)
                          & (values[cols["code"][ends[paired[has]]]] > 0))
            value_row[starts[takes]] = ends[paired[takes]]
        return end, value_row

    def _numbers(self, cols: dict, rows: np.ndarray, value_row: np.ndarray) -> np.ndarray:
        """numeric_value where the row's (or its end's) rule takes numbers, else NaN."""
        source = value_row[rows]
        numeric = (self.codes.frozen()["values"][cols["code"][source]] & 1) > 0
        return np.where(numeric, cols["num"][source], np.nan).astype(np.float32)

    def _texts(self, cols: dict, rows: np.ndarray, num: np.ndarray) -> np.ndarray:
        """Category ids (EventStore.category_ids) of text_value where the rule takes text and there
        is no number; -1 elsewhere and for empty text (as the CSV reader treats an empty value)."""
        cat = np.full(len(rows), -1, np.int32)
        text = cols["text"][rows]
        need = (np.isnan(num) & ((self.codes.frozen()["values"][cols["code"][rows]] & 2) > 0)
                & (text >= 0))
        if need.any():
            ids, inverse = unique(text[need], return_inverse=True)
            values = np.array([self.strings.values[i].strip().encode() for i in ids.tolist()],
                              dtype=bytes)
            found = np.where(values == b"", -1, self.store.category_ids(values))
            cat[need] = found[inverse]
        return cat

    # --------------------------------------------------------------------------------------- result
    def result(self) -> dict:
        """{"patients" (sorted by subject_id), "admissions", "stays" (the records of load_core;
        stays carry "meds_row", their candidate number), "diagnoses" (hadm_id, version, code),
        "drugs" (hadm_id, drug), "onsets" (candidates, onset tasks), "events" (EventStore.result
        over candidates)}."""
        out = {k: _concatenate(v) for k, v in self.parts.items() if k != "onsets"}
        order = np.argsort(out["patients"]["subject_id"]) if out["patients"] else []
        out["patients"] = {k: v[order] if isinstance(v, np.ndarray) else [v[i] for i in order]
                           for k, v in out["patients"].items()}
        for name, key in (("admission", "admissions"), ("ICU stay", "stays")):
            ids = out[key]["hadm_id" if key == "admissions" else "stay_id"]
            order = np.argsort(ids, kind="stable")
            dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
            # units hold disjoint subjects: a repeat is another subject
            if len(dup):
                i, j = order[dup[0]], order[dup[0] + 1]
                self._shared_id(name, ids[i], out[key]["subject_id"][i], out[key]["subject_id"][j])
        out["onsets"] = np.concatenate(self.parts["onsets"]) if self.parts["onsets"] else \
            np.zeros((0, len(self.codes.onset_tasks)))
        out["events"] = self.store.result()
        return out


def _concatenate(parts: list[dict]) -> dict:
    """Per-unit records laid end to end (arrays concatenated, lists joined)."""
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) if isinstance(parts[0][k], np.ndarray) else
            [x for p in parts for x in p[k]] for k in parts[0]}


def last_per_cell(stay, hour, var, since, hours: int) -> np.ndarray:
    """Indices of the last row of each (stay, hour, variable key), in that order: the latest `since`
    (minutes since intime), the later row among equal ones, as extract.EventStore keeps them; one
    stable sort of a packed key (a lexsort when the key does not fit 62 bits)."""
    if not len(stay):
        return np.zeros(0, np.int64)
    bits = [int(x).bit_length() for x in (hours, int(var.max()), int(since.max()))]
    if int(stay.max()).bit_length() + sum(bits) <= 62:
        key = ((stay.astype(np.int64) << bits[0] | hour) << bits[1] | var) << bits[2] | since
        order = np.argsort(key, kind="stable")
        cell = key[order] >> bits[2]
        new = cell[1:] != cell[:-1]
    else:
        order = np.lexsort((since, var, hour, stay))
        new = (np.diff(stay[order]) != 0) | (np.diff(hour[order]) != 0) | (np.diff(var[order]) != 0)
    return order[np.append(new, True)]


def pair_in_order(sa, va, ta, sb, vb, tb) -> np.ndarray:
    """For each a, the index of its b (-1: none): the k-th a of a (subject, variable) group in time
    order takes the k-th b of the same group. Exact for intervals of one variable that do not
    overlap; overlapping ones cover the same hours either way (a count of starts minus ends), only
    which value an hour shows can differ."""
    s_rank = unique(np.concatenate([sa, sb]), return_inverse=True)[1]
    v_rank = unique(np.concatenate([va, vb]).astype(np.int64), return_inverse=True)[1]
    group = s_rank * (int(v_rank.max(initial=0)) + 1) + v_rank
    keys = []
    for g, t in ((group[:len(sa)], ta), (group[len(sa):], tb)):
        order = np.lexsort((t, g))
        rank = np.empty(len(g), np.int64)
        rank[order] = np.arange(len(g)) - np.searchsorted(g[order], g[order])
        keys.append(g << 24 | rank)
    order_b = np.argsort(keys[1])
    pos = np.minimum(np.searchsorted(keys[1][order_b], keys[0]), max(len(order_b) - 1, 0))
    found = (keys[1][order_b][pos] == keys[0]) if len(order_b) else np.zeros(len(sa), bool)
    return np.where(found, order_b[pos] if len(order_b) else -1, -1)


def admission_at(adm: dict, subject: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The hadm_id of the admission of `subject` whose [admittime, dischtime] holds `t` (the one
    discharged first when two do: a diagnosis stamped at a discharge belongs to that admission), -1
    where none."""
    if not len(adm["hadm_id"]) or not len(t):
        return np.full(len(t), -1, np.int64)
    base = min(int(adm["admittime"].min()), int(t.min()))
    top = max(int(adm["dischtime"].max()), int(t.max())) + 1
    # an open one ends after all
    disch = np.where(adm["dischtime"] != NO_TIME, adm["dischtime"], top) - base
    subjects = unique(adm["subject_id"])
    key = np.searchsorted(subjects, adm["subject_id"]).astype(np.int64) << 40 | disch
    order = np.argsort(key)
    rank = lookup(subjects, subject)
    pos = np.minimum(np.searchsorted(key[order], np.maximum(rank, 0) << 40 | (t - base)),
                     len(order) - 1)
    a = order[pos]
    ok = ((rank >= 0) & (adm["subject_id"][a] == subject) & (adm["admittime"][a] <= t)
          & (disch[a] >= t - base))
    return np.where(ok, adm["hadm_id"][a], -1)
