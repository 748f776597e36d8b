"""Top-down multi-animal inference: detector -> boxes -> crops -> pose network -> frame pixels.

Everything here reproduces DeepLabCut 3's top-down pipeline (``build_top_down_preprocessor``,
``top_down_crop``, ``HeatmapPredictor``, ``build_top_down_postprocessor``) on ONNX Runtime:

- :class:`BoxDetector` runs a converted torchvision Faster R-CNN or SSDLite (batch of one frame; the
  frame is normalised as DeepLabCut does, the graph normalises and resizes again as
  torchvision's ``GeneralizedRCNNTransform`` does) and keeps the ``max_individuals`` best
  boxes above the score threshold.
- :func:`crop_regions` / :func:`make_crops` cut crops exactly as ``top_down_crop`` does
  (keep the box centre, grow to the crop's aspect ratio, integer-rounded corners,
  zero padding outside the frame, ``cv2.resize`` INTER_LINEAR on the uint8 crop).
- :class:`TopDownPredictor` batches the crops of many frames into one ONNX Runtime call,
  decodes the heatmaps with :func:`posezoo.decoding.decode_heatmaps` (RTMPose's SimCC vectors
  with :func:`posezoo.decoding.decode_simcc`) and maps them back
  (``x * scale + offset``).
- :class:`Tracker` (one per :meth:`TopDownPredictor.predict_video` call, the only mutable
  state) keeps ``animal0 ... animalN`` on the same animals with the Hungarian algorithm
  on box IoU and centre distance. The detector can run every N frames; in between, each
  animal's box is carried from its previous pose.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cards import DetectorSpec, ModelCard, TopDownSpec
from .decoding import decode_outputs, decode_simcc
from .dlc import scorer_name
from .errors import InputError, PosezooError
from .predictor import FrameLoop, StageTimes, finish_poses
from .runtime import TRT_MAX_BATCH, OrtModel, normalise_batch

#: crops per pose-network call on the CPU, and on a GPU (:attr:`TopDownPredictor.max_crops`)
CPU_MAX_CROPS = 64
GPU_MAX_CROPS = TRT_MAX_BATCH
from .table import PoseTable
from .video import probe


# -- crops ------------------------------------------------------------------------------------
def crop_regions(boxes_xywh: np.ndarray, crop_wh: tuple[int, int], frame_wh: tuple[int, int], *,
                 margin: int = 0, with_context: bool = True) -> dict[str, np.ndarray]:
    """DeepLabCut's ``top_down_crop`` geometry, vectorised over boxes.

    Parameters
    ----------
    boxes_xywh : ndarray, shape (n, 4)
        COCO boxes ``x, y, w, h`` (float32, as DeepLabCut's detector post-processor gives them).
    crop_wh : (int, int)
        ``(width, height)`` of the pose network's input.
    frame_wh : (int, int)
    margin : int
    with_context : bool
        Grow the box to the crop's aspect ratio around its centre (DeepLabCut's default).

    Returns
    -------
    dict of ndarray
        ``src`` (n, 4) int: ``x1, y1, x2, y2`` of the part inside the frame; ``pad`` (n, 4) int:
        ``left, top, right, bottom`` zero padding; ``offset`` (n, 2) and ``scale`` (n, 2) float:
        ``frame = crop * scale + offset``.
    """
    b = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4)
    out_w, out_h = crop_wh
    image_w, image_h = frame_wh
    x, y, w, h = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    cx = x + w / 2
    cy = y + h / 2
    w = w + 2 * margin
    h = h + 2 * margin
    if with_context:
        out_ratio = out_w / out_h
        in_ratio = w / h
        h = np.where(in_ratio > out_ratio, w / out_ratio, h).astype(np.float32)
        w = np.where(in_ratio < out_ratio, h * out_ratio, w).astype(np.float32)
    # Python's round() on NumPy float32 scalars rounds half to even, as np.round does.
    x1 = np.round(cx - w / 2).astype(np.int64)
    y1 = np.round(cy - h / 2).astype(np.int64)
    x2 = np.round(cx + w / 2).astype(np.int64)
    y2 = np.round(cy + h / 2).astype(np.int64)
    pad_left, pad_top = np.maximum(-x1, 0), np.maximum(-y1, 0)
    pad_right, pad_bottom = np.maximum(x2 - image_w, 0), np.maximum(y2 - image_h, 0)
    x1, y1 = np.maximum(x1, 0), np.maximum(y1, 0)
    x2, y2 = np.minimum(x2, image_w), np.minimum(y2, image_h)
    cw, ch = x2 - x1, y2 - y1
    if not with_context:
        raise InputError("crop_with_context=False is not supported by posezoo's top-down runtime")
    offset = np.stack([x1 - pad_left, y1 - pad_top], axis=1).astype(np.float64)
    scale = np.stack([(cw + pad_left + pad_right) / out_w, (ch + pad_top + pad_bottom) / out_h], axis=1)
    return {
        "src": np.stack([x1, y1, x2, y2], axis=1),
        "pad": np.stack([pad_left, pad_top, pad_right, pad_bottom], axis=1),
        "offset": offset,
        "scale": scale.astype(np.float64),
    }


def make_crops(frame: np.ndarray, regions: dict[str, np.ndarray], crop_wh: tuple[int, int],
               out: np.ndarray | None = None) -> np.ndarray:
    """Cut and resize the crops of one frame (uint8 ``(H, W, 3)``) -> ``(n, h, w, 3)`` uint8.

    Bit-exact with DeepLabCut: the zero-padded crop is resized with ``cv2.INTER_LINEAR``.
    """
    import cv2

    n = len(regions["src"])
    out_w, out_h = crop_wh
    if out is None:
        out = np.empty((n, out_h, out_w, frame.shape[2]), np.uint8)
    for i, ((x1, y1, x2, y2), (pl, pt, pr, pb)) in enumerate(zip(regions["src"].tolist(), regions["pad"].tolist())):
        src = frame[y1:y2, x1:x2]
        if pl or pt or pr or pb:
            padded = np.zeros((y2 - y1 + pt + pb, x2 - x1 + pl + pr, frame.shape[2]), np.uint8)
            padded[pt : pt + y2 - y1, pl : pl + x2 - x1] = src
            src = padded
        if src.shape[0] == out_h and src.shape[1] == out_w:
            out[i] = src
        else:
            cv2.resize(src, (out_w, out_h), dst=out[i], interpolation=cv2.INTER_LINEAR)
    return out


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``x1, y1, x2, y2`` boxes, ``(n, 4) x (m, 4) -> (n, m)``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def boxes_from_poses(poses: np.ndarray, min_likelihood: float, margin: float, frame_wh: tuple[int, int],
                     fallback: np.ndarray) -> np.ndarray:
    """Boxes around each pose's confident keypoints (``x1, y1, x2, y2``), ``margin`` px wider;
    ``fallback`` rows where fewer than two keypoints are confident. ``poses``: ``(n, K, 3)``."""
    p = np.asarray(poses, dtype=np.float64)
    ok = np.isfinite(p[..., 2]) & (p[..., 2] >= min_likelihood)
    enough = ok.sum(axis=1) >= 2
    x = np.where(ok, p[..., 0], np.nan)
    y = np.where(ok, p[..., 1], np.nan)
    with np.errstate(all="ignore"), _quiet_nan():
        boxes = np.stack([np.nanmin(x, 1) - margin, np.nanmin(y, 1) - margin,
                          np.nanmax(x, 1) + margin, np.nanmax(y, 1) + margin], axis=1)
    fw, fh = frame_wh
    boxes = np.clip(boxes, 0, [fw, fh, fw, fh])
    return np.where(enough[:, None], boxes, np.asarray(fallback, dtype=np.float64).reshape(-1, 4)).astype(np.float32)


class _quiet_nan:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


# -- models -----------------------------------------------------------------------------------
class BoxDetector:
    """A converted torchvision detector (``task: detector`` card): one frame in, boxes out.

    Parameters
    ----------
    card : ModelCard
    model_path : path
    max_individuals : int, optional
        Keep at most this many boxes (best first; default: the card's).
    """

    def __init__(self, card: ModelCard, model_path: str | Path, *, device: str = "auto",
                 threads: int | None = None, max_individuals: int | None = None, source: str = ""):
        if card.task != "detector":
            raise PosezooError(f"{card.ref}: task {card.task!r} is not a detector")
        self.card = card
        self.spec: DetectorSpec = card.detection or DetectorSpec()
        self.model = OrtModel(model_path, device=device, threads=threads)
        self.source = source
        self.max_individuals = int(max_individuals or card.max_individuals)
        wanted = [self.spec.boxes, self.spec.scores]
        if card.input.input_name not in self.model.input_names or any(n not in self.model.output_names for n in wanted):
            raise PosezooError(
                f"{card.ref}: the ONNX detector does not match its card (inputs {self.model.input_names}, "
                f"outputs {self.model.output_names}; card wants {card.input.input_name} -> {wanted})"
            )
        self._outputs = wanted

    @property
    def providers(self) -> list[str]:
        return self.model.providers

    def detect(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of one frame.

        Parameters
        ----------
        frame : ndarray, shape (H, W, 3), uint8, in the card's colour order

        Returns
        -------
        boxes : ndarray, shape (n, 4), float32
            ``x1, y1, x2, y2`` in frame pixels, best score first, ``n <= max_individuals``.
        scores : ndarray, shape (n,), float32
        """
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise InputError(f"a frame must have shape (H, W, 3), got {frame.shape}")
        h, w = frame.shape[:2]
        x = normalise_batch(frame[None], self.card.input, (h, w))
        out = self.model.run({self.card.input.input_name: x}, self._outputs)
        boxes = np.asarray(out[self.spec.boxes], dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(out[self.spec.scores], dtype=np.float32).reshape(-1)
        order = np.argsort(-scores, kind="stable")  # the graph sorts already; keep it robust
        boxes, scores = boxes[order][: self.max_individuals], scores[order][: self.max_individuals]
        return boxes, scores


class CropPoseModel:
    """A pose network on fixed-size crops (``task: top_down`` card), dynamic batch."""

    def __init__(self, card: ModelCard, model_path: str | Path, *, device: str = "auto", threads: int | None = None):
        if card.task != "top_down":
            raise PosezooError(f"{card.ref}: task {card.task!r} is not a top-down pose model")
        if card.input.size == "any":
            raise PosezooError(f"{card.ref}: a top-down card needs a fixed input size")
        self.card = card
        self.model = OrtModel(model_path, device=device, threads=threads)
        o = card.outputs
        if card.decoder == "simcc":
            self._outputs = [card.simcc.x, card.simcc.y]
        else:
            self._outputs = [o.heatmap] + ([o.locref] if o.locref else [])
        missing = [n for n in self._outputs if n not in self.model.output_names]
        if missing or card.input.input_name not in self.model.input_names:
            raise PosezooError(
                f"{card.ref}: the ONNX model does not match its card (inputs {self.model.input_names}, "
                f"outputs {self.model.output_names}; card wants {card.input.input_name} -> {self._outputs})"
            )
        self.crop_hw: tuple[int, int] = tuple(card.input.size)  # type: ignore[assignment]

    @property
    def crop_wh(self) -> tuple[int, int]:
        return self.crop_hw[1], self.crop_hw[0]

    def raw(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """``(n, h, w, 3)`` uint8 crops -> the network's outputs (heatmaps, locref; or SimCC x, y)."""
        x = normalise_batch(crops, self.card.input, self.crop_hw)
        return self.model.run({self.card.input.input_name: x}, self._outputs)

    def decode(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """Network outputs -> keypoints ``(n, K, 3)`` in crop pixels (DeepLabCut's HeatmapPredictor,
        or SimCCPredictor for ``decoder: simcc``; a SimCC keypoint without position is NaN)."""
        if self.card.decoder == "simcc":
            s = self.card.simcc
            return decode_simcc(out[s.x], out[s.y], split_ratio=s.split_ratio, apply_softmax=s.apply_softmax,
                                normalize=s.normalize, sigma=s.sigma, beta=s.beta)
        return decode_outputs(out, self.card.outputs, self.crop_hw)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        return self.decode(self.raw(crops))


def estimate_poses(pose: CropPoseModel, frames: list[np.ndarray] | np.ndarray, boxes: list[np.ndarray],
                   crop: TopDownSpec | None = None, *, max_crops: int = 64,
                   times: StageTimes | None = None) -> list[np.ndarray]:
    """Pose of every box of every frame, the crops of all frames batched together.

    ``boxes[i]`` is ``(n_i, 4)`` ``x1, y1, x2, y2`` for ``frames[i]``; returns ``(n_i, K, 3)``
    per frame in frame pixels.
    """
    crop = crop or pose.card.top_down or TopDownSpec()
    t0 = time.perf_counter()
    crop_wh = pose.crop_wh
    counts = [len(b) for b in boxes]
    total = sum(counts)
    K = pose.card.n_keypoints
    if total == 0:
        return [np.zeros((0, K, 3), np.float32) for _ in counts]
    crops = np.empty((total, crop_wh[1], crop_wh[0], 3), np.uint8)
    offsets, scales = np.empty((total, 2)), np.empty((total, 2))
    k = 0
    for frame, b in zip(frames, boxes):
        if len(b) == 0:
            continue
        reg = crop_regions(xyxy_to_xywh(b), crop_wh, (frame.shape[1], frame.shape[0]),
                           margin=crop.margin, with_context=crop.with_context)
        make_crops(frame, reg, crop_wh, out=crops[k : k + len(b)])
        offsets[k : k + len(b)], scales[k : k + len(b)] = reg["offset"], reg["scale"]
        k += len(b)
    t1 = time.perf_counter()
    kps, t_inf, t_dec = [], 0.0, 0.0
    for i in range(0, total, max_crops):
        ta = time.perf_counter()
        out = pose.raw(crops[i : i + max_crops])
        tb = time.perf_counter()
        kps.append(pose.decode(out))
        t_inf += tb - ta
        t_dec += time.perf_counter() - tb
    t2 = time.perf_counter()
    kp = np.concatenate(kps)
    # DeepLabCut's RescaleAndOffset: frame = crop * scale + offset (in float64, stored as float32)
    kp[..., :2] = kp[..., :2] * scales[:, None, :] + offsets[:, None, :]
    if times is not None:
        times.preprocess += t1 - t0
        times.inference += t_inf
        times.decode += t_dec + (time.perf_counter() - t2)
    return np.split(kp, np.cumsum(counts)[:-1])



# -- tracking ---------------------------------------------------------------------------------
@dataclass
class Tracker:
    """Keeps ``max_individuals`` identity slots across frames (Hungarian assignment).

    The cost of giving detection ``j`` to slot ``i`` is ``1 - IoU`` of the slot's last box
    and the detection, plus the centre distance in units of the slot box's diagonal;
    pairs with no overlap that are farther apart than ``max_distance`` diagonals are not
    matched. Unmatched detections take a never-used slot first, then the slot that has
    been missing longest.
    """

    max_individuals: int
    max_distance: float = 1.0
    boxes: np.ndarray = field(init=False)
    last_seen: np.ndarray = field(init=False)
    used: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.boxes = np.full((self.max_individuals, 4), np.nan, np.float32)
        self.last_seen = np.full(self.max_individuals, -1, np.int64)
        self.used = np.zeros(self.max_individuals, bool)

    def assign(self, frame: int, boxes: np.ndarray) -> np.ndarray:
        """Slot index of each detection (``-1``: no slot left). Updates the slots' boxes."""
        from scipy.optimize import linear_sum_assignment

        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        slots = np.full(len(boxes), -1, np.int64)
        active = np.flatnonzero(self.used)
        if len(boxes) and len(active):
            tb = self.boxes[active]
            iou = box_iou(tb, boxes)
            tc, dc = (tb[:, :2] + tb[:, 2:]) / 2, (boxes[:, :2] + boxes[:, 2:]) / 2
            diag = np.maximum(np.hypot(*(tb[:, 2:] - tb[:, :2]).T), 1.0)
            dist = np.linalg.norm(tc[:, None] - dc[None], axis=2) / diag[:, None]
            cost = 1.0 - iou + dist
            allowed = (iou > 0) | (dist <= self.max_distance)
            rows, cols = linear_sum_assignment(np.where(allowed, cost, 1e6))
            for r, c in zip(rows, cols):
                if allowed[r, c]:
                    slots[c] = active[r]
        for j in np.flatnonzero(slots < 0):
            taken = set(slots[slots >= 0].tolist())
            free = [s for s in range(self.max_individuals) if not self.used[s] and s not in taken]
            if not free:
                stale = [s for s in np.argsort(self.last_seen, kind="stable").tolist()
                         if self.last_seen[s] < frame and s not in taken]
                free = stale
            if free:
                slots[j] = free[0]
        ok = slots >= 0
        self.boxes[slots[ok]] = boxes[ok]
        self.last_seen[slots[ok]] = frame
        self.used[slots[ok]] = True
        return slots

    def carry(self, frame: int, slots: np.ndarray, boxes: np.ndarray) -> None:
        """Boxes carried from poses (no detector on this frame)."""
        self.boxes[slots] = boxes
        self.last_seen[slots] = frame


# -- predictor --------------------------------------------------------------------------------
class TopDownPredictor:
    """Detector + crop pose network: frames in, every animal's keypoints in frame pixels out.

    Immutable after construction (sessions are thread-safe); the tracking state of a
    video lives in a :class:`Tracker` made per :meth:`predict_video` call.

    Parameters
    ----------
    card : ModelCard
        The pose card (``task: top_down``).
    model_path : path
    detector : BoxDetector
    device, threads, source, sha256 : see :class:`posezoo.predictor.PosePredictor`.
    """

    def __init__(self, card: ModelCard, model_path: str | Path, detector: BoxDetector, *, device: str = "auto",
                 threads: int | None = None, source: str = "", sha256: str | None = None):
        self.card = card
        self.pose = CropPoseModel(card, model_path, device=device, threads=threads)
        self.model = self.pose.model  # for code that reports threads/providers
        self.detector = detector
        self.source = source
        self.sha256 = sha256 or card.artefact.sha256
        self.crop: TopDownSpec = card.top_down or TopDownSpec()
        #: crops per pose-network call: the crops of all frames of a video batch go together
        #: (:func:`estimate_poses`), up to this many; a GPU takes the batch TensorRT's profile allows
        self.max_crops = GPU_MAX_CROPS if self.pose.model.uses_gpu else CPU_MAX_CROPS

    @property
    def providers(self) -> list[str]:
        return self.pose.model.providers

    @property
    def keypoints(self) -> list[str]:
        return list(self.card.keypoints)

    # -- one batch of frames --------------------------------------------------------------
    def _detect(self, frame: np.ndarray, min_score: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of one frame, without those scoring under ``min_score`` (default: the card's)."""
        boxes, scores = self.detector.detect(frame)
        threshold = self.crop.min_box_score if min_score is None else min_score
        if threshold is not None:
            keep = scores >= threshold
            boxes, scores = boxes[keep], scores[keep]
        return boxes, scores

    def poses_for_boxes(self, frames: list[np.ndarray] | np.ndarray, boxes: list[np.ndarray],
                        max_crops: int | None = None, times: StageTimes | None = None) -> list[np.ndarray]:
        """Pose of every box of every frame, the crops of all frames batched into calls of at most
        ``max_crops`` (default :attr:`max_crops`; see :func:`estimate_poses`)."""
        return estimate_poses(self.pose, frames, boxes, self.crop, max_crops=max_crops or self.max_crops, times=times)

    def predict_images(self, images: np.ndarray, *, colour_order: str = "RGB",
                       max_individuals: int | None = None) -> np.ndarray:
        """Detect and estimate poses on independent images (no tracking).

        Parameters
        ----------
        images : ndarray, shape (n_images, height, width, 3) or (height, width, 3), uint8
        colour_order : {"RGB", "BGR"}
        max_individuals : int, optional

        Returns
        -------
        ndarray, shape (n_images, max_individuals, n_keypoints, 3)
            Animals in the detector's order (best box first); NaN where fewer were found.
        """
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError(f"images must be uint8 of shape (n, height, width, 3), got {arr.dtype} {arr.shape}")
        if colour_order.upper() != self.card.input.colour_order:
            arr = np.ascontiguousarray(arr[..., ::-1])
        m = int(max_individuals or self.detector.max_individuals)
        boxes = [self._detect(f)[0][:m] for f in arr]
        poses = self.poses_for_boxes(list(arr), boxes)
        out = np.full((len(arr), m, self.card.n_keypoints, 3), np.nan, np.float32)
        for i, p in enumerate(poses):
            out[i, : len(p)] = p
        return out

    # -- videos ---------------------------------------------------------------------------
    def predict_video(
        self,
        video: str | os.PathLike,
        *,
        batch_size: int = 16,
        progress=False,
        filter: str | None = None,
        filter_window: int = 5,
        max_jump: float | None = None,
        allow_truncated: bool = False,
        max_frames: int | None = None,
        detector_every: int = 1,
        max_individuals: int | None = None,
        carry_min_likelihood: float | None = None,
        carry_margin: float = 20.0,
        keep_empty_individuals: bool = False,
        bbox_threshold: float | None = None,
    ) -> PoseTable:
        """Poses of every animal in every frame, with identities kept across frames.

        Parameters
        ----------
        video, batch_size, progress, filter, filter_window, max_jump, allow_truncated, max_frames :
            As :meth:`posezoo.predictor.PosePredictor.predict_video`.
        detector_every : int
            Run the detector on every N-th frame only; in between, each animal's box is the
            box around its previous pose's confident keypoints (``carry_min_likelihood``,
            default the card's ``pcutoff``), ``carry_margin`` pixels wider. ``1`` runs it on
            every frame, as DeepLabCut does (crops of ``batch_size`` frames then share one
            ONNX Runtime call; with ``N > 1`` crops are batched per frame).
        max_individuals : int, optional
            Identity slots (default: the card's ``max_individuals``).
        keep_empty_individuals : bool
            Keep slots that never held an animal (all-NaN columns) in the table.
        bbox_threshold : float, optional
            Ignore detections scoring below it (default: the card's ``min_box_score``, and
            the detector's own score threshold always applies).

        Returns
        -------
        PoseTable
            ``data`` of shape ``(n_frames, n_individuals, n_keypoints, 3)``, individuals
            ``animal0 ...``; NaN where an animal was not found.
        """
        if detector_every < 1:
            raise InputError(f"detector_every must be >= 1, got {detector_every}")
        info = probe(video)
        m = int(max_individuals or self.detector.max_individuals)
        min_lik = self.card.pcutoff if carry_min_likelihood is None else carry_min_likelihood
        tracker = Tracker(m)
        times = StageTimes()
        t_detect = 0.0
        n_detector_runs = n_crops = 0
        K = self.card.n_keypoints
        chunks: list[np.ndarray] = []
        box_chunks: list[np.ndarray] = []  # (frames, slots, 5): x1, y1, x2, y2, detector score (NaN: carried box)
        prev = np.full((m, K, 3), np.nan, np.float32)  # last frame's poses, per slot
        with FrameLoop(video, info, batch_size, times, size=None, colour_order=self.card.input.colour_order,
                       max_frames=max_frames, progress=progress) as loop:
            for batch in loop:
                frames = batch.frames
                out = np.full((len(frames), m, K, 3), np.nan, np.float32)
                out_boxes = np.full((len(frames), m, 5), np.nan, np.float32)
                wh = (frames.shape[2], frames.shape[1])
                if detector_every == 1:
                    boxes, slots = [], []
                    for i, frame in enumerate(frames):
                        td = time.perf_counter()
                        b, sc = self._detect(frame, bbox_threshold)
                        t_detect += time.perf_counter() - td
                        s = tracker.assign(batch.start + i, b)
                        kept = s >= 0
                        boxes.append(b[kept])
                        slots.append(s[kept])
                        out_boxes[i, s[kept], :4], out_boxes[i, s[kept], 4] = b[kept], sc[kept]
                    n_detector_runs += len(frames)
                    poses = self.poses_for_boxes(frames, boxes, times=times)
                    for i, (p, s) in enumerate(zip(poses, slots)):
                        out[i, s] = p
                        n_crops += len(p)
                else:
                    for i, frame in enumerate(frames):
                        idx = batch.start + i
                        if idx % detector_every == 0:
                            td = time.perf_counter()
                            b, sc = self._detect(frame, bbox_threshold)
                            t_detect += time.perf_counter() - td
                            n_detector_runs += 1
                            s = tracker.assign(idx, b)
                            b, sc, s = b[s >= 0], sc[s >= 0], s[s >= 0]
                            out_boxes[i, s, 4] = sc
                        else:
                            s = np.flatnonzero(np.any(np.isfinite(prev[..., 2]), axis=1))
                            b = boxes_from_poses(prev[s], min_lik, carry_margin, wh, tracker.boxes[s])
                            tracker.carry(idx, s, b)
                        out_boxes[i, s, :4] = b
                        p = self.poses_for_boxes([frame], [b], times=times)[0]
                        out[i, s] = p
                        n_crops += len(p)
                        prev = out[i]
                if len(frames):
                    prev = out[-1]
                chunks.append(out)
                box_chunks.append(out_boxes)
        data = np.concatenate(chunks) if chunks else np.zeros((0, m, K, 3), np.float32)
        n_keep = m if keep_empty_individuals else max(1, int(np.flatnonzero(tracker.used).max() + 1) if tracker.used.any() else 1)
        data = data[:, :n_keep]
        boxes_all = (np.concatenate(box_chunks) if box_chunks else np.zeros((0, m, 5), np.float32))[:, :n_keep]
        times.extra.update({"detector_s": round(t_detect, 4), "detector_runs": n_detector_runs, "crops": n_crops,
                            "crops_per_s": round(n_crops / max(times.inference, 1e-9), 2)})
        meta = self._metadata(info, times, loop.done, batch_size)
        meta["top_down"] = {"detector_every": detector_every, "max_individuals": m, "individuals_found": n_keep,
                            "bbox_threshold": bbox_threshold if bbox_threshold is not None else self.crop.min_box_score,
                            "carry_min_likelihood": min_lik, "carry_margin": carry_margin,
                            "tracking": "hungarian (1 - IoU + centre distance / box diagonal)"}
        data = finish_poses(data, meta, loop, info, pcutoff=self.card.pcutoff, allow_truncated=allow_truncated,
                            filter=filter, filter_window=filter_window, max_jump=max_jump)
        individuals = tuple(f"animal{i}" for i in range(n_keep))
        return PoseTable(data, tuple(self.card.keypoints), individuals, scorer_name(self.card, self.detector.card),
                         meta, boxes=boxes_all, skeleton=tuple(self.card.skeleton), multi_animal=True)

    def _metadata(self, info, times: StageTimes, n_frames: int, batch_size: int) -> dict:
        total = max(times.total, 1e-9)
        d = self.detector
        return {
            "model": {"name": self.card.name, "version": self.card.version, "sha256": self.sha256,
                      "source": self.source, "task": self.card.task},
            "detector": {"name": d.card.name, "version": d.card.version, "sha256": d.card.artefact.sha256,
                         "source": d.source, "providers": d.providers},
            "video": {"path": info.path, "fps": info.fps, "width": info.width, "height": info.height,
                      "n_frames": n_frames, "n_frames_header": info.n_frames, "codec": info.codec},
            "runtime": {"providers": self.providers, "threads": self.pose.model.threads, "batch_size": batch_size},
            "timings": {**times.as_dict(), "fps": round(n_frames / total, 2)},
            "pcutoff": self.card.pcutoff,
        }


def load_top_down(resolved, zoo, *, device: str = "auto", threads: int | None = None) -> TopDownPredictor:
    """A :class:`TopDownPredictor` for a resolved ``top_down`` card (resolving its detector)."""
    card = resolved.card
    det = zoo.resolve(card.detector)
    if det.card.task != "detector":
        raise PosezooError(f"{card.ref}: its detector {card.detector!r} is a {det.card.task!r} card")
    detector = BoxDetector(det.card, det.path, device=device, threads=threads,
                           max_individuals=card.max_individuals, source=det.source)
    return TopDownPredictor(card, resolved.path, detector, device=device, threads=threads,
                            source=resolved.source, sha256=card.artefact.sha256)


# -- benchmark --------------------------------------------------------------------------------
def bench_top_down(predictor: TopDownPredictor, video: str, *, frames: int = 32, batch_size: int = 16,
                   detector_every: tuple[int, ...] = (1, 10), min_seconds: float = 2.0) -> dict:
    """``posezoo bench`` for a top-down model: pose-network crops/s (ONNX Runtime alone and the
    whole crop -> keypoints stage), detector frames/s, end-to-end frames/s for each
    ``detector_every`` (the accuracy side of that trade-off: mean keypoint distance to the
    every-frame run, in pixels)."""
    from .video import iter_frames

    info = probe(video)
    imgs = list(iter_frames(video, colour_order=predictor.card.input.colour_order, max_frames=frames))
    boxes = [predictor._detect(f)[0] for f in imgs[:2]]
    boxes = [b if len(b) else np.array([[0, 0, info.width / 3, info.height / 3]], np.float32) for b in boxes]
    boxes = (boxes * len(imgs))[: len(imgs)]
    n_crops = sum(len(b) for b in boxes)
    pose = predictor.pose
    crops = np.concatenate([make_crops(f, crop_regions(xyxy_to_xywh(b), pose.crop_wh, (f.shape[1], f.shape[0])),
                                       pose.crop_wh) for f, b in zip(imgs, boxes)])
    x = normalise_batch(crops, pose.card.input, pose.crop_hw)

    from .bench import units_per_second

    def model_only():
        for i in range(0, len(x), batch_size):
            pose.model.run({pose.card.input.input_name: x[i : i + batch_size]}, pose._outputs)

    def stage():
        per_call = max(1, batch_size // max(1, n_crops // len(imgs)))
        for i in range(0, len(imgs), per_call):
            estimate_poses(pose, imgs[i : i + per_call], boxes[i : i + per_call], predictor.crop, max_crops=batch_size)

    result = {
        "model": predictor.card.ref, "detector": predictor.detector.card.ref, "video": str(video),
        "frame_size": f"{info.width}x{info.height}", "frames": len(imgs), "crops": n_crops,
        "providers": predictor.providers, "threads": pose.model.threads, "batch_size": batch_size,
        "pose_model_only_crops_per_s": round(units_per_second(model_only, n_crops, min_seconds), 2),
        "pose_stage_crops_per_s": round(units_per_second(stage, n_crops, min_seconds), 2),
        "detector_frames_per_s": round(units_per_second(lambda: predictor._detect(imgs[0]), 1, min_seconds), 3),
        "end_to_end": [],
    }
    reference = None
    for every in detector_every:
        table = predictor.predict_video(video, batch_size=batch_size, max_frames=frames, detector_every=every,
                                        keep_empty_individuals=True)
        entry = {"detector_every": every, "frames_per_s": table.metadata["timings"]["fps"],
                 "crops_per_s": table.metadata["timings"]["crops_per_s"]}
        if reference is None:
            reference = table.data
        else:
            with _quiet_nan():
                d = np.linalg.norm(table.data[..., :2] - reference[..., :2], axis=-1)
                entry["mean_px_from_every_frame"] = None if np.isnan(d).all() else round(float(np.nanmean(d)), 3)
                entry["missing_share"] = round(float(np.mean(np.isnan(table.data[..., 0]) != np.isnan(reference[..., 0]))), 4)
        result["end_to_end"].append(entry)
    return result


def format_top_down_bench(r: dict) -> str:
    lines = [
        f"top-down {r['model']} + {r['detector']} on {r['video']} ({r['frames']} frames, {r['frame_size']}, "
        f"{r['crops']} crops), providers {','.join(r['providers'])}, {r['threads']} threads, batch {r['batch_size']}",
        f"  pose network alone (ORT)    {r['pose_model_only_crops_per_s']:8.2f} crops/s",
        f"  crop -> keypoints stage     {r['pose_stage_crops_per_s']:8.2f} crops/s",
        f"  detector alone              {r['detector_frames_per_s']:8.3f} frames/s",
    ]
    for e in r["end_to_end"]:
        extra = ""
        if "mean_px_from_every_frame" in e:
            extra = f"  (vs every frame: {e['mean_px_from_every_frame']} px mean, {e['missing_share']:.1%} presence differs)"
        lines.append(f"  end-to-end, detector every {e['detector_every']:>2d}  {e['frames_per_s']:8.2f} frames/s{extra}")
    return "\n".join(lines)
