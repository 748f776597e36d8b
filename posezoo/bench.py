"""`posezoo bench`: throughput, pipeline efficiency, stage shares and peak RSS, all
measured in one run so that the ratios compare like with like."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np

from .predictor import PosePredictor
from .runtime import normalise_batch, plan_resize
from .video import iter_frames, probe


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def units_per_second(fn, units: int, min_seconds: float, *, warm_up: bool = True) -> float:
    """Rate of ``fn()``, which does ``units`` units of work a call: called once to warm up
    (TensorRT/cuDNN pick their kernels then), then repeatedly for at least ``min_seconds``."""
    if warm_up:
        fn()
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += units
        if time.perf_counter() - t0 >= min_seconds:
            return done / (time.perf_counter() - t0)


def model_only_fps(predictor: PosePredictor, video: str, batch_size: int, n_frames: int = 128,
                   min_seconds: float = 3.0) -> float:
    """The network alone: frames/s on pre-decoded, pre-normalised batches (both passes of a
    card with test-time flip, as prediction runs them)."""
    info = probe(video)
    plan = plan_resize(info.size, predictor.card.input)
    frames = np.stack(list(iter_frames(video, size=plan.resized_wh if plan.needs_resize else None,
                                       colour_order=predictor.card.input.colour_order, max_frames=n_frames)))
    batches = [normalise_batch(frames[i : i + batch_size], predictor.card.input, plan.input_hw)
               for i in range(0, len(frames), batch_size)]
    predictor.run_network(batches[0])  # warm-up (a whole pass follows in units_per_second's)

    def one_pass() -> None:
        for x in batches:
            predictor.run_network(x)

    return units_per_second(one_pass, len(frames), min_seconds, warm_up=False)


def video_only_fps(predictor: PosePredictor, video: str, max_frames: int | None = None) -> float:
    """Decoding (and resizing) alone, frames/s."""
    info = probe(video)
    plan = plan_resize(info.size, predictor.card.input)
    t0, n = time.perf_counter(), 0
    for _ in iter_frames(video, size=plan.resized_wh if plan.needs_resize else None, max_frames=max_frames):
        n += 1
    return n / (time.perf_counter() - t0)


def _rss_child(model: str, video: str, max_frames: int | None, batch_size: int, threads: int | None) -> float:
    """Peak RSS of a fresh process predicting ``max_frames`` frames (None: all)."""
    code = (
        "import json, posezoo, posezoo.bench as b\n"
        f"p = posezoo.load({model!r}, device='cpu', threads={threads!r})\n"
        f"t = p.predict_video({video!r}, batch_size={batch_size}, max_frames={max_frames!r})\n"
        "print(json.dumps({'rss': b.peak_rss_mb(), 'frames': t.n_frames}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_bench(predictor: PosePredictor, model_ref: str, video: str, *, batch_size: int = 16,
              max_frames: int | None = None, rss: bool = True, threads: int | None = None) -> dict:
    """Measure everything ``posezoo bench`` reports; returns a JSON-able dict."""
    info = probe(video)
    # model-only before and after the end-to-end run: this machine's speed drifts by
    # +-15 % over a minute, so one measurement on one side would bias the ratio
    model_before = model_only_fps(predictor, video, batch_size)
    vid_fps = video_only_fps(predictor, video, max_frames)
    table = predictor.predict_video(video, batch_size=batch_size, max_frames=max_frames)
    model_after = model_only_fps(predictor, video, batch_size)
    model_fps = (model_before + model_after) / 2
    t = table.metadata["timings"]
    wall = t["total_s"]
    result = {
        "model": model_ref,
        "video": video,
        "frames": table.n_frames,
        "frame_size": f"{info.width}x{info.height}",
        "providers": predictor.providers,
        "io_binding": bool(getattr(predictor.model, "uses_gpu", False)),
        "threads": predictor.model.threads,
        "batch_size": batch_size,
        "model_only_fps": round(model_fps, 1),
        "model_only_fps_before_after": [round(model_before, 1), round(model_after, 1)],
        "end_to_end_fps": round(table.n_frames / wall, 1),
        "pipeline_efficiency": round(table.n_frames / wall / model_fps, 3),
        "video_decode_only_fps": round(vid_fps, 1),
        "share_preprocess": round(t["preprocess_s"] / wall, 4),
        "share_inference": round(t["inference_s"] / wall, 4),
        "share_decoding": round(t["decode_s"] / wall, 4),
        "share_video_wait": round(t["video_wait_s"] / wall, 4),
    }
    if rss:
        n = table.n_frames
        small = _rss_child(model_ref, video, max(1, n // 10), batch_size, threads)
        full = _rss_child(model_ref, video, max_frames, batch_size, threads)
        result.update({
            "peak_rss_mb_full": round(full["rss"], 1),
            "peak_rss_mb_tenth": round(small["rss"], 1),
            "frames_tenth": small["frames"],
            "peak_rss_ratio": round(full["rss"] / small["rss"], 3),
        })
    return result


def format_bench(r: dict) -> str:
    lines = [
        f"model {r['model']} on {r['video']} ({r['frames']} frames, {r['frame_size']}), "
        f"providers {','.join(r['providers'])}{' (I/O binding)' if r.get('io_binding') else ''}, "
        f"{r['threads']} threads, batch {r['batch_size']}",
        f"  model-only ORT throughput   {r['model_only_fps']:8.1f} frames/s "
        f"(mean of {r['model_only_fps_before_after'][0]:.1f} before and {r['model_only_fps_before_after'][1]:.1f} after)",
        f"  end-to-end throughput       {r['end_to_end_fps']:8.1f} frames/s",
        f"  pipeline efficiency         {r['pipeline_efficiency']:8.3f}  (end-to-end / model-only)",
        f"  video decode alone          {r['video_decode_only_fps']:8.1f} frames/s",
        f"  wall-time shares            preprocess {r['share_preprocess']:.1%}, inference {r['share_inference']:.1%}, "
        f"decoding {r['share_decoding']:.2%}, waiting for video {r['share_video_wait']:.1%}",
    ]
    if "peak_rss_mb_full" in r:
        lines.append(
            f"  peak RSS                    {r['peak_rss_mb_full']:.1f} MiB all frames vs "
            f"{r['peak_rss_mb_tenth']:.1f} MiB first {r['frames_tenth']} frames (ratio {r['peak_rss_ratio']:.3f})"
        )
    return "\n".join(lines)


def run_bench_precisions(predictors: dict, video: str, *, batch_size: int = 16, max_frames: int | None = None,
                         rss: bool = True, threads: int | None = None) -> dict:
    """:func:`run_bench` for each precision's predictor (``{"fp32": p32, "int8": p8}``) in one run,
    and the speed-ups over the first one.

    This machine's speed drifts over a minute, so the end-to-end pass is run twice per
    precision, in the order A B then B A, and averaged (``end_to_end_fps_passes``); the
    model-only figure is already the mean of a measurement before and after.
    """
    order = list(predictors)
    results = {p: run_bench(pred, pred.card.ref, video, batch_size=batch_size, max_frames=max_frames, rss=rss,
                            threads=threads) for p, pred in predictors.items()}
    for p in reversed(order):
        table = predictors[p].predict_video(video, batch_size=batch_size, max_frames=max_frames)
        first = results[p]["end_to_end_fps"]
        second = round(table.n_frames / table.metadata["timings"]["total_s"], 1)
        results[p]["end_to_end_fps_passes"] = [first, second]
        results[p]["end_to_end_fps"] = round((first + second) / 2, 1)
        results[p]["pipeline_efficiency"] = round(results[p]["end_to_end_fps"] / results[p]["model_only_fps"], 3)
    base = order[0]
    out = {"precisions": results, "baseline": base, "speedup_end_to_end": {}, "speedup_model_only": {}}
    for p in order[1:]:
        out["speedup_end_to_end"][p] = round(results[p]["end_to_end_fps"] / results[base]["end_to_end_fps"], 3)
        out["speedup_model_only"][p] = round(results[p]["model_only_fps"] / results[base]["model_only_fps"], 3)
    return out


def format_bench_precisions(r: dict) -> str:
    lines = []
    for p, one in r["precisions"].items():
        lines.append(f"[{p}] " + format_bench(one))
        if "end_to_end_fps_passes" in one:
            a, b = one["end_to_end_fps_passes"]
            lines.append(f"  end-to-end passes           {a:8.1f} and {b:.1f} frames/s (order A B, then B A)")
    base = r["baseline"]
    for p, x in r["speedup_end_to_end"].items():
        e2e, e2e_base = r["precisions"][p]["end_to_end_fps"], r["precisions"][base]["end_to_end_fps"]
        lines.append(f"{p} vs {base}: end to end {e2e:.1f} vs {e2e_base:.1f} frames/s = {x:.2f}x; "
                     f"model only {r['speedup_model_only'][p]:.2f}x")
    return "\n".join(lines)

