"""Reading frames from a clip with PyAV (FFmpeg): the decoding under video.py's views.

read_frames(path, plan, convert) decodes the frames plan(n) asks for, n being the clip's real
frame count, and passes each to convert; video.py plans segment centres and converts them to
mosaic tiles and local frames. display_image turns a decoded frame into the picture shown.
check_video(path) reads only the header: the tools' check of a clip before any work.

Choices (the authors did not release their frame extraction):
- Clips of up to SEEK_THRESHOLD frames are decoded in full and frames are picked by decoded
  index, exact whatever the container claims; longer clips are read by seeking to the middle
  of each wanted frame's time slot. A missing frame count (mkv, webm, raw H.264) is made by
  counting packets; a truncated file or a corrupt packet gives indices over the frames that
  really decode. Errors are VideoError, naming the file.
- Resizing runs in FFmpeg (area filter) on the YUV frame and never enlarges, so a 4K clip
  never becomes full-size RGB arrays.
- The display rotation of phone clips is applied in quarter turns (flips are ignored), and
  non-square pixels are made square.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

import av
import numpy as np
from PIL import Image


# A seek decodes from the key frame before the target, half a GOP on average (x264's default
# GOP is 250 frames), and the default views need 20 seeks: measured on 360p clips with that
# GOP, decoding every frame wins up to ~1,500 frames and seeking wins from ~2,500; above the
# threshold exact indices are traded for speed.
SEEK_THRESHOLD = 3000

# PIL's ROTATE_* turn counter-clockwise, the same sense as VideoFrame.rotation.
_TRANSPOSE = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180,
              3: Image.Transpose.ROTATE_270}


class VideoError(ValueError):
    """A clip that cannot be opened, has no video stream, or has too few decodable frames. The tools
    exit 2 (support.cli); data.read_visual turns it into a DataError, which training skips and counts."""
    exit_status = 2


def fit_size(width: float, height: float, max_side: int | None, max_pixels: int | None) -> tuple[int, int]:
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


def display_image(frame: av.VideoFrame, sar: Fraction, max_side: int | None,
                  max_pixels: int | None) -> Image.Image:
    """A decoded frame as an RGB image in display orientation, square pixels, within the caps.

    The resize runs in FFmpeg (swscale, area filter) on the YUV frame, so no full-size RGB
    array is made. Rotation does not change either cap, so sizes are fitted before turning.
    """
    width, height = fit_size(frame.width * sar, frame.height, max_side, max_pixels)
    image = frame.to_image(width=width, height=height, interpolation="AREA")
    turns = _quarter_turns(frame.rotation)
    return image.transpose(_TRANSPOSE[turns]) if turns else image


def native_array(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8 native pixels, in display orientation."""
    return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), _quarter_turns(frame.rotation)))


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


def check_video(path: str, decode: bool = False) -> None:
    """The cheap check before any work: `path` opens as a container with a video stream (reading the
    header only) and, with decode=True, its first frame decodes. Raises VideoError naming the file."""
    with _open(path) as (container, stream):
        try:
            if decode and next(container.decode(stream), None) is None:
                raise VideoError(f"{path}: no frame decodes. The file is damaged; re-encode it.")
        except av.error.FFmpegError as error:
            raise VideoError(f"{path}: the first frame does not decode ({error}); re-encode it.") from None


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


def read_frames(path: str, plan: Plan, convert: Convert, *, min_frames: int,
                seek_threshold: int) -> tuple[dict[int, tuple[int, object]], int, str]:
    """Decode the frames `plan(n)` asks for, n being the clip's real frame count, each passed
    to convert(frame, plan(n)[index], pixel aspect ratio). Fewer than min_frames is a VideoError.

    Returns ({planned index: (index read, value)}, n, "sequential" or "seek"). Without a frame
    count in the header (mkv, webm, raw H.264) the packets are counted first; when decoding then
    yields another number of frames (a truncated file, an edit list, a skipped corrupt packet),
    the plan is made again on the frames that really decode, so indices count decodable frames.
    Seeking (clips over seek_threshold frames) falls back to this on any error.
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
