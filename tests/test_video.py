"""Tests for video.py and frames.py: clips whose frames carry their own index as a grey level (frame i is
uniformly STEP·i), encoded with PyAV, then decoded and read back."""

import math
import os
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

import bench
import data
from support import frames
import video
from support.synthetic import write_clip
from video import (VideoError, fragment_picture, global_mosaic, sample_frames, sample_views,
                   segment_centres, video_views)

STEP = 5  # grey levels between consecutive frames: survives crf 18 (errors are at most 1 level)
W, H = 64, 48

FORMATS = {  # name: (extension, codec, encoder options with a short GOP, so seeking has work to do)
    "mp4-h264": (".mp4", "libx264", {"crf": "18", "preset": "veryfast", "g": "6"}),
    "mkv-h264": (".mkv", "libx264", {"crf": "18", "preset": "veryfast", "g": "6"}),
    "mkv-ffv1": (".mkv", "ffv1", {}),
    "webm-vp9": (".webm", "libvpx-vp9", {"lossless": "1", "deadline": "realtime", "cpu-used": "8", "g": "6"}),
}


def grey_frames(n, width=W, height=H):
    return [np.full((height, width, 3), STEP * i, np.uint8) for i in range(n)]


def index_of(image, box=None):
    """The frame index a decoded picture (or a region of it) carries."""
    region = np.asarray(image.crop(box) if box else image, dtype=np.float64)
    return round(region.mean() / STEP)


def write(path, frames, options=None, *, container_format=None, container_options=None,
          pts=None, time_base=None, sar=None):
    """An H.264 writer for the container details write_clip does not expose (timestamps,
    pixel aspect, raw streams, faststart)."""
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = options or {"crf": "0"}
        if time_base:
            stream.codec_context.time_base = stream.time_base = time_base
        if sar:
            stream.codec_context.sample_aspect_ratio = sar
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def count_decodable(path):
    """Reference: how many frames plain PyAV decodes from `path` before its first error."""
    count = 0
    with av.open(path) as container:
        try:
            for _ in container.decode(video=0):
                count += 1
        except av.error.FFmpegError:
            pass
    return count


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """{format: path} of a 40-frame grey-index clip per format."""
    root = tmp_path_factory.mktemp("clips")
    out = {}
    for name, (ext, codec, options) in FORMATS.items():
        out[name] = str(root / f"{name}{ext}")
        write_clip(out[name], grey_frames(40), codec=codec, options=options)
    return out


# ---------------------------------------------------------------- indices


def test_segment_centres_hand_worked():
    assert segment_centres(48, 16) == [3 * i + 1 for i in range(16)]  # floor(3i + 1.5)
    assert segment_centres(10, 4) == [1, 3, 6, 8]                      # 1.25, 3.75, 6.25, 8.75
    assert segment_centres(3, 1) == [1]
    assert segment_centres(3, 6) == [0, 0, 1, 1, 2, 2]                 # fewer frames: repeats


def test_segment_centres_match_float_formula():
    for n in range(1, 80):
        for num in (1, 3, 7, 16, 25):
            assert segment_centres(n, num) == [math.floor((i + 0.5) * n / num) for i in range(num)]
    with pytest.raises(ValueError):
        segment_centres(0, 4)


# ---------------------------------------------------------------- exact frames per container


@pytest.mark.parametrize("name", FORMATS)
def test_sample_frames_exact_sequential_and_seek(clips, name):
    expected = segment_centres(40, 16)
    for seek_threshold in (video.SEEK_THRESHOLD, 0):  # 0: every clip takes the seeking path
        images, indices = sample_frames(clips[name], 16, seek_threshold=seek_threshold)
        assert indices == expected, seek_threshold
        assert [index_of(im) for im in images] == expected, seek_threshold
        assert all(im.size == (W, H) and im.mode == "RGB" for im in images)


def test_containers_without_frame_count(clips, tmp_path):
    for name in ("mkv-h264", "mkv-ffv1", "webm-vp9"):
        with av.open(clips[name]) as container:
            assert container.streams.video[0].frames == 0  # the case under test
    # A raw H.264 stream has no frame count, no duration and no timestamps at all.
    raw = write(tmp_path / "raw.h264", grey_frames(30), container_format="h264")
    with av.open(raw) as container:
        stream = container.streams.video[0]
        assert stream.frames == 0 and stream.duration is None and container.duration is None
    images, indices = sample_frames(raw, 7, seek_threshold=0)  # no duration: cannot seek
    assert indices == segment_centres(30, 7)
    assert [index_of(im) for im in images] == indices


def test_sample_views_layout(clips):
    for name in ("mp4-h264", "webm-vp9"):
        views = sample_views(clips[name], grid=4, num_local=3, tile_size=32)
        tiles = segment_centres(40, 16)
        assert views.global_indices == tiles and views.local_indices == [6, 20, 33]  # 40·(i + ½)/3
        assert views.num_frames == 40 and views.mode == "sequential"
        tile_w, tile_h = 32, 24  # 64×48 with longer side 32
        assert views.mosaic.size == (4 * tile_w, 4 * tile_h)
        for r in range(4):
            for c in range(4):
                box = (c * tile_w + 4, r * tile_h + 4, (c + 1) * tile_w - 4, (r + 1) * tile_h - 4)
                assert index_of(views.mosaic, box) == tiles[4 * r + c], (name, r, c)
        assert [index_of(im) for im in views.local] == [6, 20, 33]
        assert all(im.size == (W, H) for im in views.local)  # under local_max_pixels: native size
        images = video_views(clips[name], grid=4, num_local=3, tile_size=32)
        assert len(images) == 4 and np.array_equal(np.asarray(images[0]), np.asarray(views.mosaic))


def test_short_clip_repeats_frames_then_refuses(tmp_path):
    path = str(tmp_path / "short.mp4")
    write_clip(path, grey_frames(5))
    views = sample_views(path, grid=4, num_local=3, tile_size=32)
    # floor((2i + 1) · 5 / 32): each frame fills three or four tiles
    assert views.global_indices == segment_centres(5, 16) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert [index_of(views.mosaic, (c * 32 + 4, 28, c * 32 + 28, 44)) for c in range(4)] == [1, 1, 2, 2]
    with pytest.raises(VideoError, match=r"short\.mp4: only 5 decodable frame\(s\), at least 6"):
        sample_views(path, num_local=6)


# ---------------------------------------------------------------- timestamps, GOPs, damage


@pytest.mark.parametrize("ext, fps", [(".mp4", 25), (".mkv", 30), (".webm", 30)])
def test_seeking_matches_sequential(tmp_path, ext, fps):
    # 30 fps in mkv/webm: timestamps are whole milliseconds (0, 33, 67, ...), not exact multiples
    path = str(tmp_path / f"gop{ext}")
    codec, options = ("libx264", {"crf": "18", "preset": "medium", "g": "12", "bf": "3"}) if ext != ".webm" \
        else ("libvpx-vp9", {"lossless": "1", "deadline": "realtime", "cpu-used": "8", "g": "12"})
    write_clip(path, grey_frames(50), fps=fps, codec=codec, options=options)
    sequential = sample_views(path, tile_size=32)
    seek = sample_views(path, tile_size=32, seek_threshold=10)
    assert (sequential.mode, seek.mode) == ("sequential", "seek")
    assert seek.global_indices == sequential.global_indices == segment_centres(50, 16)
    assert seek.local_indices == sequential.local_indices
    for a, b in zip(seek.images, sequential.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_seeking_with_a_late_first_timestamp(tmp_path):
    # the first frame is shown at 1.5 s (as in streams cut from a broadcast)
    path = write(tmp_path / "late.mkv", grey_frames(30), pts=[1500 + 40 * i for i in range(30)],
                 time_base=Fraction(1, 1000))
    for seek_threshold in (video.SEEK_THRESHOLD, 0):
        images, indices = sample_frames(path, 6, seek_threshold=seek_threshold)
        assert indices == segment_centres(30, 6) and [index_of(im) for im in images] == indices


def test_variable_frame_rate_by_index_then_by_time(tmp_path):
    # 15 frames 20 ms apart, then 15 frames 100 ms apart: timestamps 0 .. 1.7 s
    pts = [20 * i for i in range(15)] + [300 + 100 * i for i in range(15)]
    path = write(tmp_path / "vfr.mp4", grey_frames(30), pts=pts, time_base=Fraction(1, 1000))
    images, indices = sample_frames(path, 4)  # sequential: by decoded index
    assert indices == [3, 11, 18, 26] and [index_of(im) for im in images] == indices
    images, _ = sample_frames(path, 4, seek_threshold=0)  # by time: the frame on screen at
    # (k + 0.5) · 1.7/29 s for k = 3, 11, 18, 26: 0.205, 0.674, 1.084, 1.553 s
    assert [index_of(im) for im in images] == [10, 18, 22, 27]


def test_truncated_files_keep_what_decodes(tmp_path):
    frames = [np.clip(f.astype(int) + np.arange(W)[None, :, None] % 3, 0, 255).astype(np.uint8)
              for f in grey_frames(40)]  # a little texture so that every frame has similar size
    write_clip(str(tmp_path / "full.mkv"), frames, codec="ffv1")
    clips = {
        "mkv": str(tmp_path / "full.mkv"),
        # faststart puts the index first: the header then promises 40 frames the file lacks
        "mp4": write(tmp_path / "full.mp4", frames, options={"crf": "0", "g": "1"},
                     container_options={"movflags": "faststart"}),
    }
    for ext, path in clips.items():
        data = open(path, "rb").read()
        cut = str(tmp_path / f"cut.{ext}")
        open(cut, "wb").write(data[: int(len(data) * 0.6)])
        decodable = count_decodable(cut)
        assert 10 < decodable < 40, ext
        images, indices = sample_frames(cut, 8)
        assert indices == segment_centres(decodable, 8), ext
        assert [index_of(im) for im in images] == indices, ext
        open(cut, "wb").write(data[:200])
        with pytest.raises(VideoError, match=f"cut.{ext}"):
            sample_frames(cut, 8)


def test_a_corrupt_packet_is_skipped(tmp_path):
    path = str(tmp_path / "intra.mp4")
    write_clip(path, grey_frames(40), options={"crf": "0", "g": "1"})  # every frame a key frame
    with av.open(path) as container:
        payload = [bytes(p) for p in container.demux(video=0) if p.size][20]
    data = bytearray(open(path, "rb").read())
    at = data.find(payload)
    data[at:at + len(payload)] = b"\xff" * len(payload)  # frame 20 becomes garbage
    open(path, "wb").write(data)
    images, indices = sample_frames(path, 8)
    assert indices == segment_centres(39, 8)  # indices count the frames that decode
    assert [index_of(im) for im in images] == [k if k < 20 else k + 1 for k in indices]


def test_counted_packets_spare_a_second_pass(clips, monkeypatch):
    passes = []
    read = frames._read_sequential
    monkeypatch.setattr(frames, "_read_sequential", lambda *a: passes.append(1) or read(*a))
    for name in ("mkv-h264", "mkv-ffv1", "webm-vp9"):  # no frame count in the header
        passes.clear()
        sample_frames(clips[name], 5)
        assert len(passes) == 1, name


def test_bad_files_name_the_path(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(VideoError, match=r"garbage\.mp4: cannot open"):
        video_views(str(garbage))
    with pytest.raises(data.DataError, match=r"garbage\.mp4: cannot open"):  # what training skips and counts
        data.read_visual(str(garbage))
    with pytest.raises(VideoError, match=r"missing\.mp4: cannot open"):
        video_views(str(tmp_path / "missing.mp4"))
    audio = str(tmp_path / "audio.wav")
    with av.open(audio, "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
    with pytest.raises(VideoError, match=r"audio\.wav: no video stream \(streams found: audio\)"):
        video_views(audio)


# ---------------------------------------------------------------- geometry


def test_downscaling_caps_and_aspect(tmp_path):
    path = str(tmp_path / "wide.mp4")
    write_clip(path, grey_frames(10, 320, 180))
    images, _ = sample_frames(path, 2, max_side=100)
    assert images[0].size == (100, 56)  # 320×180 · 100/320 = 100×56.25
    images, _ = sample_frames(path, 2, max_pixels=320 * 180 // 4)
    assert images[0].size == (160, 90)
    images, _ = sample_frames(path, 2, max_side=1000, max_pixels=10**9)
    assert images[0].size == (320, 180)  # never enlarged
    assert index_of(images[1]) == segment_centres(10, 2)[1]
    views = sample_views(path, tile_size=64, local_max_pixels=80 * 45)
    assert views.mosaic.size == (4 * 64, 4 * 36) and views.local[0].size == (80, 45)


def test_non_square_pixels_are_made_square(tmp_path):
    path = write(tmp_path / "sar.mp4", grey_frames(6), sar=Fraction(4, 3))
    images, _ = sample_frames(path, 1)
    assert images[0].size == (85, 48)  # 64 · 4/3 = 85.3 display pixels wide


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path, rotation):
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:16, :16] = 255  # a white mark in the top-left corner
    path = str(tmp_path / "phone.mp4")
    write_clip(path, [frame] * 4, rotation=rotation)
    with av.open(path) as container:
        assert next(container.decode(video=0)).rotation % 360 == rotation % 360  # PyAV reads it back
    images, _ = sample_frames(path, 1)
    expected = np.rot90(frame, rotation // 90)  # counter-clockwise quarter turns
    got = np.asarray(images[0])
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).mean() < 4  # the mark moved where numpy puts it


def test_global_mosaic_row_major_with_aspect_kept():
    colours = [(10 * i, 255 - 10 * i, 7 * i) for i in range(9)]
    frames = [Image.new("RGB", (300, 100), c) for c in colours]
    mosaic = global_mosaic(frames, grid=3, tile_size=60)
    assert mosaic.size == (180, 60)  # tiles 60×20
    for i, colour in enumerate(colours):
        row, col = divmod(i, 3)
        assert mosaic.getpixel((col * 60 + 30, row * 20 + 10)) == colour
    odd = frames[:8] + [Image.new("RGB", (100, 100), (255, 255, 255))]  # a square frame: pillarboxed
    mosaic = global_mosaic(odd, grid=3, tile_size=60)
    assert mosaic.getpixel((150, 50)) == (255, 255, 255) and mosaic.getpixel((122, 50)) == (0, 0, 0)
    with pytest.raises(ValueError, match="needs grid"):
        global_mosaic(frames[:8], grid=3)


def test_fragment_picture_cuts_native_patches_one_per_cell():
    height, width = 300, 470
    y, x = np.mgrid[0:height, 0:width]
    frame = np.stack([x % 256, y % 256, x // 256 * 100 + y // 256], -1).astype(np.uint8)
    picture = np.asarray(fragment_picture(frame, seed=3))
    assert picture.shape == (224, 224, 3)
    cell_h, cell_w = height // 7, width // 7
    offsets = set()
    for r in range(7):
        for c in range(7):
            patch = picture[32 * r:32 * r + 32, 32 * c:32 * c + 32]
            top = int(patch[0, 0, 1]) + 256 * (int(patch[0, 0, 2]) % 100)
            left = int(patch[0, 0, 0]) + 256 * (int(patch[0, 0, 2]) // 100)
            assert r * cell_h <= top <= (r + 1) * cell_h - 32 and c * cell_w <= left <= (c + 1) * cell_w - 32
            assert np.array_equal(patch, frame[top:top + 32, left:left + 32])  # native pixels, uncut
            offsets.add((top - r * cell_h, left - c * cell_w))
    assert len(offsets) > 40  # positions drawn at random within each cell
    assert np.array_equal(picture, np.asarray(fragment_picture(frame, seed=3)))
    assert not np.array_equal(picture, np.asarray(fragment_picture(frame, seed=4)))
    small = fragment_picture(frame[:100, :150], seed=0)  # enlarged to reach 224 first
    assert small.size == (224, 224)


def test_fragments_view_from_native_frames(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(9)]
    path = str(tmp_path / "noise.mkv")
    write_clip(path, frames, codec="ffv1")  # lossless: decoded frames equal the written ones
    views = sample_views(path, num_local=3, fragments=True, seed=5)
    assert views.local_indices == [1, 4, 7]
    for image, k in zip(views.local, views.local_indices):
        assert np.array_equal(np.asarray(image), np.asarray(fragment_picture(frames[k], seed=5)))


# ---------------------------------------------------------------- command line


def test_cli_writes_views_and_prints_indices(clips, tmp_path, capsys):
    out = tmp_path / "views"
    assert video.main([clips["mp4-h264"], "--out", str(out), "--tile-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert str(segment_centres(40, 16)) in printed and "[6, 20, 33]" in printed
    assert sorted(os.listdir(out)) == ["global.png", "local-1.png", "local-2.png", "local-3.png"]
    assert Image.open(out / "global.png").size == (128, 96)
    assert video.main([clips["mkv-ffv1"], "--out", str(out), "--fragments", "--num-local", "2"]) == 0
    assert Image.open(out / "fragments-2.png").size == (224, 224)
    assert video.main([str(tmp_path / "nothing.mp4"), "--out", str(out)]) == 2
    assert "nothing.mp4: cannot open" in capsys.readouterr().err


def test_decode_benchmark_reports_one_clip(clips):
    timing = bench.decode_benchmark(clips["mp4-h264"], repeats=2, tile_size=32)
    assert timing["num_frames"] == 40 and timing["mode"] == "sequential"
    assert 0 < timing["min_seconds"] <= timing["seconds_per_clip"]
