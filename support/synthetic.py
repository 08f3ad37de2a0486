"""The synthetic data sets: procedural pictures and panning clips with known quality order.

They let PreResQ train and be tested with no download. Every picture is a procedural
`landscape` (textured ground, sky, crisp shapes); each source gives its pristine version and
distorted versions at levels 1..5, and the score is the level: MOS = synthetic_mos(level).

    make_synthetic()        # images: 8 DISTORTIONS types x 5 levels; 297 train / 99 test at 112x112
    make_synthetic_video()  # clips: VIDEO_DISTORTIONS (compression, stutter, blur) x 5 levels
    write_clip(path, frames)  # RGB arrays -> a video file (also used by tests and benchmarks)

A set is generated once into files.cache_dir (a folder named by every parameter, so a changed
recipe never meets a stale set) and is an ordinary "GT" data set there: train.txt / test.txt
hold 'ref dist mos' lines; data.load_dataset("synthetic") reads it. The same seed gives the same
files (libx264 has been seen to encode tiny clips, 64x32, differently from run to run; the
default 128x96 clips repeat byte for byte). Pixelation uses nested block sizes 2, 4, 8, 16,
32 px: non-nested blocks break the PSNR order on small images.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from typing import Callable, Iterable

import av
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from scipy import ndimage

from support.label_formats import DataError
from support.files import atomic_folder, cache_dir

# --------------------------------------------------------------------------- synthetic images

SYNTHETIC_VERSION = 1  # bump whenever the synthetic recipes change
# Levels 1 -> 5 per distortion type, tuned so that PSNR falls strictly with the level.
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


def _cached(kind: str, root: str | None, params: dict, build: Callable[[str], None]) -> str:
    """The folder holding the set described by params, built once by build(folder).

    root defaults to files.cache_dir(<kind>-<every parameter>): a changed recipe (bump
    SYNTHETIC_VERSION) or parameter gets a new folder, never a stale one. The set is written into
    a temporary sibling renamed into place (files.atomic_folder), so a crash never leaves half a set.
    """
    root = os.path.expanduser(root) if root else str(cache_dir("-".join([kind, *map(str, params.values())])))
    marker = os.path.join(root, "params.json")
    if not os.path.isfile(marker) and os.path.isdir(root) and os.listdir(root):
        raise DataError(f"--data-root {root} is not a synthetic set (it holds other files and no params.json): "
                        f"the synthetic data are generated, they need no --data-root. To train or evaluate on "
                        f"your own pictures, use --data labels --labels FILE --data-root {root} (a label file "
                        "of 'name mos' lines), or --data NAME for a known benchmark.")
    if not os.path.isfile(marker):
        with atomic_folder(root) as tmp:
            build(str(tmp))
            with open(tmp / "params.json", "w") as f:
                json.dump(params, f, sort_keys=True)
        if not os.path.isfile(marker):  # the rename found a folder that is not ours
            raise DataError(f"{root} is not a synthetic set; choose another folder")
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
    root defaults to files.cache_dir("synthetic-<version>-<seed>-<size>-<n>-<types>").
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

    return _cached("synthetic", root, params, build)


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

_CODEC_OPTIONS = {  # quality settings that make each encoder fast and near-lossless
    "libx264": {"crf": "18", "preset": "veryfast"},
    "libvpx-vp9": {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"},
    "ffv1": {},
}


def write_clip(path: str, frames: Iterable[np.ndarray], *, fps: int = 25, codec: str = "libx264",
               options: dict[str, str] | None = None, rotation: int = 0) -> None:
    """Write RGB frames, each (H, W, 3) uint8 with even H and W, as a clip.

    The container follows the extension (.mp4, .mkv, .webm, ...). `options` go to the
    encoder (default: near-lossless settings for libx264, libvpx-vp9, ffv1); `rotation`
    (degrees, counter-clockwise) is stored as display-matrix metadata, as phones do.
    """
    with av.open(path, "w") as container:
        stream = None
        for array in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = array.shape[:2]
                # ffv1 keeps RGB exactly (bgr0), so decoded frames equal the ones written
                stream.pix_fmt = "yuv420p" if codec != "ffv1" else "bgr0"
                stream.options = dict(_CODEC_OPTIONS.get(codec, {}) if options is None else options)
                if rotation:
                    stream.set_display_rotation(rotation)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"write_clip: no frames given for {path}")
        for packet in stream.encode():
            container.mux(packet)


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
        def encode(name: str, shown: list[Image.Image], crf: int) -> None:
            write_clip(os.path.join(out, name), map(np.asarray, shown), fps=fps,
                       options={"crf": str(crf), "preset": "veryfast"})

        lines = {"train": [], "test": []}
        for s, split in enumerate(_split_sources(n_sources)):
            src = landscape(np.random.default_rng([seed, s]), width + PAN_SPEED * frames, height)
            clip = pan_clip(src, frames, width, height)
            ref = f"s{s:03d}.mp4"
            encode(ref, clip, CARRIER_CRF)
            lines[split].append(f"{ref} {ref} {synthetic_mos(0):.1f}")
            for kind in VIDEO_DISTORTIONS:
                for level in range(1, 6):
                    dist = f"s{s:03d}_{kind}{level}.mp4"
                    shown, crf = distort_clip(clip, kind, level)
                    encode(dist, shown, crf)
                    lines[split].append(f"{ref} {dist} {synthetic_mos(level):.1f}")
        _write_split_files(out, lines)

    return _cached("synthetic-video", root, params, build)
