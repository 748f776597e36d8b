import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from posezoo.errors import InputError
from posezoo.filtering import filter_poses, outlier_frames
from posezoo.table import PoseTable


@pytest.fixture()
def table():
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 300, (50, 2, 3, 3)).astype(np.float32)
    data[..., 2] = rng.uniform(0, 1, (50, 2, 3))
    data[7, 1, 2] = np.nan  # a missing point
    return PoseTable(data, ("nose", "left_ear", "tail_base"), ("animal0", "animal1"), "model@1.0",
                     {"video": {"fps": 29.97}, "model": {"name": "model"}})


def test_dataframe_layout_is_deeplabcuts(table):
    df = table.to_dataframe()
    assert df.columns.names == ["scorer", "individuals", "bodyparts", "coords"]
    assert df.shape == (50, 2 * 3 * 3)
    assert list(df.index) == list(range(50)) and pd.api.types.is_integer_dtype(df.index)
    assert df[("model@1.0", "animal1", "left_ear", "likelihood")].iloc[3] == pytest.approx(table.data[3, 1, 1, 2])


def test_h5_and_csv_read_back_like_deeplabcut_does(table, tmp_path):
    paths = table.save(tmp_path, ["h5", "csv"], stem="vid")
    df_h5 = pd.read_hdf(paths["h5"])  # DeepLabCut reads without naming the key: only one key exists
    with pd.HDFStore(paths["h5"], "r") as store:
        assert store.keys() == ["/df_with_missing"]
    df_csv = pd.read_csv(paths["csv"], header=[0, 1, 2, 3], index_col=0)
    np.testing.assert_allclose(df_h5.to_numpy(), table.to_dataframe().to_numpy(), equal_nan=True)
    np.testing.assert_allclose(df_csv.to_numpy(), table.to_dataframe().to_numpy(), rtol=1e-6, equal_nan=True)
    first = paths["csv"].read_text().splitlines()[:4]
    assert [line.split(",")[0] for line in first] == ["scorer", "individuals", "bodyparts", "coords"]
    back = PoseTable.load(paths["h5"])
    np.testing.assert_allclose(back.data, table.data, equal_nan=True)
    assert back.keypoints == table.keypoints and back.individuals == table.individuals
    assert back.metadata == json.loads(paths["meta"].read_text())


def test_movement_loads_h5_and_csv(table, tmp_path):
    from movement.io import load_poses

    paths = table.save(tmp_path, ["h5", "csv"], stem="vid")
    for fmt in ("h5", "csv"):
        ds = load_poses.from_dlc_file(paths[fmt], fps=29.97)
        assert ds.position.shape == (50, 2, 3, 2)  # time, space, keypoints, individuals
        assert list(ds.keypoints.values) == list(table.keypoints)
        assert list(ds.individuals.values) == list(table.individuals)
        np.testing.assert_allclose(ds.position.sel(individuals="animal1", keypoints="nose", space="x").values,
                                   table.data[:, 1, 0, 0], rtol=1e-6)
        assert np.isnan(ds.position.values[7, 0, 2, 1])


def test_json_and_parquet(table, tmp_path):
    paths = table.save(tmp_path, ["json", "parquet"], stem="vid")
    doc = json.loads(paths["json"].read_text())
    assert doc["keypoints"] == list(table.keypoints) and len(doc["frames"]) == 50
    assert doc["frames"][7]["poses"]["animal1"][2] == [None, None, None]
    assert doc["frames"][3]["poses"]["animal0"][1][0] == pytest.approx(table.data[3, 0, 1, 0], abs=1e-3)
    pt = pq.read_table(paths["parquet"])
    long = pt.to_pandas()
    assert list(long.columns) == ["frame", "time", "individual", "keypoint", "x", "y", "likelihood"]
    assert len(long) == 50 * 2 * 3
    row = long[(long.frame == 3) & (long.individual == "animal1") & (long.keypoint == "tail_base")].iloc[0]
    assert row.x == pytest.approx(table.data[3, 1, 2, 0])
    assert json.loads(pt.schema.metadata[b"posezoo"])["model"]["name"] == "model"


def test_save_rejects_unknown_format_and_bad_shapes(table, tmp_path):
    with pytest.raises(InputError, match="unknown output format"):
        table.save(tmp_path, ["xlsx"])
    with pytest.raises(InputError):
        PoseTable(np.zeros((3, 1, 2, 2)), ("a", "b"))
    with pytest.raises(InputError):
        PoseTable(np.zeros((3, 1, 2, 3)), ("a",))


def test_median_filter_removes_a_single_frame_jump():
    t = np.arange(40, dtype=np.float32)
    data = np.zeros((40, 1, 1, 3), np.float32)
    data[:, 0, 0, 0], data[:, 0, 0, 1], data[:, 0, 0, 2] = t, 2 * t, 0.9
    data[20, 0, 0, :2] = (500, -500)
    data[30, 0, 0, :] = np.nan
    med = filter_poses(data, "median", 5)
    assert med[20, 0, 0, :2].tolist() == [21, 38]  # medians of {18,19,21,22,500} and {36,38,-500,42,44}
    assert np.isnan(med[30, 0, 0, :2]).all()  # missing stays missing
    sg = filter_poses(data[:19], "savgol", 7, 2)
    np.testing.assert_allclose(sg[:, 0, 0, 0], t[:19], atol=1e-3)  # a line is kept by a quadratic fit
    with pytest.raises(InputError):
        filter_poses(data, "median", 4)
    with pytest.raises(InputError):
        filter_poses(data, "kalman", 5)


def test_outlier_frames():
    data = np.zeros((10, 1, 2, 3), np.float32)
    data[..., 2] = 0.9
    data[4, 0, 1, 2] = 0.1  # uncertain
    data[7:, 0, 0, 0] = 100  # a jump between frames 6 and 7
    out = outlier_frames(data, pcutoff=0.5, max_jump=50)
    assert out["frames"] == [4, 7] and out["low_confidence"] == 1 and out["jumps"] == 1


def test_top_down_boxes_go_to_the_json(tmp_path):
    import json

    import numpy as np

    from posezoo.errors import InputError
    from posezoo.table import PoseTable

    data = np.full((2, 2, 1, 3), np.nan, np.float32)
    data[:, 0] = [[[1, 2, 0.9]], [[3, 4, 0.8]]]
    boxes = np.full((2, 2, 5), np.nan, np.float32)
    boxes[0, 0] = [0, 0, 10, 20, 0.95]
    boxes[1, 0, :4] = [1, 1, 11, 21]  # carried: no detector score
    t = PoseTable(data, ("snout",), ("animal0", "animal1"), "m@1", {}, boxes=boxes)
    doc = json.loads(t.save(tmp_path, ["json"])["json"].read_text())
    assert doc["frames"][0]["boxes"] == {"animal0": [0, 0, 10, 20, 0.95], "animal1": None}
    assert doc["frames"][1]["boxes"]["animal0"] == [1, 1, 11, 21, None]
    assert t.with_metadata(x=1).boxes is not None
    with pytest.raises(InputError, match="boxes"):
        PoseTable(data, ("snout",), ("animal0", "animal1"), boxes=np.zeros((2, 1, 5)))
