"""The CSV layer: the numpy block reader must agree with csv.reader on every row, quoting included."""
import csv
import gzip
import io

import numpy as np
import pytest

from folders import InputError
from preprocessing import tables
from preprocessing.tables import Source, parse_float, parse_int, parse_minutes, read_blocks


def _write(path, text: str, gz: bool):
    data = text.encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _read_all(path, columns, block_bytes=tables.BLOCK_BYTES):
    src = Source(path)
    blocks = list(read_blocks(src, {c: True for c in columns}, block_bytes=block_bytes))
    return {c: [v.decode() for b in blocks for v in b[c].tolist()] for c in columns}, src


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("block_bytes", [64, 1 << 20])
def test_reader_matches_csv_module_on_awkward_rows(tmp_path, gz, block_bytes):
    rng = np.random.default_rng(0)
    pieces = ["plain", "with, comma", 'with "quote"', "multi\nline", "", "  spaced ", "ünïcode", "x" * 300]
    rows = [[str(i), str(rng.integers(1e9)), pieces[rng.integers(len(pieces))], f"{rng.normal():.3f}"]
            for i in range(500)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n" if block_bytes == 64 else "\n")
    w.writerow(["ID", "Big", "Value", "Num"])
    w.writerows(rows)
    path = _write(tmp_path / ("t.csv.gz" if gz else "t.csv"), buf.getvalue(), gz)
    got, src = _read_all(path, ["id", "big", "value", "num"], block_bytes)
    assert got["id"] == [r[0] for r in rows]
    assert got["value"] == [r[2] for r in rows]
    assert got["num"] == [r[3] for r in rows]
    assert src.rows == 500 and src.bad_rows == 0 and len(src.sha256) == 64


def test_malformed_rows_are_counted_not_fatal(tmp_path):
    path = _write(tmp_path / "t.csv", "a,b\n1,2\n3\n4,5,6\n7,8\n\n", gz=False)
    got, src = _read_all(path, ["a", "b"])
    assert got["a"] == ["1", "7"]
    assert src.bad_rows == 2 and src.first_bad_row == 2


def test_missing_column_and_empty_file_are_one_line_errors(tmp_path):
    path = _write(tmp_path / "t.csv", "a,b\n1,2\n", gz=False)
    with pytest.raises(InputError, match=r"t.csv: missing column 'c' \(columns are: a, b\)"):
        _read_all(path, ["c"])
    empty = _write(tmp_path / "e.csv.gz", "", gz=True)
    with pytest.raises(tables.EmptyFile, match="the file is empty"):
        _read_all(empty, ["a"])


def test_truncated_and_corrupt_gzip_are_errors(tmp_path):
    data = gzip.compress(("a,b\n" + "1,2\n" * 5000).encode())
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated"):
        _read_all(tmp_path / "cut.csv.gz", ["a"])
    (tmp_path / "bad.csv.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    with pytest.raises(InputError, match="gzip"):
        _read_all(tmp_path / "bad.csv.gz", ["a"])


def test_parsers():
    minutes, ok = parse_minutes(np.array([b"1970-01-01 00:01:00", b"2130-02-04 04:00:00", b"2024-02-29",
                                          b"20240229", b"2024-02-29T10:30:00", b"", b"2024-13-01", b"soon"]))
    assert ok.tolist() == [True, True, True, True, True, False, False, False]
    expect = [1, np.datetime64("2130-02-04T04:00", "m").astype(int), np.datetime64("2024-02-29", "m").astype(int)]
    assert minutes[:3].tolist() == expect and minutes[3] == minutes[2]
    assert minutes[4] == minutes[2] + 10 * 60 + 30
    ids, ok = parse_int(np.array([b"42", b"", b"4a", b"007"]))
    assert ids[ok].tolist() == [42, 7] and ok.tolist() == [True, False, False, True]
    nums = parse_float(np.array([b"1.5", b"", b"abc", b" -2e3"]))
    assert nums[0] == 1.5 and np.isnan(nums[1]) and np.isnan(nums[2]) and nums[3] == -2000


def test_layout_detection_is_case_insensitive(tmp_path):
    for name in ("admissions.csv", "Patients.CSV.gz"):
        (tmp_path / "m3" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "m3" / name).write_text("x\n")
    assert tables.find_layout(tmp_path / "m3") == "mimic3"
    (tmp_path / "m4" / "HOSP").mkdir(parents=True)
    for name in ("admissions.csv.gz", "patients.csv"):
        (tmp_path / "m4" / "HOSP" / name).write_text("x\n")
    assert tables.find_layout(tmp_path / "m4") == "mimic4"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "foo.csv").write_text("x\n")
    with pytest.raises(InputError, match="no known layout"):
        tables.find_layout(tmp_path / "other")
    with pytest.raises(InputError, match="no such folder"):
        tables.find_layout(tmp_path / "absent")
