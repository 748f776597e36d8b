"""Pseudo-labels from an unlabelled video: a teacher model's confident keypoints on evenly
spaced frames of it, added to the labelled training frames.

This is DeepLabCut SuperAnimal's "video adaptation" (self-training on the video one wants to
analyse) made a training option: a few labelled frames of one recording, plus many frames of
another recording that no one labelled, labelled by the best model one has (its card's
test-time flip included, so the teacher is stronger than the single pass the student makes).
Points under ``min_likelihood`` are left out (NaN: no target for them), and so are frames with
no point left.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..video import decoded_frames, frame_to_array, probe


@dataclass(frozen=True)
class PseudoLabelSpec:
    """Which video, which teacher, how many frames and how confident.

    ``video``: the unlabelled video; ``teacher``: a zoo model (``name@version``) with the
    labelled data's keypoints; ``n_frames``: at most this many frames, evenly spaced over
    the video; ``min_likelihood``: a teacher point under this is not a target.
    """

    video: str
    teacher: str
    n_frames: int = 300
    min_likelihood: float = 0.6


@dataclass(frozen=True)
class PseudoLabels:
    """Teacher-labelled video frames, shaped like labelled data.

    Attributes
    ----------
    images : ndarray, shape (n, height, width, 3), uint8
        RGB frames, at the labelled frames' size.
    coords : ndarray, shape (n, n_keypoints, 2)
        Teacher keypoints in those frames' pixels, NaN under ``min_likelihood``.
    frame_indices : ndarray, shape (n,)
        Where in the video each frame is.
    record : dict
        What the model card records (video, teacher, counts).
    """

    images: np.ndarray
    coords: np.ndarray
    frame_indices: np.ndarray
    record: dict


def frame_step(n_video_frames: int, n_frames: int) -> int:
    """Every how many video frames one is taken, for at most ``n_frames`` of them (every frame,
    so the first ``n_frames``, when the header does not say how many frames there are)."""
    return max(1, -(-max(n_video_frames, 1) // max(n_frames, 1)))


def pseudo_label_video(spec: PseudoLabelSpec, keypoints, frame_wh: tuple[int, int], *, threads: int | None = None,
                       zoo=None) -> PseudoLabels:
    """Label evenly spaced frames of ``spec.video`` with ``spec.teacher``.

    Parameters
    ----------
    spec : PseudoLabelSpec
    keypoints : sequence of str
        The labelled data's keypoints, in its order; the teacher must predict all of them.
    frame_wh : (int, int)
        The labelled frames' size. Video frames of another size with the same aspect ratio
        are resized to it (their labels with them).
    threads : int, optional
        ONNX Runtime threads of the teacher.
    zoo : posezoo.zoo.Zoo, optional

    Raises
    ------
    InputError
        The teacher lacks a keypoint or is not a full-frame model, the video's aspect
        ratio differs from the labelled frames', or no frame has a confident point.
    """
    from ..predictor import PosePredictor, load
    from ..zoo import sha256_file

    if not 0.0 <= spec.min_likelihood < 1.0:
        raise InputError(f"pseudo-label min likelihood must be in [0, 1), got {spec.min_likelihood}")
    if spec.n_frames < 1:
        raise InputError(f"pseudo-label frames must be at least 1, got {spec.n_frames}")
    teacher = load(spec.teacher, device="cpu", threads=threads, zoo=zoo)
    if not isinstance(teacher, PosePredictor):
        raise InputError(f"pseudo-label teacher {spec.teacher}: a full-frame model is needed, not {teacher.card.task}")
    missing = [k for k in keypoints if k not in teacher.keypoints]
    if missing:
        raise InputError(f"pseudo-label teacher {teacher.card.ref} does not predict {missing} "
                         f"(it predicts {teacher.keypoints})")
    order = [teacher.keypoints.index(k) for k in keypoints]
    info = probe(spec.video)
    w, h = frame_wh
    if abs(info.width * h - info.height * w) > 0.01 * info.width * h:
        raise InputError(f"{spec.video}: {info.width}x{info.height} frames do not have the labelled frames' "
                         f"aspect ratio ({w}x{h})")
    step = frame_step(info.n_frames, spec.n_frames)
    frames, index = [], []
    # only the taken frames are converted (and resized to the labelled size, as the runtime resizes)
    for i, frame in enumerate(decoded_frames(spec.video)):
        if len(frames) == spec.n_frames:
            break
        if i % step == 0:
            frames.append(frame_to_array(frame, (w, h), "RGB"))
            index.append(i)
    images = np.stack(frames)
    pred = teacher.predict_images(images, colour_order="RGB")[:, 0][:, order]  # (n, K, 3)
    coords = pred[..., :2].astype(np.float64)
    coords[pred[..., 2] < spec.min_likelihood] = np.nan
    keep = np.isfinite(coords).all(axis=-1).any(axis=1)
    if not keep.any():
        raise InputError(f"{spec.video}: {teacher.card.ref} is confident (>= {spec.min_likelihood}) of no "
                         f"keypoint in any of {len(images)} frames")
    coords, images, index = coords[keep], images[keep], np.asarray(index)[keep]
    record = {
        "video": Path(spec.video).name,
        "video_sha256": sha256_file(spec.video),
        "teacher": teacher.card.ref,
        "teacher_sha256": teacher.sha256,
        "teacher_test_time_flip": teacher.test_time_flip,
        "frame_step": step,
        "frames": int(len(images)),
        "frames_dropped": int((~keep).sum()),
        "points": int(np.isfinite(coords).all(axis=-1).sum()),
        "min_likelihood": spec.min_likelihood,
    }
    return PseudoLabels(images, coords, index, record)


def labelled_repeats(n_labelled: int, n_pseudo: int) -> int:
    """How often each labelled frame is drawn per pass over the pseudo-labelled ones, so that
    about half of every batch is human-labelled (the teacher's errors must not dominate)."""
    return max(1, int(round(n_pseudo / max(n_labelled, 1))))
