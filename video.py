"""Video views for PreResQ-R1: a global-temporal mosaic and local-spatial frames.

PreResQ-R1 shows the model each clip as four labelled images in one user turn (method.md §5):
image 0, the *global multiframe picture*, is a 4×4 grid of 16 frames spread over the clip
(temporal view: motion, stutter, scene changes); images 1–3, the *local single frame
pictures*, are frames at higher resolution from different moments (spatial view: blur,
noise, compression). The authors did not release how they extract frames; this file does it
with PyAV (FFmpeg):

    segment_centres   the frame indices: floor((i + 0.5) · n / N), the centre of each of N
                      equal segments of an n-frame clip
    sample_frames     decode N evenly spaced frames, downscaled inside FFmpeg
    global_mosaic     the global-temporal view: grid × grid small frames, row-major time order
    fragment_picture  FAST-VQA fragments: one native-resolution patch per grid cell, spliced
    sample_views      both views from one decoding pass (returns a VideoViews record)
    video_views       [global mosaic, local 1..K]: the list the model is given
    write_clip        write RGB frames as a clip (synthetic data, tests, benchmarks)
    decode_benchmark  seconds per clip for sample_views

    python video.py CLIP --out DIR [--grid 4] [--num-local 3] [--fragments]

Decoding. Clips of up to `seek_threshold` frames (all of LSVQ, KoNViD-1k, LIVE-VQC and
YouTube-UGC at the default) are decoded sequentially and the wanted frames are picked by
decoded index, so indices are exact whatever the container says. When the container has
no frame count (mkv, webm, raw H.264) the packets are counted first (demuxing only, ~1% of
the decoding time); if decoding then yields a different number of frames (a truncated
file, an edit list, a corrupt packet, which is skipped), the indices are recomputed for
the frames that really decode and the clip is decoded again: indices always count
decodable frames. Longer clips are read by seeking: the first and last timestamps are read
from the frames themselves, and for each wanted index k the decoder seeks to the key frame
before the middle of frame k's time slot and decodes forward to the frame on screen at
that moment. Seeking falls back to sequential decoding on any error or missing timestamp.
Errors are VideoError, a data.DataError, with the path in the message.

Deliberate choices (the paper does not specify them):
- Variable frame rate: sequential decoding picks by decoded index, seeking picks by
  timestamp (the frame on screen at the segment's time). Both are identical at constant
  frame rate (tested); at variable frame rate only seeking follows wall-clock time, and
  its reported indices are estimates.
- Short clips: with fewer frames than asked for, an index repeats (each segment shows the
  frame on screen at its centre), so a 10-frame clip still gives a 4×4 mosaic. A clip
  with fewer than `min_frames` decodable frames raises VideoError; video_views asks for
  at least `num_local`, so that the local views come from different moments.
- Sizes: mosaic tiles have their longer side `tile_size` (128 px: a 16:9 clip gives a
  512×288 mosaic); local frames are capped at `local_max_pixels` (448² ≈ 256 Qwen2.5-VL
  visual tokens) rather than the paper's full resolution, which a 4K clip makes
  unaffordable. Frames are never enlarged (except to make non-square pixels square, and
  for fragments of frames under 224 px), and all resizing happens inside FFmpeg (area
  filter), so a 4K clip never becomes full-size RGB arrays, except with `fragments=True`,
  whose patches are native pixels by design.
- `fragments=True` replaces each local frame with its FAST-VQA fragment picture
  (Wu et al., ECCV 2022: a 7×7 grid of 32×32 native-resolution patches, one drawn from each
  grid cell, spliced into 224×224; the same patch positions in every frame, as FAST-VQA
  aligns them in time), keeping compression and blur artefacts that resizing hides.
- Display orientation: the container's display-matrix rotation (phone clips) is applied,
  rounded to a multiple of 90°; flips in the matrix are ignored. Non-square pixels
  (sample aspect ratio) are made square when resizing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Iterator

import av
import numpy as np
from PIL import Image, ImageOps

from data import DataError

# Frames. A seek decodes from the key frame before the target, half a GOP on average (x264's
# default GOP is 250 frames), and the default views need 20 seeks: measured on 360p clips
# with that GOP, decoding every frame wins up to ~1,500 frames and seeking wins from
# ~2,500; above the threshold exact indices are traded for speed.
SEEK_THRESHOLD = 3000
LOCAL_MAX_PIXELS = 448 * 448
TILE_SIZE = 128

# PIL's ROTATE_* turn counter-clockwise, the same sense as VideoFrame.rotation.
_TRANSPOSE = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
              3: Image.Transpose.ROTATE_270}


class VideoError(DataError):
    """A clip that cannot be opened, has no video stream, or has too few decodable frames."""


def segment_centres(num_total: int, num: int) -> list[int]:
    """Indices of the frames at the centres of `num` equal segments of a `num_total`-frame clip.

    index_i = floor((i + 0.5) · num_total / num), i = 0..num-1 (integer arithmetic, exact).
    With num > num_total indices repeat: each segment gets the frame covering its centre.
    """
    if num_total < 1 or num < 1:
        raise ValueError(f"segment_centres needs num_total >= 1 and num >= 1, got {num_total}, {num}")
    return [(2 * i + 1) * num_total // (2 * num) for i in range(num)]


def _fit(width: float, height: float, max_side: int | None, max_pixels: int | None) -> tuple[int, int]:
    """The size (w, h) of a width × height picture shrunk to both caps, aspect kept, never enlarged."""
    scale = 1.0
    if max_side is not None:
        scale = min(scale, max_side / max(width, height))
    if max_pixels is not None:
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _quarter_turns(rotation: float) -> int:
    """Counter-clockwise display rotation in degrees -> quarter turns 0..3."""
    return round(rotation / 90) % 4


def _display_image(frame: av.VideoFrame, sar: Fraction, max_side: int | None,
                   max_pixels: int | None) -> Image.Image:
    """A decoded frame as an RGB image in display orientation, square pixels, within the caps.

    The resize runs in FFmpeg (swscale, area filter) on the YUV frame, so no full-size RGB
    array is made. Rotation does not change either cap, so sizes are fitted before turning.
    """
    width, height = _fit(frame.width * sar, frame.height, max_side, max_pixels)
    image = frame.to_image(width=width, height=height, interpolation="AREA")
    turns = _quarter_turns(frame.rotation)
    return image.transpose(_TRANSPOSE[turns]) if turns else image


def _native_array(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 native pixels, in display orientation."""
    return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), _quarter_turns(frame.rotation)))


# ---------------------------------------------------------------- decoding


@contextlib.contextmanager
def _open(path: str) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open `path` and yield (container, its video stream); VideoError for anything else."""
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as error:
        raise VideoError(f"{path}: cannot open as a video ({error}). Check that the file exists "
                         "and plays, or re-encode it.") from None
    with container:
        # Cover art in audio files is a one-frame "video" stream: skip it.
        streams = [s for s in container.streams.video
                   if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(f"{path}: no video stream (streams found: {', '.join(kinds)}). "
                             "Pass a video file.")
        yield container, streams[0]


@dataclass(frozen=True)
class _Clip:
    """What the container says before decoding (any field can be missing or wrong)."""
    frames: int            # frame count in the header, 0 when unknown (mkv, webm, raw streams)
    duration: Fraction | None   # seconds
    rate: Fraction | None       # frames per second
    time_base: Fraction | None
    sar: Fraction               # sample (pixel) aspect ratio, 1 when unknown

    @property
    def frames_estimate(self) -> int | None:
        if self.frames > 0:
            return self.frames
        if self.duration and self.rate:
            return round(self.duration * self.rate)
        return None


def _clip_header(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> _Clip:
    tb = stream.time_base
    duration = None
    if stream.duration and tb:
        duration = stream.duration * tb
    elif container.duration:
        duration = Fraction(container.duration, av.time_base)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if duration is None and rate and stream.frames > 0:
        duration = stream.frames / Fraction(rate)
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return _Clip(frames=stream.frames, duration=duration, rate=Fraction(rate) if rate else None,
                 time_base=tb, sar=Fraction(sar) if sar else Fraction(1))


def _count_packets(path: str) -> int:
    """Number of video packets (one per frame for the usual codecs): demuxing, no decoding."""
    with _open(path) as (container, stream):
        count = 0
        try:
            for packet in container.demux(stream):
                count += packet.size > 0  # the final flush packet is empty
        except av.error.FFmpegError:
            pass  # a truncated file: what was read so far is the count; decoding checks it
    return count


Plan = Callable[[int], dict[int, object]]  # n -> {frame index: request}
Convert = Callable[[av.VideoFrame, object, Fraction], object]  # (frame, request, pixel aspect) -> value


def _read_sequential(path: str, clip: _Clip, wanted: dict[int, object],
                     convert: Convert) -> tuple[dict[int, object], int]:
    """Decode every frame, converting those whose index is wanted. Returns (values, frames decoded)."""
    values, index = {}, 0
    with _open(path) as (container, stream):
        try:
            for packet in container.demux(stream):
                try:
                    frames = stream.decode(packet)
                except av.error.InvalidDataError:
                    continue  # one corrupt packet: the frames after it may still decode
                for frame in frames:
                    if index in wanted:
                        values[index] = convert(frame, wanted[index], clip.sar)
                    index += 1
        except av.error.FFmpegError:
            pass  # truncated: keep what decoded; the caller checks the count
    return values, index


class _SeekFailed(Exception):
    pass


def _read_by_seeking(path: str, clip: _Clip, plan: Plan,
                     convert: Convert) -> tuple[dict[int, tuple[int, object]], int]:
    """Read the planned frames of a long clip by seeking. Returns ({k: (index read, value)}, n).

    The first and last timestamps are read from the frames themselves (container durations
    disagree on whether they include a late start). n is the header's frame count, else
    (last - first) · frame rate + 1; with s = (last - first) / (n - 1), frame k is read as
    the frame on screen at first + (k + 1/2)·s, the middle of its time slot, and the index
    reported is round((pts - first) / s). Raises _SeekFailed when a timestamp is missing,
    demuxing or decoding fails, or nothing decodes after a seek.
    """
    tb = clip.time_base
    with _open(path) as (container, stream):
        try:
            first = next(container.decode(stream), None)
            if first is None or first.pts is None:
                raise _SeekFailed
            first = first.pts * tb
            container.seek(math.floor((first + clip.duration) / tb), stream=stream, backward=True, any_frame=False)
            last = _frame_on_screen(container, stream, None, tb).pts * tb
            n = clip.frames if clip.frames > 0 else round((last - first) * clip.rate) + 1
            if n < 2 or last <= first:
                raise _SeekFailed
            slot = (last - first) / (n - 1)
            out = {}
            for k, request in sorted(plan(n).items()):
                target = first + (k + Fraction(1, 2)) * slot
                container.seek(math.floor(target / tb), stream=stream, backward=True, any_frame=False)
                shown = _frame_on_screen(container, stream, target, tb)
                index = round((shown.pts * tb - first) / slot)
                out[k] = (min(max(index, 0), n - 1), convert(shown, request, clip.sar))
        except av.error.FFmpegError as error:
            raise _SeekFailed from error
    return out, n


def _frame_on_screen(container, stream, target: Fraction | None, time_base: Fraction) -> av.VideoFrame:
    """After a seek: decode forward to the last frame whose timestamp is <= target seconds
    (None: the last frame of the clip)."""
    previous = None
    for packet in container.demux(stream):
        for frame in stream.decode(packet):
            if frame.pts is None:
                raise _SeekFailed
            if target is not None and frame.pts * time_base > target:
                return previous if previous is not None else frame
            previous = frame
    if previous is None:
        raise _SeekFailed
    return previous  # the target lies past the last frame: the last frame is on screen


def _read(path: str, plan: Plan, convert: Convert, *, min_frames: int,
          seek_threshold: int) -> tuple[dict[int, tuple[int, object]], int, str]:
    """Decode the frames `plan(n)` asks for, n being the clip's real frame count.

    Returns ({planned index: (index read, value)}, n, "sequential" or "seek").
    """
    with _open(path) as (container, stream):
        clip = _clip_header(container, stream)
    estimate = clip.frames_estimate
    if (estimate is not None and estimate > max(seek_threshold, min_frames) and clip.duration
            and clip.time_base and clip.rate):
        try:
            return *_read_by_seeking(path, clip, plan, convert), "seek"
        except _SeekFailed:
            pass
    n = clip.frames if clip.frames > 0 else _count_packets(path)
    for attempt in range(2):
        if n < min_frames:
            break
        values, decoded = _read_sequential(path, clip, plan(n), convert)
        if decoded == n:
            return {k: (k, v) for k, v in values.items()}, n, "sequential"
        if attempt == 1:
            raise VideoError(f"{path}: decodes to {n} frames, then to {decoded}. The file is "
                             "damaged; re-encode it.")
        n = decoded  # the header or packet count was wrong: plan again on what really decodes
    if n == 0:
        raise VideoError(f"{path}: no frame could be decoded. The file is damaged or its codec is "
                         "unsupported; re-encode it (e.g. to H.264).")
    raise VideoError(f"{path}: only {n} decodable frame(s), at least {min_frames} needed. "
                     "Use a longer clip, or judge a single frame as an image.")


def sample_frames(path: str, num_frames: int, *, max_side: int | None = None,
                  max_pixels: int | None = None, min_frames: int = 1,
                  seek_threshold: int = SEEK_THRESHOLD) -> tuple[list[Image.Image], list[int]]:
    """Decode `num_frames` evenly spaced frames (segment centres) of the clip at `path`.

    Returns (RGB images in time order, their frame indices). Each image is in display
    orientation with square pixels, shrunk inside FFmpeg to at most `max_side` pixels on its
    longer side and `max_pixels` pixels in all (None: no cap). Raises VideoError when the
    clip cannot be read or has fewer than `min_frames` decodable frames.
    """
    def plan(n: int) -> dict[int, object]:
        return dict.fromkeys(segment_centres(n, num_frames))

    got, n, _ = _read(path, plan, lambda frame, _, sar: _display_image(frame, sar, max_side, max_pixels),
                      min_frames=min_frames, seek_threshold=seek_threshold)
    order = segment_centres(n, num_frames)
    return [got[k][1] for k in order], [got[k][0] for k in order]


# ---------------------------------------------------------------- views


def global_mosaic(frames: list[Image.Image], grid: int = 4, tile_size: int = TILE_SIZE) -> Image.Image:
    """The global-temporal view: grid × grid frames, row-major in time order.

    frames: grid² images. Every tile has the first frame's aspect ratio with its longer side
    `tile_size` (never enlarged); a frame of another shape is fitted inside its tile, centred
    on black. Output: (grid · tile_w) × (grid · tile_h).
    """
    if len(frames) != grid * grid:
        raise ValueError(f"global_mosaic needs grid² = {grid * grid} frames, got {len(frames)}")
    tile = _fit(*frames[0].size, tile_size, None)
    mosaic = Image.new("RGB", (grid * tile[0], grid * tile[1]))
    for i, frame in enumerate(frames):
        row, col = divmod(i, grid)
        mosaic.paste(ImageOps.pad(frame.convert("RGB"), tile, color=(0, 0, 0)), (col * tile[0], row * tile[1]))
    return mosaic


def fragment_picture(frame: np.ndarray, *, grid: int = 7, patch: int = 32, seed: int = 0) -> Image.Image:
    """FAST-VQA fragments: one patch × patch native-pixel crop from each cell of a grid × grid
    split of the frame, spliced in place into a (grid·patch)² picture (224² by default).

    frame: (H, W, 3) uint8. The position of each patch inside its cell is drawn from `seed`,
    so every frame given the same seed is cut at the same places (FAST-VQA aligns patches in
    time). A frame with a side under grid·patch is first enlarged (bilinear) to reach it.
    """
    height, width = frame.shape[:2]
    need = grid * patch
    if min(height, width) < need:
        scale = need / min(height, width)
        size = (max(need, math.ceil(width * scale)), max(need, math.ceil(height * scale)))
        frame = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))
        height, width = frame.shape[:2]
    cell_h, cell_w = height // grid, width // grid
    rng = np.random.default_rng(seed)
    top = rng.integers(0, cell_h - patch + 1, size=(grid, grid))
    left = rng.integers(0, cell_w - patch + 1, size=(grid, grid))
    out = np.empty((need, need, 3), np.uint8)
    for r in range(grid):
        for c in range(grid):
            y, x = r * cell_h + top[r, c], c * cell_w + left[r, c]
            out[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = frame[y:y + patch, x:x + patch]
    return Image.fromarray(out)


@dataclass(frozen=True)
class VideoViews:
    """The two views of one clip, and where they came from."""
    mosaic: Image.Image              # global-temporal view
    local: list[Image.Image]         # local-spatial views (frames, or fragment pictures)
    global_indices: list[int]        # frame index of each mosaic tile, row-major
    local_indices: list[int]
    num_frames: int                  # frames in the clip (estimated when mode == "seek")
    mode: str                        # "sequential" or "seek"

    @property
    def images(self) -> list[Image.Image]:
        """[global mosaic, local 1..K]: the images given to the model, in prompt order."""
        return [self.mosaic, *self.local]


def sample_views(path: str, *, grid: int = 4, num_local: int = 3, tile_size: int = TILE_SIZE,
                 local_max_pixels: int | None = LOCAL_MAX_PIXELS, fragments: bool = False,
                 seed: int = 0, seek_threshold: int = SEEK_THRESHOLD) -> VideoViews:
    """Both views of the clip at `path`, from one decoding pass over the union of their frames.

    Mosaic: grid² segment-centre frames, longer side `tile_size`. Local: the centre frames of
    `num_local` segments, capped at `local_max_pixels` (None: native), or with
    `fragments=True` their FAST-VQA fragment pictures (native pixels, `seed`). Raises
    VideoError when the clip cannot be read or has fewer than `num_local` decodable frames.
    """
    def plan(n: int) -> dict[int, tuple[bool, bool]]:
        tiles, local = set(segment_centres(n, grid * grid)), set(segment_centres(n, num_local))
        return {k: (k in tiles, k in local) for k in sorted(tiles | local)}

    def convert(frame: av.VideoFrame, roles: tuple[bool, bool], sar: Fraction) -> tuple:
        tile, local = roles
        small = _display_image(frame, sar, tile_size, None) if tile else None
        if not local:
            return small, None
        big = _native_array(frame) if fragments else _display_image(frame, sar, None, local_max_pixels)
        return small, big

    got, n, mode = _read(path, plan, convert, min_frames=num_local, seek_threshold=seek_threshold)
    tiles, local = segment_centres(n, grid * grid), segment_centres(n, num_local)
    local_views = [got[k][1][1] for k in local]
    if fragments:
        local_views = [fragment_picture(frame, seed=seed) for frame in local_views]
    return VideoViews(mosaic=global_mosaic([got[k][1][0] for k in tiles], grid, tile_size),
                      local=local_views, global_indices=[got[k][0] for k in tiles],
                      local_indices=[got[k][0] for k in local], num_frames=n, mode=mode)


def video_views(path: str, *, grid: int = 4, num_local: int = 3, tile_size: int = TILE_SIZE,
                local_max_pixels: int | None = LOCAL_MAX_PIXELS, fragments: bool = False,
                seed: int = 0, seek_threshold: int = SEEK_THRESHOLD) -> list[Image.Image]:
    """[global mosaic, local 1..K] for the clip at `path` (see sample_views). Raises VideoError."""
    return sample_views(path, grid=grid, num_local=num_local, tile_size=tile_size,
                        local_max_pixels=local_max_pixels, fragments=fragments, seed=seed,
                        seek_threshold=seek_threshold).images


# ---------------------------------------------------------------- writing and timing

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


def decode_benchmark(path: str, *, repeats: int = 3, **view_options) -> dict[str, object]:
    """Time sample_views(path, **view_options): the decoding cost of one training clip.

    Returns {"seconds_per_clip": median over `repeats`, "min_seconds", "num_frames", "mode"}.
    """
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        views = sample_views(path, **view_options)
        seconds.append(time.perf_counter() - start)
    return {"seconds_per_clip": statistics.median(seconds), "min_seconds": min(seconds),
            "num_frames": views.num_frames, "mode": views.mode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the views PreResQ-R1 sees of a clip as PNG files.")
    parser.add_argument("clip")
    parser.add_argument("--out", required=True, help="folder for global.png, local-1.png, ...")
    parser.add_argument("--grid", type=int, default=4, help="mosaic is grid × grid frames")
    parser.add_argument("--num-local", type=int, default=3, help="number of local views")
    parser.add_argument("--tile-size", type=int, default=TILE_SIZE, help="longer side of a mosaic tile")
    parser.add_argument("--local-max-pixels", type=int, default=LOCAL_MAX_PIXELS,
                        help="pixel cap of a local frame (0: native resolution)")
    parser.add_argument("--fragments", action="store_true", help="local views as FAST-VQA fragments")
    parser.add_argument("--seed", type=int, default=0, help="fragment positions")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        views = sample_views(args.clip, grid=args.grid, num_local=args.num_local, tile_size=args.tile_size,
                             local_max_pixels=args.local_max_pixels or None, fragments=args.fragments, seed=args.seed)
    except VideoError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    names = ["global.png"] + [f"{'fragments' if args.fragments else 'local'}-{k + 1}.png"
                              for k in range(len(views.local))]
    for name, image in zip(names, views.images):
        image.save(os.path.join(args.out, name))
    print(f"{args.clip}: {views.num_frames} frames, decoded ({views.mode}) in {seconds:.2f} s")
    print(f"global {args.grid}x{args.grid} {views.mosaic.size[0]}x{views.mosaic.size[1]}: "
          f"frames {views.global_indices}")
    print(f"local {'fragments' if args.fragments else 'frames'} {views.local[0].size[0]}x"
          f"{views.local[0].size[1]}: frames {views.local_indices}")
    print(f"wrote {', '.join(names)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
