"""DeepLabCut labelled data: the real openfield table, and malformed copies of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from posezoo.errors import InputError
from posezoo.labelled import check_keypoints, find_label_file, load_labelled, split_indices

REPO = Path(__file__).resolve().parents[1]
LABELLED = REPO.parent / "shared" / "data" / "openfield" / "labeled-data" / "m4s1"
CSV = LABELLED / "CollectedData_Pranav.csv"
KEYPOINTS = ("snout", "leftear", "rightear", "tailbase")


def make_copy(root: Path, frames=range(6), *, csv: bool = True, h5: bool = False) -> Path:
    """A DeepLabCut project folder ``root/labeled-data/m4s1`` holding ``frames`` of the
    real openfield data and their labels; returns the label file (CSV or H5)."""
    if not CSV.exists():
        pytest.fail(f"the real openfield data is missing: {LABELLED}")
    folder = root / "labeled-data" / "m4s1"
    folder.mkdir(parents=True, exist_ok=True)
    lines = CSV.read_text().splitlines()
    body = [lines[3 + i] for i in frames]
    for line in body:
        name = Path(line.split(",")[0]).name
        shutil.copyfile(LABELLED / name, folder / name)
    (folder / "CollectedData_Pranav.csv").write_text("\n".join(lines[:3] + body) + "\n")
    if h5:
        df = pd.read_hdf(LABELLED / "CollectedData_Pranav.h5").iloc[list(frames)]
        df.to_hdf(folder / "CollectedData_Pranav.h5", key="df_with_missing", mode="w")
    return folder / ("CollectedData_Pranav.csv" if csv else "CollectedData_Pranav.h5")


def test_real_table_csv_and_h5_agree():
    a = load_labelled(CSV)
    b = load_labelled(LABELLED / "CollectedData_Pranav.h5")
    assert a.keypoints == b.keypoints == KEYPOINTS
    assert len(a) == len(b) == 116 and a.image_size == (640, 480)
    np.testing.assert_allclose(a.coords, b.coords)
    assert a.images[0] == "labeled-data/m4s1/img0000.png" and a.paths[0] == LABELLED / "img0000.png"
    np.testing.assert_allclose(a.coords[0, 0], [21.521, 265.428])
    assert find_label_file(LABELLED).suffix == ".h5"  # the folder: DeepLabCut's master file


def test_split_by_pattern_and_by_seed():
    data = load_labelled(CSV, check_images=False)
    train, test = split_indices(data, test=["img01[01]*"])
    assert len(train) == 100 and len(test) == 16
    assert data.names[test[0]] == "img0100.png" and data.names[test[-1]] == "img0115.png"
    r1 = split_indices(data, test_fraction=0.1, seed=3)
    r2 = split_indices(data, test_fraction=0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(r1, r2)) and len(r1[1]) == 12
    with pytest.raises(InputError, match="no labelled frame matches"):
        split_indices(data, test=["nothing*"])


def test_three_column_index_and_missing_labels(tmp_path):
    label = make_copy(tmp_path, range(4))
    lines = label.read_text().splitlines()
    out = [line.replace(",", ",,,", 1) for line in lines[:3]]  # scorer,,,Pranav,...
    for line in lines[3:]:
        path, *vals = line.split(",")
        vals[2] = vals[3] = ""  # leftear not labelled in these frames
        out.append(",".join(path.split("/") + vals))
    label.write_text("\n".join(out) + "\n")
    data = load_labelled(label)
    assert data.images[0] == "labeled-data/m4s1/img0000.png" and len(data) == 4
    assert np.isnan(data.coords[:, 1]).all() and not data.visible[:, 1].any()
    assert data.visible[:, [0, 2, 3]].all()


def test_h5_copy_loads(tmp_path):
    label = make_copy(tmp_path, range(3), csv=False, h5=True)
    assert len(load_labelled(label)) == 3


def test_missing_image_names_file_and_row(tmp_path):
    label = make_copy(tmp_path, range(5))
    (label.parent / "img0002.png").unlink()
    with pytest.raises(InputError, match=r"CollectedData_Pranav.csv: row 6: image labeled-data/m4s1/img0002.png not found"):
        load_labelled(label)


def test_wrong_header_rows(tmp_path):
    label = make_copy(tmp_path, range(3))
    lines = label.read_text().splitlines()
    label.write_text("\n".join([lines[0], lines[2]] + lines[3:]) + "\n")  # bodyparts row dropped
    with pytest.raises(InputError, match=r"CollectedData_Pranav.csv: row 1: the header rows must be scorer"):
        load_labelled(label)


def test_non_numeric_value_names_row(tmp_path):
    label = make_copy(tmp_path, range(3))
    lines = label.read_text().splitlines()
    lines[4] = lines[4].replace(lines[4].split(",")[3], "abc", 1)
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"row 5 \(labeled-data/m4s1/img0001.png\), column 4: 'abc' is not a number"):
        load_labelled(label)


def test_keypoints_not_in_the_card(tmp_path):
    data = load_labelled(make_copy(tmp_path, range(2)))
    with pytest.raises(InputError, match=r"row 2 \(bodyparts\): keypoints \['tailbase'\] are not in the model card"):
        check_keypoints(data, ["snout", "leftear", "rightear", "nose"])
    reordered = check_keypoints(data, ["tailbase", "snout", "leftear", "rightear"])
    np.testing.assert_array_equal(reordered.coords[:, 0], data.coords[:, 3])


def test_zero_labelled_frames(tmp_path):
    label = make_copy(tmp_path, range(3))
    lines = label.read_text().splitlines()
    lines[3:] = [line.split(",")[0] + "," * 8 for line in lines[3:]]
    label.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="CollectedData_Pranav.csv: zero labelled frames"):
        load_labelled(label)


def test_images_of_mixed_sizes(tmp_path):
    label = make_copy(tmp_path, range(4))
    img = cv2.imread(str(label.parent / "img0003.png"))
    cv2.imwrite(str(label.parent / "img0003.png"), img[:240, :320])
    with pytest.raises(InputError, match=r"row 7: image labeled-data/m4s1/img0003.png is 320x240 but .*img0000.png is 640x480"):
        load_labelled(label)


def test_unreadable_table_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no CollectedData_<scorer>.h5 or .csv"):
        load_labelled(tmp_path)
    bad = tmp_path / "CollectedData_x.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="cannot read this HDF5"):
        load_labelled(bad)
