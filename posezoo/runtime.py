"""ONNX Runtime sessions and the NumPy pre-processing that feeds them.

Execution providers are chosen TensorRT -> CUDA -> CPU among those the installed
onnxruntime wheel offers; the GPU wheel silently falls back to the CPU when CUDA
libraries are missing, so :attr:`OrtModel.providers` reports what the session really
uses, and ``device="cuda"`` fails loudly when no GPU provider took the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cards import InputSpec
from .errors import InputError, PosezooError

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _cache_dir() -> Path:
    return Path(os.environ.get("POSEZOO_CACHE", Path.home() / ".cache" / "posezoo"))


def select_providers(device: str = "auto") -> list:
    """Providers to ask ONNX Runtime for, best first, for ``device`` auto|cpu|cuda|tensorrt."""
    available = ort.get_available_providers()
    device = device.lower()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    wanted = {
        "auto": GPU_PROVIDERS,
        "cuda": ("CUDAExecutionProvider",),
        "gpu": GPU_PROVIDERS,
        "tensorrt": GPU_PROVIDERS,
    }.get(device)
    if wanted is None:
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or tensorrt")
    chosen: list = []
    for name in wanted:
        if name not in available:
            continue
        if name == "TensorrtExecutionProvider":
            engine_cache = _cache_dir() / "trt-engines"
            engine_cache.mkdir(parents=True, exist_ok=True)
            chosen.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache)}))
        else:
            chosen.append(name)
    if device != "auto" and not chosen:
        raise PosezooError(
            f"device {device!r} requested but this onnxruntime offers only {available}; "
            "install the GPU build: pip install 'posezoo[gpu]'"
        )
    return chosen + ["CPUExecutionProvider"]


class OrtModel:
    """One ONNX Runtime inference session (thread-safe ``run``)."""

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads would steal the cores the video decoder runs on.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = str(path)
        self.device = device
        self.threads = opts.intra_op_num_threads
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=select_providers(device))
        except PosezooError:
            raise
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise PosezooError(f"{path}: ONNX Runtime cannot load this model: {exc}") from exc
        self.providers: list[str] = list(self.session.get_providers())
        if device.lower() in ("cuda", "gpu", "tensorrt") and not set(self.providers) & set(GPU_PROVIDERS):
            raise PosezooError(
                f"device {device!r} requested but ONNX Runtime fell back to {self.providers} "
                "(CUDA/cuDNN libraries missing?)"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds)))


@dataclass(frozen=True)
class ResizePlan:
    """How frames of one size become network inputs, and how to map points back.

    ``resized_wh`` is the size the frame is scaled to (inside the video decoder or by
    :func:`resize_batch`); ``input_hw`` the padded network input; ``scale`` the
    per-axis factor ``(sx, sy)`` from input pixels back to frame pixels.
    """

    frame_wh: tuple[int, int]
    resized_wh: tuple[int, int]
    input_hw: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        return self.frame_wh[0] / self.resized_wh[0], self.frame_wh[1] / self.resized_wh[1]

    @property
    def needs_resize(self) -> bool:
        return self.resized_wh != self.frame_wh


def plan_resize(frame_wh: tuple[int, int], spec: InputSpec) -> ResizePlan:
    """Plan the resize/pad of ``(width, height)`` frames for a card's input spec."""
    fw, fh = int(frame_wh[0]), int(frame_wh[1])
    if fw < 1 or fh < 1:
        raise InputError(f"invalid frame size {frame_wh}")
    if spec.size == "any":
        pad = spec.pad_to
        return ResizePlan((fw, fh), (fw, fh), (-(-fh // pad) * pad, -(-fw // pad) * pad))
    h, w = spec.size
    if spec.resize == "stretch":
        return ResizePlan((fw, fh), (w, h), (h, w))
    s = min(w / fw, h / fh)
    rw, rh = max(1, min(w, round(fw * s))), max(1, min(h, round(fh * s)))
    return ResizePlan((fw, fh), (rw, rh), (h, w))


def resize_batch(images: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize ``(n, h, w, 3)`` uint8 images to ``size_wh`` with area averaging.

    One OpenCV call per 42 images: the batch is laid out as the channels of a single
    image (OpenCV resizes up to 128 channels at once), not looped over image by image.
    """
    import cv2

    n, h, w, c = images.shape
    tw, th = size_wh
    if (w, h) == (tw, th):
        return images
    interp = cv2.INTER_AREA if tw <= w and th <= h else cv2.INTER_LINEAR
    per_call = max(1, 128 // c)  # the most channels this OpenCV resizes in one call
    out = np.empty((n, th, tw, c), np.uint8)
    for i in range(0, n, per_call):
        chunk = images[i : i + per_call]
        stacked = np.ascontiguousarray(chunk.transpose(1, 2, 0, 3)).reshape(h, w, -1)
        resized = cv2.resize(stacked, (tw, th), interpolation=interp).reshape(th, tw, len(chunk), c)
        out[i : i + len(chunk)] = resized.transpose(2, 0, 1, 3)
    return out


def normalise_batch(images: np.ndarray, spec: InputSpec, input_hw: tuple[int, int]) -> np.ndarray:
    """Turn resized frames into the network input, vectorised over the batch.

    Parameters
    ----------
    images : ndarray, shape (n, h, w, 3), uint8
        Frames already in the card's colour order and resized (``h <= H``, ``w <= W``).
    spec : InputSpec
    input_hw : (int, int)
        ``(H, W)`` of the network input; the bottom/right remainder is zero-padded
        (zero after normalisation, i.e. the mean colour).

    Returns
    -------
    ndarray, shape (n, 3, H, W), float32
        uint8 pixels, padded with the mean colour, for a ``dtype: uint8`` input (INT8
        variants normalise inside the graph).
    """
    if images.ndim != 4 or images.shape[3] != 3:
        raise InputError(f"images must have shape (n, h, w, 3), got {images.shape}")
    n, h, w, _ = images.shape
    H, W = input_hw
    if h > H or w > W:
        raise InputError(f"images of {w}x{h} do not fit the network input {W}x{H}")
    if spec.dtype == "uint8":
        pixels = np.full((n, 3, H, W), spec.pad_value, dtype=np.uint8)
        pixels[:, :, :h, :w] = images.transpose(0, 3, 1, 2)
        return pixels
    a = (1.0 / (spec.pixel_range * np.asarray(spec.std, dtype=np.float32))).astype(np.float32)
    b = (-np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)).astype(np.float32)
    out = np.zeros((n, 3, H, W), dtype=np.float32)
    chw = images.transpose(0, 3, 1, 2)  # a view: the cast below does the copy once
    dst = out[:, :, :h, :w]
    np.multiply(chw, a[None, :, None, None], out=dst, casting="unsafe")
    dst += b[None, :, None, None]
    return out
