"""ONNX Runtime sessions and the NumPy pre-processing that feeds them.

Execution providers are chosen TensorRT -> CUDA -> CPU among those the installed
onnxruntime wheel offers (:func:`select_providers`, a pure function of the available
providers, the device and the precision); the GPU wheel silently falls back to the CPU
when CUDA libraries are missing, so :attr:`OrtModel.providers` reports what the session
really uses, ``device="cuda"``/``"tensorrt"`` fail loudly when the provider asked for did
not take the model, and ``"auto"`` warns when a GPU provider was offered but not used.

On a GPU, :meth:`OrtModel.run` goes through ONNX Runtime's I/O binding
(:meth:`OrtModel.run_bound`): each batch's input is copied to the device once, the
outputs stay on the device until they are copied back once. TensorRT engines are cached
under ``<posezoo cache>/trt-engines/<key>``, the key naming the model's sha256, the GPU,
the TensorRT version and the precision (:func:`trt_cache_key`), so an engine is built
once per model and machine; a missing engine is announced (the first build can take a
minute).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cards import InputSpec
from .errors import InputError, PosezooError

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
DEVICES = ("auto", "cpu", "cuda", "tensorrt", "gpu")
#: numeric precisions of a GPU session: ``fp16`` lets TensorRT run layers in half precision
GPU_PRECISIONS = ("fp32", "fp16")
#: TensorRT optimisation profile for a dynamic batch axis: 1 .. TRT_MAX_BATCH, tuned for TRT_OPT_BATCH
#: (larger batches are split by :meth:`OrtModel.run`, so the engine is never rebuilt for a new batch size)
TRT_MAX_BATCH = 128
TRT_OPT_BATCH = 32


def _cache_dir() -> Path:
    return Path(os.environ.get("POSEZOO_CACHE", Path.home() / ".cache" / "posezoo"))


def parse_device(device: str) -> tuple[str, str]:
    """``"tensorrt:fp16"`` -> ``("tensorrt", "fp16")``; ``"cuda"`` -> ``("cuda", "fp32")``."""
    text = str(device or "auto").strip().lower()
    name, _, precision = text.partition(":")
    precision = precision or "fp32"
    if name not in DEVICES:
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or tensorrt (tensorrt:fp16 for half precision)")
    if precision not in GPU_PRECISIONS:
        raise InputError(f"unknown GPU precision {precision!r} in device {device!r}: use fp32 or fp16")
    return name, precision


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text).strip()).strip("-").lower() or "unknown"


def trt_cache_key(model_sha256: str, gpu: str, trt_version: str, precision: str = "fp32") -> str:
    """The engine-cache folder name of a model on a GPU with a TensorRT version, e.g.
    ``9e8b46d411360d6c-nvidia-h200-trt10.9.0-fp16`` (an engine built for one of them is not
    valid for another)."""
    sha = str(model_sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{16,64}", sha):
        raise InputError(f"not a sha256: {model_sha256!r}")
    if precision not in GPU_PRECISIONS:
        raise InputError(f"unknown GPU precision {precision!r}: use fp32 or fp16")
    return f"{sha[:16]}-{_slug(gpu)}-trt{_slug(trt_version)}-{precision}"


def engine_cache_dir(key: str) -> Path:
    """Where TensorRT engines (and the timing cache) of ``key`` live."""
    return _cache_dir() / "trt-engines" / key


def engine_is_cached(path: str | os.PathLike) -> bool:
    """Whether a TensorRT engine was already built into this cache folder."""
    p = Path(path)
    return p.is_dir() and any(p.glob("*.engine"))


@functools.lru_cache(maxsize=1)
def gpu_name() -> str:
    """The first GPU's name (``nvidia-smi``), ``"unknown"`` without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    line = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    return line or "unknown"


@functools.lru_cache(maxsize=1)
def tensorrt_version() -> str:
    """The TensorRT library's version (``getInferLibVersion`` of libnvinfer, else the installed
    ``tensorrt`` wheel's), ``"unknown"`` without TensorRT."""
    import ctypes

    for soname in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so", "nvinfer_10.dll", "nvinfer.dll"):
        try:
            lib = ctypes.CDLL(soname)
            v = int(lib.getInferLibVersion())
        except (OSError, AttributeError):
            continue
        # TensorRT >= 10: major*10000 + minor*100 + patch; 8.x: major*1000 + minor*100 + patch
        major, rest = (v // 10000, v % 10000) if v >= 100000 else (v // 1000, v % 1000)
        return f"{major}.{rest // 100}.{rest % 100}"
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-libs", "tensorrt-cu12-libs", "tensorrt-libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trt_profile_shapes(inputs: list[tuple[str, list]], max_batch: int = TRT_MAX_BATCH,
                       opt_batch: int = TRT_OPT_BATCH) -> dict[str, str] | None:
    """TensorRT's explicit optimisation profile for inputs whose only dynamic axis is the
    batch (``[("image", ["batch", 3, 240, 320])]`` -> ``image:1x3x240x320`` ..
    ``image:128x3x240x320``); ``None`` when another axis is dynamic (the engine is then built
    for the shapes met, as TensorRT does by default)."""
    mins, opts, maxs = [], [], []
    for name, shape in inputs:
        dims = list(shape)
        if not dims or any(not isinstance(d, int) or d < 1 for d in dims[1:]):
            return None
        rest = "x".join(str(d) for d in dims[1:])
        fixed = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        lo, opt, hi = (fixed, fixed, fixed) if fixed else (1, min(opt_batch, max_batch), max_batch)
        mins.append(f"{name}:{lo}x{rest}")
        opts.append(f"{name}:{opt}x{rest}")
        maxs.append(f"{name}:{hi}x{rest}")
    if not mins:
        return None
    return {"trt_profile_min_shapes": ",".join(mins), "trt_profile_opt_shapes": ",".join(opts),
            "trt_profile_max_shapes": ",".join(maxs)}


def select_providers(device: str = "auto", precision: str | None = None, *, available: list[str] | None = None,
                     engine_cache: str | os.PathLike | None = None, trt_profile: dict | None = None,
                     device_id: int = 0) -> list:
    """Providers to ask ONNX Runtime for, best first, with their options.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "tensorrt"}, optional ``:fp16`` suffix
    precision : {"fp32", "fp16"}, optional
        Overrides the device's suffix; ``fp16`` is a TensorRT option (the CUDA provider runs
        the graph as it is), so ``cuda:fp16`` is refused.
    available : list of str
        What the onnxruntime wheel offers (default ``ort.get_available_providers()``).
    engine_cache : path, optional
        TensorRT engine (and timing) cache folder (see :func:`trt_cache_key`); without it
        TensorRT builds its engine at every start.
    trt_profile : dict, optional
        :func:`trt_profile_shapes` for the model.

    Raises
    ------
    InputError
        Unknown device or precision.
    PosezooError
        ``cuda``/``tensorrt`` asked for and this onnxruntime does not offer it.
    """
    name, suffix = parse_device(device)
    precision = (precision or suffix).lower()
    if precision not in GPU_PRECISIONS:
        raise InputError(f"unknown GPU precision {precision!r}: use fp32 or fp16")
    available = list(ort.get_available_providers() if available is None else available)
    if name == "cpu":
        return [CPU]
    if name == "cuda" and precision == "fp16":
        raise InputError("fp16 is a TensorRT option (the CUDA provider runs the fp32 graph): use tensorrt:fp16")
    wanted = {"auto": (TRT, CUDA), "gpu": (TRT, CUDA), "cuda": (CUDA,), "tensorrt": (TRT, CUDA)}[name]
    missing = TRT if name == "tensorrt" and TRT not in available else (
        CUDA if name == "cuda" and CUDA not in available else None)
    if missing:
        raise PosezooError(
            f"device {name!r} requested but this onnxruntime offers only {available} (no {missing}); "
            "install the GPU build: pip install 'posezoo[gpu]' (see benchmarks/gpu_check.sh)"
        )
    chosen: list = []
    for provider in wanted:
        if provider not in available:
            continue
        if provider == TRT:
            opts = {"device_id": str(device_id), "trt_fp16_enable": "True" if precision == "fp16" else "False"}
            if engine_cache is not None:
                opts.update({"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(engine_cache),
                             "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(engine_cache)})
            opts.update(trt_profile or {})
            chosen.append((provider, opts))
        else:
            chosen.append((provider, {"device_id": str(device_id), "cudnn_conv_use_max_workspace": "1",
                                      "do_copy_in_default_stream": "1"}))
    return chosen + [CPU]


def provider_names(providers: list) -> list[str]:
    """Names of a :func:`select_providers` list (without the options)."""
    return [p[0] if isinstance(p, tuple) else p for p in providers]


@functools.lru_cache(maxsize=1)
def preload_gpu_libraries() -> str:
    """Make CUDA/cuDNN (and TensorRT) from NVIDIA's pip wheels loadable by the GPU build of
    onnxruntime (``ort.preload_dlls``, onnxruntime >= 1.21; the ``tensorrt`` wheel loads
    libnvinfer when imported). Returns what was done, for reports; never raises."""
    done = []
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                preload()
            done.append("ort.preload_dlls")
        except Exception as exc:  # a missing wheel is reported by the session, not here
            done.append(f"ort.preload_dlls failed ({exc})")
    for module in ("tensorrt_libs", "tensorrt"):
        try:
            __import__(module)
            done.append(f"import {module}")
            break
        except Exception:
            continue
    return ", ".join(done) or "nothing"


def _stderr_notice(message: str) -> None:
    print(f"posezoo: {message}", file=sys.stderr, flush=True)


class OrtModel:
    """One ONNX Runtime inference session (thread-safe ``run``).

    Parameters
    ----------
    path : path
    device : {"auto", "cpu", "cuda", "tensorrt"}, optional ``:fp16`` (``tensorrt:fp16``)
    threads : int, optional
        Intra-op threads of the CPU provider (default: all cores).
    precision : {"fp32", "fp16"}, optional
        TensorRT precision (overrides the device's suffix).
    sha256 : str, optional
        The model file's sha256 (for the TensorRT engine-cache key; computed when missing).
    notify : callable(str), optional
        Receives the one-line notices (a TensorRT engine about to be built for the first
        time); default: printed on stderr as ``posezoo: ...``. Kept in :attr:`notices`.
    """

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None,
                 precision: str | None = None, sha256: str | None = None,
                 notify: Callable[[str], None] | None = None):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads would steal the cores the video decoder runs on.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = str(path)
        self.device = device
        name, suffix = parse_device(device)
        self.precision = (precision or suffix).lower()
        self.threads = opts.intra_op_num_threads
        self.device_id = 0
        self.notices: list[str] = []
        self.engine_cache: Path | None = None
        self.max_batch: int | None = None
        available = ort.get_available_providers()
        if name != "cpu" and set(GPU_PROVIDERS) & set(available):
            preload_gpu_libraries()
        trt_profile = None
        if name in ("auto", "gpu", "tensorrt") and TRT in available:
            key = trt_cache_key(sha256 or file_sha256(self.path), gpu_name(), tensorrt_version(), self.precision)
            self.engine_cache = engine_cache_dir(key)
            self.engine_cache.mkdir(parents=True, exist_ok=True)
            trt_profile = self._trt_profile()
            if trt_profile is not None:
                self.max_batch = TRT_MAX_BATCH
        providers = select_providers(name, self.precision, available=available, engine_cache=self.engine_cache,
                                     trt_profile=trt_profile, device_id=self.device_id)
        if self.engine_cache is not None and not engine_is_cached(self.engine_cache):
            self._notice(notify, f"building the TensorRT {self.precision} engine for {Path(self.path).name} "
                                 f"(first run on this GPU and TensorRT version: the first build can take a minute; "
                                 f"cached in {self.engine_cache})")
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts, providers=providers)
        except PosezooError:
            raise
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise PosezooError(f"{path}: ONNX Runtime cannot load this model: {exc}") from exc
        self.providers: list[str] = list(self.session.get_providers())
        wanted_gpu = [p for p in provider_names(providers) if p in GPU_PROVIDERS]
        if name in ("cuda", "gpu", "tensorrt") and not set(self.providers) & set(GPU_PROVIDERS):
            raise PosezooError(
                f"device {device!r} requested but ONNX Runtime fell back to {self.providers} "
                "(CUDA/cuDNN libraries missing?)"
            )
        if name == "tensorrt" and TRT not in self.providers:
            raise PosezooError(
                f"device {device!r} requested but ONNX Runtime did not take TensorRT ({self.providers}): "
                "TensorRT libraries missing? (pip install tensorrt-cu12 or -cu13, matching onnxruntime-gpu's CUDA)"
            )
        if name == "auto" and wanted_gpu and not set(self.providers) & set(GPU_PROVIDERS):
            warnings.warn(f"onnxruntime offers {wanted_gpu} but the session fell back to {self.providers} "
                          "(CUDA/cuDNN libraries missing?); running on the CPU", RuntimeWarning, stacklevel=2)
        if TRT not in self.providers:
            self.max_batch = None
        #: the first provider is a GPU one: :meth:`run` binds inputs/outputs on the device
        self.uses_gpu = bool(self.providers) and self.providers[0] in GPU_PROVIDERS
        self.binding_device = "cuda" if self.uses_gpu else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _notice(self, notify, message: str) -> None:
        self.notices.append(message)
        (notify or _stderr_notice)(message)

    def _trt_profile(self) -> dict | None:
        """TensorRT's batch profile, from the graph's input shapes (read by a CPU session)."""
        try:
            probe = ort.InferenceSession(self.path, providers=[CPU])
        except Exception:
            return None  # the real session reports the error
        return trt_profile_shapes([(i.name, i.shape) for i in probe.get_inputs()])

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Outputs ``{name: array}`` for ``feeds``; on a GPU through :meth:`run_bound`."""
        names = outputs or self.output_names
        if not self.uses_gpu:
            return dict(zip(names, self.session.run(names, feeds)))
        n = len(next(iter(feeds.values()))) if feeds else 0
        if self.max_batch is None or n <= self.max_batch:
            return self.run_bound(feeds, names)
        parts = [self.run_bound({k: v[i : i + self.max_batch] for k, v in feeds.items()}, names)
                 for i in range(0, n, self.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in names}

    def run_bound(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
                  device: str | None = None) -> dict[str, np.ndarray]:
        """One run through ONNX Runtime's I/O binding: each input is copied to ``device``
        (default: the session's, ``cuda`` on a GPU) once, the outputs are allocated there and
        copied back to NumPy once. Works on the CPU too (``device="cpu"``), with the same
        results as :meth:`run`."""
        names = outputs or self.output_names
        device = device or self.binding_device
        binding = self.session.io_binding()
        keep = []  # the OrtValues must outlive the run
        for name, arr in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device, self.device_id)
            keep.append(value)
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, device, self.device_id)
        self.session.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()
        return dict(zip(names, out))


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
    Area averaging by a non-integer factor (640x480 into 480x360) takes at most 4 channels
    in OpenCV, so those images are resized one by one.
    """
    import cv2

    n, h, w, c = images.shape
    tw, th = size_wh
    if (w, h) == (tw, th):
        return images
    area = tw <= w and th <= h
    interp = cv2.INTER_AREA if area else cv2.INTER_LINEAR
    if area and (w % tw or h % th):
        per_call = 1
    else:
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
