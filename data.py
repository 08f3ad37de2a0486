"""Data for PreResQ: labelled images and videos, with every score on one 1..5 scale.

Paper map (arXiv 2511.05393, its data and evaluation protocol):
- training sets: KADID-10K split by reference image 49/16/16 (the authors' lists), LSVQ train
  for video; KonIQ's official split for the KonIQ-trained protocol;
- test sets: the whole of AGIQA-3K, BID, CLIVE, KonIQ, PIPAL, SPAQ, TID2013, CSIQ, LIVE (and the
  KADID test refs); KoNViD-1k, LIVE-VQC, LSVQ test / test-1080p, YouTube-UGC for video;
- every score is min-max rescaled per label file to 1..5 (lower-is-better scores flipped
  first): mos = 1 + 4 (x - min) / (max - min). `Item.raw` keeps the number in the file.

    load_dataset("kadid", "~/kadid10k", "train")   # -> [Item(path, mos, raw, "kadid", ref), ...]
    load_datasets("synthetic,koniq", ",~/koniq10k")  # the --data / --data-root flags
    load_image(path, max_pixels)    # an image file -> upright 8-bit RGB, at most max_pixels
    read_visual(path, max_pixels)   # an image, or a video's views [global mosaic, local frames]
    python data.py --data NAME --data-root DIR   # items per split, score ranges, problems found

Each benchmark's own files and the set names (DATASETS): benchmarks.py; label files: label_formats.py;
the generated sets ("synthetic", "synthetic-video"): synthetic.py; video views: video.py.

Choices the paper leaves open:
- KADID: train/val/test are the authors' published reference lists (`kadid_split`), whatever
  --seed says; a reference outside them is a DataError for those splits ("all" reads any copy).
- Sets without an official split: "all", and "train"/"test" = a seeded 80/20 split by
  reference image (by file where there is none), so no content is shared.
- Truncated or corrupt images raise DataError; Pillow's LOAD_TRUNCATED_IMAGES (which pads
  with grey, silently changing the quality being judged) is never turned on.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import struct
import sys
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from support import cli
from support import synthetic
import video
# DataError, DATASETS and read_labels are part of this module's interface too (data.DataError ...).
from support.benchmarks import DATASETS, DatasetInfo, known_datasets, pair_sets
from support.label_formats import DataError, LabelRow, check_duplicates, read_labels

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp")
RANDOM_TEST_FRACTION = 0.2
# The authors' KADID-10K split by reference image (125 distorted images each: 6,125 / 2,000 / 2,000).
KADID_TRAIN_REFS = tuple("I01 I02 I03 I04 I05 I06 I08 I09 I10 I11 I13 I17 I18 I20 I21 I22 I23 I24 I25 I26 I28 "
                         "I31 I33 I39 I40 I42 I45 I46 I47 I48 I51 I52 I53 I54 I56 I57 I58 I59 I60 I61 I62 "
                         "I63 I65 I68 I69 I75 I76 I77 I79".split())
KADID_VAL_REFS = tuple("I07 I12 I14 I15 I16 I27 I32 I35 I36 I41 I44 I49 I55 I66 I67 I70".split())
KADID_TEST_REFS = tuple("I19 I29 I30 I34 I37 I38 I43 I50 I64 I71 I72 I73 I74 I78 I80 I81".split())


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
        return is_video(self.path)


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTS


# --------------------------------------------------------------------------- rescaling and splits

def rescale(raw: list[float], lower_is_better: bool = False, where: str = "") -> list[float]:
    """Min-max rescale to 1..5: 1 + 4 (x - min) / (max - min); flipped first when lower is better.
    where: the label file, named by the DataError when the scores span no range, or more than a float holds."""
    lo, hi, at = min(raw), max(raw), f"{where}: " if where else ""
    if hi == lo:
        raise DataError(f"{at}all {len(raw)} scores equal {lo}: cannot rescale to 1..5")
    if not math.isfinite(4 * (hi - lo)):
        raise DataError(f"{at}the scores run from {lo:g} to {hi:g}, a range too large for a float: "
                        "cannot rescale to 1..5. Fix the scores that are out of scale")
    return [1 + 4 * ((hi - x) if lower_is_better else (x - lo)) / (hi - lo) for x in raw]


def kadid_split(refs: list[str]) -> dict[str, str]:
    """KADID reference (I01.png, or i01) -> "train" / "val" / "test": the authors' lists,
    KADID_TRAIN_REFS / KADID_VAL_REFS / KADID_TEST_REFS (49/16/16). No seed: the split is
    theirs. A reference in none of the lists raises DataError."""
    lists = {**dict.fromkeys(KADID_TRAIN_REFS, "train"), **dict.fromkeys(KADID_VAL_REFS, "val"),
             **dict.fromkeys(KADID_TEST_REFS, "test")}
    stems = {r: os.path.splitext(os.path.basename(r))[0].upper() for r in set(refs)}
    unknown = sorted(r for r, stem in stems.items() if stem not in lists)
    if unknown:
        raise DataError(f"kadid: {len(unknown)} reference image(s) not among KADID-10k's I01..I81, so "
                        f"the authors' train/val/test lists do not place them: {unknown[:5]}. Restore "
                        "the original names, or use the 'all' split")
    return {r: lists[stem] for r, stem in stems.items()}


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
        which = kadid_split([r.ref or r.name for r in rows])
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
    for group, idx in groups.items():
        for i, m in zip(idx, rescale([rows[i].raw for i in idx], info.lower_is_better, group)):
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
                        f"folder --data-root should point at:\n{known_datasets()}")
    info = DATASETS[name]
    if labels is not None and name != "labels":
        raise DataError(f"--labels is only read with --data labels (got --data {name})")
    if name == "synthetic":
        root = synthetic.make_synthetic(root, seed=seed)
    elif name == "synthetic-video":
        root = synthetic.make_synthetic_video(root, seed=seed)
    else:
        root = _root(name, info, root)
    if name != "labels":
        return info, root, check_duplicates(info.read(root)), name
    if not labels:
        raise DataError("--data labels needs --labels FILE (a GT file or a training jsonl)")
    path = os.path.expanduser(labels)
    if not os.path.isfile(path):
        raise DataError(f"label file {labels} does not exist")
    return info, root, check_duplicates(read_labels(path)), os.path.splitext(os.path.basename(path))[0]


def load_dataset(name: str, root: str | None = None, split: str = "train", *,
                 labels: str | None = None, seed: int = 42) -> list[Item]:
    """Items of one dataset split, MOS rescaled to 1..5; every bad label row or missing file
    raises DataError here, before any training starts.

    name: a key of DATASETS; "labels" reads `labels` (a GT file or jsonl) relative to root,
    and its items carry the label file's stem as their dataset name.
    split: "train" | "val" | "test" | "all" (| "test-1080p" for lsvq); which exist depends on
    the set (DatasetInfo.splits). seed drives the random 80/20 splits and the content of the
    synthetic sets; KADID's split is the authors' and ignores it.
    """
    info, root, rows, dataset = _open(name, root, labels, seed)
    return _items(name, info, root, rows, split, seed, dataset)


def load_datasets(names: str, roots: str | None = None, split: str = "train", *,
                  labels: str | None = None, seed: int = 42) -> dict[str, list[Item]]:
    """The `--data a,b --data-root A,B [--labels F1,F2]` flags (paired by pair_sets, e.g.
    `--data synthetic,koniq --data-root ,~/koniq10k`): {set name: items}. A "labels" set is keyed
    by its label file's stem. Keeping the sets apart lets a trainer draw each step's batch from one set.
    """
    out: dict[str, list[Item]] = {}
    for name, root, label in pair_sets(names, roots, labels):
        items = one_kind(load_dataset(name, root, split, labels=label, seed=seed), label or name)
        key = items[0].dataset if items else name
        if key in out:
            raise DataError(f"set {key!r} appears twice in --data")
        out[key] = items
    return out


def one_kind(items: list[Item], where: str) -> list[Item]:
    """items, or a DataError naming `where` and the first item of each kind when they mix images and
    videos: a training set is one kind, as each training step shows its items one prompt (images and
    videos have their own). evaluate.py, which prompts each item by its kind, reads mixed sets."""
    first: dict[bool, Item] = {}
    for it in items:
        first.setdefault(it.is_video, it)
    if len(first) > 1:
        raise DataError(f"{where} mixes images and videos (first image {first[False].path}, first video "
                        f"{first[True].path}); a training set must be one kind, as each step gives its items "
                        "one prompt: put them in two label files, --data labels,labels --data-root DIR,DIR "
                        "--labels images.txt,videos.txt")
    return items


# --------------------------------------------------------------------------- images and videos

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)
_HUGE_WARNED: set[str] = set()
_IGNORE_BOMB = ("ignore", None, Image.DecompressionBombWarning, None, 0)  # an entry of warnings.filters


def _open_image(path: str) -> Image.Image:
    """Image.open(path) (lazy: the header only). A picture over Pillow's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS) gets one warning line naming the file, once; one over twice the limit,
    which Pillow refuses, a DataError."""
    limit = Image.MAX_IMAGE_PIXELS
    # Pillow's own warning names a line of its code in site-packages; this function says it, naming the file.
    if warnings.filters[:1] != [_IGNORE_BOMB]:  # (re)adding a filter resets every "show once" record
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise DataError(f"{path} has over {2 * limit:,} pixels, more than Pillow decodes (twice its limit "
                        "against decompression bombs): downscale the file") from None
    if limit and im.width * im.height > limit and path not in _HUGE_WARNED:
        _HUGE_WARNED.add(path)
        cli.say(f"{os.path.basename(sys.argv[0]) or 'data.py'}: warning: {path} is {im.width} x {im.height} "
                f"pixels, over Pillow's limit against decompression bombs ({limit:,} pixels); decoding "
                "it takes much memory and time: downscale the file if it is not meant to be that large")
    return im


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


# The Qwen2-VL image processor (smart_resize) refuses a picture whose long side is over 200 times its
# short one; it scales every other size, however small, to at least 56 x 56 pixels.
MAX_ASPECT_RATIO = 200


def check_shape(path: str, width: int, height: int, downscaled: bool = False) -> None:
    """DataError for a picture the model's image processor refuses: a long side over MAX_ASPECT_RATIO
    times the short one. downscaled: the size is --max-pixels' downscale of a larger picture."""
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        size = f"{width} x {height} pixels" + (" once downscaled to --max-pixels" if downscaled else "")
        raise DataError(f"{path} is {size}: the model's image processor takes no picture whose long side is "
                        f"over {MAX_ASPECT_RATIO} times its short one; crop it"
                        + (", or raise --max-pixels" if downscaled else ""))


def load_image(path: str, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file to 8-bit RGB, upright, with at most max_pixels pixels.

    A JPEG larger than max_pixels is decoded at a reduced DCT scale (Image.draft) before the
    full decode, then resized (bicubic, aspect kept) so w * h <= max_pixels. EXIF orientation is
    applied. Undecodable, truncated or missing files raise DataError naming the path.
    """
    try:
        with _open_image(path) as im:
            downscaled = bool(max_pixels) and im.width * im.height > max_pixels
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
                        "or corrupt: re-download or re-save it") from None
    if max_pixels and im.width * im.height > max_pixels:
        s = math.sqrt(max_pixels / (im.width * im.height))
        size = (max(1, int(im.width * s)), max(1, int(im.height * s)))
        im = im.resize(size, Image.Resampling.BICUBIC)
    check_shape(path, *im.size, downscaled)
    return im


@contextmanager
def videos_as_data_errors():
    """A video.VideoError raised inside as a DataError: the one error of a file a set cannot use."""
    try:
        yield
    except video.VideoError as e:
        raise DataError(str(e)) from None


def read_visual(path: str, max_pixels: int | None = None) -> Image.Image | list[Image.Image]:
    """What the model is shown of one file: an image file -> its RGB picture (load_image); a video
    file -> its views [global mosaic, local 1..3] (video.video_views), the local frames capped at
    max_pixels (default video.LOCAL_MAX_PIXELS). Raises DataError naming the file."""
    if is_video(path):
        with videos_as_data_errors():
            views = video.video_views(path, local_max_pixels=max_pixels or video.LOCAL_MAX_PIXELS)
        for view in views:
            check_shape(path, *view.size)
        return views
    return load_image(path, max_pixels=max_pixels)


# --------------------------------------------------------------------------- the synthetic sets

def synthetic_dataset(root: str | None = None, split: str = "train", *, seed: int = 42,
                      size: tuple[int, int] = (112, 112), n_sources: int = 36,
                      types_per_source: int = 2) -> list[Item]:
    """Items of the synthetic image set (synthetic.make_synthetic). The defaults give 297 train /
    99 test images of 112x112 px (16 visual tokens at patch 14, merge 2) in about a second."""
    root = synthetic.make_synthetic(root, seed=seed, size=size, n_sources=n_sources,
                                    types_per_source=types_per_source)
    info = DATASETS["synthetic"]
    return _items("synthetic", info, root, info.read(root), split, seed)


def synthetic_video_dataset(root: str | None = None, split: str = "train", *, seed: int = 42,
                            size: tuple[int, int] = (128, 96), frames: int = 32, fps: int = 8,
                            n_sources: int = 12) -> list[Item]:
    """Items of the synthetic video set (synthetic.make_synthetic_video). Defaults: 128x96, 32
    frames at 8 fps, 9 train / 3 test sources = 144 / 48 clips, a few seconds to make."""
    root = synthetic.make_synthetic_video(root, seed=seed, size=size, frames=frames, fps=fps, n_sources=n_sources)
    info = DATASETS["synthetic-video"]
    return _items("synthetic-video", info, root, info.read(root), split, seed)


# --------------------------------------------------------------------------- command line

def check_readable(path: str) -> None:
    """The cheap check before a model loads: `path` is a file whose header opens as an image, or as a
    container with a video stream (frames.check_video). Raises DataError naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    if is_video(path):
        with videos_as_data_errors():
            return video.check_video(path)
    try:
        with _open_image(path) as im:
            size = im.size
    except _DECODE_ERRORS as e:
        raise DataError(f"{path} is not an image Pillow can read ({type(e).__name__}: {e}); pass an image "
                        "or a video file") from None
    check_shape(path, *size)




def _check_file(path: str) -> str | None:
    """None if the file decodes (an image in full, a video's first frame), else the reason."""
    try:
        with videos_as_data_errors():
            video.check_video(path, decode=True) if is_video(path) else load_image(path, max_pixels=256 * 256)
    except DataError as e:
        return str(e)
    return None


def summary(name: str, root: str | None, split: str | None, labels: str | None, seed: int,
            check_images: bool) -> int:
    """Print items per split, score ranges before and after rescaling, and problems found; return a
    process exit code (1 when there are problems). A set that cannot be opened raises DataError."""
    info, root, rows, dataset = _open(name, root, labels, seed)
    print(f"{name}: {info.what}\nroot: {root}")
    print(f"{'split':<11} {'items':>7}  {'raw min':>10} {'raw max':>10}  {'mos min':>7} {'mos max':>7}")
    problems = 0
    for s in [split] if split else info.splits(rows):
        try:
            items = one_kind(_items(name, info, root, rows, s, seed, dataset), labels or name)
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


def command(argv: list[str] | None = None) -> int:
    p = cli.parser("data.py", "Summarise a quality dataset: items per split, score ranges before and "
                   "after rescaling, problems found.")
    p.add_argument("name", nargs="?", help=argparse.SUPPRESS)  # the older spelling, `data.py NAME`
    p.add_argument("--data", help=f"the dataset, one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", help="the folder it unpacks to (none for the synthetic sets)")
    p.add_argument("--split", help="only this split (default: every split the set has)")
    p.add_argument("--labels", help="the label file of --data labels")
    p.add_argument("--seed", type=int, default=42, help="seed of the random 80/20 splits and synthetic sets")
    p.add_argument("--check-images", action="store_true", help="also decode every file")
    args = p.parse_args(argv)
    cli.at_least(p, args)
    if bool(args.name) == bool(args.data):
        p.error("name one dataset: --data NAME")
    return summary(args.data or args.name, args.data_root, args.split, args.labels, args.seed, args.check_images)


def main(argv: list[str] | None = None) -> int:
    """`python data.py --data NAME`: exit 0 when no problem was found, 1 when some were (listed),
    2 for bad usage or a set that cannot be opened (an unknown name, a missing --data-root)."""
    return cli.entry("data.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
