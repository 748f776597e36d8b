"""The GPU check behind ``benchmarks/gpu_check.sh``: which providers posezoo picks and, on a
GPU, what they deliver.

``python -m posezoo.gpu --dry-run`` (any machine, no GPU needed) prints, for each
configuration (CPU, CUDA fp32, TensorRT fp32, TensorRT fp16), the providers
:func:`posezoo.runtime.select_providers` would ask ONNX Runtime for with the installed
wheel, or why it cannot, and the TensorRT engine-cache folder; it exits 0.

Without ``--dry-run`` it measures, for the bundled model and each configuration the
machine can run: the providers the session really uses, model-only and end-to-end
frames/s on a 640x480 video, the parity of the keypoints with the CPU's, and the
HRNet-w32 top-down pose network's crops/s (the network alone and the whole crop ->
keypoints stage, crops of several frames batched into each call). The HRNet-w32 ONNX is
the converted ``superanimal_topviewmouse`` when the zoo has it locally; otherwise a
randomly initialised network of the same architecture and input (timm's ``hrnet_w32``
trunk, its stride-4 branch, a 1x1 head to 27 heatmaps, 256x256 RGB), built once into the
posezoo cache when torch and timm are installed; else it is skipped. The output says
which. A time budget (``--budget``, default 270 s) keeps the whole check within five
minutes: what does not fit is skipped, and said so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import PosezooError
from .runtime import (
    CPU,
    GPU_PROVIDERS,
    TRT,
    _cache_dir,
    engine_cache_dir,
    engine_is_cached,
    gpu_name,
    provider_names,
    select_providers,
    tensorrt_version,
    trt_cache_key,
)

#: (device, precision) pairs the check measures, CPU first (the parity reference)
CONFIGS = (("cpu", "fp32"), ("cuda", "fp32"), ("tensorrt", "fp32"), ("tensorrt", "fp16"))
BUNDLED = "posezoo_mouse"
HRNET_CARD = "superanimal_topviewmouse"
REPO = Path(__file__).resolve().parents[1]
OPENFIELD_VIDEO = REPO.parent / "shared" / "data" / "openfield" / "videos" / "m3v1mp4.mp4"


def device_spec(device: str, precision: str) -> str:
    return device if precision == "fp32" else f"{device}:{precision}"


def plan_configs(available: list[str], model_sha256: str, gpu: str = "unknown", trt_version: str = "unknown") -> list[dict]:
    """What each configuration would use with these available providers (pure: nothing is loaded).

    Returns one dict per :data:`CONFIGS` entry, plus ``auto``: ``device`` (the spec),
    ``providers`` (names, best first) or ``error`` (why it cannot run here), and
    ``engine_cache`` (the TensorRT engine folder, when TensorRT is among the providers).
    """
    out = []
    for device, precision in CONFIGS + (("auto", "fp32"),):
        spec = device_spec(device, precision)
        entry: dict = {"device": spec}
        uses_trt = device in ("auto", "tensorrt") and TRT in available
        cache = engine_cache_dir(trt_cache_key(model_sha256, gpu, trt_version, precision)) if uses_trt else None
        try:
            entry["providers"] = provider_names(select_providers(spec, available=available, engine_cache=cache))
        except PosezooError as exc:
            entry["error"] = str(exc)
        if cache is not None and "providers" in entry:
            entry["engine_cache"] = str(cache)
        out.append(entry)
    return out


def hrnet_source(zoo=None) -> tuple[str, Path | None]:
    """Which HRNet-w32 ONNX the check would use: ``("zoo", path)``, ``("random", path)``
    (built already, or buildable: ``path`` is where it goes) or ``("skip", None)``."""
    from .errors import ZooError
    from .zoo import default_zoo

    zoo = zoo or default_zoo()
    try:  # unpublished: found only when converted on this machine (`posezoo zoo pull`), no network
        return "zoo", zoo.resolve(HRNET_CARD).path
    except ZooError:
        pass
    path = _cache_dir() / "bench" / "hrnet_w32_random_256.onnx"
    if path.exists():
        return "random", path
    from importlib.util import find_spec

    if find_spec("torch") is None or find_spec("timm") is None:
        return "skip", None
    return "random", path


def build_random_hrnet(path: Path, n_keypoints: int = 27, size: int = 256) -> Path:
    """A randomly initialised HRNet-w32 pose network as ONNX (``image`` (n, 3, 256, 256) float
    -> ``heatmaps`` (n, 27, 64, 64)): timm's ``hrnet_w32`` trunk, the stride-4 branch, a 1x1
    head, the shape of DeepLabCut's SuperAnimal HRNet-w32 (its FLOPs, not its weights)."""
    import timm
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = timm.create_model("hrnet_w32", pretrained=False, features_only=True, out_indices=(1,),
                                           feature_location="")
            self.head = torch.nn.Conv2d(self.trunk.feature_info.channels()[0], n_keypoints, 1)

        def forward(self, x):
            return self.head(self.trunk(x)[0])

    torch.manual_seed(0)
    net = Net().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part.onnx")
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, size, size), str(tmp), input_names=["image"],
                          output_names=["heatmaps"], dynamic_axes={"image": {0: "batch"}, "heatmaps": {0: "batch"}},
                          opset_version=17, dynamo=False)
    tmp.replace(path)
    return path


def _report_header(out) -> dict:
    available = ort.get_available_providers()
    info = {
        "onnxruntime": ort.__version__,
        "available_providers": available,
        "gpu": gpu_name(),
        "tensorrt": tensorrt_version() if TRT in available else "not offered by this onnxruntime",
    }
    try:
        from onnxruntime.capi import build_and_package_info

        cuda = getattr(build_and_package_info, "cuda_version", None)
    except ImportError:
        cuda = None
    if cuda:
        info["onnxruntime_cuda"] = cuda
    print(f"onnxruntime {info['onnxruntime']}, available providers: {', '.join(available)}", file=out)
    print(f"GPU: {info['gpu']}; TensorRT: {info['tensorrt']}", file=out)
    return info


def dry_run(out=sys.stdout) -> dict:
    """Print (and return) what a real run would use; loads nothing on a GPU."""
    from .zoo import default_zoo

    info = _report_header(out)
    zoo = default_zoo()
    card = zoo.card(BUNDLED)
    plan = plan_configs(info["available_providers"], card.artefact.sha256, info["gpu"],
                        info["tensorrt"] if TRT in info["available_providers"] else "unknown")
    print(f"bundled model {card.ref} (sha256 {card.artefact.sha256[:16]}...):", file=out)
    for entry in plan:
        if "error" in entry:
            print(f"  {entry['device']:<14} would not run here: {entry['error']}", file=out)
        else:
            line = f"  {entry['device']:<14} providers {' > '.join(entry['providers'])}"
            if "engine_cache" in entry:
                state = "cached" if engine_is_cached(entry["engine_cache"]) else "first build can take a minute"
                line += f"; TensorRT engine cache {entry['engine_cache']} ({state})"
            print(line, file=out)
    kind, path = hrnet_source(zoo)
    print({"zoo": f"HRNet-w32: the converted {HRNET_CARD} ONNX ({path})",
           "random": f"HRNet-w32: a randomly initialised HRNet-w32-shaped ONNX (same 256x256 input), {path}",
           "skip": f"HRNet-w32: skipped ({HRNET_CARD} is not converted locally and torch/timm are missing)"}[kind],
          file=out)
    video = OPENFIELD_VIDEO if OPENFIELD_VIDEO.exists() else "a synthetic 640x480 video (the openfield video is absent)"
    print(f"video: {video}", file=out)
    print("dry run: nothing measured", file=out)
    return {**info, "plan": plan, "hrnet": kind}


# -- measurements -----------------------------------------------------------------------------
def _video(path: str | None, frames: int) -> str:
    if path:
        return str(path)
    if OPENFIELD_VIDEO.exists():
        return str(OPENFIELD_VIDEO)
    from .synthetic import make_mouse_video

    target = _cache_dir() / "bench" / f"mouse_640x480_{frames}.mp4"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        make_mouse_video(target, frames, 640, 480, 30.0, seed=1)
    return str(target)


def parity(reference: np.ndarray, other: np.ndarray, pcutoff: float) -> dict:
    """Keypoint agreement of two ``(n, 1, K, 3)`` predictions: pixel distance where the reference
    is confident, and the largest likelihood difference."""
    conf = reference[..., 2] >= pcutoff
    d = np.linalg.norm(other[..., :2] - reference[..., :2], axis=-1)[conf]
    if d.size == 0:
        return {"n": 0}
    return {"n": int(d.size), "mean_px": round(float(d.mean()), 4), "max_px": round(float(d.max()), 4),
            "within_1px": round(float((d <= 1.0).mean()), 4),
            "max_likelihood_diff": round(float(np.abs(other[..., 2] - reference[..., 2]).max()), 4)}


def _unavailable(entry: dict, spec: str, prefix: str, out) -> bool:
    try:
        select_providers(spec)
    except PosezooError as exc:
        entry["error"] = str(exc)
        print(f"{prefix}{spec:<14} not available: {exc}", file=out)
        return True
    return False


def _over_budget(entry: dict, spec: str, deadline: float, prefix: str, out) -> bool:
    if time.monotonic() <= deadline:
        return False
    entry["skipped"] = "time budget spent"
    print(f"{prefix}{spec:<14} skipped: time budget spent (--budget)", file=out)
    return True


def measure_bundled(video: str, *, frames: int, batch_size: int, deadline: float, out=sys.stdout) -> list[dict]:
    from .bench import model_only_fps
    from .predictor import load

    results, reference = [], None
    for device, precision in CONFIGS:
        spec = device_spec(device, precision)
        entry: dict = {"model": BUNDLED, "device": spec}
        results.append(entry)
        if _unavailable(entry, spec, "  ", out) or _over_budget(entry, spec, deadline, "  ", out):
            continue
        try:
            t0 = time.perf_counter()
            predictor = load(BUNDLED, device=spec)
            entry["load_s"] = round(time.perf_counter() - t0, 2)
        except PosezooError as exc:
            entry["error"] = str(exc)
            print(f"  {spec:<14} not available: {exc}", file=out)
            continue
        entry["providers"] = predictor.providers
        entry["io_binding"] = predictor.model.uses_gpu
        seconds = 1.0 if device == "cpu" else 2.0
        entry["model_only_fps"] = round(model_only_fps(predictor, video, batch_size, n_frames=4 * batch_size,
                                                       min_seconds=seconds), 1)
        n = min(frames, 256) if device == "cpu" else frames
        predictor.predict_video(video, batch_size=batch_size, max_frames=batch_size)  # warm-up
        table = predictor.predict_video(video, batch_size=batch_size, max_frames=n)
        t = table.metadata["timings"]
        entry.update({"frames": table.n_frames, "end_to_end_fps": round(table.n_frames / t["total_s"], 1),
                      "share_video_wait": round(t["video_wait_s"] / t["total_s"], 3)})
        if reference is None and device == "cpu":
            reference = table.data
        elif reference is not None:
            m = min(len(reference), len(table.data))
            entry["parity_vs_cpu"] = parity(reference[:m], table.data[:m], predictor.card.pcutoff)
        line = (f"  {spec:<14} providers {','.join(entry['providers'])}: model-only {entry['model_only_fps']:.1f} "
                f"frames/s, end-to-end {entry['end_to_end_fps']:.1f} frames/s over {entry['frames']} frames "
                f"(waiting for video {entry['share_video_wait']:.0%}), load {entry['load_s']} s")
        if "parity_vs_cpu" in entry:
            p = entry["parity_vs_cpu"]
            line += (f"; vs CPU: mean {p.get('mean_px')} px, max {p.get('max_px')} px, "
                     f"{p.get('within_1px', 0):.1%} within 1 px")
        print(line, file=out, flush=True)
    return results


def measure_hrnet(video: str, *, batch_size: int, deadline: float, out=sys.stdout) -> list[dict]:
    from .bench import units_per_second
    from .topdown import CropPoseModel, estimate_poses
    from .video import iter_frames
    from .zoo import default_zoo

    zoo = default_zoo()
    kind, path = hrnet_source(zoo)
    if kind == "skip":
        print(f"  HRNet-w32 skipped: {HRNET_CARD} is not converted locally and torch/timm are missing", file=out)
        return [{"model": "hrnet_w32", "skipped": "no ONNX and no torch/timm"}]
    if kind == "random" and not path.exists():
        t0 = time.perf_counter()
        build_random_hrnet(path)
        print(f"  built a randomly initialised HRNet-w32 ONNX in {time.perf_counter() - t0:.1f} s: {path}", file=out)
    label = HRNET_CARD if kind == "zoo" else "random HRNet-w32 (same architecture and input, no trained weights)"
    card = zoo.card(HRNET_CARD)
    frames = list(iter_frames(video, max_frames=16))
    h, w = frames[0].shape[:2]
    rng = np.random.default_rng(0)
    boxes = []  # 4 mouse-sized boxes a frame
    for _ in frames:
        xy = rng.uniform([0, 0], [w - 120, h - 120], size=(4, 2))
        boxes.append(np.concatenate([xy, xy + 120], axis=1).astype(np.float32))
    results, reference = [], None
    for device, precision in CONFIGS:
        spec = device_spec(device, precision)
        entry: dict = {"model": label, "device": spec}
        results.append(entry)
        if _unavailable(entry, spec, "  HRNet-w32 ", out) or _over_budget(entry, spec, deadline, "  HRNet-w32 ", out):
            continue
        try:
            pose = CropPoseModel(card, path, device=spec)
        except PosezooError as exc:
            entry["error"] = str(exc)
            print(f"  HRNet-w32 {spec:<14} not available: {exc}", file=out)
            continue
        entry["providers"] = pose.model.providers
        per_call = batch_size if device == "cpu" else 128
        x = rng.normal(size=(per_call, 3, *pose.crop_hw)).astype(np.float32)
        seconds = 1.0 if device == "cpu" else 2.0
        entry["model_only_crops_per_s"] = round(units_per_second(lambda: pose.model.run({card.input.input_name: x}), per_call,
                                                      seconds), 1)
        n_crops = sum(len(b) for b in boxes)
        entry["stage_crops_per_s"] = round(units_per_second(lambda: estimate_poses(pose, frames, boxes, max_crops=per_call),
                                                 n_crops, seconds), 1)
        kp = np.concatenate(estimate_poses(pose, frames, boxes, max_crops=per_call))
        if reference is None:
            reference = kp
        else:
            d = np.linalg.norm(kp[..., :2] - reference[..., :2], axis=-1)
            entry["parity_vs_cpu"] = {"mean_px": round(float(np.nanmean(d)), 4), "max_px": round(float(np.nanmax(d)), 4)}
        line = (f"  HRNet-w32 {spec:<14} providers {','.join(entry['providers'])}: network alone "
                f"{entry['model_only_crops_per_s']:.1f} crops/s (batch {per_call}), crop -> keypoints stage "
                f"{entry['stage_crops_per_s']:.1f} crops/s ({len(frames)} frames x 4 crops per call)")
        if "parity_vs_cpu" in entry:
            line += f"; vs CPU: mean {entry['parity_vs_cpu']['mean_px']} px"
        print(line, file=out, flush=True)
    return results


def full_run(*, video: str | None = None, frames: int = 2330, batch_size: int = 64, budget: float = 270.0,
             hrnet: bool = True, out=sys.stdout) -> dict:
    start = time.monotonic()
    info = _report_header(out)
    if not set(info["available_providers"]) & set(GPU_PROVIDERS):
        print("no GPU provider in this onnxruntime: only the CPU figures follow "
              "(install the GPU build: benchmarks/gpu_check.sh without --no-install)", file=out)
    clip = _video(video, frames)
    print(f"video {clip}; batch {batch_size}; budget {budget:.0f} s", file=out)
    print(f"bundled model {BUNDLED}:", file=out, flush=True)
    # HRNet gets the last ~40 % of the budget
    bundled = measure_bundled(clip, frames=frames, batch_size=batch_size, deadline=start + 0.6 * budget, out=out)
    heavy = []
    if hrnet:
        print("HRNet-w32 top-down pose network:", file=out, flush=True)
        heavy = measure_hrnet(clip, batch_size=batch_size, deadline=start + budget, out=out)
    print(f"done in {time.monotonic() - start:.0f} s", file=out)
    return {**info, "video": clip, "bundled": bundled, "hrnet": heavy, "wall_s": round(time.monotonic() - start, 1),
            "cpu_provider": CPU}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m posezoo.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the providers each configuration would use; "
                                                           "measure nothing (works without a GPU)")
    ap.add_argument("--video", help="video to measure on (default: the openfield video, else a synthetic 640x480 one)")
    ap.add_argument("--frames", type=int, default=2330, help="frames of the end-to-end runs")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for all measurements (what does not fit is skipped)")
    ap.add_argument("--no-hrnet", action="store_true", help="skip the HRNet-w32 crops/s")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.dry_run:
        result = dry_run()
    else:
        result = full_run(video=args.video, frames=args.frames, batch_size=args.batch_size, budget=args.budget,
                          hrnet=not args.no_hrnet)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
