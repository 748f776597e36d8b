"""Evaluation metrics against hand-computed values, and `posezoo evaluate` end to end
(with the tiny bundled model: it needs no PyTorch)."""

from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from posezoo.errors import InputError
from posezoo.evaluate import (
    draw_grid,
    evaluate_model,
    evaluate_predictions,
    format_evaluation,
    metrics_table,
    point_errors,
    summarise,
)
from posezoo.labelled import load_labelled
from test_labelled import make_copy

TINY = "posezoo_tiny_mouse"


def test_point_errors_and_summary_by_hand():
    truth = np.array([[[0.0, 0.0], [10.0, 10.0], [np.nan, np.nan]],
                      [[5.0, 5.0], [0.0, 0.0], [1.0, 1.0]]])
    pred = np.array([[[3.0, 4.0], [10.0, 10.0], [7.0, 7.0]],
                     [[5.0, 17.0], [6.0, 8.0], [1.0, 1.0]]])
    e = point_errors(pred, truth)
    np.testing.assert_allclose(e, [[5.0, 0.0, np.nan], [12.0, 10.0, 0.0]])
    s = summarise(e)
    # labelled distances 5, 0, 12, 10, 0: mean 27/5, RMSE sqrt((25+144+100)/5)
    assert s["n"] == 5
    assert s["mean_px"] == pytest.approx(5.4)
    assert s["rmse_px"] == pytest.approx(np.sqrt(269 / 5))
    assert s["pck@5"] == pytest.approx(3 / 5) and s["pck@10"] == pytest.approx(4 / 5)
    table = metrics_table(e, ["a", "b", "c"])
    assert table["a"] == {"n": 2, "mean_px": 8.5, "rmse_px": pytest.approx(np.sqrt(169 / 2)),
                          "pck@5": 0.5, "pck@10": 0.5}
    assert table["c"]["n"] == 1 and table["c"]["mean_px"] == 0.0
    assert summarise(np.full(3, np.nan)) == {"n": 0, "mean_px": None, "rmse_px": None, "pck@5": None, "pck@10": None}
    with pytest.raises(InputError):
        point_errors(pred[:, :2], truth)


def test_evaluate_predictions_splits(tmp_path):
    data = load_labelled(make_copy(tmp_path, range(4)))
    pred = data.coords.copy()
    pred[2:, :, 0] += 3.0  # test frames 3 px off in x
    ev = evaluate_predictions(data, pred, {"train": np.array([0, 1]), "test": np.array([2, 3])}, "m")
    assert ev.metrics["train"]["overall"]["mean_px"] == 0.0
    assert ev.metrics["test"]["overall"]["mean_px"] == pytest.approx(3.0)
    assert ev.metrics["test"]["snout"]["pck@5"] == 1.0 and ev.metrics["test"]["overall"]["n"] == 8
    text = format_evaluation(ev)
    assert "test (2 frames)" in text and "snout" in text and "RMSE" in text


def test_evaluate_tiny_model_matches_its_predictor(tmp_path, tiny_predictor):
    label = make_copy(tmp_path, range(6))
    ev = evaluate_model(TINY, label, test=["img000[45].png"], threads=2)
    data = load_labelled(label)
    pred = tiny_predictor.predict_images(data.load_images())[:, 0, :, :2]
    e = np.linalg.norm(pred - data.coords, axis=-1)
    assert ev.metrics["test"]["overall"]["mean_px"] == pytest.approx(e[4:].mean(), rel=1e-5)
    assert ev.metrics["train"]["overall"]["rmse_px"] == pytest.approx(np.sqrt((e[:4] ** 2).mean()), rel=1e-5)
    png = draw_grid(ev.data, ev.predictions, [4, 5], tmp_path / "grid.png", columns=2,
                    skeleton=[("snout", "leftear")])
    grid = cv2.imread(str(png))
    assert grid.shape == (240, 640, 3)


def test_evaluate_cli(tmp_path):
    label = make_copy(tmp_path, range(4))
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "posezoo", "evaluate", TINY, str(label.parent), "--test", "img0003*",
                        "--out", str(out), "--threads", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "train (3 frames)" in r.stdout and "test (1 frames)" in r.stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert report["frames"] == {"train": 3, "test": 1}
    assert (out / "test_frames.png").stat().st_size > 1000
    # keypoints the model does not know: one clear line, no traceback
    lines = label.read_text().splitlines()
    lines[1] = lines[1].replace("tailbase", "tail_tip")
    label.write_text("\n".join(lines) + "\n")
    bad = subprocess.run([sys.executable, "-m", "posezoo", "evaluate", TINY, str(label)], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "keypoints ['tail_tip'] are not in the model card" in bad.stderr and bad.stderr.count("\n") == 1
