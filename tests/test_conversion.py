"""Conversion of DeepLabCut 3 SuperAnimal checkpoints to ONNX, parity with DeepLabCut on real
openfield frames, publishing into a (test) Hugging Face cache, and top-down inference.

The real checkpoints cannot be downloaded here: the checkpoints are built in exactly
DeepLabCut's format from DeepLabCut's own model definitions with random weights
(``conversion.testing``: BatchNorm calibrated on real frames, detector biased towards
"animal"). So parity is numerical (ONNX Runtime + posezoo's decoder vs DeepLabCut's PyTorch
forward pass and predictor) and the video run is a mechanics test, never an accuracy test.

Each architecture is converted once per session (module-scoped fixtures): topviewmouse
HRNet-w32 + Faster R-CNN MobileNet-v3 (the converted mouse card then names that detector),
quadruped HRNet-w32, ResNet-50 and Faster R-CNN ResNet-50-FPN-v2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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

from conftest import OPENFIELD_VIDEO, REPO, dlc_crops, labelled_mice, make_hf_cache  # noqa: E402
from conversion import superanimal as sa  # noqa: E402
from conversion import testing as st  # noqa: E402
from posezoo import Zoo  # noqa: E402
from posezoo.topdown import BoxDetector, CropPoseModel, TopDownPredictor, crop_regions, estimate_poses  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
MOUSE_DET = "fasterrcnn_mobilenet_v3_large_fpn"
QUAD_DET = "fasterrcnn_resnet50_fpn_v2"


# -- real data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, list[np.ndarray]]:
    """8 labelled openfield frames and a box around each mouse's labelled keypoints."""
    return labelled_mice(8)


@pytest.fixture(scope="module")
def crops(labelled) -> np.ndarray:
    """DeepLabCut's own 256x256 crops of the labelled mice (uint8 RGB)."""
    return dlc_crops(*labelled)


# -- checkpoints and conversion (each architecture once) -------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("superanimal")


@pytest.fixture(scope="module")
def checkpoints(work, labelled, crops) -> dict[tuple[str, str], Path]:
    frames = labelled[0]
    ck = work / "checkpoints"
    return {
        ("topviewmouse", "hrnet_w32"): st.random_pose_checkpoint(
            "topviewmouse", "hrnet_w32", ck / sa.checkpoint_filename("topviewmouse", "hrnet_w32"), crops),
        ("quadruped", "hrnet_w32"): st.random_pose_checkpoint(
            "quadruped", "hrnet_w32", ck / sa.checkpoint_filename("quadruped", "hrnet_w32"), crops, seed=1),
        ("quadruped", "resnet_50"): st.random_pose_checkpoint(
            "quadruped", "resnet_50", ck / sa.checkpoint_filename("quadruped", "resnet_50"), crops),
        ("topviewmouse", MOUSE_DET): st.random_detector_checkpoint(
            "topviewmouse", MOUSE_DET, ck / sa.checkpoint_filename("topviewmouse", MOUSE_DET), frames[:1]),
        ("quadruped", QUAD_DET): st.random_detector_checkpoint(
            "quadruped", QUAD_DET, ck / sa.checkpoint_filename("quadruped", QUAD_DET), frames[:1]),
    }


@pytest.fixture(scope="module")
def converted(work, checkpoints) -> Path:
    """A local catalog with every converted model, written through the conversion CLI's code path."""
    out = work / "converted"
    sa.convert("topviewmouse", "hrnet_w32", MOUSE_DET, out, pose_checkpoint=checkpoints["topviewmouse", "hrnet_w32"],
               detector_checkpoint=checkpoints["topviewmouse", MOUSE_DET], verify=False)
    sa.convert("quadruped", "hrnet_w32", QUAD_DET, out, pose_checkpoint=checkpoints["quadruped", "hrnet_w32"],
               detector_checkpoint=checkpoints["quadruped", QUAD_DET], verify=False)
    sa.convert_pose("quadruped", "resnet_50", QUAD_DET, out, checkpoint=checkpoints["quadruped", "resnet_50"],
                    verify=False)
    return out


def _torch_pose(dataset, arch, checkpoints):
    return sa.load_checkpoint(sa.build_pose_model(dataset, arch), checkpoints[dataset, arch])


def _entry(converted: Path, name: str):
    zoo = Zoo([converted], include_bundled=False)
    return zoo.resolve(name)


# -- conversion -----------------------------------------------------------------------------------
def test_converted_cards_describe_deeplabcut(converted):
    zoo = Zoo([converted], include_bundled=False)
    names = {c.name for c in zoo.cards()}
    assert names == {"superanimal_topviewmouse", "superanimal_quadruped", "superanimal_quadruped_resnet_50",
                     f"superanimal_topviewmouse_{MOUSE_DET}", f"superanimal_quadruped_{QUAD_DET}"}
    mouse, quad, r50 = (zoo.card(n) for n in ("superanimal_topviewmouse", "superanimal_quadruped",
                                               "superanimal_quadruped_resnet_50"))
    assert mouse.keypoints == sa.keypoints("topviewmouse") and mouse.n_keypoints == 27
    assert quad.keypoints == sa.keypoints("quadruped") and quad.n_keypoints == 39
    assert mouse.detector == f"superanimal_topviewmouse_{MOUSE_DET}@1.0.0" and quad.detector.startswith(
        f"superanimal_quadruped_{QUAD_DET}")
    assert mouse.outputs.stride == 4 and not mouse.outputs.locref and mouse.outputs.clip_scores
    assert r50.outputs.stride == 8 and r50.outputs.locref == "locref" and r50.outputs.nominal_stride
    assert mouse.input.size == (256, 256) and mouse.input.mean == sa.IMAGENET_MEAN
    det = zoo.card(mouse.detector)
    assert det.task == "detector" and det.detection.score_threshold == 0.6 and det.detection.graph_min_size == 800
    for card in zoo.cards():
        assert card.artefact.published and card.upstream.repo_id.startswith("mwmathis/")
        assert zoo.resolve(card.name).path.stat().st_size == card.artefact.bytes


def test_bundled_catalog_matches_conversion():
    """The catalog's unpublished cards say what the converter writes (only the artefact differs)."""
    zoo = Zoo(include_bundled=True)
    for dataset in sa.DATASETS:  # every pose model and detector DeepLabCut publishes (bird, RTMPose, SSDLite...)
        pose_models, detectors = sa.UPSTREAM_ARCHS[dataset]
        for arch in pose_models:
            want = sa.pose_card(dataset, arch, sa.default_detector(dataset, arch))
            have = zoo.card(want.name)
            assert have.model_dump(exclude={"artefact", "upstream"}) == want.model_dump(exclude={"artefact", "upstream"})
        for det in detectors:
            want = sa.detector_card(dataset, det)
            assert zoo.card(want.name).model_dump(exclude={"artefact", "upstream"}) == want.model_dump(
                exclude={"artefact", "upstream"})


# -- parity on real frames ------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,arch", [("topviewmouse", "hrnet_w32"), ("quadruped", "hrnet_w32"),
                                          ("quadruped", "resnet_50")])
def test_heatmaps_match_pytorch_on_real_crops(dataset, arch, checkpoints, converted, crops):
    model = _torch_pose(dataset, arch, checkpoints)
    x = st.normalise(crops)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))["bodypart"]
    resolved = _entry(converted, sa.card_name(dataset, arch))
    pose = CropPoseModel(resolved.card, resolved.path, device="cpu")
    got = pose.raw(crops)
    hm_ref, hm = ref["heatmap"].numpy(), got["heatmaps"]
    assert hm.shape == hm_ref.shape
    err = sa.relative_max_diff(hm, hm_ref)
    assert err <= 1e-4, f"{arch}: relative max difference {err:.2e}"
    n, k = hm.shape[:2]
    assert np.array_equal(hm.reshape(n, k, -1).argmax(-1), hm_ref.reshape(n, k, -1).argmax(-1))
    if arch == "resnet_50":
        assert sa.relative_max_diff(got["locref"], ref["locref"].numpy()) <= 1e-4
    # the heatmaps are not degenerate (BatchNorm calibrated): the argmax moves between crops
    assert len({tuple(r) for r in hm.reshape(n, k, -1).argmax(-1).tolist()}) > 1


def test_crops_are_deeplabcuts(labelled, crops):
    from deeplabcut.pose_estimation_pytorch.data.image import top_down_crop

    from posezoo.topdown import make_crops, xyxy_to_xywh

    frames, boxes = labelled
    h, w = frames.shape[1:3]
    tricky = np.array([[-40.3, -10.5, 90.5, 60.5], [600.5, 400.2, 700.7, 530.1], [100.5, 100.5, 300.5, 140.5],
                       [10.0, 20.0, 11.0, 400.0]], np.float32)
    for f, b in zip(frames[:2], boxes[:2]):
        bb = np.concatenate([b, tricky])
        reg = crop_regions(xyxy_to_xywh(bb), (256, 256), (w, h))
        mine = make_crops(f, reg, (256, 256))
        for i, xywh in enumerate(xyxy_to_xywh(bb)):
            ref, offset, scale = top_down_crop(f, xywh, (256, 256))
            assert np.array_equal(mine[i], ref)
            assert tuple(reg["offset"][i]) == tuple(float(v) for v in offset)
            assert np.allclose(reg["scale"][i], scale, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dataset,arch", [("topviewmouse", "hrnet_w32"), ("quadruped", "resnet_50")])
def test_keypoints_match_deeplabcut_predictor(dataset, arch, checkpoints, converted, labelled):
    from conversion.bench import dlc_pose_runner, dlc_poses

    frames, boxes = labelled
    runner = dlc_pose_runner(dataset, arch, checkpoints[dataset, arch], max_individuals=1, batch_size=8)
    ref = np.concatenate(dlc_poses(runner, list(frames), boxes))
    resolved = _entry(converted, sa.card_name(dataset, arch))
    pose = CropPoseModel(resolved.card, resolved.path, device="cpu")
    got = np.concatenate(estimate_poses(pose, frames, boxes))
    assert got.shape == ref.shape == (len(frames), resolved.card.n_keypoints, 3)
    assert np.abs(got[..., :2] - ref[..., :2]).max() <= 0.1
    assert np.abs(got[..., 2] - ref[..., 2]).max() <= 1e-4
    assert ((got[..., 2] >= 0) & (got[..., 2] <= 1)).all()  # clip_scores


@pytest.mark.parametrize("dataset,det", [("topviewmouse", MOUSE_DET), ("quadruped", QUAD_DET)])
def test_detector_boxes_match_deeplabcut(dataset, det, checkpoints, converted, labelled):
    from conversion.bench import dlc_detector_runner

    frames = labelled[0][: 2 if det == MOUSE_DET else 1]  # ResNet-50-FPN at 800x1066 is slow on a CPU
    runner = dlc_detector_runner(dataset, det, checkpoints[dataset, det], max_individuals=10)
    ref = runner.inference(list(frames))
    resolved = _entry(converted, sa.card_name(dataset, det))
    detector = BoxDetector(resolved.card, resolved.path, device="cpu", max_individuals=10)
    for f, r in zip(frames, ref):
        boxes, scores = detector.detect(f)
        rb = np.asarray(r["bboxes"], np.float32)
        rb = np.concatenate([rb[:, :2], rb[:, :2] + rb[:, 2:]], axis=1)  # DLC returns COCO xywh
        assert len(boxes) == len(rb) == 10
        assert np.abs(boxes - rb).max() <= 0.5
        assert np.abs(scores - np.asarray(r["bbox_scores"])).max() <= 1e-3


def test_fp16_pose_model_deviation(converted, work, labelled):
    """float16 weights (for GPUs): the keypoint deviation from float32 is measured (with random
    weights the heatmaps are flat, so a few argmaxes flip: only the median is bounded)."""
    resolved = _entry(converted, "superanimal_topviewmouse")
    f16 = sa.to_fp16(resolved.path, work / "fp16.onnx")
    frames, boxes = labelled
    p32 = CropPoseModel(resolved.card, resolved.path, device="cpu")
    p16 = CropPoseModel(resolved.card, f16, device="cpu")
    a = np.concatenate(estimate_poses(p32, frames, boxes))
    b = np.concatenate(estimate_poses(p16, frames, boxes))
    dev = np.abs(a[..., :2] - b[..., :2])
    print(f"\nfp16 keypoint deviation: median {np.median(dev):.3f} px, 90th percentile "
          f"{np.percentile(dev, 90):.3f} px, max {dev.max():.3f} px")
    assert np.median(dev) <= 4.0


# -- publishing and the zoo -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def published(converted, work) -> tuple[Path, Path]:
    """Converted models published to hf://posezoo-test/zoo (laid out locally) and a Hub cache of it."""
    from conversion.publish import publish

    catalog = work / "catalog"
    layout = work / "hf-repo"
    cards = publish(converted, "hf://posezoo-test/zoo", catalog=catalog, layout_dir=layout, upload=False,
                    revision=COMMIT)
    assert {c.artefact.revision for c in cards} == {COMMIT}
    files = {p.relative_to(layout).as_posix(): p for p in layout.rglob("*") if p.is_file()}
    cache = make_hf_cache(work / "hf-cache", "posezoo-test/zoo", COMMIT, files)
    return catalog, cache


def test_dog_horse_mouse_resolve_to_converted_artefacts_in_hub_cache(published, converted, monkeypatch):
    catalog, cache = published
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    zoo = Zoo([catalog], include_bundled=False, hf_cache_dir=cache)
    for alias, name in (("dog", "superanimal_quadruped"), ("horse", "superanimal_quadruped"),
                        ("mouse", "superanimal_topviewmouse")):
        resolved = zoo.resolve(alias)
        assert resolved.card.name == name and resolved.source == f"hf://posezoo-test/zoo@{COMMIT}"
        assert resolved.path.read_bytes() == (converted / name / "1.0.0" / resolved.card.artefact.filename).read_bytes()
        det = zoo.resolve(resolved.card.detector)
        assert det.card.task == "detector" and det.source.startswith("hf://posezoo-test/zoo")
    # the published cards are the bundled catalog's entries with sha256 and revision filled in
    for card in zoo.cards():
        assert card.artefact.sha256 and card.artefact.revision == COMMIT and card.artefact.locations == [
            "hf://posezoo-test/zoo"]


def test_publish_to_s3(s3, converted, tmp_path, monkeypatch):
    from conversion.publish import publish

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "one"
    name = f"superanimal_topviewmouse_{MOUSE_DET}"
    (src / name).mkdir(parents=True)
    os.symlink(converted / name / "1.0.0", src / name / "1.0.0")
    cards = publish(src, f"s3://{s3.bucket}/superanimal", catalog=tmp_path / "catalog")
    assert cards[0].artefact.locations == [f"s3://{s3.bucket}/superanimal"] and cards[0].artefact.revision is None
    zoo = Zoo([tmp_path / "catalog"], include_bundled=False, cache_dir=tmp_path / "cache")
    assert zoo.resolve(name).source == f"s3://{s3.bucket}/superanimal/{cards[0].artefact.filename}"
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="superanimal/")["Contents"]}
    assert f"superanimal/cards/{name}/1.0.0/card.yaml" in keys


def test_zoo_pull_converts_unpublished_model(checkpoints, tmp_path, monkeypatch):
    """`posezoo zoo pull` of an unpublished model: fetch DeepLabCut's checkpoints (the test
    checkpoints stand in for hf_hub_download), convert, verify, cache; then resolve finds them."""
    import huggingface_hub

    from posezoo.cli import main

    files = {  # the detector architecture does not depend on the dataset: reuse the quadruped one
        "superanimal_topviewmouse_hrnet_w32.pt": checkpoints["topviewmouse", "hrnet_w32"],
        f"superanimal_topviewmouse_{QUAD_DET}.pt": checkpoints["quadruped", QUAD_DET],
    }
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(files[filename])

    monkeypatch.setenv("POSEZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("posezoo.zoo._default_zoo", None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main(["zoo", "pull", "mouse"]) == 0
    assert {r for r, _ in calls} == {"mwmathis/DeepLabCutModelZoo-SuperAnimal-TopViewMouse"} and len(calls) == 2
    zoo = Zoo(cache_dir=tmp_path / "cache")
    resolved = zoo.resolve("superanimal_topviewmouse")
    assert resolved.path.is_relative_to(tmp_path / "cache" / "converted")
    assert zoo.resolve(resolved.card.detector).card.task == "detector"
    assert main(["zoo", "pull", "mouse"]) == 0 and len(calls) == 2  # cached: nothing fetched again


def test_zoo_pull_without_network_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "POSEZOO_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "posezoo", "zoo", "pull", "dog"], env=env, capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot fetch the upstream checkpoint hf://mwmathis/DeepLabCutModelZoo-SuperAnimal-Quadruped" in out.stderr


# -- top-down inference ---------------------------------------------------------------------------
def test_top_down_predictor_images(converted, labelled):
    import posezoo

    predictor = posezoo.load(str(converted / "superanimal_topviewmouse" / "1.0.0" / "card.yaml"), device="cpu",
                             zoo=Zoo([converted], include_bundled=False))
    assert isinstance(predictor, TopDownPredictor)
    out = predictor.predict_images(labelled[0][:2], max_individuals=3)
    assert out.shape == (2, 3, 27, 3) and np.isfinite(out).all()


def test_predict_cli_top_down_on_openfield_video(converted, tmp_path):
    """Mechanics only (random weights): top-down over the real openfield video, multi-animal h5
    that movement loads, identities from the tracker, detector every N frames."""
    from movement.io import load_poses

    env = {**os.environ, "POSEZOO_CATALOG": str(converted), "POSEZOO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "posezoo", "predict", str(OPENFIELD_VIDEO), "--model", "superanimal_topviewmouse",
           "--out", str(tmp_path), "--format", "h5,csv", "--device", "cpu", "--max-frames", "24",
           "--detector-every", "4", "--max-individuals", "3", "--no-progress"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    stem = f"m3v1mp4_superanimal_topviewmouse_hrnet_w32_{MOUSE_DET}"  # as deeplabcut.video_inference_superanimal
    h5 = tmp_path / f"{stem}.h5"
    ds = load_poses.from_dlc_file(h5, fps=30)
    assert ds.sizes["time"] == 24 and ds.sizes["keypoints"] == 27 and 1 <= ds.sizes["individuals"] <= 3
    assert list(ds.individuals.values) == [f"animal{i}" for i in range(ds.sizes["individuals"])]
    meta = json.loads((tmp_path / f"{stem}.meta.json").read_text())
    assert meta["top_down"]["detector_every"] == 4 and meta["timings"]["detector_runs"] == 6
    assert meta["detector"]["name"] == f"superanimal_topviewmouse_{MOUSE_DET}"
    assert np.isfinite(ds.position.values).any()


def test_bench_top_down_reports_crops_and_frames(converted, tmp_path):
    """`posezoo bench` on a top-down model: crops/s, detector frames/s, end-to-end frames/s for the
    detector every frame and every 10th (random weights: speed only)."""
    env = {**os.environ, "POSEZOO_CATALOG": str(converted), "POSEZOO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "posezoo", "bench", "--model", "mouse", "--video", str(OPENFIELD_VIDEO),
           "--frames", "4", "--device", "cpu", "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["pose_model_only_crops_per_s"] > 0 and r["pose_stage_crops_per_s"] > 0 and r["detector_frames_per_s"] > 0
    assert [e["detector_every"] for e in r["end_to_end"]] == [1, 10]
    assert all(e["frames_per_s"] > 0 for e in r["end_to_end"])


def test_top_down_jobs_through_the_service(converted, tmp_path_factory, tmp_path):
    """A converted SuperAnimal model through a real `bentoml serve`: listed as ready, top-down options
    refused for single-animal models before the 202, a video job with a labelled video whose h5
    movement loads with several identities, and the image endpoint answering every animal."""
    import av
    import httpx
    from movement.io import load_poses

    from test_service import assert_error, auth, key_env, start_server, wait_job

    clip = tmp_path / "clip.mp4"
    with av.open(str(OPENFIELD_VIDEO)) as src, av.open(str(clip), "w") as dst:
        out = dst.add_stream("libx264", rate=30)
        for i, frame in enumerate(src.decode(video=0)):
            if i == 0:
                out.width, out.height, out.pix_fmt = frame.width, frame.height, "yuv420p"
                first = frame.to_ndarray(format="bgr24")
            for packet in out.encode(frame.reformat(format="yuv420p")):
                dst.mux(packet)
            if i == 23:
                break
        for packet in out.encode():
            dst.mux(packet)
    d = tmp_path_factory.mktemp("service-top-down")
    srv = start_server(d / "data", {**key_env(workers=1, threads=2, finetune_threads=2, max_finetune_steps=50),
                                    "POSEZOO_CATALOG": str(converted),
                                    "POSEZOO_CACHE": str(d / "cache")})
    try:
        url = f"{srv.url}/v1"
        models = {m["name"]: m for m in httpx.get(f"{url}/models", headers=auth()).json()}
        assert models["superanimal_topviewmouse"]["ready"] and models["superanimal_topviewmouse"]["task"] == "top_down"
        assert not any(m["ready"] for m in models.values() if m["task"] == "detector")
        assert_error(httpx.post(f"{url}/jobs?max_individuals=2&filename=c.mp4", headers=auth(), content=clip.read_bytes()),
                     422, "bad_options", "top-down")
        r = httpx.post(f"{url}/jobs", headers=auth(), content=clip.read_bytes(), params={
            "model": "superanimal_topviewmouse", "max_individuals": 3, "detector_every": 4, "bbox_threshold": 0.5,
            "labeled_video": "true", "draw_boxes": "true", "formats": "h5,json", "filename": "clip.mp4"})
        assert r.status_code == 202, r.text
        job = wait_job(srv, r.json()["id"], timeout=600)
        assert job["status"] == "succeeded", job
        assert job["progress"]["frames_total"] == 24 and job["n_frames"] == 24
        h5 = tmp_path / "clip.h5"
        h5.write_bytes(httpx.get(f"{srv.url}{job['results']['h5']}", headers=auth()).content)
        ds = load_poses.from_dlc_file(h5, fps=30)
        assert ds.sizes["time"] == 24 and ds.sizes["keypoints"] == 27 and 1 <= ds.sizes["individuals"] <= 3
        meta = httpx.get(f"{srv.url}{job['results']['meta']}", headers=auth()).json()
        assert meta["top_down"]["detector_every"] == 4 and meta["top_down"]["bbox_threshold"] == 0.5
        assert meta["detector"]["source"].startswith("local:") and "/" not in meta["detector"]["source"]
        frames = httpx.get(f"{srv.url}{job['results']['json']}", headers=auth()).json()["frames"]
        assert len(frames) == 24
        for i, f in enumerate(frames):  # per frame and animal: x1, y1, x2, y2 and the detector's score
            for animal, box in f["boxes"].items():
                if box is not None:
                    assert len(box) == 5 and box[0] < box[2] and box[1] < box[3]
                    assert (box[4] is not None) == (i % 4 == 0), (i, box)  # carried boxes have no score
        assert any(b is not None for b in frames[0]["boxes"].values())
        video = tmp_path / "labeled.mp4"
        video.write_bytes(httpx.get(f"{srv.url}{job['results']['video']}", headers=auth()).content)
        with av.open(str(video)) as c:
            assert sum(1 for _ in c.decode(video=0)) == 24
        ok, png = cv2.imencode(".png", first)
        doc = httpx.post(f"{url}/predict/image?model=superanimal_topviewmouse", headers=auth(),
                         content=png.tobytes(), timeout=120).json()
        assert doc["individuals"] and len(doc["individuals"][0]["keypoints"]) == 27, doc
        assert doc["keypoints"] == doc["individuals"][0]["keypoints"]

        # a fine-tune job from the top-down base: real openfield labels under SuperAnimal's names
        # train a new pose network on crops of each labelled mouse, for the base's detector
        import zipfile

        from test_labelled import make_copy

        label = make_copy(tmp_path / "ft", range(6))
        names = {"snout": "nose", "leftear": "left_ear", "rightear": "right_ear", "tailbase": "tail_base"}
        lines = label.read_text().splitlines()
        lines[1] = ",".join(names.get(c, c) for c in lines[1].split(","))
        label.write_text("\n".join(lines) + "\n")
        zpath = tmp_path / "ft.zip"
        with zipfile.ZipFile(zpath, "w") as z:
            for f in sorted(label.parent.iterdir()):
                z.write(f, f"labeled-data/m4s1/{f.name}")
        r = httpx.post(f"{url}/finetune", headers={**auth(), "Content-Type": "application/zip"},
                       params={"base_model": "superanimal_topviewmouse", "steps": 3, "batch_size": 2,
                               "head_width": 16, "name": "mouse-td"}, content=zpath.read_bytes(), timeout=60)
        assert r.status_code == 202, r.text
        ft = wait_job(srv, r.json()["id"], timeout=600)
        assert ft["status"] == "succeeded", ft
        ref = ft["output_model"]
        card = httpx.get(f"{url}/models/{ref}", headers=auth()).json()
        assert card["task"] == "top_down" and card["detector"] == f"superanimal_topviewmouse_{MOUSE_DET}@1.0.0"
        # the labelled subset of the base's keypoints, in the base's order
        assert card["input"]["size"] == [256, 256] and card["keypoints"] == ["nose", "left_ear", "right_ear", "tail_base"]
        assert card["training"]["base_model"] == "superanimal_topviewmouse@1.0.0"
        assert ft["metrics"]["test"]["overall"]["mean_px"] is not None
        mine = {m["ref"]: m for m in httpx.get(f"{url}/models", headers=auth()).json()}
        assert mine[ref]["ready"]
        r = httpx.post(f"{url}/jobs", headers=auth(), content=clip.read_bytes(),
                       params={"model": ref, "max_individuals": 2, "formats": "h5", "filename": "clip.mp4"})
        assert r.status_code == 202, r.text
        job = wait_job(srv, r.json()["id"], timeout=600)
        assert job["status"] == "succeeded", job
        h5.write_bytes(httpx.get(f"{srv.url}{job['results']['h5']}", headers=auth()).content)
        ds = load_poses.from_dlc_file(h5, fps=30)
        assert ds.sizes["time"] == 24 and ds.sizes["keypoints"] == 4
    finally:
        srv.stop()
