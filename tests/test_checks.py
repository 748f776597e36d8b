"""The head/tail plausibility check: the bundled mouse model over all 2330 frames of the real
openfield video, with body-length bounds from the human labels; and the check catching
confusions planted in a real table. The left/right check over the human labels (it finds the
one frame labelled with the ears the other way round) and over the video's predictions."""

import numpy as np
import pytest

from conftest import OPENFIELD_FRAMES, SHARED
from posezoo.checks import body_length_bounds, head_tail_check, left_right_check
from posezoo.errors import InputError
from posezoo.labelled import load_labelled

EARS = ("leftear", "rightear")


@pytest.fixture(scope="module")
def bounds():
    labels = load_labelled(SHARED / "labeled-data" / "m4s1", check_images=False)
    k = list(labels.keypoints)
    lengths = np.linalg.norm(labels.coords[:, k.index("snout")] - labels.coords[:, k.index("tailbase")], axis=1)
    return body_length_bounds(lengths)


@pytest.fixture(scope="module", params=[("posezoo_mouse@1.1.0", "fp32"), ("posezoo_mouse@1.1.0", "int8"),
                                        ("posezoo_mouse@1.2.0", "fp32"), ("posezoo_mouse@1.2.0", "int8"),
                                        ("posezoo_mouse@1.3.0", "fp32"), ("posezoo_mouse@1.3.0", "int8"),
                                        ("posezoo_mouse@1.4.0", "fp32"), ("posezoo_mouse@1.4.0", "int8")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def video_table(openfield_video, request):
    import posezoo

    model, precision = request.param
    predictor = posezoo.load(model, device="cpu", precision=precision)
    return predictor, predictor.predict_video(openfield_video, batch_size=32)


def test_bundled_mouse_model_has_no_head_tail_confusion_on_the_real_video(video_table, bounds):
    predictor, table = video_table
    assert table.n_frames == OPENFIELD_FRAMES
    report = head_tail_check(table.data, table.keypoints, head="snout", tail="tailbase", length_bounds=bounds,
                             pcutoff=predictor.card.pcutoff, ears=EARS)
    print(f"\n{predictor.card.ref}: {report.n_checked}/{report.n_frames} frames checked, snout-tailbase "
          f"p1/p50/p99 {np.round(report.length_px, 1).tolist()} px within {np.round(bounds, 1).tolist()}")
    assert report.n_checked > 0.9 * OPENFIELD_FRAMES  # measured: 2219 (fp32)
    assert report.ok, (report.bad_length[:20], report.turned[:20], report.head_behind_ears[:20])


def test_planted_confusions_are_found(video_table, bounds):
    predictor, table = video_table
    k = list(table.keypoints)
    s, t = k.index("snout"), k.index("tailbase")
    data = table.data.copy()
    data[100, 0, [s, t]] = data[100, 0, [t, s]]          # a swap in one frame
    data[500, 0, s, :2] = data[500, 0, t, :2] + 3.0      # the snout on the tail base
    report = head_tail_check(data, k, head="snout", tail="tailbase", length_bounds=bounds,
                             pcutoff=predictor.card.pcutoff, ears=EARS)
    assert not report.ok
    assert 100 in report.turned and 101 in report.turned and 100 in report.head_behind_ears
    assert 500 in report.bad_length
    data[500, 0, s, 2] = 0.0  # not confident: not checked
    assert 500 not in head_tail_check(data, k, head="snout", tail="tailbase", length_bounds=bounds,
                                      pcutoff=predictor.card.pcutoff).bad_length
    with pytest.raises(InputError, match="nose"):
        head_tail_check(data, k, head="nose", tail="tailbase", length_bounds=bounds, pcutoff=0.4)


def test_left_right_check_finds_the_swapped_ear_labels(capsys):
    from posezoo.cli import main

    labels = load_labelled(SHARED / "labeled-data" / "m4s1", check_images=False)
    report = left_right_check(labels.coords, labels.keypoints, head="snout", tail="tailbase", pairs=[EARS])
    assert report.n_checked == 116 and not report.ok
    # img0101 and img0102 show the mouse standing the same way; 102's ear labels are swapped
    assert [labels.names[i] for i in report.swapped["leftear"]] == ["img0102.png"]
    coords = labels.coords.copy()
    coords[102][[1, 2]] = coords[102][[2, 1]]  # swapped back: consistent
    coords[7][[1, 2]] = coords[7][[2, 1]]      # a planted swap
    coords[9, 1] = np.nan                      # a missing ear: that frame is not checked
    fixed = left_right_check(coords, labels.keypoints, head="snout", tail="tailbase", pairs=[EARS])
    assert fixed.swapped == {"leftear": [7]} and fixed.n_checked == 115 and fixed.side == report.side
    with pytest.raises(InputError, match="nose"):
        left_right_check(coords, labels.keypoints, head="nose", tail="tailbase", pairs=[EARS])
    args = [str(SHARED / "labeled-data" / "m4s1"), "--head", "snout", "--tail", "tailbase", "--pairs", "leftear-rightear"]
    assert main(["check-labels", *args]) == 1
    assert "leftear/rightear swapped in 1 frame(s): img0102.png" in capsys.readouterr().out


def test_bundled_mouse_model_keeps_the_ears_on_their_side_on_the_real_video(video_table):
    predictor, table = video_table
    xy = table.data[:, 0, :, :2].copy()
    xy[table.data[:, 0, :, 2] < predictor.card.pcutoff] = np.nan
    report = left_right_check(xy, table.keypoints, head="snout", tail="tailbase", pairs=[EARS])
    labels = load_labelled(SHARED / "labeled-data" / "m4s1", check_images=False)
    human = left_right_check(labels.coords, labels.keypoints, head="snout", tail="tailbase", pairs=[EARS])
    print(f"\n{predictor.card.ref}: ears checked on {report.n_checked} frames, swapped on "
          f"{len(report.swapped['leftear'])}")
    assert report.n_checked > 0.9 * OPENFIELD_FRAMES
    assert report.side == human.side  # the labellers' convention
    assert report.ok, report.swapped["leftear"][:20]  # measured: 0 of 2231 frames (1.2.0)
