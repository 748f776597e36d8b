"""The outputs for other tools, each read back with an independent library: NWB (pynwb +
ndx-pose, and movement), SLEAP .slp (sleap-io), JSON (skeleton, colours, no absolute paths),
Parquet (pyarrow: keypoints in model order, a time column). Real predictions of the bundled
model on the real openfield video."""

from __future__ import annotations

import json

import numpy as np
import pytest

import posezoo
from posezoo.table import PoseTable


@pytest.fixture(scope="module")
def table(openfield_video) -> PoseTable:
    predictor = posezoo.load("posezoo_mouse", device="cpu", threads=2)
    return predictor.predict_video(str(openfield_video), max_frames=40, progress=False)


@pytest.fixture(scope="module")
def two_animals(table) -> PoseTable:
    """The same poses as two individuals (the second shifted), with NaN gaps."""
    data = np.concatenate([table.data, table.data + np.array([5.0, 7.0, 0.0], np.float32)], axis=1)
    data[3, 1] = np.nan
    return PoseTable(data, table.keypoints, ("animal0", "animal1"), table.scorer, table.metadata,
                     skeleton=table.skeleton)


def test_nwb_reads_back_with_pynwb_and_movement(table, tmp_path):
    from movement.io import load_poses
    from pynwb import NWBHDF5IO

    path = table.save(tmp_path, ["nwb"], stem="m3v1mp4")["nwb"]
    with NWBHDF5IO(str(path), mode="r") as io:
        nwb = io.read()
        pe = nwb.processing["behavior"]["PoseEstimation"]
        # NWB containers keep their series by name; the skeleton's nodes keep the model's order
        assert set(pe.pose_estimation_series) == set(table.keypoints) and list(pe.skeleton.nodes[:]) == list(table.keypoints)
        assert pe.source_software == "posezoo" and pe.scorer == table.scorer
        assert list(pe.source_video.external_file[:]) == ["m3v1mp4.mp4"]
        assert list(pe.source_video.dimension[:]) == [640, 480]
        edges = [(pe.skeleton.nodes[a], pe.skeleton.nodes[b]) for a, b in pe.skeleton.edges[:]]
        assert edges == list(table.skeleton) and len(edges) == 4
        snout = pe.pose_estimation_series["snout"]
        np.testing.assert_allclose(snout.data[:], table.data[:, 0, 0, :2], rtol=1e-6)
        np.testing.assert_allclose(snout.confidence[:], table.data[:, 0, 0, 2], rtol=1e-6)
        assert snout.rate == pytest.approx(table.metadata["video"]["fps"])
    ds = load_poses.from_nwb_file(path)
    assert ds.sizes["time"] == 40 and set(ds.keypoints.values) == set(table.keypoints)
    assert list(ds.individuals.values) == ["animal0"]
    got = ds.position.sel(keypoints="snout", individuals="animal0").values  # (time, space)
    np.testing.assert_allclose(got, table.data[:, 0, 0, :2], rtol=1e-6)


def test_nwb_multi_animal_has_a_pose_estimation_per_animal(two_animals, tmp_path):
    from movement.io import load_poses

    path = two_animals.to_nwb(tmp_path / "two.nwb")
    for j, name in enumerate(two_animals.individuals):
        ds = load_poses.from_nwb_file(path, pose_estimation_key=f"PoseEstimation_{name}")
        got = ds.position.sel(keypoints="tailbase").values[:, :, 0]
        np.testing.assert_allclose(got, two_animals.data[:, j, 3, :2], rtol=1e-6, equal_nan=True)


def test_slp_reads_back_with_sleap_io_every_frame(two_animals, tmp_path):
    import sleap_io as sio

    path = two_animals.save(tmp_path, ["slp"], stem="m3v1mp4")["slp"]
    labels = sio.load_slp(str(path))
    assert len(labels) == 40 and [lf.frame_idx for lf in labels] == list(range(40))
    assert labels.skeleton.node_names == list(two_animals.keypoints)
    assert [(e.source.name, e.destination.name) for e in labels.skeleton.edges] == list(two_animals.skeleton)
    assert [t.name for t in labels.tracks] == ["animal0", "animal1"]
    assert labels.video.filename == "m3v1mp4.mp4"
    arr = labels.numpy()  # (frames, tracks, nodes, 2)
    np.testing.assert_allclose(arr, two_animals.data[..., :2], rtol=1e-6, equal_nan=True)
    inst = labels[5].instances[0]
    np.testing.assert_allclose(inst.numpy(scores=True)[:, 2], two_animals.data[5, 0, :, 2], rtol=1e-6)


def test_json_has_skeleton_colours_and_no_absolute_paths(table, tmp_path):
    path = table.save(tmp_path, ["json"], stem="m3v1mp4")["json"]
    text = path.read_text()
    doc = json.loads(text)
    assert doc["skeleton"] == [list(e) for e in table.skeleton]
    assert len(doc["colours"]["keypoints"]) == len(table.keypoints)
    assert all(c.startswith("#") and len(c) == 7 for c in doc["colours"]["keypoints"])
    assert doc["metadata"]["video"]["path"] == "m3v1mp4.mp4"
    assert str(tmp_path.parent) not in text and '"/' not in text  # no absolute path anywhere


def test_parquet_keeps_model_order_and_time(table, tmp_path):
    import pyarrow.parquet as pq

    path = table.save(tmp_path, ["parquet"], stem="m3v1mp4")["parquet"]
    df = pq.read_table(path).to_pandas()
    assert list(df.columns) == ["frame", "time", "individual", "keypoint", "x", "y", "likelihood"]
    assert list(df["keypoint"].cat.categories) == list(table.keypoints)  # model order, not alphabetical
    assert list(df["keypoint"].iloc[: len(table.keypoints)]) == list(table.keypoints)
    fps = table.metadata["video"]["fps"]
    np.testing.assert_allclose(df["time"].to_numpy(), df["frame"].to_numpy() / fps)
    assert "/" not in json.loads(pq.read_schema(path).metadata[b"posezoo"])["video"]["path"]


def test_predict_cli_writes_nwb_and_slp(openfield_video, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "-m", "posezoo", "predict", str(openfield_video), "--model",
                          "posezoo_mouse", "--format", "nwb,slp", "--max-frames", "10", "--out", str(tmp_path),
                          "--no-progress", "--device", "cpu"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert {p.suffix for p in tmp_path.iterdir()} >= {".nwb", ".slp"}
