import numpy as np
import pytest

from posezoo.decoding import crop_boxes, decode_crops, decode_heatmaps, sigmoid, to_frame_coordinates
from posezoo.errors import InputError


def reference_decode(hm, lr, stride, locref_std):
    """The straightforward per-image, per-keypoint loop (DeepLabCut's own style)."""
    n, k, h, w = hm.shape
    out = np.zeros((n, k, 3), np.float64)
    for b in range(n):
        for j in range(k):
            iy, ix = np.unravel_index(np.argmax(hm[b, j]), (h, w))
            dx = dy = 0.0
            if lr is not None:
                dx, dy = lr[b, 2 * j, iy, ix], lr[b, 2 * j + 1, iy, ix]
            out[b, j] = (ix * stride + stride / 2 + dx * locref_std, iy * stride + stride / 2 + dy * locref_std, hm[b, j, iy, ix])
    return out


def test_hand_made_peaks_are_found_exactly():
    hm = np.zeros((2, 3, 30, 40), np.float32)
    peaks = [[(5, 7), (0, 0), (29, 39)], [(12, 20), (3, 38), (28, 1)]]  # (iy, ix)
    for b, per in enumerate(peaks):
        for j, (iy, ix) in enumerate(per):
            hm[b, j, iy, ix] = 0.9 - 0.1 * j
            hm[b, j, max(iy - 1, 0), ix] = 0.3  # a lesser neighbour must not win
    lr = np.zeros((2, 6, 30, 40), np.float32)
    lr[0, 0, 5, 7], lr[0, 1, 5, 7] = 0.5, -0.25  # offsets of keypoint 0, image 0
    kp = decode_heatmaps(hm, lr, stride=8, locref_std=2.0)
    assert kp.shape == (2, 3, 3) and kp.dtype == np.float32
    assert kp[0, 0].tolist() == pytest.approx([7 * 8 + 4 + 1.0, 5 * 8 + 4 - 0.5, 0.9])
    assert kp[0, 2].tolist() == pytest.approx([39 * 8 + 4, 29 * 8 + 4, 0.7])
    assert kp[1, 1].tolist() == pytest.approx([38 * 8 + 4, 3 * 8 + 4, 0.8])
    assert kp[1, 2].tolist() == pytest.approx([1 * 8 + 4, 28 * 8 + 4, 0.7])


def test_stride_is_measured_from_input_size_per_axis():
    hm = np.zeros((1, 1, 10, 20), np.float32)
    hm[0, 0, 2, 3] = 1
    kp = decode_heatmaps(hm, input_hw=(40, 160))  # stride 4 in y, 8 in x
    assert kp[0, 0, :2].tolist() == pytest.approx([3 * 8 + 4, 2 * 4 + 2])


@pytest.mark.parametrize("seed", range(5))
def test_matches_per_keypoint_loop_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    n, k, h, w = rng.integers(1, 9), rng.integers(1, 30), rng.integers(4, 40), rng.integers(4, 40)
    hm = rng.random((n, k, h, w), dtype=np.float32)
    lr = rng.normal(size=(n, 2 * k, h, w)).astype(np.float32)
    ours = decode_heatmaps(hm, lr, stride=4.0, locref_std=7.2801)
    ref = reference_decode(hm, lr, 4.0, 7.2801)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(decode_heatmaps(hm, None, stride=4.0), reference_decode(hm, None, 4.0, 0), atol=1e-4)


def test_sigmoid_activation_and_bad_shapes():
    hm = np.full((1, 2, 4, 4), -10.0, np.float32)
    hm[0, 1, 1, 2] = 3.0
    kp = decode_heatmaps(hm, None, stride=8, activation="sigmoid")
    assert kp[0, 1, 2] == pytest.approx(1 / (1 + np.exp(-3.0)), rel=1e-5)
    assert sigmoid(np.array([-1000.0, 0.0, 1000.0])).tolist() == pytest.approx([0.0, 0.5, 1.0])
    with pytest.raises(InputError):
        decode_heatmaps(np.zeros((2, 4, 4)), stride=8)
    with pytest.raises(InputError):
        decode_heatmaps(hm, np.zeros((1, 3, 4, 4)), stride=8)
    with pytest.raises(InputError):
        decode_heatmaps(hm)


def test_frame_mapping_and_top_down_crops():
    kp = np.array([[[10.0, 20.0, 0.5]]], np.float32)
    out = to_frame_coordinates(kp, (2.0, 2.0), (0.0, 0.0))
    assert out[0, 0].tolist() == [20.0, 40.0, 0.5]
    # a 50x100 (w x h) box becomes a 100x100 square region centred on the box
    regions = crop_boxes(np.array([[100, 50, 150, 150]]), (256, 256))
    assert regions[0].tolist() == pytest.approx([75, 50, 100, 100])
    # a wide box grows in height instead
    assert crop_boxes(np.array([[0, 0, 200, 100]]), (256, 256))[0].tolist() == pytest.approx([0, -50, 200, 200])
    hm = np.zeros((2, 1, 64, 64), np.float32)
    hm[0, 0, 32, 16] = 1.0
    hm[1, 0, 0, 0] = 1.0
    regions = np.array([[75, 50, 100, 100], [10, 20, 512, 512]], np.float32)
    frame_kp = decode_crops(hm, None, regions, crop_hw=(256, 256))
    # crop pixel (16*4+2, 32*4+2) = (66, 130) -> frame = crop * 100/256 + (75, 50)
    assert frame_kp[0, 0, :2].tolist() == pytest.approx([66 * 100 / 256 + 75, 130 * 100 / 256 + 50])
    assert frame_kp[1, 0, :2].tolist() == pytest.approx([2 * 2 + 10, 2 * 2 + 20])


def test_simcc_hand_made_vectors():
    from posezoo.decoding import decode_simcc

    x = np.full((2, 3, 40), -5.0, np.float32)
    y = np.full((2, 3, 30), -5.0, np.float32)
    want = [[(7, 5), (0, 0), (39, 29)], [(20, 12), (38, 3), (1, 28)]]  # (ix, iy) bins
    for b, per in enumerate(want):
        for j, (ix, iy) in enumerate(per):
            x[b, j, ix], y[b, j, iy] = 1.0, 0.8
            x[b, j, max(ix - 1, 0) if ix else 1] = 0.5  # a lesser neighbour must not win
    out = decode_simcc(x, y, split_ratio=2.0)
    assert out.shape == (2, 3, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., :2], np.array(want, np.float32) / 2.0)
    assert (out[..., 2] > 0.9).all()  # softmax of logits scaled by sigma * beta: sharp
    flat = decode_simcc(np.zeros((1, 1, 40)), np.zeros((1, 1, 30)))  # no peak at all: chance, no position
    assert np.isnan(flat[0, 0, :2]).all()


@pytest.mark.parametrize("softmax, normalize", [(True, False), (False, False), (True, True)])
def test_simcc_matches_deeplabcuts_predictor(softmax, normalize):
    torch = pytest.importorskip("torch")
    sim_cc = pytest.importorskip("deeplabcut.pose_estimation_pytorch.models.predictors.sim_cc")
    from posezoo.decoding import decode_simcc

    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, (4, 39, 512)).astype(np.float32)  # rtmpose_s on 256x256: split ratio 2
    y = rng.normal(0, 0.05, (4, 39, 512)).astype(np.float32)
    x[:, :, 100] += 0.2
    y[:, :, 300] += 0.15
    dlc = sim_cc.SimCCPredictor(simcc_split_ratio=2.0, apply_softmax=softmax, normalize_outputs=normalize,
                                sigma=(5.66, 5.66), decode_beta=150.0)
    ref = dlc(1.0, {"x": torch.from_numpy(x), "y": torch.from_numpy(y)})["poses"][:, 0].numpy()
    ours = decode_simcc(x, y, split_ratio=2.0, apply_softmax=softmax, normalize=normalize, sigma=(5.66, 5.66))
    valid = np.isfinite(ours[..., 0])
    np.testing.assert_allclose(ours[..., 2], ref[..., 2], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours[valid][:, :2], ref[valid][:, :2])
    assert (ref[~valid][:, :2] == -0.5).all()  # DeepLabCut's "no position" (-1 / split ratio)


def test_exclusive_peaks_move_a_keypoint_off_a_place_another_owns():
    from posezoo.decoding import exclusive_peaks

    # frame 0: the snout (0) peaks on the tail base (1) at cell (10, 30), where the tail base's
    # heatmap is higher; its own blob at (10, 5) is weaker. Frame 1: the same, but the snout's
    # peak is 3 cells from the tail base's. Frame 2: the ears (2, 3) peak 2 cells apart, each
    # highest at its own peak: nothing moves.
    hm = np.zeros((3, 4, 20, 40), np.float32)
    hm[0, 0, 10, 30], hm[0, 0, 10, 5], hm[0, 1, 10, 30] = 0.5, 0.4, 0.8
    hm[1, 0, 10, 33], hm[1, 0, 10, 5], hm[1, 1, 10, 30] = 0.5, 0.4, 0.8
    hm[:, 2, 5, 20], hm[:, 3, 5, 22] = 0.9, 0.7
    hm[:, 3, 5, 20] = 0.6  # the right ear's heatmap is high on the left ear's peak too, but lower
    plain = decode_heatmaps(hm, stride=4)
    moved = decode_heatmaps(hm, stride=4, exclusive_radius=2)
    assert plain[0, 0, :2].tolist() == [122.0, 42.0] and moved[0, 0].tolist() == [22.0, 42.0, pytest.approx(0.4)]
    np.testing.assert_array_equal(moved[0, 1:], plain[0, 1:])
    np.testing.assert_array_equal(moved[1:], plain[1:])  # 3 cells apart; the ears keep their places
    # within 3 cells, but the tail base's heatmap is 0 at the snout's peak: not its place
    np.testing.assert_array_equal(decode_heatmaps(hm, stride=4, exclusive_radius=3)[1], plain[1])
    hm[1, 1, 10, 33] = 0.6
    assert decode_heatmaps(hm, stride=4, exclusive_radius=3)[1, 0, :2].tolist() == [22.0, 42.0]
    flat = hm.reshape(3, 4, -1)
    idx = flat.argmax(axis=2)
    out = exclusive_peaks(flat, idx, 40, 2)
    assert out is not idx and (idx == flat.argmax(axis=2)).all()  # a new array, the input untouched
