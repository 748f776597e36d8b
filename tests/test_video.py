import threading
import time
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

import posezoo.video as video
from conftest import OPENFIELD_FRAMES
from posezoo.errors import TruncatedVideoError, VideoError
from posezoo.synthetic import make_mouse_video, mouse_trajectory, render_mouse_frame


def write_raw(path, n, width, height, fps, codec, pix_fmt):
    """Encode with PyAV directly (our writer pads to even sizes; these must not)."""
    truth = mouse_trajectory(n, width, height, seed=1)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        for pose in truth[:, 0]:
            frame = av.VideoFrame.from_ndarray(render_mouse_frame(pose, width, height), format="rgb24")
            for p in s.encode(frame.reformat(format=pix_fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_probe_real_openfield(openfield_video):
    info = video.probe(openfield_video)
    assert (info.width, info.height, info.n_frames, info.codec) == (640, 480, OPENFIELD_FRAMES, "h264")
    assert info.fps == pytest.approx(30.0, abs=0.01)


@pytest.mark.parametrize(
    "name,codec,size,fps",
    [
        ("h264.mp4", "libx264", (320, 240), 30.0),
        ("mpeg4.avi", "mpeg4", (320, 240), 25.0),
        ("h264.mov", "libx264", (320, 240), 30000 / 1001),
        ("mpeg4.mp4", "mpeg4", (160, 120), 12.5),
    ],
)
def test_formats_stream_every_frame(tmp_path, name, codec, size, fps):
    path = tmp_path / name
    make_mouse_video(path, 23, *size, fps, codec=codec)
    info = video.probe(path)
    assert info.size == size and info.fps == pytest.approx(fps, rel=1e-3)
    batches = list(video.iter_batches(path, 5, size=(80, 60), colour_order="BGR"))
    assert [b.start for b in batches] == [0, 5, 10, 15, 20]
    frames = np.concatenate([b.frames for b in batches])
    assert frames.shape == (23, 60, 80, 3) and frames.dtype == np.uint8


def test_odd_size_and_unknown_frame_count(tmp_path):
    path = write_raw(tmp_path / "odd.mkv", 17, 321, 241, Fraction(30000, 1001), "libx264", "yuv444p")
    info = video.probe(path)
    assert info.size == (321, 241) and info.fps == pytest.approx(29.97, abs=0.01)
    assert info.n_frames == pytest.approx(17, abs=1)  # mkv has no frame count: estimated from duration
    frames = np.concatenate([b.frames for b in video.iter_batches(path, 4)])
    assert frames.shape == (17, 241, 321, 3)


@pytest.mark.parametrize(
    "content,message",
    [(b"", "file is empty"), (b"this is a text file, not a video\n" * 20, "not a readable video")],
)
def test_bad_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoError, match=message) as err:
        video.probe(path)
    assert str(path) in str(err.value)
    with pytest.raises(VideoError, match=message):
        list(video.iter_batches(path, 4))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        video.probe(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match="is a directory"):
        video.probe(tmp_path)


def test_truncated_without_index_is_unreadable(openfield_video, tmp_path):
    # DeepLabCut's mp4 has its index (moov) at the end: cut in half, nothing can be located
    path = tmp_path / "cut.mp4"
    path.write_bytes(openfield_video.read_bytes()[: openfield_video.stat().st_size // 2])
    with pytest.raises(VideoError, match="not a readable video"):
        video.probe(path)


def test_truncated_faststart_yields_good_frames_then_says_where(tmp_path):
    full = tmp_path / "full.mp4"
    make_mouse_video(full, 60, 320, 240)  # faststart: index first, so a cut file still opens
    data = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.5)])
    got = 0
    with pytest.raises(TruncatedVideoError) as err:
        for batch in video.iter_batches(cut, 8):
            got += len(batch.frames)
    assert 0 < got < 60 and err.value.frames_read == got
    assert "truncated" in str(err.value) and f"stopped at frame {got}" in str(err.value) and str(cut) in str(err.value)


def test_queue_bounds_decoded_frames_in_memory(monkeypatch, mouse_video):
    path, _ = mouse_video
    produced = []
    real = video.iter_frames

    def counting(*args, **kwargs):
        for frame in real(*args, **kwargs):
            produced.append(1)
            yield frame

    monkeypatch.setattr(video, "iter_frames", counting)
    batches = video.iter_batches(path, 2, queue_batches=2)
    next(batches)
    time.sleep(0.5)  # a slow consumer: the decoder must wait, not run ahead
    assert len(produced) <= (2 + 2) * 2 + 1
    rest = sum(len(b.frames) for b in batches)
    assert rest + 2 == 60


@pytest.mark.parametrize("convert_threads", [None, 3])  # 3: the conversion pool's threads stop too
def test_closing_early_stops_the_decoder_thread(mouse_video, convert_threads):
    path, _ = mouse_video
    before = threading.active_count()
    batches = video.iter_batches(path, 2, queue_batches=1, convert_threads=convert_threads)
    next(batches)
    batches.close()
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_writer_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(ValueError):
        with video.VideoWriter(tmp_path / "x.mp4", 64, 48, 30) as w:
            w.write(np.zeros((48, 64, 3), np.uint8))
            w.write(np.zeros((10, 10, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "codec,pix_fmt,colorspace",
    [("libx264", "yuv420p", None), ("libx264", "yuv444p", None), ("mjpeg", "yuvj420p", None),
     ("libx264", "yuv420p", "bt709"), ("ffv1", "bgr0", None)],
)
def test_fast_colour_conversion_matches_ffmpeg(tmp_path, codec, pix_fmt, colorspace):
    path = tmp_path / "c.mkv"
    truth = mouse_trajectory(3, 320, 240, seed=2)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=30)
        s.width, s.height, s.pix_fmt = 320, 240, pix_fmt
        if colorspace:
            s.codec_context.colorspace = av.video.reformatter.Colorspace.ITU709
        for pose in truth[:, 0]:
            img = render_mouse_frame(pose, 320, 240)
            yy, xx = np.mgrid[0:60, 0:320]  # smooth saturated colours too (4:2:0 cannot carry noise)
            img[:60] = np.stack([xx * 255 // 319, 255 - xx * 255 // 319, yy * 4], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
        for size in (None, (160, 120)):
            for order in ("RGB", "BGR"):
                ours = video.frame_to_array(frame, size, order).astype(int)
                # FFmpeg's own conversion at full size, then an exact area resize
                ref = frame.to_ndarray(format="rgb24" if order == "RGB" else "bgr24")
                if size:
                    ref = cv2.resize(ref, size, interpolation=cv2.INTER_AREA)
                ref = ref.astype(int)
                assert ours.shape == ref.shape
                assert np.abs(ours - ref).mean() < 2.0 and np.percentile(np.abs(ours - ref), 99) <= 8
