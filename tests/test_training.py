"""Training: the ImageNet backbone, label-consistent targets and augmentation, a tiny
real training run -> ONNX -> parity -> card -> posezoo.load, fine-tuning, publishing
to directory / S3 / Hub stores, and the CLI without PyTorch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

import posezoo
from posezoo.cards import ModelCard
from posezoo.decoding import decode_heatmaps
from posezoo.training import ModelInfo, TrainConfig, train_model
from posezoo.training.backbone import EfficientNetLite0, imagenet_weights_path, load_imagenet, same_pad
from posezoo.training.data import AugmentConfig, SampleSource, augment, flip_permutation, make_targets
from posezoo.training.loop import fit
from posezoo.training.model import PoseNet
from posezoo.training.register import register
from posezoo.zoo import Zoo, sha256_file
from test_labelled import KEYPOINTS, make_copy

SKELETON = (("snout", "leftear"), ("snout", "rightear"), ("leftear", "tailbase"), ("rightear", "tailbase"))
FLIP = (("leftear", "rightear"),)
TINY_CFG = TrainConfig(steps=3, batch_size=2, warmup_steps=1, threads=2, eval_every=3, checkpoint_every=2,
                       head_width=16)


def test_every_imagenet_tensor_loads_strictly():
    model = EfficientNetLite0()
    state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())  # nothing missing, nothing unexpected
    assert load_imagenet(model) == len(state) == 296
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    logits = model.eval()(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_tensorflow_same_padding_is_asymmetric_for_stride_2():
    x = torch.ones(1, 1, 240, 320)
    assert same_pad(x, 3, 2).shape[-2:] == (241, 321)  # 0 before, 1 after
    assert same_pad(x, 3, 2)[0, 0, 0, 0] == 1 and same_pad(x, 3, 2)[0, 0, -1, -1] == 0
    assert same_pad(torch.ones(1, 1, 15, 20), 5, 2).shape[-2:] == (19, 23)  # odd: 2+2 rows, 1+2 columns
    features = EfficientNetLite0().features(torch.zeros(1, 3, 240, 320))
    assert {s: tuple(f.shape[1:]) for s, f in features.items()} == {
        2: (16, 120, 160), 4: (24, 60, 80), 8: (40, 30, 40), 16: (112, 15, 20), 32: (320, 8, 10)}


def test_targets_decode_back_to_the_labels():
    pts = np.array([[10.3, 20.7], [100.1, 50.2], [np.nan, np.nan], [319.9, 0.2]])
    t = make_targets(pts, (60, 80), 4, sigma=3.0, locref_radius=8.0, locref_std=4.0)
    kp = decode_heatmaps(t["heatmap"][None], t["locref"][None], input_hw=(240, 320), locref_std=4.0)[0]
    np.testing.assert_allclose(kp[[0, 1, 3], :2], pts[[0, 1, 3]], atol=1e-4)
    assert t["heatmap_weight"].ravel().tolist() == [1, 1, 0, 1]
    assert t["locref_weight"][4:6].sum() == 0 and t["heatmap"][2].max() == 0  # unlabelled: ignored


def _dots(points: np.ndarray, colours: np.ndarray) -> np.ndarray:
    img = np.full((240, 320, 3), 128, np.uint8)
    for (x, y), c in zip(points, colours):
        img[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3] = c
    return img


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_moves_labels_with_the_pixels_and_swaps_left_right(seed):
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    pts = np.array([[150.5, 100.5], [140.5, 110.5], [160.5, 112.5], [150.5, 150.5]])  # pixel centres
    cfg = AugmentConfig(p_geometric=1.0, p_rotation=1.0, p_flip=0.5, brightness=0, contrast=(1, 1), p_blur=0,
                        p_noise=0)
    perm = flip_permutation(KEYPOINTS, FLIP)
    assert perm.tolist() == [0, 2, 1, 3]
    img, out = augment(np.random.default_rng(seed), _dots(pts, colours), pts, perm, cfg)
    for k in range(4):
        x, y = out[k] - 0.5  # decoder convention -> pixel index
        patch = img[int(round(y)) - 1 : int(round(y)) + 2, int(round(x)) - 1 : int(round(x)) + 2].reshape(-1, 3)
        dist = np.abs(patch.astype(int)[:, None] - colours.astype(int)[None]).sum(-1).min(0)
        # the pixel under each point has the colour of the keypoint that was there:
        # its own, or its mirror partner's after a flip
        assert np.argmin(dist) in (k, perm[k])
    def cross(a, b):
        return a[0] * b[1] - a[1] * b[0]

    mirrored = cross(out[2] - out[0], out[1] - out[0]) * cross(pts[2] - pts[0], pts[1] - pts[0]) < 0
    # after a mirror image + swap, "left" is still on the same side of the snout
    assert not mirrored


def test_training_is_deterministic(tmp_path):
    data = posezoo.labelled.load_labelled(make_copy(tmp_path, range(4)))
    images = data.load_images()
    perm = flip_permutation(data.keypoints, FLIP)
    cfg = dataclasses.replace(TINY_CFG, steps=2, eval_every=100)
    a = fit(images, data.coords, perm, cfg, frame_wh=data.image_size, progress=False)
    b = fit(images, data.coords, perm, cfg, frame_wh=data.image_size, progress=False)
    for (name, ta), tb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(ta, tb), name
    src = SampleSource(images[:, ::2, ::2].copy(), data.coords / 2, perm, stride=4, sigma=3, locref_radius=8,
                       locref_std=4, mean=127, std=128, augment_cfg=AugmentConfig(), seed=5)
    batch = src.batch(3)
    assert batch["image"].shape == (3, 3, 240, 320) and batch["heatmap"].shape == (3, 4, 60, 80)
    assert batch["locref"].shape == (3, 8, 60, 80)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 3 steps on 6 real openfield frames, registered in a catalog."""
    root = tmp_path_factory.mktemp("train")
    label = make_copy(root / "project", range(6))
    info = ModelInfo(name="test_mouse", version="0.0.1", skeleton=SKELETON, flip_pairs=FLIP, view="top", priority=3)
    card = train_model(label, info, root / "catalog", cfg=TINY_CFG, test=["img0005*"], workdir=root / "work",
                       command="posezoo train ...", progress=False, log=lambda *_: None)
    return SimpleNamespace(root=root, label=label, card=card, card_path=root / "catalog/test_mouse/0.0.1/card.yaml")


def test_train_export_register_load_predict(trained):
    card = ModelCard.from_yaml(trained.card_path)
    assert card == trained.card and card.keypoints == list(KEYPOINTS)
    assert (card.view, card.speed, card.priority) == ("top", "fast", 3)  # where species-first selection places it
    assert card.input.size == (240, 320) and card.input.mean == (127.0,) * 3 and card.input.std == (128.0,) * 3
    assert card.outputs.stride == 4 and card.outputs.heatmap_activation == "none"
    onnx_path = trained.card_path.parent / card.artefact.filename
    assert card.artefact.locations == ["local"] and card.artefact.sha256 == sha256_file(onnx_path)
    assert card.artefact.bytes == onnx_path.stat().st_size
    par = card.training["onnx_parity"]
    assert par["argmax_identical"] and par["max_abs_diff_heatmaps"] < 1e-4 and par["n_images"] == 1
    assert card.training["split"] == {"train": [f"img000{i}.png" for i in range(5)], "test": ["img0005.png"]}
    assert card.training["data"]["points_labelled"] == 24 and card.training["command"] == "posezoo train ..."
    assert set(card.metrics["test"]) == {"overall", *KEYPOINTS} and card.metrics["test"]["overall"]["n"] == 4
    ckpt = card.training["checkpoint"]
    assert sha256_file(trained.card_path.parent / ckpt["filename"]) == ckpt["sha256"]
    predictor = posezoo.load(str(trained.card_path), device="cpu", threads=2)
    data = posezoo.labelled.load_labelled(trained.label)
    pred = predictor.predict_images(data.load_images()[:2])
    assert pred.shape == (2, 1, 4, 3) and np.isfinite(pred).all()
    assert ((pred[..., 2] >= 0) & (pred[..., 2] <= 1)).all()
    # the ONNX graph has a dynamic batch axis
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 240, 320]
    # "SAME" padding lives in the convolutions: a Pad node costs ONNX Runtime a copy and
    # two layout conversions; the stride-2 convolutions carry TensorFlow's asymmetric pads
    ops = [n.op_type for n in graph.node]
    assert "Pad" not in ops and ops.count("Conv") == 40
    pads = [list(a.ints) for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "pads"]
    assert [0, 0, 1, 1] in pads and [1, 1, 2, 2] in pads


def test_fine_tune_from_a_zoo_model(trained, tmp_path):
    info = ModelInfo(name="test_mouse", version="0.0.2", skeleton=SKELETON, flip_pairs=FLIP)
    # at another input size: the network is fully convolutional, so the weights carry over
    cfg = dataclasses.replace(TINY_CFG, steps=1, input_hw=(120, 160))
    card = train_model(trained.label, info, tmp_path / "catalog", cfg=cfg, test=["img0005*"],
                       init=str(trained.card_path), workdir=tmp_path / "work", progress=False, log=lambda *_: None,
                       test_time_flip=True, exclusive_radius=1)
    assert card.training["init"] == str(trained.card_path) and card.outputs.exclusive_radius == 1
    assert card.input.size == (120, 160) and "160x120 letterboxed input" in card.description
    assert card.speed == "fast"  # 160x120 twice (flip) is less work than 320x240 once
    assert card.test_time_flip is True and trained.card.test_time_flip is None  # --test-time-flip, or off
    assert posezoo.load(str(tmp_path / "catalog/test_mouse/0.0.2/card.yaml"), device="cpu").test_time_flip
    with pytest.raises(posezoo.PosezooError, match=r"network differs from the one configured \(head_width 16\)"):
        train_model(trained.label, info, tmp_path / "c2", cfg=cfg, init="posezoo_mouse@1.1.0", progress=False,
                    log=lambda *_: None)  # 1.1.0's head is 64 wide
    with pytest.raises(posezoo.PosezooError, match="no training checkpoint"):
        train_model(trained.label, info, tmp_path / "c2", cfg=cfg, init="posezoo_tiny_mouse", progress=False,
                    log=lambda *_: None)


def test_register_to_file_hub_and_s3_stores(trained, tmp_path, s3, monkeypatch):
    card = trained.card
    onnx_path = trained.card_path.parent / card.artefact.filename
    # a Hub-like directory layout (file://), then resolved through the zoo
    hub_dir = tmp_path / "hub"
    path = register(card, onnx_path, f"file://{hub_dir}", catalog=tmp_path / "cat1")
    assert (hub_dir / onnx_path.name).is_file()
    assert Zoo([tmp_path / "cat1"], include_bundled=False).resolve("test_mouse").source.startswith("file:")
    assert ModelCard.from_yaml(path).artefact.locations == [f"file://{hub_dir}"]
    # the Hub through a mocked HfApi: nothing is uploaded for real
    api = mock.Mock()
    api.upload_file.return_value = SimpleNamespace(oid="a" * 40)
    path = register(card, onnx_path, "hf://posezoo/test", catalog=tmp_path / "cat2", hf_api=api)
    hub_card = ModelCard.from_yaml(path)
    assert hub_card.artefact.locations == ["hf://posezoo/test"] and hub_card.artefact.revision == "a" * 40
    assert api.upload_file.call_args.kwargs["repo_id"] == "posezoo/test"
    # a real S3 server
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    path = register(card, onnx_path, f"s3://{s3.bucket}/zoo", catalog=tmp_path / "cat3", s3_client=s3.client())
    resolved = Zoo([tmp_path / "cat3"], include_bundled=False, cache_dir=tmp_path / "cache").resolve("test_mouse")
    assert resolved.source == f"s3://{s3.bucket}/zoo/test_mouse/0.0.1/{onnx_path.name}"
    with pytest.raises(posezoo.PosezooError, match="needs a catalog"):
        register(card, onnx_path, "s3://bucket/x")


def test_pose_net_shapes():
    heat, locref = PoseNet(3, pretrained=False, width=16).eval()(torch.zeros(2, 3, 240, 320))
    assert heat.shape == (2, 3, 60, 80) and locref.shape == (2, 6, 60, 80)


def test_train_cli_without_torch_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "from posezoo.cli import main\n"
            f"sys.exit(main(['train', {str(tmp_path)!r}, '--name', 'x']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "install posezoo[train]" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\nimport posezoo, posezoo.evaluate,"
                        " posezoo.labelled, posezoo.cli"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # inference and evaluation never import torch


def test_train_cli_input_size(trained, capsys):
    from posezoo.cli import build_parser, main

    args = build_parser().parse_args(["train", "x", "--name", "m", "--input-size", "480x360"])
    assert args.input_size == (360, 480)  # the card's (height, width)
    for bad in ("480", "480xabc", "16x12"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", "x", "--name", "m", "--input-size", bad])
        assert "480x360 (width x height" in capsys.readouterr().err
    # the size reaches the training: 640x480 frames do not letterbox exactly into 500x300
    assert main(["train", str(trained.label), "--name", "m", "--store", str(trained.root / "unused"),
                 "--input-size", "500x300", "--steps", "1", "--no-progress"]) == 1
    assert "do not letterbox exactly into 500x300" in capsys.readouterr().err
    assert not (trained.root / "unused").exists()


def test_labelled_crops_are_the_runtimes_crops():
    """Top-down fine-tunes train on crops cut exactly as the runtime cuts a detection box, and
    the labels move with them (crop -> frame is the runtime's own mapping)."""
    from posezoo.cards import TopDownSpec
    from posezoo.labelled import load_labelled
    from posezoo.topdown import crop_regions, make_crops, xyxy_to_xywh
    from posezoo.training import TopDownTarget
    from posezoo.training.pipeline import labelled_crops

    from test_labelled import CSV

    data = load_labelled(CSV)
    images, coords = data.load_images("RGB")[:3], data.coords[:3]
    target = TopDownTarget(detector="d@1", crop=TopDownSpec(margin=0, with_context=True))
    crops, crop_coords = labelled_crops(images, coords, (256, 256), target)
    assert crops.shape == (3, 256, 256, 3) and crop_coords.shape == coords.shape
    for i in range(3):
        pts = coords[i][np.isfinite(coords[i]).all(1)]
        pad = 0.15 * float((pts.max(0) - pts.min(0)).max()) + 2.0
        box = np.array([[*(pts.min(0) - pad), *(pts.max(0) + pad)]], np.float32)
        reg = crop_regions(xyxy_to_xywh(box), (256, 256), (data.image_size[0], data.image_size[1]))
        np.testing.assert_array_equal(crops[i], make_crops(images[i], reg, (256, 256))[0])
        back = crop_coords[i] * reg["scale"][0] + reg["offset"][0]
        np.testing.assert_allclose(back, coords[i], atol=1e-6)
        inside = np.isfinite(crop_coords[i]).all(1)
        assert ((crop_coords[i][inside] >= 0) & (crop_coords[i][inside] <= 256)).all()


def _labelled_video(path, data, frames, size_wh=None):
    """An H.264 video of real labelled frames (optionally resized): ground truth for pseudo-labels."""
    import cv2

    from posezoo.video import VideoWriter

    images = data.load_images("RGB")[list(frames)]
    w, h = size_wh or (images.shape[2], images.shape[1])
    with VideoWriter(path, w, h, 30.0, crf=12) as out:
        for im in images:
            out.write(im if (w, h) == (im.shape[1], im.shape[0]) else cv2.resize(im, (w, h),
                                                                                  interpolation=cv2.INTER_AREA))
    return path


def test_pseudo_labels_are_the_teachers_confident_points_in_labelled_frame_pixels(tmp_path):
    from posezoo.training.pseudo import PseudoLabelSpec, frame_step, labelled_repeats, pseudo_label_video

    data = posezoo.labelled.load_labelled(make_copy(tmp_path / "p", range(12)))
    # the bundled model labels real frames it was trained on: its labels must land on the human
    # ones, in the labelled frames' pixels, also from a half-size copy of the video
    for size in (None, (320, 240)):
        video = _labelled_video(tmp_path / f"v{size}.mp4", data, range(12), size)
        pl = pseudo_label_video(PseudoLabelSpec(str(video), "posezoo_mouse@1.1.0", n_frames=5, min_likelihood=0.5),
                                data.keypoints, data.image_size, threads=2)
        assert frame_step(12, 5) == 3 and list(pl.frame_indices) == [0, 3, 6, 9]
        assert pl.images.shape == (4, 480, 640, 3) and pl.coords.shape == (4, 4, 2)
        err = np.linalg.norm(pl.coords - data.coords[[0, 3, 6, 9]], axis=-1)
        assert np.nanmedian(err) < 4.0, err
        assert pl.record["frames"] == 4 and pl.record["frame_step"] == 3 and pl.record["teacher"] == "posezoo_mouse@1.1.0"
        assert pl.record["points"] == int(np.isfinite(pl.coords).all(-1).sum()) >= 12
        assert pl.record["video_sha256"] == sha256_file(video)
    # points under the threshold are no targets: a stricter threshold keeps a subset
    strict = pseudo_label_video(PseudoLabelSpec(str(video), "posezoo_mouse@1.1.0", n_frames=5, min_likelihood=0.9),
                                data.keypoints, data.image_size, threads=2)
    kept = np.isfinite(strict.coords).all(-1)
    assert strict.record["frames"] <= 4 and kept.sum() <= pl.record["points"]
    with pytest.raises(posezoo.InputError, match="does not predict"):
        pseudo_label_video(PseudoLabelSpec(str(video), "posezoo_mouse@1.1.0"), [*data.keypoints, "tailtip"],
                           data.image_size)
    wide = _labelled_video(tmp_path / "wide.mp4", data, range(2), (640, 360))
    with pytest.raises(posezoo.InputError, match="aspect ratio"):
        pseudo_label_video(PseudoLabelSpec(str(wide), "posezoo_mouse@1.1.0"), data.keypoints, data.image_size)
    assert labelled_repeats(100, 292) == 3 and labelled_repeats(100, 20) == 1


def test_sample_source_draws_repeated_frames_as_often_as_asked():
    images = np.zeros((3, 16, 16, 3), np.uint8)
    points = np.full((3, 1, 2), np.nan)
    src = SampleSource(images, points, np.array([0]), stride=4, sigma=2, locref_radius=4, locref_std=4, mean=127,
                       std=128, augment_cfg=None, seed=0, repeats=np.array([3, 1, 1]))
    drawn = [src._next_index() for _ in range(10)]  # two passes over the pool of 5
    assert sorted(drawn[:5]) == [0, 0, 0, 1, 2] and sorted(drawn[5:]) == [0, 0, 0, 1, 2]


def test_train_with_pseudo_labels_from_a_video(trained, tmp_path, capsys):
    from posezoo.cli import main

    data = posezoo.labelled.load_labelled(trained.label)
    video = _labelled_video(tmp_path / "unlabelled.mp4", data, range(6))
    info = ModelInfo(name="test_mouse", version="0.0.3", skeleton=SKELETON, flip_pairs=FLIP)
    from posezoo.training.pseudo import PseudoLabelSpec

    lines = []
    card = train_model(trained.label, info, tmp_path / "catalog", cfg=dataclasses.replace(TINY_CFG, steps=2),
                       test=["img0005*"], init=str(trained.card_path), workdir=tmp_path / "work", progress=False,
                       log=lines.append, pseudo=PseudoLabelSpec(str(video), "posezoo_mouse@1.1.0", n_frames=6))
    rec = card.training["pseudo_labels"]
    assert rec["video"] == "unlabelled.mp4" and rec["teacher"] == "posezoo_mouse@1.1.0" and rec["frames"] == 6
    assert rec["labelled_repeats"] == 1 and rec["min_likelihood"] == 0.6
    assert any("6 pseudo-labelled frames" in line for line in lines), lines
    assert card.training["split"]["test"] == ["img0005.png"] and card.metrics["test"]["overall"]["n"] == 4
    # the CLI: a teacher is needed
    assert main(["train", str(trained.label), "--name", "m", "--store", str(tmp_path / "unused"),
                 "--pseudo-video", str(video), "--no-progress"]) == 1
    assert "--pseudo-teacher" in capsys.readouterr().err and not (tmp_path / "unused").exists()
