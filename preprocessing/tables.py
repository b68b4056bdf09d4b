"""Tables: finding and reading the CSV extracts fast, column by column, in bounded memory.

The lowest module of the preprocessing package (imports numpy, the stdlib and `folders.InputError`);
the other modules of the package build on it. What it does:
  * `find_layout(raw)` tells MIMIC-III (flat TABLE.csv[.gz]), MIMIC-IV (hosp/ + icu/) and a
    diagnosis extract (patient + diagnosis) apart; file and column names match case-insensitively;
    `.csv` or `.csv.gz` (both for one table is an error: either could be the one meant).
  * `open_table` is the one way a table is opened (gzip by magic number, every member of it);
    `read_blocks(src, columns)` streams it in blocks of about 16 MB of text and returns the wanted
    columns as numpy byte-string arrays. Rows without quotes (nearly all event rows) are cut with
    numpy on the raw bytes; rows with quotes go through `csv.reader`, so quoting is honoured and row
    order kept. Rows of another field count are skipped and counted; a quote that never closes (it
    would swallow the rest of the table) stops the run.
  * vectorised parsers for ids, numbers and timestamps (surrounding spaces ignored), returning
    values plus a validity mask.
Memory is bounded by the block size, never by the size of the file.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from folders import InputError

BLOCK_BYTES = 1 << 24  # 16 MiB of decompressed text per block: large enough to amortise numpy calls
# the longest row a table may have: far above any real one (a MIMIC discharge summary is under
# 100 kB), so a row that grows past it holds a quote that never closes, and the reader stops rather
# than swallow the table
MAX_RECORD_BYTES = 1 << 22
# the longest field of a column that is read: MIMIC's longest (CHARTEVENTS value) is 255 characters.
# A column is gathered as one fixed-width array, (rows, longest field) bytes, so one longer field
# would widen every row of its block; its row is skipped and counted instead (a field this long is
# no id, time, number, code or category)
MAX_FIELD_BYTES = 1 << 10
# a table that loses more than this share of its rows says so first, in its warning line
MOST = 0.5
# a time that is missing: no valid time (int64 minutes since 1970, negative before 1970) can take
# this value
NO_TIME = np.iinfo(np.int64).min
# what a table that is no CSV text starts with: (magic bytes, what it is, what to do)
NOT_CSV = ((b"PK\x03\x04", "a zip archive (an Excel .xlsx file is one)",
            "unzip it, or export the sheet as CSV"),
           (b"BZh", "a bzip2 file", "decompress it (bunzip2), or recompress it with gzip"),
           (b"\x28\xb5\x2f\xfd", "a zstd file",
            "decompress it (zstd -d), or recompress it with gzip"),
           (b"\xfd7zXZ\x00", "an xz file", "decompress it (xz -d), or recompress it with gzip"),
           (b"7z\xbc\xaf\x27\x1c", "a 7z archive", "extract it"),
           (b"\xff\xfe", "UTF-16 text", "convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8"),
           (b"\xfe\xff", "UTF-16 text", "convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8"))


class EmptyFile(InputError):
    """A table without a header line (a zero-byte file, or a gzip of nothing)."""


# ------------------------------------------------------------------------------------------ layouts
# logical table -> file stem per layout. MIMIC-IV notes live in a separate MIMIC-IV-Note folder
# (note/).
LAYOUTS = {
    "mimic3": {"patients": "PATIENTS", "admissions": "ADMISSIONS", "icustays": "ICUSTAYS",
               "diagnoses": "DIAGNOSES_ICD", "prescriptions": "PRESCRIPTIONS",
               "notes": "NOTEEVENTS", "chartevents": "CHARTEVENTS", "labevents": "LABEVENTS",
               "outputevents": "OUTPUTEVENTS", "inputevents": "INPUTEVENTS_MV",
               "procedureevents": "PROCEDUREEVENTS_MV", "datetimeevents": "DATETIMEEVENTS",
               "d_items": "D_ITEMS", "d_labitems": "D_LABITEMS"},
    "mimic4": {"patients": "hosp/patients", "admissions": "hosp/admissions",
               "icustays": "icu/icustays", "diagnoses": "hosp/diagnoses_icd",
               "prescriptions": "hosp/prescriptions", "notes": "note/discharge",
               "chartevents": "icu/chartevents", "labevents": "hosp/labevents",
               "outputevents": "icu/outputevents", "inputevents": "icu/inputevents",
               "procedureevents": "icu/procedureevents", "datetimeevents": "icu/datetimeevents",
               "d_items": "icu/d_items", "d_labitems": "hosp/d_labitems"},
    "trinetx": {"patients": "patient", "diagnoses": "diagnosis"},
}
# canonical column -> column name in the source, where they differ (MIMIC-III icustay_id is stay_id)
ALIASES = {"mimic3": {"stay_id": "icustay_id", "icd_code": "icd9_code", "race": "ethnicity"},
           "mimic4": {}, "trinetx": {"subject_id": "patient_id", "hadm_id": "encounter_id"}}


def find_file(folder: Path, stem: str) -> Path | None:
    """The file `stem.csv` or `stem.csv.gz` under `folder`, matching every path part
    case-insensitively."""
    here = folder
    for part in stem.split("/")[:-1]:
        here = _child(here, lambda name: name.lower() == part.lower())
        if here is None:
            return None
    name = stem.split("/")[-1].lower()
    return _child(here, lambda n: n.lower() in (f"{name}.csv", f"{name}.csv.gz"))


def _child(folder: Path, match) -> Path | None:
    """The one entry of `folder` whose name matches; two (TABLE.csv beside TABLE.csv.gz, or two case
    variants) are an InputError naming both, since either could be the table meant."""
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if match(p.name))
    if len(hits) > 1:
        raise InputError(f"{folder}: both {hits[0].name} and {hits[1].name} match one table; keep "
                         "only one of them")
    return hits[0] if hits else None


def find_layout(raw: Path) -> str:
    """Which layout `raw` holds; an InputError says what was expected when none (or several)
    match."""
    if not raw.is_dir():
        raise InputError(f"{raw}: no such folder (pass --raw with the folder of CSV extracts)")
    found = [name for name, tables in LAYOUTS.items()
             if find_file(raw, tables["admissions" if "admissions" in tables else "diagnoses"])
             and find_file(raw, tables["patients"])]
    if len(found) != 1:
        what = "both " + " and ".join(found) if found else "no known layout"
        raise InputError(f"{raw}: {what}; expected ADMISSIONS.csv[.gz] + PATIENTS (MIMIC-III), "
                         "hosp/admissions.csv[.gz] + hosp/patients (MIMIC-IV), or patient + "
                         "diagnosis (diagnosis extract), alone in one folder")
    return found[0]


# ------------------------------------------------------------------------------------------ reading
@dataclass
class Source:
    """One table being read: where it is, how far, and the hash of its bytes (for meta.json)."""
    path: Path
    header: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # canonical names of the columns found
    # canonical name -> name in the file (for messages)
    names: dict = field(default_factory=dict)
    bytes_read: int = 0
    rows: int = 0
    bad_rows: int = 0
    first_bad_row: int = 0
    sha256: str = ""
    # present, but without a header line (skipped if optional)
    empty: bool = False
    # reason -> rows with a bad value: skipped (or read, `kept`)
    skipped: dict = field(default_factory=dict)
    # reason -> "row R, column 'c': 'value'" of the first one
    first_skipped: dict = field(default_factory=dict)
    # reasons whose rows are read anyway (a number as a category)
    kept: set = field(default_factory=set)
    # rows that gave the output something (None: not counted)
    used: int | None = None

    def describe(self) -> dict:
        return {"path": str(self.path), "bytes": self.path.stat().st_size, "rows": self.rows,
                "sha256": self.sha256, "bad_rows": self.bad_rows,
                "first_bad_row": self.first_bad_row}

    def skip(self, reason: str, rows, column: str, first_value: bytes = b"",
             kept: bool = False) -> None:
        """Count the rows `rows` (line numbers) with a bad value in `column` under `reason`; the
        first one's row and value are kept for the warning line. `kept`: the rows are read anyway,
        so they count as no loss."""
        if len(rows) == 0:
            return
        self.skipped[reason] = self.skipped.get(reason, 0) + len(rows)
        if reason not in self.first_skipped:
            shown = (first_value[:40].decode("utf-8", "replace")
                     + ("..." if len(first_value) > 40 else ""))
            self.first_skipped[reason] = (f"row {int(rows[0])}, column "
                                          f"'{self.names.get(column, column)}': '{shown}'")
        if kept:
            self.kept.add(reason)

    def lost(self) -> int:
        """Rows of the table not read: malformed, or skipped for a bad value."""
        return self.bad_rows + sum(n for reason, n in self.skipped.items()
                                   if reason not in self.kept)

    def warnings(self) -> list[str]:
        """The `warning:` lines of this table for the end of a run: empty (left out); rows skipped,
        with the first of each kind (and, first, how many when most were lost); rows read but none
        used."""
        if self.empty:
            return [f"warning: {self.path}: the file is empty (no header line); the table was left "
                    "out (re-download it if it should hold rows)"]
        parts = ([f"{self.bad_rows:,} malformed rows skipped (first at row {self.first_bad_row})"]
                 * bool(self.bad_rows))
        parts += [f"{n:,} rows with {'an' if reason[0] in 'aeiou' else 'a'} {reason} (first at "
                  f"{self.first_skipped[reason]})" for reason, n in self.skipped.items()]
        total, lost = self.rows + self.bad_rows, self.lost()
        most = (f"{lost:,} of {total:,} rows lost ({lost / max(total, 1):.0%}): "
                if lost > MOST * total else "")
        lines = ([f"warning: {self.path}: {most}{'; '.join(parts)} (meta.json: sources, skipped)"]
                 if parts else [])
        # (all lost: the line above says so)
        if self.used == 0 and (total == 0 or lost < total):
            what = ("it has a header but no rows" if total == 0
                    else f"none of its {total - lost:,} rows read was used")
            lines.append(f"warning: {self.path}: {what}; nothing of this table is in the output")
        return lines


class _HashingReader(io.RawIOBase):
    """A raw binary stream over a file that hashes every byte read and counts them (for
    progress)."""

    def __init__(self, f):
        self.f, self.digest, self.bytes_read = f, hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, buffer):
        n = self.f.readinto(buffer)
        self.digest.update(memoryview(buffer)[:n])
        self.bytes_read += n
        return n

    def close(self):
        self.f.close()
        super().close()


def open_table(src: Source):
    """(hashing raw reader, binary stream of the table's text) over `src.path`: the one way every
    reader opens a table. The file is opened once (it may be a named pipe, which can be read only
    once): gzip is told by its magic number, peeked, whatever the name, and read member after member
    (`cat a.gz b.gz > t.gz` is one valid gzip file, which zcat reads whole); `raw.bytes_read` gives
    progress and `raw.digest` the sha256 of the file's bytes. A folder, an unreadable file or one
    that is no CSV text (a zip, bzip2, zstd, UTF-16) is an InputError saying what it is; read errors
    of the stream go through `read_error`."""
    try:
        f = open(src.path, "rb")
    except IsADirectoryError:
        raise InputError(f"{src.path}: a folder, not a table; expected a CSV file "
                         "(.csv, or .csv.gz)") from None
    except OSError as err:
        raise InputError(f"{src.path}: cannot be read ({err.strerror or err})") from None
    raw = _HashingReader(f)
    buffered = io.BufferedReader(raw, buffer_size=1 << 20)
    try:
        gz = buffered.peek(2)[:2] == b"\x1f\x8b"
        stream = gzip.GzipFile(fileobj=buffered) if gz else buffered
        _check_text(src, stream.peek(64)[:64], gz)
    except (OSError, EOFError, zlib.error) as err:
        raw.close()
        raise read_error(src, err) from None
    except InputError:
        raw.close()
        raise
    return raw, stream


def _check_text(src: Source, head: bytes, gz: bool) -> None:
    """An InputError naming what the table is when its first bytes (after gzip) are not CSV text."""
    inside = "a gzip file of " if gz else ""
    for magic, what, fix in NOT_CSV:
        if head.startswith(magic):
            raise InputError(f"{src.path}: {inside}{what}, not a CSV table; expected UTF-8 CSV "
                             f"text, plain or gzip-compressed (.csv or .csv.gz): {fix}")
    if b"\x00" in head:
        raise InputError(f"{src.path}: {inside}binary data or UTF-16 text (NUL bytes), not a CSV "
                         "table; expected UTF-8 CSV text, plain or gzip-compressed "
                         "(.csv or .csv.gz)")


def read_error(src: Source, err: Exception) -> InputError:
    """The one-line InputError for a table whose bytes cannot be read (a truncated or corrupt
    gzip)."""
    if isinstance(err, EOFError):
        return InputError(f"{src.path}: not a readable gzip file: it is truncated (re-download or "
                          "re-compress it)")
    return InputError(f"{src.path}: not a readable gzip file ({err})")


def _raw_chunks(src: Source, chunk: int):
    """Decompressed bytes of the table in pieces of `chunk`; hashes the file's bytes as it goes."""
    raw, stream = open_table(src)
    with raw, stream:
        while True:
            try:
                data = stream.read(chunk)
            except (OSError, EOFError, zlib.error) as err:
                raise read_error(src, err) from None
            src.bytes_read = raw.bytes_read
            if not data:
                break
            yield data
    src.sha256 = raw.digest.hexdigest()


def read_blocks(src: Source, columns: dict[str, bool], aliases: dict[str, str] | None = None,
                block_bytes: int = BLOCK_BYTES):
    """Yield a `Block` per ~16 MB of `src`; `block[name]` or `block.get(name, rows)` gathers a
    column.

    `columns` maps canonical names to whether they are required; a missing required column is an
    InputError naming the file and column, a missing optional one is absent (`name in block` is
    False). Gathering is lazy, so callers filter on cheap columns first and cut the wide ones only
    for kept rows.
    """
    aliases = aliases or {}
    pending, row0, want = b"", 1, None
    for data in _raw_chunks(src, block_bytes // 4):
        data = pending + data
        if want is None:
            if b"\n" not in data:
                if len(data) > MAX_RECORD_BYTES:
                    raise too_long(src, 0)
                pending = data
                continue
            data, want = _read_header(src, data, columns, aliases)
        cut = _row_end(data)
        # by quote parity one row runs on: csv's rules decide
        if len(data) - cut > MAX_RECORD_BYTES:
            cut = _csv_cut(src, data, row0, at_end=False)
        # one line, quoted or not
        if len(data) - cut > MAX_RECORD_BYTES and data.find(b"\n", cut) < 0:
            raise too_long(src, row0 + data.count(b"\n", 0, cut))
        pending, data = data[cut:], data[:cut]
        if data:
            block = _parse_block(src, data, want, row0)
            row0 += block.n_lines
            yield block
    # a header without a newline, or nothing at all
    if want is None:
        pending, want = _read_header(src, pending, columns, aliases)
    # a quote open at the end, by parity: csv's rules decide
    if pending.count(b'"') % 2:
        _csv_cut(src, pending, row0, at_end=True)
    if pending.strip():
        yield _parse_block(src, pending + b"\n", want, row0)


def runaway_quote(src: Source, row: int, what: str) -> InputError:
    """A quoted field that swallows the rest of the table (an unbalanced or unescaped '"'): reading
    on would drop every later row without a word, so the run stops here, naming the row where the
    quote opened."""
    return InputError(f'{src.path}: row {row}: a quoted field opened in this row {what} (an '
                      'unbalanced or unescaped \'"\'; escape it as \'""\' or remove the row)')


def too_long(src: Source, row: int) -> InputError:
    """A line longer than any row may be (MAX_RECORD_BYTES) without a line break: reading on would
    hold it whole."""
    what = "the header line" if row == 0 else f"row {row}"
    return InputError(f"{src.path}: {what} runs over {MAX_RECORD_BYTES >> 20} MiB without a line "
                      "break; a CSV table has one row per line (is this a CSV table, whole and "
                      "undamaged?)")


class CsvLines:
    """The lines of a table as fed to csv.reader, watched, so that no quote can swallow the rest of
    it.

    `rows()` yields (row number, fields) per record; `row` is the number of the next record (0: the
    header). A record longer than MAX_RECORD_BYTES is a `runaway_quote` error, and so is one that
    csv.reader returns only after the last line (it does so only for a quoted field still open at
    the end of the file) when `at_end`; otherwise that unfinished record is left out (the caller
    reads on). Once `n_fields` is set, a record over several lines with another number of fields is
    one too: a stray quote has shifted the quoting of what follows (rows merged into a field, note
    text read as rows). `lines_done` counts the lines of the records yielded so far."""

    def __init__(self, src: Source, lines, row: int = 0, at_end: bool = True,
                 n_fields: int | None = None):
        self.src, self.lines, self.row, self.at_end, self.n_fields = (
            src, iter(lines), row, at_end, n_fields)
        self.size, self.n_lines, self.lines_done, self.ended = 0, 0, 0, False

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            line = next(self.lines)
        except StopIteration:
            self.ended = True
            raise
        self.size, self.n_lines = self.size + len(line), self.n_lines + 1
        if self.size > MAX_RECORD_BYTES:
            raise runaway_quote(self.src, self.row,
                                f"does not close within {MAX_RECORD_BYTES >> 20} MiB")
        return line

    def rows(self):
        # the record bound rules, not csv's
        csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_BYTES + 1))
        for fields in csv.reader(self):
            if self.ended:
                if self.at_end:
                    raise runaway_quote(self.src, self.row, "is still open at the end of the file")
                return
            lines = self.n_lines - self.lines_done
            if lines > 1 and self.n_fields is not None and len(fields) != self.n_fields:
                since = (f", after malformed rows from row {self.src.first_bad_row} on"
                         if self.src.bad_rows else "")
                raise runaway_quote(self.src, self.row, f"runs over {lines} lines into a row of "
                                                        f"{len(fields)} fields, not "
                                                        f"{self.n_fields}{since}")
            yield self.row, fields
            self.row, self.size, self.lines_done = self.row + 1, 0, self.n_lines


def _csv_cut(src: Source, data: bytes, row0: int, at_end: bool) -> int:
    """Offset just past the last whole record of `data` by csv's rules, where a quote opens a field
    only at its start (quote parity is fooled by a bare '"' inside an unquoted field); a runaway
    quote raises."""
    # whole lines only
    lines = (data if at_end else data[:data.rfind(b"\n") + 1]).splitlines(keepends=True)
    watch = CsvLines(src, (line.decode("utf-8", "replace") for line in lines), row0, at_end)
    for _ in watch.rows():
        pass
    return sum(len(line) for line in lines[:watch.lines_done])


def _row_end(data: bytes) -> int:
    """Offset just past the last newline that ends a row (not one inside a quoted field); 0 if
    none."""
    if b'"' not in data:
        return data.rfind(b"\n") + 1
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)
    # even quotes before: between rows
    outside = np.searchsorted(np.flatnonzero(buf == 34), nl) % 2 == 0
    return int(nl[outside][-1]) + 1 if outside.any() else 0


def _read_header(src: Source, data: bytes, columns: dict[str, bool], aliases: dict[str, str]):
    end = data.find(b"\n") + 1 if b"\n" in data else len(data)
    line = data[:end].decode("utf-8-sig", errors="replace").strip("\r\n")
    src.header = header_names(src.path, next(csv.reader([line]), []))
    if not any(src.header):
        src.empty = True
        raise EmptyFile(f"{src.path}: the file is empty (no header line)")
    want = {}
    for name, required in columns.items():
        source_name = aliases.get(name, name)
        if source_name in src.header:
            want[name] = src.header.index(source_name)
        elif required:
            other = next((f" (separated by {name}? expected commas)"
                          for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars"))
                          if len(src.header) == 1 and sep in src.header[0]), "")
            raise InputError(f"{src.path}: missing column '{source_name}' "
                             f"(columns are: {', '.join(src.header)}){other}")
    src.columns = [name for name in want]
    src.names = {name: aliases.get(name, name) for name in want}
    want["__ncol__"] = len(src.header)
    return data[end:], want


def header_names(path: Path, fields: list[str]) -> list[str]:
    """The column names of a header row, stripped and lower-cased (names match case-insensitively);
    a name that appears twice is an InputError, since either column could be the one meant."""
    names = [c.strip().lower() for c in fields]
    seen = {}
    for k, name in enumerate(names):
        if name and name in seen:
            raise InputError(f"{path}: column '{name}' appears twice in the header (columns "
                             f"{seen[name] + 1} and {k + 1}); rename or remove one")
        seen[name] = k
    return names


class Block:
    """Whole lines of one table: field k of good row i is buf[starts[i, k]:ends[i, k]]."""

    def __init__(self, buf, starts, ends, names, rows, n_lines):
        self.buf, self.starts, self.ends = buf, starts, ends
        self.names = {name: k for k, name in enumerate(names)}
        self.rows = rows            # (n,) 1-based line numbers of the good rows, for messages
        self.n_lines = n_lines

    def __len__(self):
        return len(self.rows)

    def __contains__(self, name):
        return name in self.names

    def __getitem__(self, name):
        return self.get(name)

    def get(self, name, sel=None):
        """Column `name` as an S array, for all good rows or the rows `sel` (index or mask)."""
        k = self.names[name]
        s, e = self.starts[:, k], self.ends[:, k]
        if sel is not None:
            s, e = s[sel], e[sel]
        return _gather(self.buf, s, e)


def _parse_block(src: Source, data: bytes, want: dict[str, int], row0: int) -> Block:
    """Find the fields of `data` (whole lines): numpy on the raw bytes; rows with quotes via
    csv.reader."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
    ncol, names = want["__ncol__"], [n for n in want if n != "__ncol__"]
    cols = np.array([want[n] for n in names], dtype=np.int64)
    buf = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(buf == 10)                             # (lines,) end of each line
    line_start = np.concatenate(([0], nl[:-1] + 1))            # (lines,) start of each line
    # one row over the record limit, quoted or not
    if len(nl) and (nl - line_start).max() > MAX_RECORD_BYTES:
        raise too_long(src, row0 + int(np.argmax(nl - line_start > MAX_RECORD_BYTES)))
    bounds = np.concatenate(([0], nl))
    commas = np.flatnonzero(buf == 44)
    n_commas = np.diff(np.searchsorted(commas, bounds))        # commas per line
    n_quotes = np.diff(np.searchsorted(np.flatnonzero(buf == 34), bounds))
    # a quoted field spans lines: csv does it all
    if (n_quotes % 2).any():
        return _parse_with_csv(src, data, names, cols, ncol, row0)
    blank = nl == line_start
    clean = (n_commas == ncol - 1) & (n_quotes == 0) & ~blank
    # field j of a clean line starts after its comma j-1 and ends at its comma j (or at the line's
    # ends)
    first = np.searchsorted(commas, line_start[clean])        # (n_clean,) each line's first comma
    starts = np.stack([line_start[clean] if j == 0 else commas[first + j - 1] + 1 for j in cols],
                      axis=1)
    # (n_clean, k)
    ends = np.stack([nl[clean] if j == ncol - 1 else commas[first + j] for j in cols], axis=1)
    dirty = np.flatnonzero(~clean & ~blank)
    good = clean
    # quoted lines: csv.reader, fields appended
    if len(dirty):
        rows = list(csv.reader(data[line_start[i]:nl[i]].decode("utf-8", "replace") for i in dirty))
        fits = np.array([len(r) == ncol for r in rows], dtype=bool)
        count_bad(src, row0 + dirty[~fits])
        fields = [r[j].encode() for r, ok in zip(rows, fits) if ok for j in cols]
        lens = np.array([len(f) for f in fields], dtype=np.int64)
        extra_start = len(buf) + np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lens) else lens
        buf = np.concatenate([buf, np.frombuffer(b"".join(fields), dtype=np.uint8)])
        good = clean.copy()
        good[dirty[fits]] = True
        order = np.argsort(np.concatenate([np.flatnonzero(clean), dirty[fits]]), kind="stable")
        starts = np.concatenate([starts, extra_start.reshape(-1, len(cols))])[order]
        ends = np.concatenate([ends, (extra_start + lens).reshape(-1, len(cols))])[order]
    return _fields_in_bounds(src, Block(buf, starts, ends, names, row0 + np.flatnonzero(good),
                                        len(nl)))


def _parse_with_csv(src: Source, data: bytes, names, cols, ncol: int, row0: int) -> Block:
    """Slow path for blocks where a quoted field holds a newline (rare outside note tables)."""
    lines = (line.decode("utf-8", "replace") for line in data.splitlines(keepends=True))
    rows = [fields for _, fields in CsvLines(src, lines, row0, n_fields=ncol).rows()]
    fits = np.array([len(r) == ncol for r in rows], dtype=bool)
    count_bad(src, row0 + np.flatnonzero(~fits & np.array([bool(r) for r in rows], dtype=bool)))
    fields = [r[j].encode() for r, ok in zip(rows, fits) if ok for j in cols]
    lens = np.array([len(f) for f in fields], dtype=np.int64)
    starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lens) else lens
    buf = np.frombuffer(b"".join(fields), dtype=np.uint8)
    shape = (-1, len(cols))
    return _fields_in_bounds(src, Block(buf, starts.reshape(shape), (starts + lens).reshape(shape),
                                        names, row0 + np.flatnonzero(fits), len(rows)))


def _fields_in_bounds(src: Source, block: Block) -> Block:
    """`block` without its rows that have a field over MAX_FIELD_BYTES in a column read (skipped and
    counted), so that gathering a column never widens every row to one huge field; adds the rows
    read to `src.rows`."""
    src.rows += len(block)
    long = (block.ends - block.starts > MAX_FIELD_BYTES) if len(block) else np.zeros((0, 1), bool)
    if not long.any():
        return block
    i, k = np.argwhere(long)[0]
    name = next(n for n, j in block.names.items() if j == k)
    bad = long.any(axis=1)
    src.skip(f"field over {MAX_FIELD_BYTES} bytes", block.rows[bad], name,
             bytes(block.buf[block.starts[i, k]:block.starts[i, k] + 41]))
    block.starts, block.ends, block.rows = block.starts[~bad], block.ends[~bad], block.rows[~bad]
    return block


def count_bad(src: Source, row_numbers) -> None:
    """Count malformed rows (a field count other than the header's) of `src`, keeping the first row
    number."""
    if len(row_numbers):
        if not src.bad_rows:
            src.first_bad_row = int(row_numbers[0])
        src.bad_rows += len(row_numbers)


def _gather(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Byte fields buf[starts[i]:ends[i]] as one fixed-width S array, without a Python loop."""
    lens = ends - starts
    width = max(int(lens.max()) if len(lens) else 1, 1)
    padded = np.concatenate([buf, np.zeros(width, np.uint8)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, width)  # (len(buf)+1, width) view
    out = windows[starts]                                               # (n, width) copy
    # zero the bytes past each field
    out *= np.arange(width, dtype=np.int64)[None, :] < lens[:, None]
    return out.view(f"S{width}").ravel()


def read_table(path: Path, columns: dict[str, bool], aliases: dict[str, str] | None = None):
    """A whole (small) table: ({column: S-array, "__row__": line numbers}, Source)."""
    src = Source(path)
    blocks = list(read_blocks(src, columns, aliases))
    out = {name: np.concatenate([b[name] for b in blocks]) if blocks else np.zeros(0, "S1")
           for name in src.columns}
    out["__row__"] = np.concatenate([b.rows for b in blocks]) if blocks else np.zeros(0, np.int64)
    return out, src


# ------------------------------------------------------------------------------------------ parsing
SPACES = np.frombuffer(b" \t\r\n\x0b\x0c", dtype=np.uint8)   # what np.char.strip removes


def strip(values: np.ndarray) -> np.ndarray:
    """`values` (an S array) without surrounding whitespace, which some exports pad fields with
    (', 10006'); returned as is, without a copy, when no value starts or ends with whitespace (the
    usual case)."""
    if len(values) == 0:
        return values
    lens = np.char.str_len(values)
    b = values.view(np.uint8).reshape(len(values), values.itemsize)
    ends = np.concatenate([b[:, 0], b[np.arange(len(values)), np.maximum(lens - 1, 0)]])
    return np.char.strip(values) if np.isin(ends, SPACES).any() else values


# the most digits an id may have: every 18-digit number fits int64 (19 may overflow)
ID_DIGITS = 18


def parse_int(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal integers (ids, flags, versions) from an S array -> (int64 values, ok mask);
    surrounding whitespace is ignored. An integral float, '100001.0' (what pandas writes for an
    integer column with blanks), is that integer; empty, a sign, other characters, a fraction
    ('1.5') or over ID_DIGITS digits is not ok."""
    values = strip(values)
    lens = np.char.str_len(values)
    # longer values are not ok: look at no more
    width = min(values.itemsize, ID_DIGITS + 8)
    # (n, width) view
    chars = values.view(np.uint8).reshape(len(values), values.itemsize)[:, :width]
    at = np.arange(width)[None, :]
    used = at < lens[:, None]
    # the positions of the integer's digits, their number
    whole, n_digits = used, lens
    ok = (lens > 0) & (lens <= width)
    dot = used & (chars == 46)
    # '100001.0': digits, then '.' and zeros only
    if dot.any():
        n_digits = np.where(dot.any(axis=1), dot.argmax(axis=1), lens)
        whole = at < n_digits[:, None]
        ok &= (n_digits > 0) & ((chars == 48) | ~used | whole
                                | (at == n_digits[:, None])).all(axis=1)
    ok &= (n_digits <= ID_DIGITS) & (((chars >= 48) & (chars <= 57)) | ~whole).all(axis=1)
    out = np.zeros(len(values), np.int64)
    for k in range(min(width, ID_DIGITS)):
        out = np.where(whole[:, k], out * 10 + chars[:, k] - 48, out)
    return np.where(ok, out, 0), ok


INTEGRAL = re.compile(r"\s*(\d{1,%d})(?:\.0*)?\s*" % ID_DIGITS)


def parse_id(text: str) -> int | None:
    """`parse_int` for one str (rows read by csv.reader, as notes are): the integer, or None when
    not ok."""
    m = INTEGRAL.fullmatch(text)
    return int(m[1]) if m else None


def integral_text(values: np.ndarray) -> np.ndarray:
    """`values` (an S array) stripped, with the integral floats written as integers ('10.0' ->
    '10'): ids that need not be numbers (a diagnosis extract's) and ICD versions compare as text,
    where '10.0' must be '10'."""
    values = strip(values)
    numbers, ok = parse_int(values)
    dotted = ok & (np.char.find(values, b".") >= 0) if len(values) else ok
    return np.where(dotted, numbers.astype(values.dtype), values) if dotted.any() else values


def parse_float(values: np.ndarray) -> np.ndarray:
    """Numbers from an S array -> float64, NaN where empty or not a number."""
    vals = np.char.strip(values)
    vals = np.where(vals == b"", b"nan", vals)
    try:
        return vals.astype(np.float64)
    except ValueError:
        return np.array([_to_float(v) for v in vals], dtype=np.float64)


def _to_float(v: bytes) -> float:
    try:
        return float(v)
    except ValueError:
        return float("nan")


def parse_minutes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps -> (int64 minutes since 1970-01-01, ok mask).

    Accepts 'YYYY-MM-DD HH:MM:SS' (MIMIC), 'YYYY-MM-DD HH:MM', 'YYYY-MM-DDTHH:MM:SS', 'YYYY-MM-DD'
    and 'YYYYMMDD' (TriNetX), with surrounding whitespace ignored. Empty or malformed values are not
    ok (the caller counts or reports them).
    """
    values = strip(values)
    n = len(values)
    d = np.full((n, 19), -48, np.int64)                  # digit values; -48 marks "no character"
    raw = values.view(np.uint8).reshape(n, values.itemsize)[:, :19]
    d[:, :raw.shape[1]] = raw.astype(np.int64) - 48
    lens = np.char.str_len(values)
    compact = lens == 8                                  # YYYYMMDD
    if compact.any():                                    # re-seat YYYYMMDD as YYYY-MM-DD
        d[compact, 8:10], d[compact, 5:7], d[compact, 4] = d[compact, 6:8], d[compact, 4:6], -3
        d[compact, 7] = -3
        lens = np.where(compact, 10, lens)
    is_digit = (d >= 0) & (d <= 9)
    digit_pos = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
    need = np.array(digit_pos)[None, :] < lens[:, None]  # digit positions this length uses
    ok = np.isin(lens, [10, 16, 19]) & (is_digit[:, digit_pos] | ~need).all(axis=1)
    ok &= (d[:, 4] == -3) & (d[:, 7] == -3)              # '-' separators ('-' is 45 = 48 - 3)

    def num(*cols):
        v = np.zeros(n, np.int64)
        for c in cols:
            v = v * 10 + np.where(is_digit[:, c], d[:, c], 0)
        return v
    month, day = num(5, 6), num(8, 9)
    hour = np.where(lens >= 16, num(11, 12), 0)
    minute = np.where(lens >= 16, num(14, 15), 0)
    ok &= (month >= 1) & (month <= 12) & (day >= 1) & (day <= 31) & (hour <= 23) & (minute <= 59)
    days = _days_from_civil(num(0, 1, 2, 3), np.clip(month, 1, 12), day)
    return np.where(ok, days * 1440 + hour * 60 + minute, 0), ok


def _days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm), vectorised."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * ((m + 9) % 12) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def unique(x: np.ndarray, return_inverse: bool = False, return_counts: bool = False):
    """np.unique by sorting. numpy 2.x hashes integers in np.unique, far slower than a sort on wide
    int64 keys (docs/performance.md), and our composite keys are wide."""
    if not (return_inverse or return_counts):
        s = np.sort(x)
        return s[np.append(True, s[1:] != s[:-1])] if len(s) else s
    order = np.argsort(x, kind="stable")
    s = x[order]
    first = np.append(True, s[1:] != s[:-1]) if len(s) else np.zeros(0, bool)
    out = [s[first]]
    if return_inverse:
        inverse = np.empty(len(x), np.int64)
        inverse[order] = np.cumsum(first) - 1
        out.append(inverse)
    if return_counts:
        out.append(np.diff(np.append(np.flatnonzero(first), len(s))))
    return tuple(out)


def group_rank(counts) -> np.ndarray:
    """Position of each element inside its group, for groups of `counts` laid end to end."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def decode(values: np.ndarray) -> list[str]:
    """S array -> list of stripped str (for categories and names)."""
    return [v.decode("utf-8", "replace").strip() for v in values.tolist()]
