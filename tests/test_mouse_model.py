"""Test-time flip (the card's ``test_time_flip``): the mirrored pass is mapped back exactly,
predictions are mirror-equivariant with it, and it works for images and video alike."""

import numpy as np
import pytest

import posezoo
from conftest import SHARED
from posezoo.cards import ModelCard, OutputSpec
from posezoo.errors import InvalidCardError
from posezoo.predictor import average_flipped, flip_permutation, unflip_outputs

KEYPOINTS = ("snout", "leftear", "rightear", "tailbase")
PERM = flip_permutation(KEYPOINTS, [("leftear", "rightear")])


def test_flip_permutation_swaps_the_pairs_only():
    assert PERM.tolist() == [0, 2, 1, 3]


def test_unflip_mirrors_the_cells_swaps_the_pairs_and_negates_dx():
    spec = OutputSpec(heatmap="heatmaps", locref="locref", stride=4.0, locref_std=4.0)
    n, k, h, w = 2, 4, 6, 10
    rng = np.random.default_rng(0)
    heat = rng.random((n, k, h, w)).astype(np.float32)
    loc = rng.normal(size=(n, 2 * k, h, w)).astype(np.float32)
    back = unflip_outputs({"heatmaps": heat, "locref": loc}, spec, PERM)
    for j in range(k):
        np.testing.assert_array_equal(back["heatmaps"][:, j], heat[:, PERM[j], :, ::-1])
        np.testing.assert_array_equal(back["locref"][:, 2 * j], -loc[:, 2 * PERM[j], :, ::-1])      # dx
        np.testing.assert_array_equal(back["locref"][:, 2 * j + 1], loc[:, 2 * PERM[j] + 1, :, ::-1])  # dy
    again = unflip_outputs(back, spec, PERM)  # an involution
    np.testing.assert_array_equal(again["heatmaps"], heat)
    np.testing.assert_array_equal(again["locref"], loc)
    avg = average_flipped({"heatmaps": heat, "locref": loc}, {"heatmaps": heat, "locref": loc}, spec, PERM)
    np.testing.assert_allclose(avg["heatmaps"], 0.5 * (heat + back["heatmaps"]))


def test_a_point_decoded_from_the_mirrored_pass_lands_on_the_mirrored_position():
    # a keypoint at input x in a W-wide input sits at W - x in the mirror: one-hot peak plus
    # offset in the mirrored maps, un-mirrored, decodes to x itself
    from posezoo.decoding import decode_outputs

    spec = OutputSpec(heatmap="heatmaps", locref="locref", stride=4.0, locref_std=4.0)
    H, W, h, w = 24, 40, 6, 10
    x, y = 13.3, 9.6                               # the left ear, in the plain frame
    xm = W - x                                     # where the mirrored image shows it (as the right ear)
    heat = np.zeros((1, 4, h, w), np.float32)
    loc = np.zeros((1, 8, h, w), np.float32)
    ix, iy = int(xm // 4), int(y // 4)
    heat[0, 2, iy, ix] = 1.0
    loc[0, 4, iy, ix] = (xm - (ix * 4 + 2)) / 4.0
    loc[0, 5, iy, ix] = (y - (iy * 4 + 2)) / 4.0
    back = unflip_outputs({"heatmaps": heat, "locref": loc}, spec, PERM)
    kp = decode_outputs(back, spec, (H, W))
    np.testing.assert_allclose(kp[0, 1, :2], [x, y], atol=1e-5)


def test_test_time_flip_is_for_full_frame_heatmap_cards_only(tmp_path):
    from posezoo.zoo import default_zoo

    card = default_zoo().card("posezoo_mouse@1.1.0")
    assert card.test_time_flip is None  # older cards: off, and left out of the YAML
    assert "test_time_flip" not in card.model_dump(mode="json", exclude_none=True)
    flipped = ModelCard.model_validate({**card.model_dump(mode="json", exclude_none=True), "test_time_flip": True})
    assert flipped.test_time_flip is True
    bad = {**card.model_dump(mode="json", exclude_none=True), "test_time_flip": True, "task": "top_down",
           "detector": "some_detector"}
    path = tmp_path / "card.yaml"
    import yaml

    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(InvalidCardError, match="test_time_flip"):
        ModelCard.from_yaml(path)


@pytest.fixture(scope="module")
def test_frames():
    from posezoo.labelled import load_labelled

    data = load_labelled(SHARED / "labeled-data" / "m4s1")
    return data.load_images("RGB")[[100, 105, 110]]  # 640x480: letterboxed to 320x240 without padding


@pytest.mark.parametrize("model", ["posezoo_mouse@1.1.0", "posezoo_mouse@1.1.0-int8"])
def test_flip_predictions_are_mirror_equivariant(model, test_frames):
    p = posezoo.load(model, device="cpu", threads=2, test_time_flip=True)
    assert p.test_time_flip
    pred = p.predict_images(test_frames)[:, 0]
    mirrored = p.predict_images(np.ascontiguousarray(test_frames[:, :, ::-1]))[:, 0]
    back = mirrored[:, PERM].copy()
    back[..., 0] = test_frames.shape[2] - back[..., 0]  # u -> W - u
    np.testing.assert_allclose(back, pred, atol=1e-3)


def test_flip_on_and_off_both_give_valid_close_predictions(test_frames):
    off = posezoo.load("posezoo_mouse@1.1.0", device="cpu", threads=2, test_time_flip=False)
    on = posezoo.load("posezoo_mouse@1.1.0", device="cpu", threads=2, test_time_flip=True)
    a, b = off.predict_images(test_frames)[:, 0], on.predict_images(test_frames)[:, 0]
    for kp in (a, b):
        assert kp.shape == (3, 4, 3) and np.isfinite(kp).all()
        assert (kp[..., 0] >= 0).all() and (kp[..., 0] < 640).all() and (kp[..., 1] >= 0).all() and (kp[..., 1] < 480).all()
        assert (kp[..., 2] > 0.4).all() and (kp[..., 2] <= 1.0).all()
    assert np.median(np.linalg.norm(a[..., :2] - b[..., :2], axis=-1)) < 3.0
    assert not np.allclose(a, b)  # it really ran the mirrored pass


def test_flip_on_video_matches_flip_on_images(openfield_video):
    from posezoo.video import iter_frames

    on = posezoo.load("posezoo_mouse@1.1.0", device="cpu", threads=2, test_time_flip=True)
    off = posezoo.load("posezoo_mouse@1.1.0", device="cpu", threads=2, test_time_flip=False)
    flipped = on.predict_video(openfield_video, batch_size=4, max_frames=6).data[:, 0]
    plain = off.predict_video(openfield_video, batch_size=4, max_frames=6).data[:, 0]
    assert flipped.shape == (6, 4, 3) and np.isfinite(flipped).all() and not np.allclose(flipped, plain)
    assert on.predict_video(openfield_video, max_frames=2).metadata["runtime"]["test_time_flip"] is True
    frames = np.stack(list(iter_frames(openfield_video, max_frames=6)))
    images = on.predict_images(frames)[:, 0]  # the same flip; only the resize differs (decoder vs OpenCV)
    assert np.median(np.linalg.norm(flipped[..., :2] - images[..., :2], axis=-1)) < 2.0


def test_each_bundled_version_records_its_recipe_and_beats_the_one_it_started_from():
    from posezoo.zoo import default_zoo

    zoo = default_zoo()
    v11, v12, v13, v14 = (zoo.card(f"posezoo_mouse@{v}") for v in ("1.1.0", "1.2.0", "1.3.0", "1.4.0"))
    assert zoo.card("posezoo_mouse") == v14 and v11.test_time_flip is None
    for new, old, steps in ((v12, v11, 1500), (v13, v12, 1000), (v14, v13, 1000)):
        assert new.test_time_flip is True and zoo.card(new.ref, precision="int8").test_time_flip is True
        cmd = new.training["command"]
        assert cmd.startswith("posezoo train ") and f"--init {old.ref}" in cmd and "--test-time-flip" in cmd
        assert "--store models" in cmd and new.training["init"] == old.ref
        assert new.training["config"]["steps"] == steps and new.training["history"][-1]["step"] == steps
        assert new.training["split"] == old.training["split"]
        assert new.metrics["test"]["overall"]["mean_px"] < old.metrics["test"]["overall"]["mean_px"]
    # 1.3.0: the same network at a larger input, recorded in the card and in its command
    assert v13.input.size == (300, 400) and v13.training["config"]["input_hw"] == [300, 400]
    assert "--input-size 400x300" in v13.training["command"] and v13.speed == "medium"
    # decoded with one place per body part (the plain argmax put the snout on the tail base once)
    assert v13.outputs.exclusive_radius == 2 and "--exclusive-radius 2" in v13.training["command"]
    assert zoo.card(v13.ref, precision="int8").outputs.exclusive_radius == 2 and v12.outputs.exclusive_radius == 0
    # 1.4.0: 1.3.0 trained on at a lower learning rate, at its input size and with its decoding
    assert v14.input.size == v13.input.size and v14.training["config"]["lr"] < v13.training["config"]["lr"]
    assert v14.outputs.exclusive_radius == 2 and zoo.card(v14.ref, precision="int8").outputs.exclusive_radius == 2
    assert "--store /tmp" not in v14.training["command"] and "--workdir" not in v14.training["command"]
