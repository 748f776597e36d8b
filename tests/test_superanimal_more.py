"""The rest of SuperAnimal: SuperAnimal-Bird (ResNet-50, Faster R-CNN MobileNet-v3, SSDLite),
SuperAnimal-Quadruped RTMPose-s (SimCC outputs) and the SSDLite detectors, converted to ONNX and
checked against DeepLabCut's own PyTorch code on real openfield frames.

As in ``test_conversion.py``, the checkpoints are built in DeepLabCut's exact format from its
own model definitions with random weights (``conversion.testing``), so parity is numerical and
the top-down run is a mechanics test, never an accuracy test. Each architecture is built,
checkpointed and converted once (module-scoped fixtures).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "deeplabcut",
    reason="the conversion tests need the conversion extra (torch, torchvision, timm, deeplabcut): "
    "pip install -e '.[conversion,test]'",
)

import cv2  # noqa: E402
import torch  # noqa: E402

from conftest import dlc_crops, labelled_mice  # noqa: E402
from conversion import superanimal as sa  # noqa: E402
from conversion import testing as st  # noqa: E402
from posezoo import Zoo  # noqa: E402
from posezoo.topdown import BoxDetector, CropPoseModel, TopDownPredictor, estimate_poses  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))
BIRD_DET = "fasterrcnn_mobilenet_v3_large_fpn"
POSES = [("quadruped", "rtmpose_s"), ("bird", "resnet_50")]
DETS = [("quadruped", "ssdlite"), ("bird", "ssdlite"), ("bird", BIRD_DET)]


# -- real data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, list[np.ndarray]]:
    """6 labelled openfield frames and a box around each mouse's labelled keypoints."""
    return labelled_mice(6)


@pytest.fixture(scope="module")
def crops(labelled) -> np.ndarray:
    """DeepLabCut's own 256x256 crops of the labelled mice (uint8 RGB)."""
    return dlc_crops(*labelled)


# -- checkpoints and conversion (each architecture once) -------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("superanimal-more")


@pytest.fixture(scope="module")
def checkpoints(work, labelled, crops) -> dict[tuple[str, str], Path]:
    frames = labelled[0]
    ck = work / "checkpoints"

    def path(dataset, arch):
        return ck / sa.checkpoint_filename(dataset, arch)

    out = {(d, a): st.random_pose_checkpoint(d, a, path(d, a), crops) for d, a in POSES}
    for d, seed in (("quadruped", 0), ("bird", 1)):
        out[d, "ssdlite"] = st.random_ssdlite_checkpoint(d, path(d, "ssdlite"), frames[:3], seed=seed)
    out["bird", BIRD_DET] = st.random_detector_checkpoint("bird", BIRD_DET, path("bird", BIRD_DET), frames[:1])
    return out


@pytest.fixture(scope="module")
def converted(work, checkpoints) -> Path:
    """A local catalog with every new network, through the conversion's own code path (verified)."""
    out = work / "converted"
    for dataset, det in DETS:
        sa.convert_detector(dataset, det, out, checkpoint=checkpoints[dataset, det])
    sa.convert_pose("quadruped", "rtmpose_s", "ssdlite", out, checkpoint=checkpoints["quadruped", "rtmpose_s"])
    sa.convert_pose("bird", "resnet_50", BIRD_DET, out, checkpoint=checkpoints["bird", "resnet_50"])
    return out


def _entry(converted: Path, name: str):
    return Zoo([converted], include_bundled=False).resolve(name)


# -- names, cards, catalog ------------------------------------------------------------------------
def test_checkpoint_names_follow_deeplabcut():
    assert sa.parse_checkpoint_filename("superanimal_bird_resnet_50.pt") == ("bird", "resnet_50")
    assert sa.parse_checkpoint_filename("superanimal_quadruped_rtmpose_s.pt") == ("quadruped", "rtmpose_s")
    assert sa.parse_checkpoint_filename("superanimal_bird_ssdlite.pt") == ("bird", "ssdlite")
    assert sa.UPSTREAM_REPOS["bird"] == "DeepLabCut/DeepLabCutModelZoo-SuperAnimal-Bird"
    with pytest.raises(sa.ConversionError, match="publishes no SuperAnimal-bird hrnet_w32"):
        sa.parse_checkpoint_filename("superanimal_bird_hrnet_w32.pt")
    with pytest.raises(sa.ConversionError, match="publishes no SuperAnimal-topviewmouse rtmpose_s"):
        sa.checkpoint_filename("topviewmouse", "rtmpose_s")
    # DeepLabCut's model-zoo URL list is the source of UPSTREAM_ARCHS
    import dlclibrary
    import yaml

    urls = yaml.safe_load((Path(dlclibrary.__file__).parent / "dlcmodelzoo" / "modelzoo_urls_pytorch.yaml").read_text())
    for dataset, (poses, dets) in sa.UPSTREAM_ARCHS.items():
        entry = urls[f"superanimal_{dataset}"]
        assert set(entry["pose_models"]) == set(poses) and set(entry["detectors"]) == set(dets)
        for arch in poses + dets:
            url = {**entry["pose_models"], **entry["detectors"]}[arch]
            assert url == f"{sa.UPSTREAM_REPOS[dataset]}/{sa.checkpoint_filename(dataset, arch)}"


def test_cards_take_deeplabcut_config(converted):
    """The SimCC decoding parameters, crop size, keypoints and detector graph come from DeepLabCut."""
    from deeplabcut.pose_estimation_pytorch.models.predictors.sim_cc import SimCCPredictor

    zoo = Zoo([converted], include_bundled=False)
    rtm = zoo.card("superanimal_quadruped_rtmpose_s")
    pred_cfg = sa.dlc_config("quadruped", "rtmpose_s", None)["model"]["heads"]["bodypart"]["predictor"]
    assert rtm.decoder == "simcc" and rtm.simcc.x == "simcc_x" and rtm.simcc.y == "simcc_y"
    assert rtm.simcc.split_ratio == pred_cfg["simcc_split_ratio"] and rtm.simcc.beta == pred_cfg["decode_beta"]
    assert list(rtm.simcc.sigma) == list(pred_cfg["sigma"])
    assert rtm.simcc.apply_softmax is SimCCPredictor().apply_softmax  # DeepLabCut's default, not in its config
    assert rtm.simcc.normalize is SimCCPredictor().normalize_outputs
    assert rtm.input.size == (256, 256) and rtm.detector == "superanimal_quadruped_ssdlite@1.0.0"
    bird = zoo.card("superanimal_bird_resnet_50")
    assert bird.n_keypoints == 42 and bird.keypoints[:3] == ["back", "bill", "belly"]
    assert bird.outputs.locref == "locref" and bird.outputs.stride == 8.0
    ssd = zoo.card("superanimal_bird_ssdlite").detection
    assert (ssd.graph_min_size, ssd.graph_max_size, ssd.graph_mean) == (320, 320, (0.5, 0.5, 0.5))
    assert ssd.score_threshold == 0.001  # torchvision's SSDLite ignores DeepLabCut's box_score_thresh
    assert zoo.card(f"superanimal_bird_{BIRD_DET}").detection.score_threshold == 0.6


def test_bundled_catalog_has_the_new_cards():
    """The catalog's unpublished cards say what the converter writes (only the artefact differs)."""
    zoo = Zoo(include_bundled=True)
    for dataset, arch in POSES:
        want = sa.pose_card(dataset, arch, sa.default_detector(dataset, arch))
        have = zoo.card(want.name)
        assert have.model_dump(exclude={"artefact", "upstream"}) == want.model_dump(exclude={"artefact", "upstream"})
        assert have.upstream.filename == sa.checkpoint_filename(dataset, arch) and not have.artefact.published
    for dataset, det in DETS:
        want = sa.detector_card(dataset, det)
        assert zoo.card(want.name).model_dump(exclude={"artefact", "upstream"}) == want.model_dump(
            exclude={"artefact", "upstream"})
    assert zoo.card("bird").name == "superanimal_bird_resnet_50"


# -- parity on real frames ------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,arch", POSES)
def test_outputs_match_pytorch_on_real_crops(dataset, arch, checkpoints, converted, crops):
    model = sa.load_checkpoint(sa.build_pose_model(dataset, arch), checkpoints[dataset, arch])
    with torch.no_grad():
        ref = model(torch.from_numpy(st.normalise(crops)))["bodypart"]
    resolved = _entry(converted, sa.card_name(dataset, arch))
    got = CropPoseModel(resolved.card, resolved.path, device="cpu").raw(crops)
    pairs = {"simcc_x": "x", "simcc_y": "y"} if arch == "rtmpose_s" else {"heatmaps": "heatmap", "locref": "locref"}
    for name, key in pairs.items():
        r = ref[key].numpy()
        assert got[name].shape == r.shape
        err = sa.relative_max_diff(got[name], r)
        print(f"\n{dataset} {arch} {name}: relative max difference {err:.2e}")
        assert err <= 1e-4, f"{arch} {name}: relative max difference {err:.2e}"
        assert np.array_equal(got[name].reshape(*r.shape[:2], -1).argmax(-1), r.reshape(*r.shape[:2], -1).argmax(-1))


@pytest.mark.parametrize("dataset,arch", POSES)
def test_keypoints_match_deeplabcut_predictor(dataset, arch, checkpoints, converted, labelled):
    from conversion.bench import dlc_pose_runner, dlc_poses

    frames, boxes = labelled
    runner = dlc_pose_runner(dataset, arch, checkpoints[dataset, arch], max_individuals=1, batch_size=8)
    ref = np.concatenate(dlc_poses(runner, list(frames), boxes))
    resolved = _entry(converted, sa.card_name(dataset, arch))
    got = np.concatenate(estimate_poses(CropPoseModel(resolved.card, resolved.path, device="cpu"), frames, boxes))
    assert got.shape == ref.shape == (len(frames), resolved.card.n_keypoints, 3)
    if arch == "rtmpose_s":
        # SimCCPredictor marks keypoints not above chance (1 / bins) with -1; posezoo with NaN
        placed = ref[..., 2] > 1.0 / 512
        assert placed.mean() > 0.5 and np.array_equal(np.isfinite(got[..., 0]), placed)
        got, ref = got[placed], ref[placed]
    dx = float(np.abs(got[..., :2] - ref[..., :2]).max())
    print(f"\n{dataset} {arch}: keypoints max difference {dx:.5f} px over {got[..., 0].size} keypoints")
    assert dx <= 0.1
    # SimCC scores are softmaxes of the logits times sigma * beta (849): float32 rounding of the
    # logits (ONNX Runtime vs PyTorch, ~1e-6) is amplified that much in the score
    tol = 1e-2 if arch == "rtmpose_s" else 1e-4
    ds = float(np.abs(got[..., 2] - ref[..., 2]).max())
    print(f"{dataset} {arch}: scores max difference {ds:.2e}")
    assert ds <= tol


@pytest.mark.parametrize("dataset,det", DETS)
def test_detector_boxes_match_deeplabcut(dataset, det, checkpoints, converted, labelled):
    from conversion.bench import dlc_detector_runner

    frames = list(labelled[0][3:5])  # not the calibration frames
    # SSDLite is fast: a second frame of another size checks that the graph takes any frame size
    frames = [frames[0], cv2.resize(frames[1], (500, 333))] if det == "ssdlite" else frames[:1]
    runner = dlc_detector_runner(dataset, det, checkpoints[dataset, det], max_individuals=10)
    ref = runner.inference(frames)
    resolved = _entry(converted, sa.card_name(dataset, det))
    detector = BoxDetector(resolved.card, resolved.path, device="cpu", max_individuals=10)
    worst = 0.0
    for f, r in zip(frames, ref):
        boxes, scores = detector.detect(f)
        rb = np.asarray(r["bboxes"], np.float32)
        rb = np.concatenate([rb[:, :2], rb[:, :2] + rb[:, 2:]], axis=1)  # DLC returns COCO xywh
        assert len(boxes) == len(rb) == 10
        worst = max(worst, float(np.abs(boxes - rb).max()))
        assert np.abs(scores - np.asarray(r["bbox_scores"])).max() <= 1e-3
    print(f"\n{dataset} {det}: boxes max difference {worst:.4f} px")
    assert worst <= 0.5


# -- top-down inference and the zoo ---------------------------------------------------------------
def test_rtmpose_top_down_with_ssdlite(converted, labelled):
    """posezoo.load on the RTMPose-s card: its SSDLite detector, crops, SimCC decoding, frame pixels."""
    import posezoo

    card = converted / "superanimal_quadruped_rtmpose_s" / "1.0.0" / "card.yaml"
    predictor = posezoo.load(str(card), device="cpu", zoo=Zoo([converted], include_bundled=False))
    assert isinstance(predictor, TopDownPredictor)
    assert predictor.detector.card.name == "superanimal_quadruped_ssdlite"
    frames = labelled[0][:2]
    out = predictor.predict_images(frames, max_individuals=3)
    assert out.shape == (2, 3, 39, 3) and np.isfinite(out[..., 2]).all()
    w = frames.shape[2]
    xy = out[..., :2][np.isfinite(out[..., 0])]
    assert len(xy) and (xy > -w).all() and (xy < 2 * w).all()
    # the same boxes through DeepLabCut's predictor give the same keypoints
    boxes = [predictor._detect(f)[0][:3] for f in frames]
    again = predictor.poses_for_boxes(list(frames), boxes)
    assert np.allclose(np.concatenate(again), out.reshape(-1, 39, 3)[: sum(map(len, boxes))], equal_nan=True)


def test_zoo_pull_converts_rtmpose_and_ssdlite(checkpoints, tmp_path, monkeypatch):
    """`posezoo zoo pull superanimal_quadruped_rtmpose_s`: fetch (monkeypatched hf_hub_download),
    convert and verify the pose network and its SSDLite detector, cache; resolve finds them."""
    import huggingface_hub

    from posezoo.cli import main

    files = {"superanimal_quadruped_rtmpose_s.pt": checkpoints["quadruped", "rtmpose_s"],
             "superanimal_quadruped_ssdlite.pt": checkpoints["quadruped", "ssdlite"]}
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(files[filename])

    monkeypatch.setenv("POSEZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("posezoo.zoo._default_zoo", None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main(["zoo", "pull", "superanimal_quadruped_rtmpose_s"]) == 0
    assert sorted(calls) == sorted(("mwmathis/DeepLabCutModelZoo-SuperAnimal-Quadruped", f) for f in files)
    zoo = Zoo(cache_dir=tmp_path / "cache")
    resolved = zoo.resolve("superanimal_quadruped_rtmpose_s")
    assert resolved.path.is_relative_to(tmp_path / "cache" / "converted") and resolved.card.decoder == "simcc"
    assert zoo.resolve(resolved.card.detector).card.name == "superanimal_quadruped_ssdlite"
