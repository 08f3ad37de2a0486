"""Each public quality benchmark in its native format, and the table of what each set name means.

A reader turns a benchmark's own label files (CSV, .xlsx, MATLAB .mat, or the plain-text "GT"
format of `read_labels`) into LabelRow records: file name, score as written, the label file it
came from, the reference image and the official split where the set has them. data.py rescales
the scores, applies the splits and finds the files; this module only reads what the files say.

    DATASETS["koniq"].read(root)   # -> [LabelRow("10004473376.jpg", 77.38, ..., split="train"), ...]
    read_labels("Ground-truth/koniq_train.txt")
    read_xlsx(path, sheet)         # rows of a worksheet, read from the zipped XML
    read_mat(path, "dmos", "orgs") # flattened arrays of a MATLAB v5 file
    pair_sets("koniq,labels", "~/koniq10k,~/mine", "gt.txt")  # the --data/--data-root/--labels flags, paired

How each set is read (the choices are ours where the release leaves them open):
- KonIQ score: `MOS_zscore` of koniq10k_scores_and_distributions.csv, or `MOS` of
  koniq10k_distributions_sets.csv (the same 0..100 scale); the 1..5 `MOS` is not used.
- PIPAL: its 200 Train_Label files are one label set split per reference, so they form one
  rescaling group. LSVQ: labels_train_test.csv and labels_test_1080p.csv are separate groups.
- LIVE Challenge keeps the 7 training images t1..t7 (as PreResQ does; pyiqa drops them).
- LIVE IQA drops the reference images (orgs == 1) and keeps the 779 distorted ones.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import scipy.io

from support.cli import InputError

SPLITS = ("train", "val", "test", "all")


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

def _where(path: str, line: int | str) -> str:
    """line: a 1-based line (or spreadsheet row) number, or a description such as "entry 7"."""
    return f"{path}, {line if isinstance(line, str) else f'line {line}'}"


def _bad_row(path: str, line: int | str, row, why: str) -> DataError:
    return DataError(f"{_where(path, line)}: {why} in row {row!r}. Fix or delete that row.")


def check_duplicates(rows: list[LabelRow]) -> list[LabelRow]:
    """rows, or a DataError for a file that one label file lists twice with different scores."""
    seen: dict[tuple[str, str], LabelRow] = {}
    for r in rows:
        first = seen.setdefault((r.group, os.path.normpath(r.name)), r)
        if first.raw != r.raw:
            raise DataError(f"{r.name!r} is listed twice with different scores: {first.raw:g} at {first.where} and "
                            f"{r.raw:g} at {r.where}. Keep the right row and delete the other.")
    return rows


def _number(value, path: str, line: int | str, row) -> float:
    """The score of one cell: a finite number. An empty cell, a boolean, text that is no number, NaN,
    infinity or a number too large for a float (1e400) is a DataError naming the file, line and row."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _bad_row(path, line, row, "the score is empty")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, str, np.number)):
        raise _bad_row(path, line, row, f"score {value!r} is not a number")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond any float
        x = math.inf
    except ValueError:
        raise _bad_row(path, line, row, f"score {str(value)!r} is not a number") from None
    if not math.isfinite(x):
        raise _bad_row(path, line, row, f"score {str(value)!r} is not finite")
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


def _int_name(value) -> str:
    """Spreadsheets store ids like 1600 as 1600.0; file names want "1600"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


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


def _mat_entry(x, path: str = "", i: int = 0):
    """Entry i (0-based) of a flattened .mat array as one value: MATLAB cell arrays arrive as nested
    object arrays; an empty cell, or a cell of several values, is a DataError naming file and entry."""
    while isinstance(x, np.ndarray):
        if x.size != 1:
            raise DataError(f"{path}, entry {i + 1}: {'an empty cell' if x.size == 0 else f'{x.size} values'} "
                            "where one name or score belongs. Fix that entry.")
        x = x.ravel()[0]
    return x


def _mat_str(x, path: str = "", i: int = 0) -> str:
    text = str(_mat_entry(x, path, i)).strip()
    if not text:
        raise DataError(f"{path}, entry {i + 1}: an empty name. Fix that entry.")
    return text


def _mat_rows(path: str, names, scores, refs=None, keep=None) -> list[LabelRow]:
    """LabelRows of the entries `keep` (default: all) of parallel .mat arrays names, scores [, refs],
    each entry checked (_mat_entry, _number)."""
    out = []
    for i in range(len(scores)) if keep is None else keep:
        name = _mat_str(names[i], path, i)
        out.append(LabelRow(name, _number(_mat_entry(scores[i], path, i), path, f"entry {i + 1}", name), path,
                            None if refs is None else _mat_str(refs[i], path, i), where=_where(path, f"entry {i + 1}")))
    return out


def _table(path: str, rows: list[list], columns: dict[str, tuple[str, ...]],
           optional: tuple[str, ...] = ()) -> Iterator[tuple[int, dict, list]]:
    """Yield (line number, {key: cell}, raw row) for the rows below a header.

    columns maps our keys to accepted header names (case-insensitive). The header is the
    first row that holds every non-optional key: spreadsheets often have title rows above it.
    """
    want = [k for k in columns if k not in optional]
    for h, header in enumerate(rows):
        cells = [str(c).strip().lower() if c is not None else "" for c in header]
        idx = {}
        for key, names in columns.items():
            hit = next((cells.index(n.lower()) for n in names if n.lower() in cells), None)
            if hit is not None:
                idx[key] = hit
        if all(k in idx for k in want):
            break
    else:
        expected = ", ".join("/".join(columns[k]) for k in want)
        raise DataError(f"{path}: no header row with the columns {expected}. Is this the "
                        "dataset's original label file?")
    for line, row in enumerate(rows[h + 1:], start=h + 2):
        if all(c is None or str(c).strip() == "" for c in row):
            continue
        yield line, {k: row[j] if j < len(row) else None for k, j in idx.items()}, row


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
                raise _bad_row(path, line, s, "empty file name")
            rows.append(LabelRow(name, _number(score, path, line, s), path, ref, where=_where(path, line)))
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
            raise _bad_row(path, line, s, "this may be 'ref dist mos' or a name with a space in it; write "
                                          "it with commas: 'ref, dist, mos' or 'name, mos'")
    raise _bad_row(path, line, s, "expected 'name mos [std]', 'mos name', 'ref dist mos' or 'path, mos'")


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
                    raise _bad_row(path, line, raw.strip()[:200], f"invalid JSON ({e.msg})") from None
    rows = []
    for line, rec in records:
        if not isinstance(rec, dict):
            raise _bad_row(path, line, rec, "expected a JSON object")
        files = next((rec[k] for k in ("image", "images", "video", "videos", "path") if k in rec), None)
        if isinstance(files, list) and len(files) == 1:
            files = files[0]
        if not isinstance(files, str) or not files.strip():
            raise _bad_row(path, line, rec, "no single file under 'image'/'video'/'path'")
        score = next((rec[k] for k in ("mos", "score", "gt_score", "label") if k in rec), None)
        if score is None:
            turns = [t for t in rec.get("conversations", []) if isinstance(t, dict)
                     and t.get("from", t.get("role")) in ("gpt", "assistant")]
            score = turns[-1].get("value", turns[-1].get("content")) if turns else None
        rows.append(LabelRow(files, _number(score, path, line, rec), path, where=_where(path, line)))
    return rows


# --------------------------------------------------------------------------- native readers

def _find(root: str, *names: str, required: bool = True) -> str | None:
    """The first of `names` (paths relative to root) that exists. When none does but one sits a
    level or two deeper (an archive unpacked into its own folder), the error says which root to use."""
    for name in names:
        hits = sorted(glob.glob(os.path.join(glob.escape(root), name)))
        if hits:
            return hits[0]
    if not required:
        return None
    for name in names:
        for pattern in (os.path.join("*", name), os.path.join("*", "*", name)):
            hits = sorted(glob.glob(os.path.join(glob.escape(root), pattern)))
            if hits:
                deeper = hits[0]
                for _ in name.split("/"):
                    deeper = os.path.dirname(deeper)
                raise DataError(f"{name} is not in {root} but in {deeper}: use --data-root {deeper}")
    raise DataError(f"none of {list(names)} found in {root}; point --data-root at the folder "
                    "the dataset unpacks to")


def _tabular(path: str, rows: list[list], name: str | tuple, score: str | tuple,
             to_name: Callable = str, **more: tuple) -> Iterator[tuple[int, dict, LabelRow]]:
    """(line, {key: cell}, LabelRow) for a header table: `name` and `score` name the columns
    (accepted header spellings); `more` adds optional columns to the cells."""
    cols = {"name": name if isinstance(name, tuple) else (name,),
            "score": score if isinstance(score, tuple) else (score,), **more}
    for line, cells, raw in _table(path, rows, cols, optional=tuple(more)):
        if cells["name"] is None or str(cells["name"]).strip() == "":
            raise _bad_row(path, line, raw, "empty file name")
        yield line, cells, LabelRow(to_name(cells["name"]).strip(), _number(cells["score"], path, line, raw), path,
                                    where=_where(path, line))


def _read_koniq(root: str) -> list[LabelRow]:
    path = _find(root, "koniq10k_distributions_sets.csv", "koniq10k_scores_and_distributions.csv")
    official = {"training": "train", "validation": "val", "test": "test"}
    out = []
    for line, cells, row in _tabular(path, read_csv(path), "image_name", ("MOS_zscore", "MOS"), set=("set",)):
        if "set" in cells:
            if str(cells["set"]).strip() not in official:
                raise _bad_row(path, line, cells, f"set must be one of {list(official)}")
            row.split = official[str(cells["set"]).strip()]
        out.append(row)
    return out


def _read_spaq(root: str) -> list[LabelRow]:
    path = _find(root, "Annotations/MOS and Image attribute scores.xlsx", "MOS and Image attribute scores.xlsx")
    return [r for _, _, r in _tabular(path, read_xlsx(path), "Image name", "MOS")]


def _read_kadid(root: str) -> list[LabelRow]:
    path = _find(root, "dmos.csv")
    out = []
    for _, cells, row in _tabular(path, read_csv(path), "dist_img", "dmos", ref=("ref_img",)):
        row.ref = str(cells.get("ref") or row.name.split("_")[0] + ".png").strip()
        out.append(row)
    return out


def _read_livec(root: str) -> list[LabelRow]:
    names_file = _find(root, "Data/AllImages_release.mat", "AllImages_release.mat")
    mos_file = _find(root, "Data/AllMOS_release.mat", "AllMOS_release.mat")
    names, = read_mat(names_file, "AllImages_release")
    mos, = read_mat(mos_file, "AllMOS_release")
    if len(names) != len(mos):
        raise DataError(f"{names_file} lists {len(names)} images but {mos_file} has {len(mos)} scores")
    return _mat_rows(mos_file, [_mat_str(n, names_file, i) for i, n in enumerate(names)], mos)


def _read_agiqa(root: str) -> list[LabelRow]:
    path = _find(root, "data.csv")
    return [r for _, _, r in _tabular(path, read_csv(path), "name", "mos_quality")]


def _read_pipal(root: str) -> list[LabelRow]:
    folder = os.path.dirname(_find(root, os.path.join("Train_Label", "*.txt")))
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.txt"))):
        for row in read_labels(path):
            row.group, row.ref = folder, row.name.split("_")[0]
            out.append(row)
    return out


def _read_tid2013(root: str) -> list[LabelRow]:
    rows = read_labels(_find(root, "mos_with_names.txt"))
    for row in rows:
        row.ref = row.name[:3].upper()  # names mix I01_.. and i01_..
    return rows


_CSIQ_TYPES = {"noise": "AWGN", "jpeg": "JPEG", "jpeg 2000": "jpeg2000", "fnoise": "fnoise",
               "blur": "BLUR", "contrast": "contrast"}


def _read_csiq(root: str) -> list[LabelRow]:
    path = _find(root, "csiq.DMOS.xlsx", "csiq_label.txt")
    if not path.endswith(".xlsx"):
        rows = read_labels(path)
        for row in rows:
            row.ref = os.path.basename(row.name).split(".")[0]
        return rows
    out = []
    table = _tabular(path, read_xlsx(path, "all_by_image"), "image", "dmos",
                     type=("dst_type",), level=("dst_lev",))
    for _, cells, row in table:
        kind = str(cells.get("type", "")).strip().lower()
        if kind not in _CSIQ_TYPES or _int_name(cells.get("level")) not in ("1", "2", "3", "4", "5"):
            raise DataError(f"{path}: row for image {row.name!r} has dst_type {kind!r} / dst_lev "
                            f"{cells.get('level')!r}; expected one of {sorted(_CSIQ_TYPES)} and 1..5")
        row.ref = _int_name(row.name)
        row.name = f"{row.ref}.{_CSIQ_TYPES[kind]}.{_int_name(cells['level'])}.png"
        out.append(row)
    return out


def _read_bid(root: str) -> list[LabelRow]:
    # DatabaseGrades.xlsx: first sheet, a header row, then image number | MOS in columns A and B.
    path = _find(root, "DatabaseGrades.xlsx")
    out = []
    for line, row in enumerate(read_xlsx(path)[1:], start=2):
        row = (row + [None, None])[:2]
        if all(c is None or str(c).strip() == "" for c in row):
            continue
        number = _number(row[0], path, line, row)
        if number < 1 or not number.is_integer():
            raise _bad_row(path, line, row, f"image number {row[0]!r} is not a whole number from 1")
        out.append(LabelRow(f"DatabaseImage{int(number):04d}.JPG", _number(row[1], path, line, row), path,
                            where=_where(path, line)))
    return out


_LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))


def _read_live(root: str) -> list[LabelRow]:
    dmos_file = _find(root, "dmos.mat")
    dmos, orgs = read_mat(dmos_file, "dmos", "orgs")
    refs, = read_mat(_find(root, "refnames_all.mat"), "refnames_all")
    names = [f"{folder}/img{i}.bmp" for folder, n in _LIVE_FOLDERS for i in range(1, n + 1)]
    if not len(dmos) == len(orgs) == len(refs) == len(names):
        raise DataError(f"{dmos_file}: expected {len(names)} entries (LIVE release 2: jp2k 227, jpeg 233, "
                        f"wn/gblur/fastfading 174 each), found dmos {len(dmos)}, orgs {len(orgs)}, "
                        f"refnames_all {len(refs)}")
    flags = [_mat_entry(o, dmos_file, i) for i, o in enumerate(orgs)]
    bad = next((i for i, o in enumerate(flags) if o not in (0, 1)), None)
    if bad is not None:
        raise DataError(f"{dmos_file}, entry {bad + 1}: orgs is {str(flags[bad])!r}; it must be 0 (distorted) or 1 "
                        "(reference). Fix that entry.")
    return _mat_rows(dmos_file, names, dmos, refs, keep=[i for i, o in enumerate(flags) if o == 0])


def _read_lsvq(root: str) -> list[LabelRow]:
    out = []
    for file, default in (("labels_train_test.csv", None), ("labels_test_1080p.csv", "test-1080p")):
        path = _find(root, file, required=file == "labels_train_test.csv")
        if path is None:
            continue
        for line, cells, row in _tabular(path, read_csv(path), "name", "mos", lambda n: str(n).strip() + ".mp4",
                                         is_test=("is_test",)):
            if default is None:
                flag = str(cells.get("is_test")).strip().lower()
                if flag not in ("true", "false", "1", "0"):
                    raise _bad_row(path, line, cells, "is_test must be True or False")
                default_split = "test" if flag in ("true", "1") else "train"
            row.split = default or default_split
            out.append(row)
    return out


def _read_konvid(root: str) -> list[LabelRow]:
    path = _find(root, "KoNViD_1k_mos.csv")
    return [r for _, _, r in _tabular(path, read_csv(path), "flickr_id", "mos", lambda n: _int_name(n) + ".mp4")]


def _read_livevqc(root: str) -> list[LabelRow]:
    path = _find(root, "data.mat")
    names, mos = read_mat(path, "video_list", "mos")
    if len(names) != len(mos):
        raise DataError(f"{path} lists {len(names)} videos in video_list but {len(mos)} scores in mos")
    return _mat_rows(path, names, mos)


def _read_youtube(root: str) -> list[LabelRow]:
    path = _find(root, "original_videos_MOS_for_YouTube_UGC_dataset.xlsx")
    return [r for _, _, r in _tabular(path, read_xlsx(path, "MOS"), "vid", "MOS full")]


def read_split_files(root: str) -> list[LabelRow]:
    """A folder holding train.txt and test.txt in GT format (the synthetic sets, synthetic.py)."""
    out = []
    for split in ("train", "test"):
        for row in read_labels(os.path.join(root, f"{split}.txt")):
            row.split = split
            out.append(row)
    return out


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset name means: content, where to get it, the folder --data-root points at."""
    what: str
    download: str
    layout: str
    read: Callable[[str], list[LabelRow]] | None = field(default=None, repr=False)
    dirs: tuple[str, ...] = (".",)   # folders under root holding the files the labels name
    exts: tuple[str, ...] = ()       # extensions tried when the labels name files without one
    lower_is_better: bool = False
    split: str = "random"            # "official" (the label file says), "kadid", or "random"

    def splits(self, rows: list[LabelRow] | None = None) -> tuple[str, ...]:
        """The split names load_dataset accepts (official ones come from the label rows)."""
        if self.split == "official":
            found = {r.split for r in rows or [] if r.split}
            order = lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)
            return (*sorted(found, key=order), "all")
        return ("train", "val", "test", "all") if self.split == "kadid" else ("train", "test", "all")


DATASETS: dict[str, DatasetInfo] = {
    "koniq": DatasetInfo(
        "KonIQ-10k: 10,073 in-the-wild photos, official split 7,058/1,000/2,015",
        "https://database.mmsp-kn.de/koniq-10k-database.html (koniq10k_1024x768.zip, "
        "koniq10k_scores_and_distributions.zip; split: github.com/subpic/koniq metadata/"
        "koniq10k_distributions_sets.csv)",
        "1024x768/<id>.jpg (or 512x384/), koniq10k_distributions_sets.csv or "
        "koniq10k_scores_and_distributions.csv",
        _read_koniq, ("1024x768", "512x384", "."), split="official"),
    "spaq": DatasetInfo(
        "SPAQ: 11,125 smartphone photos (multi-megapixel; downscaled by load_image)",
        "https://github.com/h4nwei/SPAQ",
        "TestImage/00001.jpg..., Annotations/MOS and Image attribute scores.xlsx",
        _read_spaq, ("TestImage", ".")),
    "kadid": DatasetInfo(
        "KADID-10k: 81 refs x 25 distortions x 5 levels = 10,125 PNG (512x384)",
        "https://database.mmsp-kn.de/kadid-10k-database.html (kadid10k.zip)",
        "images/I01.png, images/I01_01_01.png (I<ref>_<type>_<level>), dmos.csv",
        _read_kadid, ("images", "distorted_images", "."), split="kadid"),
    "livec": DatasetInfo(
        "LIVE In the Wild Challenge (CLIVE): 1,169 photos 500x500, incl. training images t1..t7",
        "https://live.ece.utexas.edu/research/ChallengeDB/index.html (ChallengeDB_release.zip)",
        "Images/*.bmp, Images/trainingImages/t1.bmp..., Data/AllImages_release.mat, "
        "Data/AllMOS_release.mat",
        _read_livec, ("Images", "Images/trainingImages")),
    "agiqa": DatasetInfo(
        "AGIQA-3K: 2,982 AI-generated images",
        "https://github.com/lcysyzxdxc/AGIQA-3k-Database",
        "<name>.jpg (e.g. midjourney_normal_001.jpg) next to data.csv",
        _read_agiqa),
    "pipal": DatasetInfo(
        "PIPAL training part: 200 refs x 116 distortions = 23,200 BMP (288x288), Elo scores",
        "https://www.jasongt.com/projectpages/pipal.html (NTIRE IQA challenge training set)",
        "Train_Dist/A0001_00_00.bmp..., Train_Ref/A0001.bmp, Train_Label/A0001.txt...",
        _read_pipal, ("Train_Dist", ".")),
    "tid2013": DatasetInfo(
        "TID2013: 25 refs x 24 distortions x 5 levels = 3,000 BMP (512x384)",
        "https://www.ponomarenko.info/tid2013.htm",
        "distorted_images/i01_01_1.bmp (I/i case mixed), reference_images/, mos_with_names.txt",
        _read_tid2013, ("distorted_images", ".")),
    "csiq": DatasetInfo(
        "CSIQ: 866 distorted PNG (512x512), 30 refs x 6 types; DMOS, lower is better",
        "https://s2.smu.edu/~eclarson/csiq.html (Larson & Chandler)",
        "dst_imgs/<type>/1600.AWGN.1.png..., csiq.DMOS.xlsx (or a 'name dmos' csiq_label.txt)",
        _read_csiq, ("dst_imgs/awgn", "dst_imgs/jpeg", "dst_imgs/jpeg2000", "dst_imgs/fnoise",
                     "dst_imgs/blur", "dst_imgs/contrast", "dst_imgs", "."),
        lower_is_better=True),
    "bid": DatasetInfo(
        "BID: 586 blurred photos (large JPEG)",
        "https://www.lps.ufrj.br/profs/eduardo/ImageDatabase.htm (Ciancio et al.)",
        "ImageDatabase/DatabaseImage0001.JPG..., DatabaseGrades.xlsx",
        _read_bid, ("ImageDatabase", ".")),
    "live": DatasetInfo(
        "LIVE IQA release 2: 779 distorted BMP in 5 folders; DMOS, lower is better",
        "https://live.ece.utexas.edu/research/Quality/subjective.htm",
        "jp2k/ jpeg/ wn/ gblur/ fastfading/ imgN.bmp, refimgs/, dmos.mat, refnames_all.mat",
        _read_live, lower_is_better=True),
    "lsvq": DatasetInfo(
        "LSVQ: 38,811 UGC videos; train 28,056 / test 7,182 / test-1080p 3,573",
        "https://github.com/baidut/PatchVQ (LSVQ download and label CSVs)",
        "ia-batchN/<name>.mp4, yfcc-batchN/<id>.mp4, labels_train_test.csv, labels_test_1080p.csv",
        _read_lsvq, split="official"),
    "konvid": DatasetInfo(
        "KoNViD-1k: 1,200 videos, 8 s, 960x540",
        "https://database.mmsp-kn.de/konvid-1k-database.html",
        "KoNViD_1k_videos/<flickr_id>.mp4, KoNViD_1k_mos.csv",
        _read_konvid, ("KoNViD_1k_videos", ".")),
    "livevqc": DatasetInfo(
        "LIVE-VQC: 585 phone videos, ~10 s, mostly 1080p",
        "https://live.ece.utexas.edu/research/LIVEVQC/index.html",
        "Video/A001.mp4..., data.mat (video_list, mos)",
        _read_livevqc, ("Video", ".")),
    "youtube-ugc": DatasetInfo(
        "YouTube-UGC: ~1,380 labelled 20 s videos, 360p-4K",
        "https://media.withyoutube.com/ (YouTube UGC dataset)",
        "<Category>_<res>-<hash>.mp4 or .mkv, original_videos_MOS_for_YouTube_UGC_dataset.xlsx",
        _read_youtube, exts=(".mp4", ".mkv", ".webm")),
    "labels": DatasetInfo(
        "any folder + a GT label file (--labels FILE): 'name mos [std]', 'ref dist mos', "
        "'path, mos', or a PreResQ/VisualQuality-R1 training jsonl",
        "the PreResQ-R1 release's Ground-truth/ files, or write your own",
        "--data-root DIR holding the files the label file names (relative paths)"),
    "synthetic": DatasetInfo(
        "procedural images, 8 distortion types x 5 levels + pristine, MOS from the level",
        "nothing: generated on first use and cached (PRERESQ_CACHE, default ~/.cache/preresq)",
        "generated: s000.png, s000_blur1.png..., train.txt, test.txt",
        read_split_files, split="official"),
    "synthetic-video": DatasetInfo(
        "procedural panning clips (libx264), compression/stutter/blur x 5 levels + pristine",
        "nothing: generated on first use and cached (PRERESQ_CACHE, default ~/.cache/preresq)",
        "generated: s000.mp4, s000_compression1.mp4..., train.txt, test.txt",
        read_split_files, split="official"),
}


def known_datasets() -> str:
    """Every set name with where to get it and the folder layout --data-root points at."""
    width = max(map(len, DATASETS))
    return "\n".join(f"  {n:<{width}}  {i.download}\n  {'':<{width}}  layout: {i.layout}"
                     for n, i in DATASETS.items())


def pair_sets(names: str, roots: str | None = None, labels: str | None = None) -> list[tuple]:
    """The `--data a,b --data-root A,B [--labels F1,F2]` flags -> [(name, root or None, label file
    or None)]: one root per set, in order (an empty entry for the synthetic sets), one label file
    per "labels" entry. A count that does not pair up raises DataError. A --data-root (--labels) that
    is as a whole an existing folder (file) is one entry, commas in its name and all."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    root_list = _entries(roots, os.path.isdir) if roots else [""] * len(wanted)
    if len(root_list) != len(wanted):
        raise DataError(f"--data lists {len(wanted)} sets ({','.join(wanted)}) but --data-root gives "
                        f"{len(root_list)} folder(s); give one per set, comma-separated in the same "
                        "order (an empty entry for synthetic sets)")
    label_list = _entries(labels, os.path.isfile) if labels else []
    if len(label_list) != wanted.count("labels"):
        raise DataError(f"--data names 'labels' {wanted.count('labels')} time(s) but --labels gives "
                        f"{len(label_list)} file(s); give one per 'labels' entry, in order")
    files = iter(label_list)
    return [(n, r or None, next(files) if n == "labels" else None) for n, r in zip(wanted, root_list)]


def _entries(value: str, exists: Callable[[str], bool]) -> list[str]:
    """A flag's comma-separated entries, or the whole value when it names an existing path (exists)."""
    whole = value.strip()
    return [whole] if exists(os.path.expanduser(whole)) else [x.strip() for x in value.split(",")]
