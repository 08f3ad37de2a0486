"""Datasets for PreResQ: every benchmark in its native format, plus synthetic data.

Paper map (arXiv 2511.05393, §6 "Data and evaluation protocol"; issue 4):
- training sets: KADID-10K split by reference image 49/16/16 (seed 42), LSVQ train for video;
  KonIQ's official split for the KonIQ-trained protocol;
- test sets: the whole of AGIQA-3K, BID, CLIVE, KonIQ, PIPAL, SPAQ, TID2013, CSIQ, LIVE (and the
  KADID test refs); KoNViD-1k, LIVE-VQC, LSVQ test / test-1080p, YouTube-UGC for video;
- every score is min-max rescaled per label file to 1..5 (lower-is-better scores flipped
  first): mos = 1 + 4 (x - min) / (max - min). `Item.raw` keeps the number in the file.

Public API: `load_dataset`, `load_datasets` (the `--data a,b --data-root A,B` flags),
`load_image`, `DATASETS` (what each name is, where to get it, the folder layout),
`synthetic_dataset` / `synthetic_video_dataset` and `make_synthetic` / `make_synthetic_video`
(the embedded default data), `rescale`, `kadid_split`, `random_split`, `read_labels`,
`read_xlsx`, `read_mat`. `python data.py NAME --data-root DIR` prints a summary.

Deliberate choices and deviations (each is documented where it lives):
- KADID: the 16 test references are exactly the paper's; which 16 of the other 65 are
  "val" is our seeded choice (`kadid_split`), the authors did not publish their val list.
- KonIQ score: `MOS_zscore` of koniq10k_scores_and_distributions.csv, or `MOS` of
  koniq10k_distributions_sets.csv (the same 0..100 scale); the 1..5 `MOS` is not used.
- PIPAL: its 200 Train_Label files are one label set split per reference, so they are
  rescaled together. LSVQ: labels_train_test.csv and labels_test_1080p.csv separately.
- LIVE Challenge keeps the 7 training images t1..t7 (as PreResQ does; pyiqa drops them).
- LIVE IQA drops the reference images (orgs == 1) and keeps the 779 distorted ones.
- Sets without an official split: "all", and "train"/"test" = a seeded 80/20 split by
  reference image (by file where there is none), so no content is shared.
- Truncated or corrupt images raise DataError; Pillow's LOAD_TRUNCATED_IMAGES (which pads
  with grey, silently changing the quality being judged) is never turned on.
- Synthetic pixelation uses nested block sizes 2, 4, 8, 16, 32 px instead of the scale
  ladder of datasets.md: non-nested blocks break the PSNR order on small images.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import scipy.io
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps
from scipy import ndimage

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp")
SPLITS = ("train", "val", "test", "all")
RANDOM_TEST_FRACTION = 0.2
KADID_TEST_REFS = ("I19", "I29", "I30", "I34", "I37", "I38", "I43", "I50",
                   "I64", "I71", "I72", "I73", "I74", "I78", "I80", "I81")


class DataError(Exception):
    """Bad input: the message says what is wrong, where, and what to do."""


@dataclass(frozen=True)
class Item:
    """One labelled image or video."""
    path: str                # absolute path of the image or video file
    mos: float               # rescaled to 1..5, higher is better
    raw: float               # the score as written in the label file
    dataset: str
    ref: str | None = None   # reference image name where the set has one

    @property
    def is_video(self) -> bool:
        return os.path.splitext(self.path)[1].lower() in VIDEO_EXTS


@dataclass
class LabelRow:
    """One row of a label file, before rescaling and path resolution."""
    name: str                # file name relative to one of the dataset's folders
    raw: float
    group: str               # the label file it came from: rescaling is per group
    ref: str | None = None
    split: str | None = None  # official split, where the set has one


# --------------------------------------------------------------------------- label files

def _bad_row(path: str, line: int | str, row, why: str) -> DataError:
    """line: a 1-based line (or spreadsheet row) number, or a description such as "entry 7"."""
    where = line if isinstance(line, str) else f"line {line}"
    return DataError(f"{path}, {where}: {why} in row {row!r}. Fix or delete that row.")


def _number(value, path: str, line: int | str, row) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _bad_row(path, line, row, f"score {str(value)!r} is not a number") from None
    if not math.isfinite(x):
        raise _bad_row(path, line, row, f"score {str(value)!r} is not finite")
    return x


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _int_name(value) -> str:
    """Spreadsheets store ids like 1600 as 1600.0; file names want "1600"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


def read_csv(path: str) -> list[list[str]]:
    """All rows of a CSV file (a UTF-8 byte-order mark is dropped)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from None


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


def _mat_str(x) -> str:
    while isinstance(x, np.ndarray):  # MATLAB cell arrays arrive as nested object arrays
        x = x.ravel()[0]
    return str(x).strip()


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

    Text formats, one item per line (blank lines and '#' comments skipped; a first line
    without any number is a header):
        10004473376.jpg 4.4789 0.5273     name mos [std]   (whitespace-separated)
        5.51429 i01_01_1.bmp              mos name         (TID2013's mos_with_names.txt)
        0_0.png 0_1.png 4.5692            ref dist mos
        yfcc-batch1/747.mp4, 3.8720       path, mos        (comma-separated)
    jsonl / json list: one object per item; the file from "image" | "images" | "video" |
    "videos" | "path" (a string or a one-element list); the score from "mos" | "score" |
    "gt_score" | "label", else from the last "gpt"/"assistant" turn of "conversations".
    Names are relative to the dataset root. A malformed row raises DataError (file, line, row).
    """
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read label file {path}: {e}") from None
    if text.lstrip()[:1] in ("{", "["):
        return _read_json_labels(path, text)
    rows, first = [], True
    for line, raw in enumerate(text.splitlines(), start=1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        fields = [x.strip() for x in s.split(",")] if "," in s else s.split()
        num = [_is_number(x) for x in fields]
        header, first = first and not any(num), False
        if header:
            continue
        if len(fields) == 2 and num[1]:
            name, score, ref = fields[0], fields[1], None
        elif len(fields) == 2 and num[0]:
            name, score, ref = fields[1], fields[0], None
        elif len(fields) == 3 and num[1] and num[2]:
            name, score, ref = fields[0], fields[1], None
        elif len(fields) == 3 and num[2]:
            name, score, ref = fields[1], fields[2], fields[0]
        else:
            raise _bad_row(path, line, s, "expected 'name mos [std]', 'mos name', 'ref dist mos' "
                                          "or 'path, mos'")
        rows.append(LabelRow(name, _number(score, path, line, s), path, ref))
    return rows


def _read_json_labels(path: str, text: str) -> list[LabelRow]:
    try:
        whole = json.loads(text)
        records = list(enumerate(whole if isinstance(whole, list) else [whole], start=1))
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
        if not isinstance(files, str):
            raise _bad_row(path, line, rec, "no single file under 'image'/'video'/'path'")
        score = next((rec[k] for k in ("mos", "score", "gt_score", "label") if k in rec), None)
        if score is None:
            turns = [t for t in rec.get("conversations", []) if isinstance(t, dict)
                     and t.get("from", t.get("role")) in ("gpt", "assistant")]
            score = turns[-1].get("value", turns[-1].get("content")) if turns else None
        rows.append(LabelRow(files, _number(score, path, line, rec), path))
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
        yield line, cells, LabelRow(to_name(cells["name"]).strip(), _number(cells["score"], path, line, raw), path)


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
    return [LabelRow(_mat_str(n), _number(m, mos_file, f"entry {i + 1}", _mat_str(n)), mos_file)
            for i, (n, m) in enumerate(zip(names, mos))]


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
        if kind not in _CSIQ_TYPES or cells.get("level") is None:
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
        if len(row) < 2 or row[0] is None:
            continue
        number = _number(row[0], path, line, row)
        out.append(LabelRow(f"DatabaseImage{int(number):04d}.JPG", _number(row[1], path, line, row), path))
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
    return [LabelRow(n, _number(d, dmos_file, f"entry {i + 1}", n), dmos_file, _mat_str(r))
            for i, (n, d, o, r) in enumerate(zip(names, dmos, orgs, refs)) if not o]


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
    return [LabelRow(_mat_str(n), _number(m, path, f"entry {i + 1}", _mat_str(n)), path)
            for i, (n, m) in enumerate(zip(names, mos))]


def _read_youtube(root: str) -> list[LabelRow]:
    path = _find(root, "original_videos_MOS_for_YouTube_UGC_dataset.xlsx")
    return [r for _, _, r in _tabular(path, read_xlsx(path, "MOS"), "vid", "MOS full")]


def _read_split_files(root: str) -> list[LabelRow]:
    """The synthetic caches: train.txt and test.txt in GT format."""
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
        _read_split_files, split="official"),
    "synthetic-video": DatasetInfo(
        "procedural panning clips (libx264), compression/stutter/blur x 5 levels + pristine",
        "nothing: generated on first use and cached (PRERESQ_CACHE, default ~/.cache/preresq)",
        "generated: s000.mp4, s000_compression1.mp4..., train.txt, test.txt",
        _read_split_files, split="official"),
}


def _known() -> str:
    width = max(map(len, DATASETS))
    return "\n".join(f"  {n:<{width}}  {i.download}\n  {'':<{width}}  layout: {i.layout}"
                     for n, i in DATASETS.items())


# --------------------------------------------------------------------------- rescaling and splits

def rescale(raw: list[float], lower_is_better: bool = False) -> list[float]:
    """Min-max rescale to 1..5: 1 + 4 (x - min) / (max - min); flipped first when lower is better."""
    lo, hi = min(raw), max(raw)
    if hi == lo:
        raise DataError(f"all {len(raw)} scores equal {lo}: cannot rescale to 1..5")
    return [1 + 4 * ((hi - x) if lower_is_better else (x - lo)) / (hi - lo) for x in raw]


def kadid_split(refs: list[str], seed: int = 42) -> dict[str, str]:
    """KADID reference -> "train" / "val" / "test" (49/16/16 for the full 81 references).

    Test: exactly the paper's 16 references (KADID_TEST_REFS). The others are shuffled with
    `seed`; the first round(n * 16 / 65) become "val", the rest "train".
    """
    stems = {r: os.path.splitext(os.path.basename(r))[0].upper() for r in set(refs)}
    rest = sorted(r for r in stems if stems[r] not in KADID_TEST_REFS)
    random.Random(seed).shuffle(rest)
    n_val = round(len(rest) * 16 / 65)
    out = {r: "test" for r in stems if stems[r] in KADID_TEST_REFS}
    out.update({r: "val" if i < n_val else "train" for i, r in enumerate(rest)})
    return out


def random_split(keys: list[str], seed: int = 42, test_fraction: float = RANDOM_TEST_FRACTION) -> dict[str, str]:
    """Group key (reference image, or file) -> "train" / "test", a seeded shuffle; at least one of each."""
    groups = sorted(set(keys))
    random.Random(seed).shuffle(groups)
    n_test = min(max(1, round(len(groups) * test_fraction)), len(groups) - 1) if len(groups) > 1 else 0
    return {g: "test" if i < n_test else "train" for i, g in enumerate(groups)}


def _select(name: str, info: DatasetInfo, rows: list[LabelRow], split: str, seed: int) -> list[LabelRow]:
    allowed = info.splits(rows)
    if split not in allowed:
        hint = f" (official splits come from its label files: {info.layout})" if info.split == "official" else ""
        raise DataError(f"{name} has no split {split!r}; use one of {list(allowed)}{hint}")
    if split == "all":
        return rows
    if info.split == "official":
        return [r for r in rows if r.split == split]
    if info.split == "kadid":
        which = kadid_split([r.ref or r.name for r in rows], seed)
    else:
        which = random_split([r.ref or r.name for r in rows], seed)
    return [r for r in rows if which[r.ref or r.name] == split]


# --------------------------------------------------------------------------- paths

class _Resolver:
    """Finds labelled files under root, tolerating case differences (TID2013 lists I01_11_1.BMP
    for i01_11_1.bmp) with one cached directory listing per folder."""

    def __init__(self, root: str, dirs: tuple[str, ...], exts: tuple[str, ...]):
        self.root, self.dirs, self.exts, self._listing = root, dirs, exts, {}

    def _ci_join(self, base: str, rel: str) -> str | None:
        path = base
        for part in rel.replace("\\", "/").split("/"):
            if part in ("", "."):
                continue
            nxt = os.path.join(path, part)
            if not os.path.exists(nxt):
                if path not in self._listing:
                    try:
                        self._listing[path] = {n.lower(): n for n in os.listdir(path)}
                    except OSError:
                        self._listing[path] = {}
                hit = self._listing[path].get(part.lower())
                if hit is None:
                    return None
                nxt = os.path.join(path, hit)
            path = nxt
        return path if os.path.isfile(path) else None

    def find(self, name: str) -> str | None:
        for candidate in (name, *(name + e for e in self.exts)):
            for d in self.dirs:
                exact = os.path.join(self.root, d, candidate)
                if os.path.isfile(exact):
                    return os.path.abspath(exact)
        for candidate in (name, *(name + e for e in self.exts)):
            for d in self.dirs:
                hit = self._ci_join(os.path.join(self.root, d), candidate)
                if hit:
                    return os.path.abspath(hit)
        return None


def _items(name: str, info: DatasetInfo, root: str, rows: list[LabelRow], split: str, seed: int,
           dataset: str | None = None) -> list[Item]:
    if not rows:
        raise DataError(f"{name}: the label file(s) under {root} list no items")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.group, []).append(i)
    mos = [0.0] * len(rows)
    for idx in groups.values():
        for i, m in zip(idx, rescale([rows[i].raw for i in idx], info.lower_is_better)):
            mos[i] = m
    chosen = {id(r) for r in _select(name, info, rows, split, seed)}
    resolver = _Resolver(root, info.dirs, info.exts)
    items, missing = [], []
    for r, m in zip(rows, mos):
        if id(r) not in chosen:
            continue
        path = resolver.find(r.name)
        if path is None:
            missing.append(os.path.join(info.dirs[0], r.name) if info.dirs[0] != "." else r.name)
        else:
            items.append(Item(path, m, r.raw, dataset or name, r.ref))
    if missing:
        raise DataError(f"{name}: {len(missing)} of {len(missing) + len(items)} labelled files "
                        f"({split} split) are missing under {root}; first: {missing[:5]}. "
                        f"Expected layout: {info.layout}")
    return items


def _root(name: str, info: DatasetInfo, root: str | None) -> str:
    if root is None or str(root).strip() == "":
        raise DataError(f"dataset {name!r} needs --data-root DIR (the folder it unpacks to). "
                        f"{name}: {info.download}\n  layout: {info.layout}")
    path = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(path):
        raise DataError(f"--data-root {root} for {name!r} is not a folder. Expected layout: {info.layout}")
    return path


def _open(name: str, root: str | None, labels: str | None, seed: int) -> tuple[DatasetInfo, str, list[LabelRow], str]:
    """(info, absolute root, all label rows, dataset name for the items) or DataError."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}. Known datasets, where to get them, and the "
                        f"folder --data-root should point at:\n{_known()}")
    info = DATASETS[name]
    if labels is not None and name != "labels":
        raise DataError(f"--labels is only read with --data labels (got --data {name})")
    if name == "synthetic":
        root = make_synthetic(root, seed=seed)
    elif name == "synthetic-video":
        root = make_synthetic_video(root, seed=seed)
    else:
        root = _root(name, info, root)
    if name != "labels":
        return info, root, info.read(root), name
    if not labels:
        raise DataError("--data labels needs --labels FILE (a GT file or a training jsonl)")
    path = os.path.expanduser(labels)
    if not os.path.isfile(path):
        raise DataError(f"label file {labels} does not exist")
    return info, root, read_labels(path), os.path.splitext(os.path.basename(path))[0]


def load_dataset(name: str, root: str | None = None, split: str = "train", *,
                 labels: str | None = None, seed: int = 42) -> list[Item]:
    """Items of one dataset split, MOS rescaled to 1..5; every bad label row or missing file
    raises DataError here, before any training starts.

    name: a key of DATASETS; "labels" reads `labels` (a GT file or jsonl) relative to root,
    and its items carry the label file's stem as their dataset name.
    split: "train" | "val" | "test" | "all" (| "test-1080p" for lsvq); which exist depends on
    the set (DatasetInfo.splits). seed drives KADID's train/val and the random 80/20 splits,
    and the content of the synthetic sets.
    """
    info, root, rows, dataset = _open(name, root, labels, seed)
    return _items(name, info, root, rows, split, seed, dataset)


def load_datasets(names: str, roots: str | None = None, split: str = "train", *,
                  labels: str | None = None, seed: int = 42) -> dict[str, list[Item]]:
    """The `--data a,b --data-root A,B [--labels F1,F2]` flags: {set name: items}.

    names and roots are comma-separated and paired in order, one root per set (an empty
    entry for the synthetic sets, e.g. `--data synthetic,koniq --data-root ,~/koniq10k`).
    labels: comma-separated, one per "labels" entry in names, in order; such a set is keyed
    by its label file's stem. Keeping the sets apart lets a trainer draw each step's batch
    from one set.
    """
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    root_list = [r.strip() for r in roots.split(",")] if roots else [""] * len(wanted)
    if len(root_list) != len(wanted):
        raise DataError(f"--data lists {len(wanted)} sets ({','.join(wanted)}) but --data-root gives "
                        f"{len(root_list)} folder(s); give one per set, comma-separated in the same "
                        "order (an empty entry for synthetic sets)")
    label_list = [x.strip() for x in labels.split(",")] if labels else []
    if len(label_list) != wanted.count("labels"):
        raise DataError(f"--data names 'labels' {wanted.count('labels')} time(s) but --labels gives "
                        f"{len(label_list)} file(s); give one per 'labels' entry, in order")
    out: dict[str, list[Item]] = {}
    files = iter(label_list)
    for name, root in zip(wanted, root_list):
        label = next(files) if name == "labels" else None
        items = load_dataset(name, root or None, split, labels=label, seed=seed)
        key = items[0].dataset if items else name
        if key in out:
            raise DataError(f"set {key!r} appears twice in --data")
        out[key] = items
    return out


# --------------------------------------------------------------------------- images

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited over white; 16-bit and 32-bit
    integer greyscale is scaled from 0..65535; float greyscale is read as 0..1 when max <= 1."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(path: str, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file to 8-bit RGB, upright, with at most max_pixels pixels.

    A JPEG larger than max_pixels is decoded at a reduced DCT scale (Image.draft) before the
    full decode, then resized (bicubic, aspect kept) so w * h <= max_pixels. EXIF orientation is
    applied. Undecodable, truncated or missing files raise DataError naming the path.
    """
    try:
        with Image.open(path) as im:
            if max_pixels and im.format in ("JPEG", "MPO") and im.width * im.height > max_pixels:
                s = math.sqrt(max_pixels / (im.width * im.height))
                im.draft("RGB", (math.ceil(im.width * s), math.ceil(im.height * s)))
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path} ({type(e).__name__}: {e}); the file is truncated "
                        "or corrupt: re-download it or remove it from the label file") from None
    if max_pixels and im.width * im.height > max_pixels:
        s = math.sqrt(max_pixels / (im.width * im.height))
        size = (max(1, int(im.width * s)), max(1, int(im.height * s)))
        im = im.resize(size, Image.Resampling.BICUBIC)
    return im


# --------------------------------------------------------------------------- synthetic images

SYNTHETIC_VERSION = 1  # bump whenever the synthetic recipes change
# Levels 1 -> 5 per distortion type (datasets.md §4, tuned for PSNR to fall strictly).
DISTORTIONS: dict[str, tuple[float, ...]] = {
    "blur": (0.5, 1, 2, 3.5, 5),                   # Gaussian sigma, px
    "motion": (3, 7, 11, 17, 25),                  # motion-blur length, px; one angle per source
    "noise": (0.02, 0.05, 0.08, 0.12, 0.18),       # Gaussian sigma on [0, 1]; one field per source
    "jpeg": (90, 50, 25, 10, 4),                   # JPEG quality
    "pixelate": (2, 4, 8, 16, 32),                 # block size, px (nested, so the error grows)
    "contrast": (0.75, 0.55, 0.4, 0.25, 0.12),     # ImageEnhance.Contrast factor
    "quantise": (32, 16, 8, 5, 3),                 # grey levels per channel
    "desaturate": (0.7, 0.5, 0.3, 0.1, 0.0),       # ImageEnhance.Color factor
}


def synthetic_mos(level: int) -> float:
    """MOS of a synthetic item: pristine (level 0) 5.0, then 4.2, 3.4, 2.6, 1.8, 1.0 for levels 1..5."""
    return 5.0 - 0.8 * level


def _power_noise(rng: np.random.Generator, h: int, w: int, exponent: float) -> np.ndarray:
    """(h, w) zero-mean unit-std noise with amplitude spectrum ~ f^-exponent (random phase)."""
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    f[0, 0] = 1.0
    amp = f ** -exponent
    amp[0, 0] = 0.0
    field_ = np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((h, w)))))
    return (field_ - field_.mean()) / (field_.std() + 1e-12)


def landscape(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A procedural "landscape": 1/f^1.2 luminance texture, smooth chroma, a sky gradient above a
    1/f horizon, and 4-7 flat shaded discs/rectangles with crisp edges (what blur, JPEG and
    pixelation visibly damage)."""
    h, w = height, width
    lum = 1.0 + 0.24 * _power_noise(rng, h, w, 1.2)
    c1, c2 = (0.08 * _power_noise(rng, h, w, 2.5) for _ in range(2))
    base = rng.uniform(0.25, 0.75, 3)
    img = np.stack([base[0] + c1, base[1] + c2, base[2] - c1 - c2], -1) * lum[..., None]
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = (rng.uniform(0.3, 0.5) + 0.06 * _power_noise(rng, 1, w, 1.0)[0]) * h
    t = (yy / h)[..., None]
    sky = np.array([0.35, 0.55, 0.9]) * rng.uniform(0.8, 1.1) * (1 - 2 * t) + np.array([0.8, 0.85, 0.95]) * 2 * t
    sky = sky + 0.02 * _power_noise(rng, h, w, 2.0)[..., None]
    img = np.where((yy < horizon[None, :])[..., None], sky, img)
    for _ in range(rng.integers(4, 8)):
        colour = rng.uniform(0.05, 0.95, 3)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0.3 * h, h), rng.uniform(0.06, 0.2) * min(w, h)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
            shade = 1 - 0.35 * np.clip((xx - cx + yy - cy) / (2 * r) + 0.5, 0, 1)
        else:
            rw, rh = r * rng.uniform(0.6, 1.6), r * rng.uniform(0.6, 1.6)
            mask = (abs(xx - cx) < rw) & (abs(yy - cy) < rh)
            shade = 1 - 0.3 * np.clip((xx - cx + rw) / (2 * rw), 0, 1)
        surface = colour * shade[..., None] * (1 + 0.25 * (lum[..., None] - 1))
        img = np.where(mask[..., None], surface, img)
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))


def _from_float(a: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(a, 0, 255) + 0.5).astype(np.uint8))


def distort(img: Image.Image, kind: str, level: int, rng: np.random.Generator) -> Image.Image:
    """`img` with distortion `kind` at `level` (1..5) of DISTORTIONS. rng draws the per-source
    randomness (noise field, motion angle); pass a generator seeded the same for every level so
    that the levels of one source differ only in strength."""
    p = DISTORTIONS[kind][level - 1]
    a = np.asarray(img, dtype=np.float64)
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(p))
    if kind == "motion":
        n = int(p) | 1
        kernel = Image.new("L", (n, n), 0)
        angle, c, half = rng.uniform(0, math.pi), (n - 1) / 2, (p - 1) / 2
        dx, dy = math.cos(angle) * half, math.sin(angle) * half
        ImageDraw.Draw(kernel).line([(c - dx, c - dy), (c + dx, c + dy)], fill=255)
        k = np.asarray(kernel, dtype=np.float64)
        k /= k.sum()
        return _from_float(np.stack([ndimage.convolve(a[..., i], k, mode="reflect") for i in range(3)], -1))
    if kind == "noise":
        return _from_float(a + 255 * p * rng.standard_normal(a.shape))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(p))
        return Image.open(buf).convert("RGB")
    if kind == "pixelate":
        b, (h, w) = int(p), a.shape[:2]
        padded = np.pad(a, ((0, -h % b), (0, -w % b), (0, 0)), mode="edge")
        blocks = padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b, 3).mean((1, 3))
        return _from_float(blocks.repeat(b, 0).repeat(b, 1)[:h, :w])
    if kind == "contrast":
        return ImageEnhance.Contrast(img).enhance(p)
    if kind == "quantise":
        return _from_float(np.round(a / 255 * (p - 1)) / (p - 1) * 255)
    if kind == "desaturate":
        return ImageEnhance.Color(img).enhance(p)
    raise ValueError(f"unknown distortion {kind!r}; known: {sorted(DISTORTIONS)}")


def _cache_root(kind: str, params: dict) -> str:
    """$PRERESQ_CACHE (default ~/.cache/preresq)/<kind>-<every parameter>: a changed recipe
    (bump SYNTHETIC_VERSION) or parameter gets a new folder, never a stale one."""
    parent = os.environ.get("PRERESQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "preresq")
    return os.path.join(parent, "-".join([kind, *map(str, params.values())]))


def _cached(root: str, params: dict, build: Callable[[str], None]) -> str:
    """Make sure root holds the set described by params; build it once, atomically
    (a temporary sibling folder renamed into place), so a crash never leaves half a set."""
    marker = os.path.join(root, "params.json")
    if not os.path.isfile(marker):
        parent = os.path.dirname(os.path.abspath(root))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
        try:
            build(tmp)
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(params, f, sort_keys=True)
            try:
                os.rename(tmp, root)  # replaces root only if it is absent or an empty folder
            except OSError:
                if not os.path.isfile(marker):
                    raise DataError(f"{root} exists and is not a synthetic set; remove it or choose "
                                    "another folder") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with open(marker) as f:
        found = json.load(f)
    if found != json.loads(json.dumps(params, sort_keys=True)):
        raise DataError(f"{root} holds a synthetic set made with {found}, not {params}; remove it or "
                        "choose another folder")
    return root


def _split_sources(n_sources: int) -> list[str]:
    """The first 3/4 of the sources are "train", the rest "test": no content is shared."""
    n_test = max(1, n_sources // 4)
    return ["train"] * (n_sources - n_test) + ["test"] * n_test


def make_synthetic(root: str | None = None, *, seed: int = 42, size: tuple[int, int] = (112, 112),
                   n_sources: int = 36, types_per_source: int = 2) -> str:
    """Generate (once) the synthetic image set and return its folder.

    Each source image (landscape(), size = (width, height)) gives its pristine version and
    `types_per_source` distortion types (cycling over DISTORTIONS, so all are used evenly) at
    levels 1..5; MOS = synthetic_mos(level). Sources are split 3/4 train, 1/4 test. The folder
    is an ordinary "GT" dataset: train.txt / test.txt hold 'ref dist mos' lines.
    root defaults to $PRERESQ_CACHE (or ~/.cache/preresq)/synthetic-<version>-<seed>-<size>-<n>.
    """
    width, height = size
    params = {"version": SYNTHETIC_VERSION, "seed": seed, "size": f"{width}x{height}",
              "n_sources": n_sources, "types_per_source": types_per_source}

    def build(out: str) -> None:
        kinds = list(DISTORTIONS)
        random.Random(seed).shuffle(kinds)
        lines = {"train": [], "test": []}
        for s, split in enumerate(_split_sources(n_sources)):
            src = landscape(np.random.default_rng([seed, s]), width, height)
            ref = f"s{s:03d}.png"
            src.save(os.path.join(out, ref))
            lines[split].append(f"{ref} {ref} {synthetic_mos(0):.1f}")
            for j in range(types_per_source):
                t = (s * types_per_source + j) % len(kinds)
                for level in range(1, 6):
                    rng = np.random.default_rng([seed, s, t])  # the same draw at every level
                    dist = f"s{s:03d}_{kinds[t]}{level}.png"
                    distort(src, kinds[t], level, rng).save(os.path.join(out, dist))
                    lines[split].append(f"{ref} {dist} {synthetic_mos(level):.1f}")
        _write_split_files(out, lines)

    return _cached(os.path.expanduser(root or _cache_root("synthetic", params)), params, build)


def synthetic_dataset(root: str | None = None, split: str = "train", *, seed: int = 42,
                      size: tuple[int, int] = (112, 112), n_sources: int = 36,
                      types_per_source: int = 2) -> list[Item]:
    """Items of the synthetic image set (make_synthetic). The defaults give 297 train / 99 test
    images of 112x112 px (16 visual tokens at patch 14, merge 2) in about a second."""
    root = make_synthetic(root, seed=seed, size=size, n_sources=n_sources, types_per_source=types_per_source)
    return _items("synthetic", DATASETS["synthetic"], root, _read_split_files(root), split, seed)


def _write_split_files(out: str, lines: dict[str, list[str]]) -> None:
    for split, rows in lines.items():
        with open(os.path.join(out, f"{split}.txt"), "w") as f:
            f.write("\n".join(rows) + "\n")


# --------------------------------------------------------------------------- synthetic video

# Levels 1 -> 5. Clips other than "compression" are encoded at the carrier CRF.
VIDEO_DISTORTIONS: dict[str, tuple[float, ...]] = {
    "compression": (23, 30, 36, 42, 48),   # libx264 CRF
    "stutter": (2, 3, 4, 6, 8),            # each shown frame is held this many frames (others dropped)
    "blur": (0.5, 1, 2, 3.5, 5),           # per-frame Gaussian sigma, px
}
CARRIER_CRF = 12
PAN_SPEED = 2  # px per frame


def write_video(frames: list[Image.Image], path: str, fps: int, crf: int) -> None:
    """Encode RGB frames (even width and height) with libx264, yuv420p."""
    import av
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def pan_clip(src: Image.Image, frames: int, width: int, height: int) -> list[Image.Image]:
    """A left-to-right pan at PAN_SPEED px/frame across src (src.width >= width + PAN_SPEED * frames)."""
    return [src.crop((PAN_SPEED * i, 0, PAN_SPEED * i + width, height)) for i in range(frames)]


def distort_clip(frames: list[Image.Image], kind: str, level: int) -> tuple[list[Image.Image], int]:
    """(frames, crf) for distortion `kind` at `level` (1..5) of VIDEO_DISTORTIONS."""
    p = VIDEO_DISTORTIONS[kind][level - 1]
    if kind == "compression":
        return frames, int(p)
    if kind == "stutter":
        hold = int(p)
        return [frames[(i // hold) * hold] for i in range(len(frames))], CARRIER_CRF
    if kind == "blur":
        return [f.filter(ImageFilter.GaussianBlur(p)) for f in frames], CARRIER_CRF
    raise ValueError(f"unknown video distortion {kind!r}; known: {sorted(VIDEO_DISTORTIONS)}")


def make_synthetic_video(root: str | None = None, *, seed: int = 42, size: tuple[int, int] = (128, 96),
                         frames: int = 32, fps: int = 8, n_sources: int = 12) -> str:
    """Generate (once) the synthetic video set and return its folder.

    Each source is a landscape() panned left to right (pan_clip); it gives a pristine clip and
    every VIDEO_DISTORTIONS type at levels 1..5, MOS = synthetic_mos(level); libx264, yuv420p.
    Sources are split 3/4 train, 1/4 test; train.txt / test.txt hold 'ref dist mos' lines.
    """
    width, height = size
    if width % 2 or height % 2:
        raise DataError(f"synthetic video size {size} must be even (yuv420p)")
    params = {"version": SYNTHETIC_VERSION, "seed": seed, "size": f"{width}x{height}",
              "n_sources": n_sources, "frames": frames, "fps": fps}

    def build(out: str) -> None:
        lines = {"train": [], "test": []}
        for s, split in enumerate(_split_sources(n_sources)):
            src = landscape(np.random.default_rng([seed, s]), width + PAN_SPEED * frames, height)
            clip = pan_clip(src, frames, width, height)
            ref = f"s{s:03d}.mp4"
            write_video(clip, os.path.join(out, ref), fps, CARRIER_CRF)
            lines[split].append(f"{ref} {ref} {synthetic_mos(0):.1f}")
            for kind in VIDEO_DISTORTIONS:
                for level in range(1, 6):
                    dist = f"s{s:03d}_{kind}{level}.mp4"
                    shown, crf = distort_clip(clip, kind, level)
                    write_video(shown, os.path.join(out, dist), fps, crf)
                    lines[split].append(f"{ref} {dist} {synthetic_mos(level):.1f}")
        _write_split_files(out, lines)

    return _cached(os.path.expanduser(root or _cache_root("synthetic-video", params)), params, build)


def synthetic_video_dataset(root: str | None = None, split: str = "train", *, seed: int = 42,
                            size: tuple[int, int] = (128, 96), frames: int = 32, fps: int = 8,
                            n_sources: int = 12) -> list[Item]:
    """Items of the synthetic video set (make_synthetic_video). Defaults: 128x96, 32 frames at
    8 fps, 9 train / 3 test sources = 144 / 48 clips, a few seconds to make."""
    root = make_synthetic_video(root, seed=seed, size=size, frames=frames, fps=fps, n_sources=n_sources)
    return _items("synthetic-video", DATASETS["synthetic-video"], root, _read_split_files(root), split, seed)


# --------------------------------------------------------------------------- command line

def _check_file(path: str) -> str | None:
    """None if the file decodes, else the reason."""
    if os.path.splitext(path)[1].lower() in VIDEO_EXTS:
        import av
        try:
            with av.open(path) as container:
                next(container.decode(video=0))
            return None
        except (av.error.FFmpegError, OSError, StopIteration, IndexError) as e:
            return f"{type(e).__name__}: {e}"
    try:
        load_image(path, max_pixels=256 * 256)
        return None
    except DataError as e:
        return str(e)


def summary(name: str, root: str | None, split: str | None, labels: str | None, seed: int,
            check_images: bool) -> int:
    """Print items per split, score ranges before and after rescaling, and problems found;
    return a process exit code (1 when there are problems)."""
    try:
        info, root, rows, dataset = _open(name, root, labels, seed)
    except DataError as e:
        print(f"problem: {e}")
        return 1
    print(f"{name}: {info.what}\nroot: {root}")
    print(f"{'split':<11} {'items':>7}  {'raw min':>10} {'raw max':>10}  {'mos min':>7} {'mos max':>7}")
    problems = 0
    for s in [split] if split else info.splits(rows):
        try:
            items = _items(name, info, root, rows, s, seed, dataset)
        except DataError as e:
            print(f"{s:<11} problem: {e}")
            problems += 1
            continue
        raw, mos = [i.raw for i in items], [i.mos for i in items]
        print(f"{s:<11} {len(items):>7}  {min(raw):>10.4g} {max(raw):>10.4g}  {min(mos):>7.3f} {max(mos):>7.3f}")
    if check_images and not problems:
        checked = _items(name, info, root, rows, split or "all", seed, dataset)
        bad = [(i.path, why) for i in checked if (why := _check_file(i.path))]
        print(f"decoded {len(checked) - len(bad)} of {len(checked)} files")
        for path, why in bad[:10]:
            print(f"  unreadable: {path}: {why}")
        problems += len(bad)
    print("problems: none" if not problems else f"problems: {problems}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Summarise a quality dataset: items per split, "
                                     "score ranges before and after rescaling, problems found.")
    parser.add_argument("name", help=f"one of {', '.join(DATASETS)}")
    parser.add_argument("--data-root", help="folder the dataset unpacks to (see DATASETS)")
    parser.add_argument("--split", help="only this split (default: every split the set has)")
    parser.add_argument("--labels", help="label file for --data labels")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--check-images", action="store_true", help="decode every file")
    args = parser.parse_args(argv)
    return summary(args.name, args.data_root, args.split, args.labels, args.seed, args.check_images)


if __name__ == "__main__":
    sys.exit(main())
