"""Predictors: one small class per model kind, preprocess -> infer -> postprocess.

The predictor is immutable after construction (the ONNX session is thread-safe), so
one instance can serve many videos and threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cards import ModelCard
from .decoding import decode_outputs, to_frame_coordinates
from .dlc import scorer_name
from .errors import InputError, PosezooError, TruncatedVideoError
from .filtering import filter_poses, outlier_frames
from .runtime import OrtModel, ResizePlan, normalise_batch, plan_resize, resize_batch
from .table import PoseTable
from .video import iter_batches, probe
from .zoo import ResolvedModel, Zoo, default_zoo

ProgressCallback = Callable[[int, int], None]


@dataclass
class StageTimes:
    """Wall-clock seconds spent per stage of :meth:`PosePredictor.predict_video`."""

    video_wait: float = 0.0
    preprocess: float = 0.0
    inference: float = 0.0
    decode: float = 0.0
    total: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "video_wait_s": round(self.video_wait, 4),
            "preprocess_s": round(self.preprocess, 4),
            "inference_s": round(self.inference, 4),
            "decode_s": round(self.decode, 4),
            "total_s": round(self.total, 4),
            **self.extra,
        }


class FrameLoop:
    """The frame loop every predictor shares: batches from the video decoder, time spent
    waiting for them, progress, and a truncated video noted instead of raised.

    Use as ``with FrameLoop(...) as loop: for batch in loop: ...``; afterwards
    ``loop.done`` frames were consumed, ``loop.truncated`` holds the
    :class:`TruncatedVideoError` (or None) and ``times.total`` the wall time.
    """

    def __init__(self, video, info, batch_size: int, times: StageTimes, *, size=None, colour_order: str = "RGB",
                 max_frames: int | None = None, progress: bool | ProgressCallback = False):
        self.times = times
        self.expected = min(info.n_frames, max_frames) if max_frames else info.n_frames
        self.done = 0
        self.truncated: TruncatedVideoError | None = None
        self._bar, self._callback = _progress(progress, self.expected, Path(video).name)
        self._batches = iter_batches(video, batch_size, size=size, colour_order=colour_order, max_frames=max_frames)
        self._t_start = time.perf_counter()

    def __iter__(self):
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(self._batches)
            except StopIteration:
                return
            except TruncatedVideoError as exc:
                self.truncated = exc
                return
            finally:
                self.times.video_wait += time.perf_counter() - t0
            yield batch
            self.done += len(batch.frames)
            if self._callback:
                self._callback(self.done, max(self.expected, self.done))

    def __enter__(self) -> "FrameLoop":
        return self

    def __exit__(self, *exc) -> None:
        self._batches.close()
        if self._bar is not None:
            self._bar.close()
        self.times.total = time.perf_counter() - self._t_start


def finish_poses(data: np.ndarray, meta: dict, loop: FrameLoop, info, *, pcutoff: float, allow_truncated: bool,
                 filter: str | None, filter_window: int, max_jump: float | None) -> np.ndarray:
    """What every predictor does after its loop: refuse (or note) a truncated video,
    filter, and list outlier frames in ``meta``. Returns the (filtered) poses."""
    if loop.truncated is not None:
        if not allow_truncated:
            raise loop.truncated
        meta["truncated"] = {"frames_read": loop.truncated.frames_read, "error": str(loop.truncated)}
    if filter:
        data = filter_poses(data, filter, filter_window)
        meta["filter"] = {"method": filter, "window": filter_window}
    diag = float(np.hypot(info.width, info.height))
    meta["outliers"] = outlier_frames(data, pcutoff, max_jump or 0.05 * diag)
    meta["fit"] = model_fit(data, pcutoff)
    return data


#: A video "fits" a model when at least this share of its frames has an animal with at
#: least half of its keypoints over the cutoff.
MIN_CONFIDENT_FRAMES = 0.5


def model_fit(data: np.ndarray, pcutoff: float) -> dict:
    """How well a model's confidence says it fits a video.

    Parameters
    ----------
    data : ndarray, shape (n_frames, n_individuals, n_keypoints, 3)
    pcutoff : float

    Returns
    -------
    dict
        ``confident_frames``: share of frames where some animal has at least half of its
        keypoints at ``pcutoff`` or above; ``fits``: whether that is at least
        :data:`MIN_CONFIDENT_FRAMES`.
    """
    if data.shape[0] == 0 or data.shape[2] == 0:
        return {"confident_frames": 0.0, "fits": False, "pcutoff": float(pcutoff)}
    confident = np.nan_to_num(data[..., 2], nan=0.0) >= pcutoff  # (frames, individuals, keypoints)
    share = float((confident.mean(axis=2) >= 0.5).any(axis=1).mean())
    return {"confident_frames": round(share, 4), "fits": share >= MIN_CONFIDENT_FRAMES, "pcutoff": float(pcutoff)}


def fit_warning(card: ModelCard, fit: dict, zoo: Zoo | None = None) -> str | None:
    """A one-line warning when the video does not look like what ``card`` was trained on,
    naming its species and view and the zoo's ready alternatives; ``None`` when it fits."""
    if not fit or fit.get("fits", True):
        return None
    zoo = zoo or default_zoo()
    others = [f"{c.name} ({'/'.join(c.species)}, {c.view} view)" for c in zoo.alternatives(card)[:4]]
    return (f"{card.ref} is a {'/'.join(card.species)} model ({card.view} view) and it is confident on only "
            f"{fit['confident_frames']:.0%} of the frames: the video may show another species or view"
            + (f"; other ready models: {', '.join(others)}" if others else "")
            + " (posezoo zoo list shows every model)")


class PosePredictor:
    """Full-frame (single-animal) heatmap model: frames in, keypoints in frame pixels out.

    Parameters
    ----------
    card : ModelCard
    model_path : path
        The verified ONNX file.
    device : {"auto", "cpu", "cuda", "tensorrt"}
    threads : int, optional
        ONNX Runtime intra-op threads (default: all cores).
    source : str
        Where the artefact came from (for metadata).
    """

    def __init__(self, card: ModelCard, model_path: str | Path, *, device: str = "auto",
                 threads: int | None = None, source: str = "", sha256: str | None = None,
                 test_time_flip: bool | None = None):
        if card.task != "single_animal":
            raise PosezooError(f"{card.ref}: task {card.task!r} is not served by the full-frame predictor")
        self.card = card
        self.model = OrtModel(model_path, device=device, threads=threads)
        self.source = source
        self.sha256 = sha256 or card.artefact.sha256
        spec = card.outputs
        missing = [n for n in (spec.heatmap, spec.locref) if n and n not in self.model.output_names]
        if missing or card.input.input_name not in self.model.input_names:
            raise PosezooError(
                f"{card.ref}: the ONNX model does not match its card (inputs {self.model.input_names}, "
                f"outputs {self.model.output_names}; card wants {card.input.input_name} -> {spec.heatmap}, {spec.locref})"
            )
        self._outputs = [spec.heatmap] + ([spec.locref] if spec.locref else [])
        #: test-time flip: the card's ``test_time_flip`` unless overridden here
        self.test_time_flip = bool(card.test_time_flip if test_time_flip is None else test_time_flip)
        self._flip_perm = flip_permutation(card.keypoints, card.flip_pairs)

    @property
    def providers(self) -> list[str]:
        """Execution providers the session really uses, best first."""
        return self.model.providers

    @property
    def keypoints(self) -> list[str]:
        return list(self.card.keypoints)

    # -- core -----------------------------------------------------------------------------
    def _infer(self, resized: np.ndarray, plan: ResizePlan, times: StageTimes | None = None) -> np.ndarray:
        """Resized frames ``(n, h, w, 3)`` -> keypoints ``(n, 1, K, 3)`` in frame pixels."""
        t0 = time.perf_counter()
        x = normalise_batch(resized, self.card.input, plan.input_hw)
        t1 = time.perf_counter()
        out = self.run_network(x)
        t2 = time.perf_counter()
        kp = decode_outputs(out, self.card.outputs, plan.input_hw)
        kp = to_frame_coordinates(kp, plan.scale, (0.0, 0.0))
        t3 = time.perf_counter()
        if times is not None:
            times.preprocess += t1 - t0
            times.inference += t2 - t1
            times.decode += t3 - t2
        return kp[:, None]

    def run_network(self, x: np.ndarray) -> dict:
        """The network on a normalised batch ``(n, 3, H, W)``: its outputs by name, with
        test-time flip (when on) folded in, so ``(n, K, h, w)`` heatmaps either way.

        With flip the mirrored batch runs in the same call (``2n`` images) and its outputs
        are mirrored back and averaged with the plain ones (:func:`unflip_outputs`)."""
        feed = self.card.input.input_name
        if not self.test_time_flip:
            return self.model.run({feed: x}, self._outputs)
        n = x.shape[0]
        both = self.model.run({feed: np.concatenate([x, x[..., ::-1]])}, self._outputs)
        return average_flipped({k: v[:n] for k, v in both.items()}, {k: v[n:] for k, v in both.items()},
                               self.card.outputs, self._flip_perm)

    def predict_images(self, images: np.ndarray, *, colour_order: str = "RGB", batch_size: int = 16) -> np.ndarray:
        """Predict keypoints on same-sized images.

        Parameters
        ----------
        images : ndarray, shape (n_images, height, width, 3) or (height, width, 3), uint8
        colour_order : {"RGB", "BGR"}
            Order of the given images (OpenCV reads BGR).
        batch_size : int

        Returns
        -------
        ndarray, shape (n_images, 1, n_keypoints, 3)
            ``x, y`` in image pixels and the likelihood.
        """
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
            raise InputError(f"images must have shape (n, height, width, 3), got {arr.shape}")
        if arr.dtype != np.uint8:
            raise InputError(f"images must be uint8, got {arr.dtype}")
        if colour_order.upper() != self.card.input.colour_order:
            arr = arr[..., ::-1]
        plan = plan_resize((arr.shape[2], arr.shape[1]), self.card.input)
        chunks = [
            self._infer(resize_batch(arr[i : i + batch_size], plan.resized_wh), plan)
            for i in range(0, arr.shape[0], batch_size)
        ]
        return np.concatenate(chunks)

    def predict_video(
        self,
        video: str | os.PathLike,
        *,
        batch_size: int = 16,
        progress: bool | ProgressCallback = False,
        filter: str | None = None,
        filter_window: int = 5,
        max_jump: float | None = None,
        allow_truncated: bool = False,
        max_frames: int | None = None,
    ) -> PoseTable:
        """Predict every frame of a video, streaming (memory does not grow with length).

        Parameters
        ----------
        video : path
        batch_size : int
            Frames per ONNX Runtime call.
        progress : bool or callable(frames_done, frames_total)
            ``True`` shows a tqdm bar on stderr.
        filter : {None, "median", "savgol"}
            Optional temporal filter of the positions (raw likelihoods are kept).
        filter_window : int
        max_jump : float, optional
            Pixels between consecutive frames above which a keypoint counts as an
            outlier (default: 5 % of the frame diagonal).
        allow_truncated : bool
            On a truncated video return the frames that decoded (the metadata says
            where decoding stopped) instead of raising :class:`TruncatedVideoError`.
        max_frames : int, optional
            Only the first ``max_frames`` frames.

        Returns
        -------
        PoseTable
            ``data`` of shape ``(n_frames, 1, n_keypoints, 3)``.
        """
        info = probe(video)
        plan = plan_resize(info.size, self.card.input)
        times = StageTimes()
        chunks: list[np.ndarray] = []
        with FrameLoop(video, info, batch_size, times, size=plan.resized_wh if plan.needs_resize else None,
                       colour_order=self.card.input.colour_order, max_frames=max_frames, progress=progress) as loop:
            for batch in loop:
                chunks.append(self._infer(batch.frames, plan, times))
        n_kp = self.card.n_keypoints
        data = np.concatenate(chunks) if chunks else np.zeros((0, 1, n_kp, 3), np.float32)
        meta = self._metadata(info, times, loop.done, batch_size)
        data = finish_poses(data, meta, loop, info, pcutoff=self.card.pcutoff, allow_truncated=allow_truncated,
                            filter=filter, filter_window=filter_window, max_jump=max_jump)
        return PoseTable(data, tuple(self.card.keypoints), ("animal0",), scorer_name(self.card), meta,
                         skeleton=tuple(self.card.skeleton), multi_animal=False)

    def _metadata(self, info, times: StageTimes, n_frames: int, batch_size: int) -> dict:
        total = max(times.total, 1e-9)
        return {
            "model": {"name": self.card.name, "version": self.card.version, "sha256": self.sha256,
                      "source": self.source, "task": self.card.task},
            "video": {"path": info.path, "fps": info.fps, "width": info.width, "height": info.height,
                      "n_frames": n_frames, "n_frames_header": info.n_frames, "codec": info.codec},
            "runtime": {"providers": self.providers, "threads": self.model.threads, "batch_size": batch_size,
                        "test_time_flip": self.test_time_flip},
            "timings": {**times.as_dict(), "fps": round(n_frames / total, 2)},
            "pcutoff": self.card.pcutoff,
        }


def flip_permutation(keypoints, flip_pairs) -> np.ndarray:
    """Index permutation that swaps each left/right pair, shape ``(n_keypoints,)``."""
    names = list(keypoints)
    perm = np.arange(len(names))
    for a, b in flip_pairs:
        ia, ib = names.index(a), names.index(b)
        perm[ia], perm[ib] = ib, ia
    return perm


def unflip_outputs(out: dict, spec, flip_perm: np.ndarray) -> dict:
    """Outputs of left/right-mirrored inputs, mapped back to the un-mirrored frame.

    A heatmap cell ``ix`` of a ``w``-wide map is centred at ``(ix + 1/2) * s`` of the
    ``W = w * s`` wide input, so mirroring the input (``u -> W - u``, the convention the
    training's flip augmentation uses) mirrors the cells (``ix -> w - 1 - ix``) exactly;
    each keypoint's maps are then swapped with its flip partner, and the ``dx`` of the
    location refinement changes sign (``dy`` stays).

    Parameters
    ----------
    out : dict
        ``{name: array}`` with ``spec.heatmap`` ``(n, K, h, w)`` and, if the card has
        one, ``spec.locref`` ``(n, 2K, h, w)`` (channels ``dx0, dy0, dx1, dy1, ...``).
    spec : OutputSpec
    flip_perm : ndarray, shape (K,)

    Returns
    -------
    dict
        The same names, un-mirrored (new arrays).
    """
    perm = np.asarray(flip_perm)
    res = dict(out)
    heat = np.asarray(out[spec.heatmap])
    res[spec.heatmap] = heat[:, perm, :, ::-1].copy()
    if spec.locref and spec.locref in out:
        lr = np.asarray(out[spec.locref])
        n, c, h, w = lr.shape
        lr = lr.reshape(n, c // 2, 2, h, w)[:, perm, :, :, ::-1].copy()
        lr[:, :, 0] *= -1.0
        res[spec.locref] = lr.reshape(n, c, h, w)
    return res


def average_flipped(plain: dict, mirrored: dict, spec, flip_perm: np.ndarray) -> dict:
    """Test-time flip: the mean of ``plain`` outputs and :func:`unflip_outputs` of the
    ``mirrored`` ones (heatmaps and location refinement), float32."""
    back = unflip_outputs(mirrored, spec, flip_perm)
    names = [spec.heatmap] + ([spec.locref] if spec.locref and spec.locref in plain else [])
    return {k: (0.5 * (np.asarray(plain[k], np.float32) + np.asarray(back[k], np.float32))).astype(np.float32)
            for k in names}


def _progress(progress, total: int, label: str):
    if callable(progress):
        return None, progress
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total or None, unit="frame", desc=label, leave=False, dynamic_ncols=True)

        def update(done: int, _total: int) -> None:
            bar.update(done - bar.n)

        return bar, update
    return None, None


def load(model: str = "default", *, device: str = "auto", threads: int | None = None, zoo: Zoo | None = None,
         precision: str = "fp32", test_time_flip: bool | None = None) -> PosePredictor:
    """Load a zoo model for inference.

    Parameters
    ----------
    model : str
        ``"name[@version]"``, an alias (``"mouse"``), ``"default"`` (the bundled model)
        or a path to a ``card.yaml``.
    device : {"auto", "cpu", "cuda", "tensorrt"}
        ``auto`` uses TensorRT/CUDA when onnxruntime-gpu finds a GPU, else the CPU.
    threads : int, optional
    zoo : Zoo, optional
    precision : {"fp32", "int8"}
        ``int8``: the model's static-quantised CPU variant (its own card and artefact,
        ``posezoo_mouse@1.1.0-int8``; see :mod:`posezoo.quantize`). A model without one, or
        an unknown precision, raises :class:`~posezoo.errors.PrecisionError` naming the
        precisions the model has. A ``model`` that names a variant itself is that variant.
    test_time_flip : bool, optional
        Override the card's ``test_time_flip`` (full-frame models only; None: as the card says).

    Returns
    -------
    PosePredictor, or a :class:`posezoo.topdown.TopDownPredictor` for a ``top_down`` card
    """
    zoo = zoo or default_zoo()
    resolved: ResolvedModel = zoo.resolve(DEFAULT_MODEL if model == "default" else model, precision=precision)
    if resolved.card.task == "top_down":  # detector + crops: posezoo.topdown.TopDownPredictor
        from .topdown import load_top_down

        return load_top_down(resolved, zoo, device=device, threads=threads)
    return PosePredictor(resolved.card, resolved.path, device=device, threads=threads,
                         source=resolved.source, sha256=resolved.card.artefact.sha256, test_time_flip=test_time_flip)


#: The bundled model used when none is named.
DEFAULT_MODEL = os.environ.get("POSEZOO_DEFAULT_MODEL", "posezoo_mouse")
