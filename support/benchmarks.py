"""Each public quality benchmark in its native format, and the table of what each set name means.

A benchmark's reader turns its own label files (CSV, .xlsx, MATLAB .mat or plain text, read with
label_formats.py) into LabelRow records: file name, score as written, the label file it came
from, the reference image and the official split where the set has them. data.py rescales the
scores, applies the splits and finds the files; this module only reads what the files say.

    DATASETS["koniq"].read(root)   # -> [LabelRow("10004473376.jpg", 77.38, ..., split="train"), ...]
    known_datasets()               # every set name, where to get it, the folder layout
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

import glob
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from support.label_formats import (DataError, LabelRow, bad_row, finite_number, location, mat_entry, mat_rows,
                                   mat_str, read_csv, read_labels, read_mat, read_xlsx)

SPLITS = ("train", "val", "test", "all")


# --------------------------------------------------------------------------- native readers

def _int_name(value) -> str:
    """Spreadsheets store ids like 1600 as 1600.0; file names want "1600"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text


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
            raise bad_row(path, line, raw, "empty file name")
        yield line, cells, LabelRow(to_name(cells["name"]).strip(), finite_number(cells["score"], path, line, raw),
                                    path, where=location(path, line))


def _read_koniq(root: str) -> list[LabelRow]:
    path = _find(root, "koniq10k_distributions_sets.csv", "koniq10k_scores_and_distributions.csv")
    official = {"training": "train", "validation": "val", "test": "test"}
    out = []
    for line, cells, row in _tabular(path, read_csv(path), "image_name", ("MOS_zscore", "MOS"), set=("set",)):
        if "set" in cells:
            if str(cells["set"]).strip() not in official:
                raise bad_row(path, line, cells, f"set must be one of {list(official)}")
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
    return mat_rows(mos_file, [mat_str(n, names_file, i) for i, n in enumerate(names)], mos)


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
        number = finite_number(row[0], path, line, row)
        if number < 1 or not number.is_integer():
            raise bad_row(path, line, row, f"image number {row[0]!r} is not a whole number from 1")
        out.append(LabelRow(f"DatabaseImage{int(number):04d}.JPG", finite_number(row[1], path, line, row), path,
                            where=location(path, line)))
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
    flags = [mat_entry(o, dmos_file, i) for i, o in enumerate(orgs)]
    bad = next((i for i, o in enumerate(flags) if o not in (0, 1)), None)
    if bad is not None:
        raise DataError(f"{dmos_file}, entry {bad + 1}: orgs is {str(flags[bad])!r}; it must be 0 (distorted) or 1 "
                        "(reference). Fix that entry.")
    return mat_rows(dmos_file, names, dmos, refs, keep=[i for i, o in enumerate(flags) if o == 0])


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
                    raise bad_row(path, line, cells, "is_test must be True or False")
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
    return mat_rows(path, names, mos)


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
