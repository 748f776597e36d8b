"""DeepLabCut's conventions, so that DeepLabCut's own tools find and read posezoo's results.

- **Scorer** (the first column level and part of every file name): ``DLC_<model>_<version>``
  (e.g. ``DLC_posezoo_mouse_1.1.0``); SuperAnimal models are named as DeepLabCut 3 names
  them (``superanimal_topviewmouse_hrnet_w32_fasterrcnn_resnet50_fpn_v2``).
- **Files**: ``<video><scorer>.h5`` / ``.csv`` / ``_meta.pickle`` / ``_labeled.mp4``, and
  ``<video><scorer>_filtered.h5`` beside the raw table (SuperAnimal scorers are joined to the
  video's name with ``_``, as ``deeplabcut.video_inference_superanimal`` does).
- **Columns**: single-animal models get DeepLabCut's 3 levels ``scorer/bodyparts/coords``,
  multi-animal (top-down) models its 4 levels with ``individuals``
  (:attr:`posezoo.table.PoseTable.multi_animal`).

Which DeepLabCut call finds them how is in the README ("DeepLabCut's tools on posezoo
results"): ``create_labeled_video(config, videos, init_weights="<model>_<version>.onnx")``
names the scorer from the file name alone; the calls that name it from a trained shuffle
(``filterpredictions``, ``extract_outlier_frames``) run inside :func:`deeplabcut_scorer`.
"""

from __future__ import annotations

import pickle
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError

SUPERANIMAL_PREFIX = "superanimal_"


def _superanimal_dataset(filename: str | None) -> str | None:
    """``superanimal_<dataset>`` from a SuperAnimal checkpoint's file name, else None."""
    stem = Path(filename or "").stem
    parts = stem.split("_")
    return "_".join(parts[:2]) if stem.startswith(SUPERANIMAL_PREFIX) and len(parts) > 2 else None


def scorer_name(card, detector_card=None) -> str:
    """DeepLabCut's scorer for ``card``'s results.

    A model converted from a DeepLabCut SuperAnimal checkpoint gets DeepLabCut 3's
    SuperAnimal scorer (``deeplabcut.modelzoo.utils.get_super_animal_scorer``:
    ``superanimal_<dataset>_<pose model>[_<detector>]``); every other model
    ``DLC_<name>_<version>``.
    """
    upstream = getattr(card, "upstream", None)
    dataset = _superanimal_dataset(upstream.filename) if upstream is not None and upstream.kind == "huggingface" else None
    if dataset is None:
        return f"DLC_{card.name}_{card.version}"
    prefix = dataset + "_"
    scorer = prefix + Path(upstream.filename).stem[len(prefix):]
    det_up = getattr(detector_card, "upstream", None)
    if det_up is not None and det_up.filename:
        det = Path(det_up.filename).stem
        scorer += "_" + (det[len(prefix):] if det.startswith(prefix) else det)
    return scorer


def output_stem(video: str | Path, scorer: str) -> str:
    """The stem DeepLabCut gives the results of ``video`` by ``scorer``."""
    sep = "_" if scorer.startswith(SUPERANIMAL_PREFIX) else ""
    return f"{Path(video).stem}{sep}{scorer}"


def init_weights_name(scorer: str) -> str:
    """The ``init_weights`` argument that makes ``deeplabcut.create_labeled_video`` look for
    ``scorer``'s files: DeepLabCut names the scorer ``"DLC_" + Path(init_weights).stem``."""
    if not scorer.startswith("DLC_"):
        raise InputError(f"scorer {scorer!r} does not start with DLC_: init_weights cannot name it")
    return scorer[len("DLC_"):] + ".onnx"  # a suffix, so that a version's dots survive Path.stem


def video_metadata(table) -> dict:
    """DeepLabCut's ``<video><scorer>_meta.pickle`` content for ``table`` (``{"data": {...}}``,
    the keys ``analyze_videos`` writes and its tools read)."""
    meta = table.metadata
    video = meta.get("video", {}) or {}
    timings = meta.get("timings", {}) or {}
    w, h = int(video.get("width") or 0), int(video.get("height") or 0)
    stop = float(meta.get("finished_at") or time.time())
    duration = float(timings.get("total_s") or 0.0)
    model = meta.get("model", {}) or {}
    return {"data": {
        "start": stop - duration,
        "stop": stop,
        "run_duration": duration,
        "Scorer": table.scorer,
        "DLC-model-config file": {"posezoo_model": f"{model.get('name')}@{model.get('version')}",
                                  "sha256": model.get("sha256")},
        "fps": float(video.get("fps") or 0.0),
        "batch_size": int(meta.get("batch_size") or timings.get("batch_size") or 1),
        "frame_dimensions": (h, w),
        "nframes": int(table.n_frames),
        "iteration (active-learning)": 0,
        "training set fraction": None,
        "cropping": False,
        "cropping_parameters": [0, w, 0, h],
        "individuals": list(table.individuals) if table.multi_animal else [""],
        "bodyparts": list(table.keypoints),
        "unique_bodyparts": [],
    }}


def write_video_metadata(table, path: str | Path) -> Path:
    path = Path(path)
    with path.open("wb") as f:
        pickle.dump(video_metadata(table), f, pickle.HIGHEST_PROTOCOL)
    return path


# -- DeepLabCut's shuffle-based tools -------------------------------------------------------
@contextmanager
def deeplabcut_scorer(scorer: str):
    """Within the block, DeepLabCut's functions that name the scorer from a trained shuffle of
    the project (``filterpredictions``, ``extract_outlier_frames``, ``create_labeled_video``,
    ``plot_trajectories``, ``analyzeskeleton``) use ``scorer`` instead, so they find posezoo's
    results. A zoo model is no shuffle of the user's project: DeepLabCut has no argument for
    this, so its one scorer lookup (``deeplabcut.utils.auxiliaryfunctions.get_scorer_name``)
    is replaced for the duration of the block, and restored after. Everything else runs as
    DeepLabCut wrote it. Not thread-safe: do not run other DeepLabCut calls concurrently.

    Examples
    --------
    >>> with deeplabcut_scorer("DLC_posezoo_mouse_1.1.0"):          # doctest: +SKIP
    ...     deeplabcut.filterpredictions(config, videos)
    ...     deeplabcut.extract_outlier_frames(config, videos, automatic=True)
    """
    try:
        from deeplabcut.utils import auxiliaryfunctions
    except ImportError as exc:
        raise InputError(f"deeplabcut_scorer needs DeepLabCut installed ({exc})") from None
    original = auxiliaryfunctions.get_scorer_name

    def named(*_args, **_kwargs) -> tuple[str, str]:
        return scorer, scorer

    auxiliaryfunctions.get_scorer_name = named
    try:
        yield scorer
    finally:
        auxiliaryfunctions.get_scorer_name = original
