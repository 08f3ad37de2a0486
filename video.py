"""Video views for PreResQ-R1: the global-temporal mosaic and the local-spatial frames.

The paper shows the model each clip as four pictures in one user turn:
- picture 0, the "global multiframe picture" (global_mosaic): a 4×4 grid of 16 frames spread
  over the clip, row-major in time; the temporal view (motion, stutter, scene changes);
- pictures 1-3, the "local single frame pictures" (local_frame): frames from 3 different
  moments at higher resolution; the spatial view (blur, noise, compression).
Frame i of N is the centre of the i-th of N equal segments of an n-frame clip,
floor((i + 1/2) · n / N) (segment_centres). sample_views decodes the frames of both views in
one pass (frames.read_frames, PyAV); video_views returns [mosaic, local 1..3], the list the
model sees.

    python video.py CLIP --out DIR [--grid 4] [--num-local 3] [--fragments]

Our choices where the paper is silent (the authors did not release their frame extraction;
how frames are decoded is in frames.py):
- Short clips repeat indices (a 10-frame clip still gives 16 tiles); a clip with fewer than
  num_local decodable frames is an error, so local frames come from different moments.
- Sizes: tiles have their longer side TILE_SIZE (a 16:9 clip gives a 512×288 mosaic); local
  frames are capped at LOCAL_MAX_PIXELS (448², about 256 visual tokens), our choice: the authors'
  frame size is unknown, and a full 4K frame would cost about 10,600 visual tokens.
- fragments=True replaces each local frame by its FAST-VQA fragment picture (Wu et al., ECCV
  2022), native-resolution patches that keep the artefacts resizing hides.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageOps

from support.frames import SEEK_THRESHOLD, VideoError, check_video, display_image, fit_size, native_array, read_frames

LOCAL_MAX_PIXELS = 448 * 448
TILE_SIZE = 128


def segment_centres(num_total: int, num: int) -> list[int]:
    """Indices of the frames at the centres of `num` equal segments of a `num_total`-frame clip.

    index_i = floor((i + 0.5) · num_total / num), i = 0..num-1 (integer arithmetic, exact).
    With num > num_total indices repeat: each segment gets the frame covering its centre.
    """
    if num_total < 1 or num < 1:
        raise ValueError(f"segment_centres needs num_total >= 1 and num >= 1, got {num_total}, {num}")
    return [(2 * i + 1) * num_total // (2 * num) for i in range(num)]


# ---------------------------------------------------------------- the two views

def global_mosaic(frames: list[Image.Image], grid: int = 4, tile_size: int = TILE_SIZE) -> Image.Image:
    """The global-temporal view: grid × grid frames, row-major in time order.

    frames: grid² images. Every tile has the first frame's aspect ratio with its longer side
    `tile_size` (never enlarged); a frame of another shape is fitted inside its tile, centred
    on black. Output: (grid · tile_w) × (grid · tile_h).
    """
    if len(frames) != grid * grid:
        raise ValueError(f"global_mosaic needs grid² = {grid * grid} frames, got {len(frames)}")
    tile = fit_size(*frames[0].size, tile_size, None)
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


def local_frame(frame: av.VideoFrame, sar: Fraction, max_pixels: int | None = LOCAL_MAX_PIXELS, *,
                fragments: bool = False, seed: int = 0) -> Image.Image:
    """One local-spatial view, a "local single frame picture" of the paper: one decoded frame at
    high resolution, where spatial damage (blur, noise, compression) shows.

    The frame is put in display orientation with square pixels and shrunk inside FFmpeg to at
    most max_pixels pixels (None: native size). fragments=True gives its FAST-VQA fragment
    picture instead (fragment_picture of the native pixels, patch positions from seed).
    """
    if fragments:
        return fragment_picture(native_array(frame), seed=seed)
    return display_image(frame, sar, None, max_pixels)


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
        in_mosaic, in_local = roles
        tile = display_image(frame, sar, tile_size, None) if in_mosaic else None
        local = local_frame(frame, sar, local_max_pixels, fragments=fragments, seed=seed) if in_local else None
        return tile, local

    got, n, mode = read_frames(path, plan, convert, min_frames=num_local, seek_threshold=seek_threshold)
    tiles, local = segment_centres(n, grid * grid), segment_centres(n, num_local)
    return VideoViews(mosaic=global_mosaic([got[k][1][0] for k in tiles], grid, tile_size),
                      local=[got[k][1][1] for k in local], global_indices=[got[k][0] for k in tiles],
                      local_indices=[got[k][0] for k in local], num_frames=n, mode=mode)


def video_views(path: str, *, grid: int = 4, num_local: int = 3, tile_size: int = TILE_SIZE,
                local_max_pixels: int | None = LOCAL_MAX_PIXELS, fragments: bool = False,
                seed: int = 0, seek_threshold: int = SEEK_THRESHOLD) -> list[Image.Image]:
    """[global mosaic, local 1..K] for the clip at `path` (see sample_views). Raises VideoError."""
    return sample_views(path, grid=grid, num_local=num_local, tile_size=tile_size,
                        local_max_pixels=local_max_pixels, fragments=fragments, seed=seed,
                        seek_threshold=seek_threshold).images


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

    got, n, _ = read_frames(path, plan, lambda frame, _, sar: display_image(frame, sar, max_side, max_pixels),
                            min_frames=min_frames, seek_threshold=seek_threshold)
    order = segment_centres(n, num_frames)
    return [got[k][1] for k in order], [got[k][0] for k in order]


# ---------------------------------------------------------------- command line

def command(argv: list[str] | None = None) -> int:
    from support import cli
    from support import files

    p = cli.parser("video.py", "Write the views PreResQ-R1 sees of a clip as PNG files.")
    p.add_argument("clip", help="a video file")
    p.add_argument("--out", required=True, help="folder for global.png, local-1.png, ...")
    p.add_argument("--grid", type=int, default=4, help="the mosaic is grid × grid frames")
    p.add_argument("--num-local", type=int, default=3, help="number of local views")
    p.add_argument("--tile-size", type=int, default=TILE_SIZE, help="longer side of a mosaic tile, in pixels")
    p.add_argument("--local-max-pixels", type=int, default=LOCAL_MAX_PIXELS,
                   help="pixel cap of a local frame; 0: native resolution")
    p.add_argument("--fragments", action="store_true", help="local views as FAST-VQA fragments")
    p.add_argument("--seed", type=int, default=0, help="seed of the fragment positions")
    args = p.parse_args(argv)
    cli.at_least(p, args, grid=1, num_local=1, tile_size=1, local_max_pixels=0)
    check_video(args.clip)
    out = cli.check_out(args.out)
    start = time.perf_counter()
    views = sample_views(args.clip, grid=args.grid, num_local=args.num_local, tile_size=args.tile_size,
                         local_max_pixels=args.local_max_pixels or None, fragments=args.fragments, seed=args.seed)
    seconds = time.perf_counter() - start
    names = ["global.png"] + [f"{'fragments' if args.fragments else 'local'}-{k + 1}.png"
                              for k in range(len(views.local))]
    folder = cli.make_out(out)
    for name, image in zip(names, views.images):  # a full disk: one error line, no half a picture
        with files.atomic_file(folder / name, "wb") as f:
            image.save(f, format="PNG")
    print(f"{args.clip}: {views.num_frames} frames, decoded ({views.mode}) in {seconds:.2f} s")
    print(f"global {args.grid}x{args.grid} {views.mosaic.size[0]}x{views.mosaic.size[1]}: "
          f"frames {views.global_indices}")
    print(f"local {'fragments' if args.fragments else 'frames'} {views.local[0].size[0]}x"
          f"{views.local[0].size[1]}: frames {views.local_indices}")
    print(f"wrote {', '.join(names)} to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python video.py CLIP --out DIR`: exit 0 when written, 2 for bad usage or an unreadable clip
    (nothing is written), 1 when writing fails part way, 130 on Ctrl-C."""
    from support.cli import entry

    return entry("video.py", command, argv)


if __name__ == "__main__":
    sys.exit(main())
