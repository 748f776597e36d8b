"""``posezoo evaluate``: a zoo model against DeepLabCut labelled frames.

Reports, per keypoint and overall, on the train and test frames:

* ``mean_px``: mean Euclidean distance in image pixels (what DeepLabCut prints as
  "RMSE"),
* ``rmse_px``: the true root-mean-square Euclidean distance,
* ``pck@5`` / ``pck@10``: fraction of labelled points predicted within 5 / 10 px,
* ``n``: labelled points counted (unlabelled points are ignored),

and draws a PNG grid of test frames with the labels (circles) and predictions
(crosses). Runs the ONNX model through posezoo's own runtime (``posezoo.load`` and
:meth:`PosePredictor.predict_images`): no PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .labelled import LabelledData, check_keypoints, indices_of, load_labelled, split_indices

PCK_THRESHOLDS = (5.0, 10.0)


def point_errors(pred_xy: np.ndarray, truth_xy: np.ndarray) -> np.ndarray:
    """Euclidean distances, NaN where the truth is unlabelled.

    Parameters
    ----------
    pred_xy, truth_xy : ndarray, shape (n_images, n_keypoints, 2)

    Returns
    -------
    ndarray, shape (n_images, n_keypoints)
    """
    pred_xy, truth_xy = np.asarray(pred_xy, float), np.asarray(truth_xy, float)
    if pred_xy.shape != truth_xy.shape or pred_xy.shape[-1] != 2:
        raise InputError(f"predictions {pred_xy.shape} and labels {truth_xy.shape} must both be (n, k, 2)")
    return np.linalg.norm(pred_xy - truth_xy, axis=-1)


def summarise(errors: np.ndarray, thresholds=PCK_THRESHOLDS) -> dict:
    """Mean pixel error, RMSE and PCK of a set of distances (NaN ignored).

    Parameters
    ----------
    errors : ndarray, any shape

    Returns
    -------
    dict
        ``n``, ``mean_px``, ``rmse_px`` and ``pck@<t>`` for each threshold; the
        metrics are ``None`` when ``n == 0``.
    """
    e = np.asarray(errors, float).ravel()
    e = e[np.isfinite(e)]
    out: dict = {"n": int(e.size)}
    if e.size == 0:
        out.update({"mean_px": None, "rmse_px": None, **{f"pck@{t:g}": None for t in thresholds}})
        return out
    out["mean_px"] = float(e.mean())
    out["rmse_px"] = float(np.sqrt((e**2).mean()))
    for t in thresholds:
        out[f"pck@{t:g}"] = float((e <= t).mean())
    return out


def metrics_table(errors: np.ndarray, keypoints) -> dict:
    """``{"overall": summarise(all), "<keypoint>": summarise(column), ...}``.

    Parameters
    ----------
    errors : ndarray, shape (n_images, n_keypoints)
    keypoints : sequence of str
    """
    table = {"overall": summarise(errors)}
    for k, name in enumerate(keypoints):
        table[name] = summarise(errors[:, k])
    return table


@dataclass(frozen=True)
class Evaluation:
    """Predictions and metrics of one model on one labelled-data set."""

    model: str
    data: LabelledData
    predictions: np.ndarray  # (n_images, n_keypoints, 3)
    splits: dict  # name -> ndarray of frame indices
    metrics: dict  # split -> metrics_table
    skeleton: tuple = ()  # the model card's edges, for drawing

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "labelled_data": str(self.data.source),
            "frames": {name: len(idx) for name, idx in self.splits.items()},
            "metrics": self.metrics,
        }


def evaluate_predictions(data: LabelledData, predictions: np.ndarray, splits: dict, model: str = "",
                         skeleton=()) -> Evaluation:
    """Metrics for given predictions ``(n_images, n_keypoints, 2 or 3)`` (pure)."""
    errors = point_errors(np.asarray(predictions)[..., :2], data.coords)
    metrics = {name: metrics_table(errors[np.asarray(idx, int)], data.keypoints) for name, idx in splits.items()}
    return Evaluation(model, data, np.asarray(predictions), splits, metrics, tuple(skeleton))


def card_splits(card, data: LabelledData) -> dict | None:
    """The train/test split a card's ``training.split`` records, if it names frames of ``data``."""
    split = (card.training or {}).get("split") if card.training else None
    if not split:
        return None
    out = {name: indices_of(data, split.get(name, [])) for name in ("train", "test")}
    return out if len(out["test"]) or len(out["train"]) else None


def evaluate_model(model: str, labelled: str | Path, *, test: list[str] | None = None, device: str = "cpu",
                   threads: int | None = None, zoo=None, test_time_flip: bool | None = None) -> Evaluation:
    """Run a zoo model on labelled frames and score it.

    Parameters
    ----------
    model : str
        ``name[@version]``, alias or ``card.yaml`` path (see :func:`posezoo.load`).
    labelled : path
        ``CollectedData_<scorer>.csv``/``.h5`` or its folder.
    test : list of str, optional
        Glob patterns selecting the test frames; default: the split recorded in the
        model card (``training.split``), else every frame is reported as ``all``.
    test_time_flip : bool, optional
        Override the card's ``test_time_flip`` (None: as the card says).
    """
    from .predictor import load

    predictor = load(model, device=device, threads=threads, zoo=zoo, test_time_flip=test_time_flip)
    data = check_keypoints(load_labelled(labelled), predictor.keypoints)
    if test:
        train_idx, test_idx = split_indices(data, test=test)
        splits = {"train": train_idx, "test": test_idx}
    else:
        splits = card_splits(predictor.card, data) or {"all": np.flatnonzero(data.visible.any(axis=1))}
    images = data.load_images("RGB")
    pred = predictor.predict_images(images, colour_order="RGB")[:, 0]
    return evaluate_predictions(data, pred, splits, predictor.card.ref, predictor.card.skeleton)


def format_evaluation(ev: Evaluation) -> str:
    """A DeepLabCut-style text table: one block per split, one line per keypoint."""
    lines = [f"model {ev.model} on {ev.data.source} ({len(ev.data)} frames, "
             f"{ev.data.image_size[0]}x{ev.data.image_size[1]})"]
    for split, table in ev.metrics.items():
        lines.append(f"{split} ({len(ev.splits[split])} frames):")
        lines.append(f"  {'keypoint':12s} {'n':>4s} {'mean px':>8s} {'RMSE px':>8s} {'PCK@5':>6s} {'PCK@10':>6s}")
        for name, m in table.items():
            if m["n"] == 0:
                lines.append(f"  {name:12s} {0:4d}        -        -      -      -")
                continue
            lines.append(f"  {name:12s} {m['n']:4d} {m['mean_px']:8.2f} {m['rmse_px']:8.2f} "
                         f"{m['pck@5']:6.1%} {m['pck@10']:6.1%}")
    lines.append("(mean px is the mean Euclidean error that DeepLabCut reports as 'RMSE'; "
                 "RMSE px is the root-mean-square error)")
    return "\n".join(lines)


def draw_grid(data: LabelledData, predictions: np.ndarray, indices, path: str | Path, *, columns: int = 4,
              tile_width: int = 320, skeleton=()) -> Path:
    """Write a PNG grid of frames with labels (circles) and predictions (crosses).

    Parameters
    ----------
    predictions : ndarray, shape (n_images, n_keypoints, >=2)
    indices : sequence of int
        Frames to show, in order.
    """
    import cv2

    from .render import keypoint_colours

    idx = list(indices)
    if not idx:
        raise InputError("no frames to draw")
    colours = keypoint_colours(len(data.keypoints))
    names = list(data.keypoints)
    tiles = []
    for i in idx:
        img = np.ascontiguousarray(cv2.imread(str(data.paths[i]), cv2.IMREAD_COLOR)[..., ::-1])
        s = tile_width / img.shape[1]
        img = cv2.resize(img, (tile_width, round(img.shape[0] * s)), interpolation=cv2.INTER_AREA)
        for a, b in skeleton:
            pa, pb = predictions[i, names.index(a), :2] * s, predictions[i, names.index(b), :2] * s
            if np.isfinite([*pa, *pb]).all():
                cv2.line(img, tuple(np.round(pa).astype(int)), tuple(np.round(pb).astype(int)), (255, 255, 255), 1,
                         cv2.LINE_AA)
        for k in range(len(names)):
            c = colours[k].tolist()
            t = data.coords[i, k] * s
            if np.isfinite(t).all():
                cv2.circle(img, tuple(np.round(t).astype(int)), 5, c, 1, cv2.LINE_AA)
            p = predictions[i, k, :2] * s
            if np.isfinite(p).all():
                cv2.drawMarker(img, tuple(np.round(p).astype(int)), c, cv2.MARKER_CROSS, 8, 1, cv2.LINE_AA)
        cv2.putText(img, data.paths[i].name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(img)
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    grid = np.zeros((rows * h, min(columns, len(tiles)) * w, 3), np.uint8)
    for j, tile in enumerate(tiles):
        r, c = divmod(j, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid[..., ::-1]):
        raise InputError(f"{path}: cannot write the PNG")
    return path


def write_report(ev: Evaluation, out_dir: str | Path) -> dict[str, Path]:
    """``evaluation.json`` and ``<split>_frames.png`` (the test split if any) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json"}
    paths["json"].write_text(json.dumps(ev.as_dict(), indent=2))
    split = "test" if len(ev.splits.get("test", [])) else next(iter(ev.splits))
    paths["grid"] = draw_grid(ev.data, ev.predictions, ev.splits[split][:16], out / f"{split}_frames.png",
                              skeleton=ev.skeleton)
    return paths
