"""Label files: the generic readers every set's labels go through, and the checks each row passes.

A reader turns a label file (the plain-text "GT" format, a training jsonl, CSV, .xlsx or MATLAB
.mat) into LabelRow records: file name, score as written, the label file it came from, the
reference image where the file names one. benchmarks.py reads each public benchmark's own files
with these; data.py rescales the scores, applies the splits and finds the files.

    read_labels("Ground-truth/koniq_train.txt")  # -> [LabelRow("10004473376.jpg", 4.4789, ...), ...]
    read_xlsx(path, sheet)         # rows of a worksheet, read from the zipped XML
    read_mat(path, "dmos", "orgs") # flattened arrays of a MATLAB v5 file

Every bad row, missing file or unreadable label file is a DataError naming the file and line.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass

import numpy as np
import scipy.io

from support.cli import InputError


class DataError(InputError):
    """Bad input: the message says what is wrong, where, and what to do. Raised for every bad
    label row, missing file or undecodable picture (data.DataError is this class)."""


@dataclass
class LabelRow:
    """One row of a label file, before rescaling and path resolution."""
    name: str                # file name relative to one of the dataset's folders
    raw: float
    group: str               # the label file it came from: rescaling is per group
    ref: str | None = None
    split: str | None = None  # official split, where the set has one
    where: str = ""          # "file, line N" (or "entry N"): where the row is written, for messages


# --------------------------------------------------------------------------- label files

def location(path: str, line: int | str) -> str:
    """line: a 1-based line (or spreadsheet row) number, or a description such as "entry 7"."""
    return f"{path}, {line if isinstance(line, str) else f'line {line}'}"


def bad_row(path: str, line: int | str, row, why: str) -> DataError:
    return DataError(f"{location(path, line)}: {why} in row {row!r}. Fix or delete that row.")


def check_duplicates(rows: list[LabelRow]) -> list[LabelRow]:
    """rows, or a DataError for a file that one label file lists twice with different scores."""
    seen: dict[tuple[str, str], LabelRow] = {}
    for r in rows:
        first = seen.setdefault((r.group, os.path.normpath(r.name)), r)
        if first.raw != r.raw:
            raise DataError(f"{r.name!r} is listed twice with different scores: {first.raw:g} at {first.where} and "
                            f"{r.raw:g} at {r.where}. Keep the right row and delete the other.")
    return rows


def finite_number(value, path: str, line: int | str, row) -> float:
    """The score of one cell: a finite number. An empty cell, a boolean, text that is no number, NaN,
    infinity or a number too large for a float (1e400) is a DataError naming the file, line and row."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise bad_row(path, line, row, "the score is empty")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, str, np.number)):
        raise bad_row(path, line, row, f"score {value!r} is not a number")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond any float
        x = math.inf
    except ValueError:
        raise bad_row(path, line, row, f"score {str(value)!r} is not a number") from None
    if not math.isfinite(x):
        raise bad_row(path, line, row, f"score {str(value)!r} is not finite")
    return x


def _is_number(text: str) -> bool:
    """True for any spelling float() reads, NaN, infinity and 1e400 included (a score, if a bad one)."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_file_name(text: str) -> bool:
    """'a.png', 'imgs/I01.bmp': a name with an extension, as the files a label row names have."""
    return re.search(r"\.[A-Za-z][A-Za-z0-9]{0,4}$", text) is not None



def read_text(path: str) -> str:
    """The text of a label file, the one place they are opened: UTF-8 (a byte-order mark is dropped,
    line ends kept); any other encoding (UTF-16, Latin-1) is a DataError that says to save it as UTF-8."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"label file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason}; "
                        "UTF-16 or Latin-1?): save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read label file {path}: {e.strerror or e}") from None


def read_csv(path: str) -> list[list[str]]:
    """All rows of a CSV file (read_text)."""
    try:
        return list(csv.reader(io.StringIO(read_text(path), newline="")))
    except csv.Error as e:
        raise DataError(f"cannot read {path} as CSV: {e}") from None


_XLSX = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
_XLSX_REL_ID = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}id"


def _xlsx_text(node) -> str:
    # <si>/<is> hold either <t> or rich-text runs <r><t>; phonetic hints <rPh><t> are not text.
    return "".join(t.text or "" for t in node.findall(f"{_XLSX}t") + node.findall(f"{_XLSX}r/{_XLSX}t"))


def _xlsx_col(ref: str) -> int:
    n = 0
    for ch in ref:
        if not ch.isalpha():
            break
        n = n * 26 + ord(ch.upper()) - 64
    return n - 1


def read_xlsx(path: str, sheet: str | None = None) -> list[list]:
    """Rows of one worksheet (default: the first) of an .xlsx file.

    Returns rows[i] = spreadsheet row i + 1 as a list of cells (str, float or None).
    Reads the zipped XML directly: shared strings, inline strings, numbers, booleans.
    """
    try:
        with zipfile.ZipFile(path) as z:
            shared = []
            if "xl/sharedStrings.xml" in z.namelist():
                shared = [_xlsx_text(si) for si in ET.fromstring(z.read("xl/sharedStrings.xml")).iter(f"{_XLSX}si")]
            book = ET.fromstring(z.read("xl/workbook.xml"))
            sheets = [(s.get("name"), s.get(_XLSX_REL_ID)) for s in book.iter(f"{_XLSX}sheet")]
            rels = {r.get("Id"): r.get("Target") for r in ET.fromstring(z.read("xl/_rels/workbook.xml.rels"))}
            chosen = [rid for name, rid in sheets if sheet is None or name == sheet]
            if not chosen:
                raise DataError(f"{path} has no sheet {sheet!r}; its sheets are {[n for n, _ in sheets]}")
            target = rels[chosen[0]]
            member = target.lstrip("/") if target.startswith("/") else "xl/" + target
            return _xlsx_rows(ET.fromstring(z.read(member)), shared)
    except (zipfile.BadZipFile, KeyError, IndexError, ValueError, ET.ParseError, OSError) as e:
        raise DataError(f"cannot read {path} as an .xlsx workbook ({type(e).__name__}: {e}); re-save "
                        "it from a spreadsheet program as .xlsx") from None


def _xlsx_rows(worksheet, shared: list[str]) -> list[list]:
    rows: list[list] = []
    for row in worksheet.iter(f"{_XLSX}row"):
        cells: list = []
        for c in row.iter(f"{_XLSX}c"):
            col = _xlsx_col(c.get("r")) if c.get("r") else len(cells)
            kind, v = c.get("t"), c.find(f"{_XLSX}v")
            if kind == "inlineStr":
                value = _xlsx_text(c.find(f"{_XLSX}is"))
            elif v is None or v.text is None or kind == "e":
                value = None
            elif kind == "s":
                value = shared[int(v.text)]
            elif kind in ("str", "d"):  # formula text, ISO date
                value = v.text
            elif kind == "b":  # TRUE / FALSE: never a score or a name
                value = v.text.strip() == "1"
            else:
                value = float(v.text)
            cells.extend([None] * (col + 1 - len(cells)))
            cells[col] = value
        index = int(row.get("r", len(rows) + 1)) - 1
        rows.extend([] for _ in range(index - len(rows)))
        rows.append(cells)
    return rows


def read_mat(path: str, *keys: str) -> list[np.ndarray]:
    """Flattened arrays `keys` of a MATLAB v5 .mat file (scipy.io.loadmat)."""
    try:
        mat = scipy.io.loadmat(path)
    except NotImplementedError:
        raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read. Re-save it "
                        "with save(FILE, '-v7') in MATLAB/Octave, or write the labels as a text file "
                        "'name mos' and use --data labels --labels FILE") from None
    except Exception as e:  # scipy raises IndexError, ValueError, ... on non-.mat bytes
        raise DataError(f"cannot read {path} as a .mat file ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no variable(s) {missing}; it holds {found}")
    return [np.ravel(mat[k]) for k in keys]


def mat_entry(x, path: str = "", i: int = 0):
    """Entry i (0-based) of a flattened .mat array as one value: MATLAB cell arrays arrive as nested
    object arrays; an empty cell, or a cell of several values, is a DataError naming file and entry."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise DataError(f"{path}, entry {i + 1}: {'an empty cell' if x.size == 0 else f'{x.size} values'} "
                            "where one name or score belongs. Fix that entry.")
        x = x.ravel()[0]
    return x


def mat_str(x, path: str = "", i: int = 0) -> str:
    text = str(mat_entry(x, path, i)).strip()
    if not text:
        raise DataError(f"{path}, entry {i + 1}: an empty name. Fix that entry.")
    return text


def mat_rows(path: str, names, scores, refs=None, keep=None) -> list[LabelRow]:
    """LabelRows of the entries `keep` (default: all) of parallel .mat arrays names, scores [, refs],
    each entry checked (mat_entry, finite_number)."""
    out = []
    for i in range(len(scores)) if keep is None else keep:
        name = mat_str(names[i], path, i)
        out.append(LabelRow(name, finite_number(mat_entry(scores[i], path, i), path, f"entry {i + 1}", name), path,
                            None if refs is None else mat_str(refs[i], path, i),
                            where=location(path, f"entry {i + 1}")))
    return out


def read_labels(path: str) -> list[LabelRow]:
    """Rows of a "GT" label file or of a PreResQ / VisualQuality-R1 training jsonl.

    Text formats, one item per line (blank lines and '#' comments skipped; the first line is a
    header when no field of it is a number or a file name):
        10004473376.jpg 4.4789 0.5273     name mos [std]   (whitespace-separated)
        my photo.jpg 4.4789               name mos         (the name is all before the score)
        5.51429 i01_01_1.bmp              mos name         (TID2013's mos_with_names.txt)
        0_0.png 0_1.png 4.5692            ref dist mos     (two names, each with an extension)
        yfcc-batch1/747.mp4, 3.8720       path, mos        (comma-separated)
    jsonl / json list: one object per item; the file from "image" | "images" | "video" |
    "videos" | "path" (a string or a one-element list); the score from "mos" | "score" |
    "gt_score" | "label", else from the last "gpt"/"assistant" turn of "conversations".
    Names are relative to the dataset root. A malformed row raises DataError (file, line, row).
    """
    text = read_text(path)
    if text.lstrip()[:1] in ("{", "["):
        return _read_json_labels(path, text)
    rows, first = [], True
    for line, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        fields = [x.strip() for x in s.split(",")] if "," in s else s.split()
        header, first = first and not any(_is_number(x) or _is_file_name(x) for x in fields), False
        if not header:
            name, score, ref = _text_row(s, fields, path, line)
            if not name or ref == "":
                raise bad_row(path, line, s, "empty file name")
            rows.append(LabelRow(name, finite_number(score, path, line, s), path, ref, where=location(path, line)))
    return rows


def _text_row(s: str, fields: list[str], path: str, line: int) -> tuple[str, str, str | None]:
    """(name, score, ref) of one line of read_labels' text formats, or a DataError naming the line."""
    num = [_is_number(x) for x in fields]
    if "," in s:
        if len(fields) == 2 and num[1]:
            return fields[0], fields[1], None
        if len(fields) == 2 and num[0]:
            return fields[1], fields[0], None
        if len(fields) == 3 and num[1] and num[2]:
            return fields[0], fields[1], None
        if len(fields) == 3 and num[2]:
            return fields[1], fields[2], fields[0]
    elif len(fields) >= 2 and num[0] and not num[-1]:
        return s.split(None, 1)[1], fields[0], None
    elif len(fields) >= 2 and num[-1]:
        tail = 2 if len(fields) >= 3 and num[-2] else 1
        name, words = s.rsplit(None, tail)[0], fields[:-tail]
        if len(words) == 1 or not _is_number(words[-1]):  # not three numbers in a row
            if len(words) != 2 or not _is_file_name(words[0]):
                return name, fields[-tail], None
            if os.path.splitext(words[0])[1].lower() == os.path.splitext(words[1])[1].lower():
                return words[1], fields[-tail], words[0]
            raise bad_row(path, line, s, "this may be 'ref dist mos' or a name with a space in it; write "
                                         "it with commas: 'ref, dist, mos' or 'name, mos'")
    raise bad_row(path, line, s, "expected 'name mos [std]', 'mos name', 'ref dist mos' or 'path, mos'")


def _read_json_labels(path: str, text: str) -> list[LabelRow]:
    try:
        whole = json.loads(text)
        records = [(f"item {k}", r) for k, r in enumerate(whole, start=1)] if isinstance(whole, list) else [(1, whole)]
    except json.JSONDecodeError:
        records = []
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    records.append((line, json.loads(raw)))
                except json.JSONDecodeError as e:
                    raise bad_row(path, line, raw.strip()[:200], f"invalid JSON ({e.msg})") from None
    rows = []
    for line, rec in records:
        if not isinstance(rec, dict):
            raise bad_row(path, line, rec, "expected a JSON object")
        files = next((rec[k] for k in ("image", "images", "video", "videos", "path") if k in rec), None)
        if isinstance(files, list) and len(files) == 1:
            files = files[0]
        if not isinstance(files, str) or not files.strip():
            raise bad_row(path, line, rec, "no single file under 'image'/'video'/'path'")
        score = next((rec[k] for k in ("mos", "score", "gt_score", "label") if k in rec), None)
        if score is None:
            turns = [t for t in rec.get("conversations", []) if isinstance(t, dict)
                     and t.get("from", t.get("role")) in ("gpt", "assistant")]
            score = turns[-1].get("value", turns[-1].get("content")) if turns else None
        rows.append(LabelRow(files, finite_number(score, path, line, rec), path, where=location(path, line)))
    return rows
