"""posezoo's top-down pose stage (ONNX Runtime) next to DeepLabCut's own PyTorch runner,
on the same network (one checkpoint), the same frames and the same boxes, hence the same
crops: crops/s and frames/s of ``crops -> network -> keypoints in frame pixels``."""

from __future__ import annotations

import os
import time

import numpy as np


def fixed_boxes(frame_wh: tuple[int, int], animals: int, size: float = 0.3) -> np.ndarray:
    """``animals`` boxes (``x1, y1, x2, y2``) spread over the frame (the same for every frame)."""
    fw, fh = frame_wh
    bw, bh = fw * size, fh * size
    cx = np.linspace(fw * 0.25, fw * 0.75, animals) if animals > 1 else np.array([fw / 2])
    cy = np.full(animals, fh / 2)
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1).astype(np.float32)


def dlc_pose_runner(dataset: str, pose_model: str, checkpoint, *, max_individuals: int, batch_size: int):
    """DeepLabCut's top-down pose InferenceRunner for a checkpoint (CPU)."""
    from deeplabcut.pose_estimation_pytorch.apis.utils import get_inference_runners

    from .superanimal import default_detector, dlc_config

    cfg = dlc_config(dataset, pose_model, default_detector(dataset, pose_model), max_individuals=max_individuals)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    pose_runner, _ = get_inference_runners(cfg, snapshot_path=str(checkpoint), max_individuals=max_individuals,
                                           batch_size=batch_size, device="cpu")
    return pose_runner


def dlc_detector_runner(dataset: str, detector: str, checkpoint, *, max_individuals: int):
    """DeepLabCut's detector InferenceRunner for a checkpoint (CPU, nothing downloaded)."""
    from deeplabcut.pose_estimation_pytorch.apis.utils import get_inference_runners

    from .superanimal import dlc_config, no_weight_download

    cfg = dlc_config(dataset, None, detector, max_individuals=max_individuals)  # the dataset's default pose model
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    with no_weight_download():
        _, det_runner = get_inference_runners(cfg, snapshot_path=None, max_individuals=max_individuals,
                                              device="cpu", detector_path=str(checkpoint))
    return det_runner


def dlc_poses(runner, frames, boxes_xyxy) -> list[np.ndarray]:
    """DeepLabCut's keypoints ``(n_i, K, 3)`` for given boxes (its postprocessor pads with -1)."""
    items = []
    for f, b in zip(frames, boxes_xyxy):
        b = np.asarray(b, np.float32).reshape(-1, 4)
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
        items.append((f, {"bboxes": xywh, "bbox_scores": np.ones(len(b), np.float32)}))
    out = runner.inference(items)
    return [np.asarray(o["bodyparts"])[: len(b)] for o, b in zip(out, boxes_xyxy)]


def bench_crops(video: str, dataset: str, pose_model: str, checkpoint, onnx_path, *, frames: int = 32,
                animals: int = 1, batch_size: int = 16, threads: int | None = None, repeats: int = 1) -> dict:
    import torch

    from posezoo.topdown import CropPoseModel, estimate_poses
    from posezoo.video import iter_frames

    from .superanimal import default_detector, pose_card

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    imgs = list(iter_frames(video, colour_order="RGB", max_frames=frames))
    wh = (imgs[0].shape[1], imgs[0].shape[0])
    boxes = [fixed_boxes(wh, animals)] * len(imgs)
    card = pose_card(dataset, pose_model, default_detector(dataset, pose_model), locations=["local"])
    pz = CropPoseModel(card, onnx_path, device="cpu", threads=threads)
    dlc = dlc_pose_runner(dataset, pose_model, checkpoint, max_individuals=animals, batch_size=batch_size)

    def run_pz():
        out = []
        per_call = max(1, batch_size // animals)
        for i in range(0, len(imgs), per_call):
            out += estimate_poses(pz, imgs[i : i + per_call], boxes[i : i + per_call], max_crops=batch_size)
        return out

    def run_dlc():
        return dlc_poses(dlc, imgs, boxes)

    # warm-up (sessions, allocators, DLC's worker thread)
    estimate_poses(pz, imgs[:1], boxes[:1])
    dlc_poses(dlc, imgs[:1], boxes[:1])
    timings = {"posezoo": [], "deeplabcut": []}
    results = {}
    for _ in range(repeats):  # interleaved, so that a busy machine hurts both alike
        for name, fn in (("posezoo", run_pz), ("deeplabcut", run_dlc)):
            t0 = time.perf_counter()
            results[name] = fn()
            timings[name].append(time.perf_counter() - t0)
    n_crops = len(imgs) * animals
    a, b = np.concatenate(results["posezoo"]), np.concatenate(results["deeplabcut"])
    best = {k: min(v) for k, v in timings.items()}
    return {
        "network": f"superanimal_{dataset}_{pose_model}",
        "video": str(video), "frames": len(imgs), "frame_size": f"{wh[0]}x{wh[1]}",
        "crops": n_crops, "animals_per_frame": animals, "batch_size": batch_size, "threads": threads,
        "torch": torch.__version__,
        "posezoo_crops_per_s": round(n_crops / best["posezoo"], 2),
        "deeplabcut_crops_per_s": round(n_crops / best["deeplabcut"], 2),
        "posezoo_frames_per_s": round(len(imgs) / best["posezoo"], 2),
        "deeplabcut_frames_per_s": round(len(imgs) / best["deeplabcut"], 2),
        "speedup": round(best["deeplabcut"] / best["posezoo"], 3),
        "max_keypoint_diff_px": round(float(np.abs(a[..., :2] - b[..., :2]).max()), 5),
        # random weights give flat heatmaps: a near-tie (1e-6) can flip one argmax between runtimes
        "keypoints_within_0.1px": round(float((np.abs(a[..., :2] - b[..., :2]).max(-1) <= 0.1).mean()), 4),
        "seconds": {k: [round(x, 3) for x in v] for k, v in timings.items()},
    }


def format_result(r: dict) -> str:
    return "\n".join([
        f"{r['network']}: {r['frames']} frames ({r['frame_size']}), {r['crops']} crops, batch {r['batch_size']}, "
        f"{r['threads']} threads",
        f"  posezoo (ONNX Runtime)     {r['posezoo_crops_per_s']:8.2f} crops/s  {r['posezoo_frames_per_s']:8.2f} frames/s",
        f"  DeepLabCut (PyTorch {r['torch']}) {r['deeplabcut_crops_per_s']:8.2f} crops/s  "
        f"{r['deeplabcut_frames_per_s']:8.2f} frames/s",
        f"  speed-up {r['speedup']:.2f}x; {r['keypoints_within_0.1px']:.1%} of keypoints agree within 0.1 px "
        f"(max {r['max_keypoint_diff_px']} px)",
    ])


def bench_modelzoo(video: str, tarball, catalog, name: str, *, frames: int = 16, threads: int | None = None,
                   repeats: int = 2) -> dict:
    """A TF model-zoo network: DeepLabCut's TF ``getpose`` vs posezoo's full-frame predictor
    (ONNX Runtime) on the same frames, one frame per call for both (DeepLabCut's single-frame
    path), plus posezoo's batched throughput; keypoint agreement between the two."""
    import tempfile

    import posezoo
    from posezoo.video import iter_frames
    from posezoo.zoo import Zoo

    from .modelzoo import DlcTfPredictor, import_tensorflow, open_tarball

    tf = import_tensorflow()
    threads = threads or os.cpu_count() or 1
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    imgs = np.stack(list(iter_frames(video, colour_order="RGB", max_frames=frames)))
    predictor = posezoo.load(name, device="cpu", threads=threads, zoo=Zoo([catalog], include_bundled=False))
    with tempfile.TemporaryDirectory(prefix="posezoo-bench-") as tmp:
        dlc = DlcTfPredictor(open_tarball(tarball, tmp))
        try:
            runs = {
                "deeplabcut": lambda: np.stack([dlc.pose(f) for f in imgs]),
                "posezoo": lambda: np.concatenate([predictor.predict_images(f[None], batch_size=1) for f in imgs]),
                "posezoo_batched": lambda: predictor.predict_images(imgs, batch_size=8),
            }
            for fn in runs.values():  # warm-up: sessions, allocators, TF's graph
                fn()
            timings = {k: [] for k in runs}
            results = {}
            for _ in range(repeats):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    results[k] = fn()
                    timings[k].append(time.perf_counter() - t0)
        finally:
            dlc.close()
    a = results["posezoo"][:, 0]
    b = results["deeplabcut"]
    best = {k: min(v) for k, v in timings.items()}
    d = np.abs(a[..., :2] - b[..., :2]).max(-1)
    return {
        "network": name, "video": str(video), "frames": len(imgs),
        "frame_size": f"{imgs.shape[2]}x{imgs.shape[1]}", "threads": threads, "tensorflow": tf.__version__,
        **{f"{k}_frames_per_s": round(len(imgs) / v, 2) for k, v in best.items()},
        "speedup": round(best["deeplabcut"] / best["posezoo"], 3),
        "speedup_batched": round(best["deeplabcut"] / best["posezoo_batched"], 3),
        "max_keypoint_diff_px": round(float(d.max()), 5),
        "keypoints_within_0.1px": round(float((d <= 0.1).mean()), 4),
    }


def format_modelzoo_result(r: dict) -> str:
    return "\n".join([
        f"{r['network']}: {r['frames']} frames ({r['frame_size']}), {r['threads']} threads",
        f"  DeepLabCut TF {r['tensorflow']} getpose      {r['deeplabcut_frames_per_s']:8.2f} frames/s",
        f"  posezoo (ONNX Runtime), 1 frame/call {r['posezoo_frames_per_s']:8.2f} frames/s  ({r['speedup']:.2f}x)",
        f"  posezoo, batches of 8               {r['posezoo_batched_frames_per_s']:8.2f} frames/s  "
        f"({r['speedup_batched']:.2f}x)",
        f"  {r['keypoints_within_0.1px']:.1%} of keypoints agree within 0.1 px (max {r['max_keypoint_diff_px']} px)",
    ])
