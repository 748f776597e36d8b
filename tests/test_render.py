import av
import numpy as np
import pytest

from posezoo.render import keypoint_colours, render_labeled_video
from posezoo.synthetic import MOUSE_KEYPOINTS, MOUSE_SKELETON
from posezoo.table import PoseTable
from test_video import write_raw


def read_frames(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        meta = (s.codec_context.name, s.pix_fmt, s.width, s.height, s.average_rate)
        return meta, np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])


def test_labeled_video_is_browser_playable_h264(mouse_video, tmp_path):
    path, truth = mouse_video
    table = PoseTable(truth, MOUSE_KEYPOINTS)
    table.data[5:, 0, 3, 2] = 0.1  # tailbase uncertain from frame 5: hidden
    out = render_labeled_video(path, table, tmp_path / "labeled.mp4", skeleton=list(MOUSE_SKELETON), pcutoff=0.4,
                               trail_length=5, radius=4)
    (codec, pix_fmt, w, h, rate), frames = read_frames(out)
    assert (codec, pix_fmt, w, h) == ("h264", "yuv420p", 320, 240)
    assert float(rate) == pytest.approx(30.0, rel=1e-3)
    assert len(frames) == 60
    head = out.read_bytes()[:4096]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))
    colours = keypoint_colours(4).astype(int)
    for i in (0, 30):
        x, y = truth[i, 0, 0, :2].round().astype(int)  # snout dot, drawn in its colour
        assert np.abs(frames[i, y, x].astype(int) - colours[0]).max() < 60
    x, y = truth[30, 0, 3, :2].round().astype(int)  # hidden tailbase: no tailbase-coloured dot
    assert np.abs(frames[30, y, x].astype(int) - colours[3]).max() > 60
    x, y = truth[0, 0, 3, :2].round().astype(int)
    assert np.abs(frames[0, y, x].astype(int) - colours[3]).max() < 60
    assert not list(tmp_path.glob(".*part*"))


def test_odd_input_size_gives_even_output_with_same_frames_and_rate(tmp_path):
    from fractions import Fraction

    src = write_raw(tmp_path / "odd.mkv", 12, 161, 121, Fraction(30000, 1001), "libx264", "yuv444p")
    table = PoseTable(np.full((12, 1, 4, 3), np.nan, np.float32), MOUSE_KEYPOINTS)
    out = render_labeled_video(src, table, tmp_path / "odd_labeled.mp4")
    (codec, pix_fmt, w, h, rate), frames = read_frames(out)
    assert (w, h, len(frames), pix_fmt) == (162, 122, 12, "yuv420p")
    assert float(rate) == pytest.approx(30000 / 1001, rel=1e-4)


def test_several_animals_are_coloured_by_identity():
    import numpy as np

    from posezoo.render import draw_poses, keypoint_colours

    poses = np.array([[[10, 10, 1.0], [30, 10, 1.0]], [[10, 40, 1.0], [30, 40, 1.0]]], np.float32)  # 2 x 2 kp
    by_animal = np.repeat(keypoint_colours(2)[:, None], 2, axis=1)
    frame = draw_poses(np.zeros((60, 60, 3), np.uint8), poses, by_animal, np.zeros((0, 2), np.int64), pcutoff=0.5)
    assert (frame[10, 10] == frame[10, 30]).all() and (frame[40, 10] == frame[40, 30]).all()
    assert not (frame[10, 10] == frame[40, 10]).all()
    per_keypoint = draw_poses(np.zeros((60, 60, 3), np.uint8), poses, keypoint_colours(2), np.zeros((0, 2), np.int64),
                              pcutoff=0.5)
    assert not (per_keypoint[10, 10] == per_keypoint[10, 30]).all()
