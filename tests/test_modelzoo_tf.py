"""DeepLabCut's TensorFlow model zoo (primate_face, full_dog, horse_sideview) -> ONNX, checked
against DeepLabCut's own TF forward pass and predictor on real openfield frames.

The real tarballs cannot be downloaded here, so they are made in exactly DeepLabCut 2.x's
layout with DeepLabCut's own TF code (``conversion.testing.random_modelzoo_tarball``:
``PoseNetFactory.create(cfg).test(inputs)``, random weights with BatchNorm calibrated on real
frames, a ``tf.compat.v1.train.Saver`` snapshot). Parity is numerical; the video runs are
mechanics tests, never accuracy tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# not importorskip: TensorFlow must be imported after torch and triton (conversion.modelzoo.import_tensorflow)
if not all(importlib.util.find_spec(m) for m in ("tensorflow", "tf_slim", "deeplabcut")):
    pytest.skip("the TF model-zoo tests need: pip install -e '.[conversion-tf,test]'", allow_module_level=True)

from conftest import OPENFIELD_VIDEO, REPO  # noqa: E402
from conversion import modelzoo as mz  # noqa: E402
from conversion import testing as st  # noqa: E402
from posezoo import Zoo  # noqa: E402
from posezoo.video import iter_frames  # noqa: E402

HORSE = ["Nose", "Eye", "Nearknee", "Nearfrontfetlock", "Nearfrontfoot", "Offknee", "Offfrontfetlock",
         "Offfrontfoot", "Shoulder", "Midshoulder", "Elbow", "Girth", "Wither", "Nearhindhock",
         "Nearhindfetlock", "Nearhindfoot", "Hip", "Stifle", "Offhindhock", "Offhindfetlock", "Offhindfoot",
         "Ischium"]
JOINTS = {
    "horse_sideview": HORSE,
    "full_dog": [f"dog_part{i:02d}" for i in range(24)],
    "primate_face": [f"face_point{i:02d}" for i in range(20)],
}
SKELETON = {"horse_sideview": [("Nose", "Eye"), ("Shoulder", "Elbow"), ("Hip", "Stifle")]}
LICENCE = {"full_dog": "CC-BY-NC-4.0 (test tarball)"}
SPECIES = {"horse_sideview": "horse", "full_dog": "dog", "primate_face": "primate"}


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Three real openfield frames, RGB (3, 480, 640, 3)."""
    return np.stack(list(iter_frames(OPENFIELD_VIDEO, colour_order="RGB", max_frames=300)))[[0, 150, 299]]


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory, frames) -> dict[str, Path]:
    import cv2

    work = tmp_path_factory.mktemp("modelzoo")
    calibration = np.stack([cv2.resize(f, (320, 240), interpolation=cv2.INTER_AREA) for f in frames[:2]])
    cards = Zoo().cards()
    out = {}
    for seed, name in enumerate(JOINTS):
        filename = next(c.upstream.filename for c in cards if c.name == name)
        out[name] = st.random_modelzoo_tarball(work / filename, JOINTS[name], calibration, seed=seed,
                                               skeleton=SKELETON.get(name), licence=LICENCE.get(name))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tarballs) -> Path:
    """A catalog with the three converted models, through `python -m conversion modelzoo`'s code."""
    out = tmp_path_factory.mktemp("modelzoo-converted")
    for name, tarball in tarballs.items():
        mz.convert(name, tarball, out)
    return out


@pytest.fixture(scope="module")
def dlc(tarballs, tmp_path_factory):
    """DeepLabCut's TF predictor per model (setup_pose_prediction on the unpacked tarball)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = mz.DlcTfPredictor(mz.open_tarball(tarballs[name], tmp_path_factory.mktemp(name)))
        return made[name]

    yield get
    for p in made.values():
        p.close()


def _inputs(frames) -> list[np.ndarray]:
    """The real frames, and one cropped to an odd size (TF's asymmetric SAME padding)."""
    return [*frames, np.ascontiguousarray(frames[1][3:480, 5:640])]


# -- the tarball and the card ---------------------------------------------------------------------
def test_tarball_is_deeplabcuts_layout(tarballs):
    import tarfile

    with tarfile.open(tarballs["primate_face"]) as tar:
        names = sorted(Path(m.name).name for m in tar.getmembers() if m.isfile())
    assert names == ["pose_cfg.yaml", "snapshot-1030000.data-00000-of-00001", "snapshot-1030000.index",
                     "snapshot-1030000.meta"]


def test_cards_come_from_the_tarball(converted):
    zoo = Zoo([converted], include_bundled=False)
    for name, joints in JOINTS.items():
        r = zoo.resolve(name)
        c = r.card
        assert c.keypoints == joints and c.task == "single_animal" and c.decoder == "heatmap_argmax_locref"
        assert c.input.size == "any" and c.input.pad_to == 1 and c.input.mean == (123.68, 116.779, 103.939)
        assert c.outputs.stride == 8.0 and c.outputs.nominal_stride and c.outputs.heatmap_activation == "sigmoid"
        assert c.artefact.locations == ["local"] and r.path.stat().st_size == c.artefact.bytes
        assert "relative max difference" in c.upstream.notes and SPECIES[name] in c.species
    assert [tuple(p) for p in zoo.card("horse_sideview").skeleton] == SKELETON["horse_sideview"]
    assert zoo.card("full_dog").licence == LICENCE["full_dog"]
    assert zoo.card("primate_face").licence == Zoo().card("primate_face").licence  # none in the tarball


def test_not_ready_message_names_the_tf_extra():
    zoo = Zoo(include_bundled=True)
    msg = zoo.how_to_get(zoo.card("full_cat"))
    assert "pip install 'posezoo[conversion-tf]' && posezoo zoo pull full_cat" in msg


def test_a_non_resnet_checkpoint_is_refused(tmp_path):
    with pytest.raises(mz.ConversionError, match="resnet_v1"):
        mz.build_onnx({"MobilenetV2/Conv/weights": np.zeros((3, 3, 3, 32), np.float32)}, 4)


# -- parity with DeepLabCut's TF code -------------------------------------------------------------
@pytest.mark.parametrize("name", list(JOINTS))
def test_scoremaps_match_deeplabcut_tf_on_real_frames(name, converted, dlc, frames):
    onnx_path = Zoo([converted], include_bundled=False).resolve(name).path
    k = len(JOINTS[name])
    for frame in _inputs(frames):
        ref, ref_locref = dlc(name).scoremaps(frame)  # (h, w, K), (h, w, K, 2) in pixels
        got, locref = mz.onnx_scoremaps(onnx_path, frame[None], (123.68, 116.779, 103.939))
        got = got[0].transpose(1, 2, 0)
        assert got.shape == ref.shape == (-(-frame.shape[0] // 8), -(-frame.shape[1] // 8), k)
        assert mz.relative_max_diff(got, ref) <= 1e-4
        assert (got.reshape(-1, k).argmax(0) == ref.reshape(-1, k).argmax(0)).all()
        lr = locref[0].transpose(1, 2, 0).reshape(*got.shape[:2], k, 2) * 7.2801
        assert mz.relative_max_diff(lr, ref_locref) <= 1e-4


@pytest.mark.parametrize("name", list(JOINTS))
def test_keypoints_match_deeplabcut_predictor(name, converted, dlc, frames):
    import posezoo

    predictor = posezoo.load(name, device="cpu", zoo=Zoo([converted], include_bundled=False))
    for frame in _inputs(frames):
        ref = dlc(name).pose(frame)  # (K, 3): DeepLabCut's getpose
        got = predictor.predict_images(frame[None])[0, 0]
        assert np.abs(got[:, :2] - ref[:, :2]).max() <= 0.1
        assert np.abs(got[:, 2] - ref[:, 2]).max() <= 1e-4


# -- the zoo and the CLI --------------------------------------------------------------------------
def test_zoo_pull_converts_a_model_zoo_tarball(tarballs, tmp_path, monkeypatch):
    """`posezoo zoo pull primate_face`: the tarball (standing in for hf_hub_download) is
    converted, verified against DeepLabCut's TF predictor and cached; resolve then finds it."""
    import huggingface_hub

    from posezoo.cli import main

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        assert filename == tarballs["primate_face"].name
        return str(tarballs["primate_face"])

    monkeypatch.setenv("POSEZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("posezoo.zoo._default_zoo", None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert main(["zoo", "pull", "primate_face"]) == 0
    assert calls == [("mwmathis/DeepLabCutModelZoo-primate_face", tarballs["primate_face"].name)]
    resolved = Zoo(cache_dir=tmp_path / "cache").resolve("primate_face")
    assert resolved.path.is_relative_to(tmp_path / "cache" / "converted")
    assert resolved.card.keypoints == JOINTS["primate_face"]
    assert main(["zoo", "pull", "primate_face"]) == 0 and len(calls) == 1  # cached


# -- publish-zoo ----------------------------------------------------------------------------------
SA_POSE, SA_DET = "superanimal_topviewmouse_resnet_50", "superanimal_topviewmouse_fasterrcnn_mobilenet_v3_large_fpn"


@pytest.fixture(scope="module")
def published(tmp_path_factory, tarballs, frames, s3):
    """`python -m conversion publish-zoo --to s3://BUCKET/zoo` over a copy of the catalog's TF
    model-zoo entries and a SuperAnimal pose network + detector, from exact-format upstream
    checkpoints (the TF tarballs, random SuperAnimal ``.pt``), into the real SeaweedFS."""
    import shutil

    import cv2
    import yaml

    from conversion import superanimal as sa

    work = tmp_path_factory.mktemp("publish-zoo")
    catalog, ckpts = work / "catalog", work / "checkpoints"
    for name in [*JOINTS, SA_POSE, SA_DET]:
        shutil.copytree(REPO / "models" / name, catalog / name)
    card = catalog / SA_POSE / "1.0.0" / "card.yaml"  # the light detector, to keep the test short
    data = yaml.safe_load(card.read_text())
    data["detector"] = f"{SA_DET}@1.0.0"
    card.write_text(yaml.safe_dump(data, sort_keys=False))
    ckpts.mkdir()
    for tarball in tarballs.values():
        os.link(tarball, ckpts / tarball.name)
    crops = np.stack([cv2.resize(f[100:400, 150:450], (256, 256)) for f in frames])
    st.random_pose_checkpoint("topviewmouse", "resnet_50", ckpts / sa.checkpoint_filename("topviewmouse", "resnet_50"),
                              crops)
    st.random_detector_checkpoint("topviewmouse", "fasterrcnn_mobilenet_v3_large_fpn",
                                  ckpts / sa.checkpoint_filename("topviewmouse", "fasterrcnn_mobilenet_v3_large_fpn"),
                                  frames[:1])
    env = {**os.environ, **s3.env(), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "conversion", "publish-zoo", "--to", f"s3://{s3.bucket}/zoo", "--catalog",
           str(catalog), "--checkpoints", str(ckpts)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("published ") == 5, out.stdout
    return catalog, env, s3


def test_publish_zoo_fills_the_catalog_and_the_bucket(published, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard as HubCard

    catalog, env, s3 = published
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    zoo = Zoo([catalog], include_bundled=False, cache_dir=tmp_path / "cache")
    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="zoo/")["Contents"]}
    for card in zoo.cards():
        assert card.artefact.locations == [f"s3://{s3.bucket}/zoo"] and card.artefact.sha256
        assert f"zoo/{card.artefact.filename}" in keys and f"zoo/cards/{card.name}/1.0.0/card.yaml" in keys
        assert "difference" in card.upstream.notes  # the parity figure of the check against DeepLabCut
    assert zoo.card("primate_face").keypoints == JOINTS["primate_face"]
    readme = s3.client().get_object(Bucket=s3.bucket, Key="zoo/README.md")["Body"].read().decode()
    hub = HubCard(readme)
    assert hub.data.license == "other" and "deeplabcut" in hub.data.tags
    assert "mwmathis/DeepLabCutModelZoo-primate_face" in hub.data.base_model
    models = {m["name"]: m for m in hub.data.to_dict()["posezoo_models"]}
    assert set(models) == {*JOINTS, SA_POSE, SA_DET}
    assert models["horse_sideview"]["keypoints"] == HORSE and "relative max difference" in models["full_dog"]["parity"]
    for name in models:  # every entry resolves from the bucket into a fresh cache, sha256-checked
        assert zoo.resolve(name).source.startswith(f"s3://{s3.bucket}/zoo/")


@pytest.mark.parametrize("species", ["dog", "horse", "primate", "mouse"])
def test_predict_by_species_over_the_real_video(species, published, tmp_path):
    """`posezoo predict VIDEO --species S` with the catalog publish-zoo wrote: the recommended
    ready model (from the S3 bucket; for mouse the bundled model, which ranks first) writes a
    table movement loads."""
    from movement.io import load_poses

    catalog, s3_env, _ = published
    env = {**s3_env, "POSEZOO_CATALOG": str(catalog), "POSEZOO_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "posezoo", "predict", str(OPENFIELD_VIDEO), "--species", species, "--out",
           str(tmp_path), "--format", "h5", "--device", "cpu", "--max-frames", "12", "--no-progress"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    expected = {"dog": "full_dog", "horse": "horse_sideview", "primate": "primate_face", "mouse": "posezoo_mouse"}
    (h5,) = tmp_path.glob("*.h5")
    assert expected[species] in h5.name
    ds = load_poses.from_dlc_file(h5, fps=30)
    assert ds.sizes["time"] == 12 and np.isfinite(ds.position.values).all()
    if species != "mouse":
        assert list(ds.keypoints.values) == JOINTS[expected[species]]


def test_bench_modelzoo_reports_both_runtimes(converted, tarballs):
    cmd = [sys.executable, "-m", "conversion", "bench-modelzoo", "--name", "horse_sideview", "--tarball",
           str(tarballs["horse_sideview"]), "--catalog", str(converted), "--video", str(OPENFIELD_VIDEO),
           "--frames", "4", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["frames"] == 4 and r["deeplabcut_frames_per_s"] > 0 and r["posezoo_frames_per_s"] > 0
    assert r["keypoints_within_0.1px"] == 1.0
