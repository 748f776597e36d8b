"""The training loop: AdamW, linear warm-up then cosine decay, periodic checkpoints,
a tqdm progress bar with the loss, and a seeded, deterministic run."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..decoding import decode_heatmaps
from ..errors import PosezooError
from .backbone import INPUT_MEAN, INPUT_STD
from .data import AugmentConfig, SampleSource, labels_to_network, normalise, resize_frames
from .model import STRIDE, PoseNet


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the model card).

    ``input_hw`` is the network input (the card's ``input.size``); ``sigma`` the
    Gaussian target's standard deviation and ``locref_radius`` the radius of the
    offset targets, both in input pixels; ``locref_std`` divides the offsets;
    ``locref_weight`` scales the offset loss against the heatmap loss.
    """

    steps: int = 1500
    batch_size: int = 8
    lr: float = 1.5e-3
    backbone_lr_factor: float = 0.5
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_factor: float = 0.01
    input_hw: tuple[int, int] = (240, 320)
    sigma: float = 3.0
    locref_radius: float = 8.0
    locref_std: float = 4.0
    locref_weight: float = 20.0
    pos_weight: float = 20.0
    head_width: int = 64
    freeze_blocks: int = 5
    pretrained: bool = True
    seed: int = 0
    threads: int | None = None
    checkpoint_every: int = 250
    eval_every: int = 200
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["input_hw"] = list(self.input_hw)
        d["augment"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["augment"].items()}
        return d


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (warm-up, then cosine)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def pose_loss(heat_logits: torch.Tensor, locref: torch.Tensor, batch: dict[str, torch.Tensor],
              locref_weight: float, pos_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Heatmap + location-refinement loss.

    Heatmaps: binary cross-entropy of the logits against the Gaussian targets, each
    cell weighted ``1 + pos_weight * target``, summed over the cells and averaged over
    labelled keypoints (unlabelled ones weigh 0).
    Offsets: Huber loss over the cells near each labelled keypoint, averaged over them.

    Parameters
    ----------
    heat_logits : Tensor, shape (B, K, h, w)
    locref : Tensor, shape (B, 2K, h, w)
    batch : dict
        ``heatmap`` (B, K, h, w), ``heatmap_weight`` (B, K, 1, 1), ``locref`` and
        ``locref_weight`` (B, 2K, h, w).
    """
    hw = batch["heatmap_weight"]
    target = batch["heatmap"]
    bce = F.binary_cross_entropy_with_logits(heat_logits, target, reduction="none")
    # cells near a keypoint weigh up to 1 + pos_weight: a few positive cells against
    # thousands of background cells would otherwise learn the peaks very slowly
    heat = (bce * hw * (1.0 + pos_weight * target)).sum() / hw.sum().clamp(min=1.0)
    lw = batch["locref_weight"]
    hub = F.smooth_l1_loss(locref, batch["locref"], reduction="none", beta=1.0)
    loc = (hub * lw).sum() / lw.sum().clamp(min=1.0)
    total = heat + locref_weight * loc
    return total, {"heatmap": float(heat.detach()), "locref": float(loc.detach())}


def predict_torch(model: PoseNet, images: np.ndarray, cfg: TrainConfig, batch_size: int = 16) -> np.ndarray:
    """Keypoints in network-input pixels for network-size frames (PyTorch, eval mode).

    Parameters
    ----------
    images : ndarray, shape (n, H, W, 3), uint8

    Returns
    -------
    ndarray, shape (n, K, 3)
        ``x, y, likelihood`` (decoded as posezoo's runtime does).
    """
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(normalise(images[i : i + batch_size], INPUT_MEAN, INPUT_STD))
            heat, loc = model(x)
            out.append(decode_heatmaps(heat.numpy(), loc.numpy(), input_hw=cfg.input_hw, locref_std=cfg.locref_std,
                                       activation="none" if model.sigmoid else "sigmoid"))
    model.train(was_training)
    return np.concatenate(out)


def mean_error(pred_xy: np.ndarray, truth_xy: np.ndarray) -> float:
    """Mean Euclidean distance over labelled points (NaN truth ignored)."""
    d = np.linalg.norm(pred_xy - truth_xy, axis=-1)
    return float(np.nanmean(d))


@dataclass
class TrainResult:
    """What :func:`fit` returns: the trained network and its history."""

    model: PoseNet
    config: TrainConfig
    history: list[dict]
    seconds: float
    checkpoint: Path | None


def _set_determinism(seed: int, threads: int | None) -> None:
    """Seed PyTorch (the data pipeline has its own Generator) and pin its threads."""
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


def build_model(n_keypoints: int, cfg: TrainConfig, init: str | Path | None = None) -> PoseNet:
    """A fresh :class:`PoseNet` (ImageNet backbone), or one loaded from a checkpoint."""
    model = PoseNet(n_keypoints, pretrained=cfg.pretrained and init is None, width=cfg.head_width)
    if init is not None:
        state = load_checkpoint(init)
        weights = state["model"]
        if weights["out.weight"].shape[0] != 3 * n_keypoints:
            raise PosezooError(f"{init}: this checkpoint predicts {weights['out.weight'].shape[0] // 3} keypoints, "
                               f"the labelled data has {n_keypoints}")
        try:
            model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
        except RuntimeError as exc:  # another head width (TrainConfig.head_width) or network
            first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise PosezooError(f"{init}: this checkpoint's network differs from the one configured "
                               f"(head_width {cfg.head_width}): {first}") from None
    return model


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise PosezooError(f"{path}: not a posezoo training checkpoint ({exc})") from exc


def save_checkpoint(path: Path, model: PoseNet, step: int, cfg: TrainConfig, *, half: bool = False,
                    extra: dict | None = None) -> Path:
    """Write the weights (and the step and config as JSON) atomically."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    payload = {"model": state, "step": step, "config": json.dumps(cfg.as_dict()), **(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def fit(train_images: np.ndarray, train_coords: np.ndarray, flip_perm: np.ndarray, cfg: TrainConfig, *,
        frame_wh: tuple[int, int], test_images: np.ndarray | None = None, test_coords: np.ndarray | None = None,
        init: str | Path | None = None, workdir: str | Path | None = None, progress: bool = True,
        log=print, sample_repeats: np.ndarray | None = None) -> TrainResult:
    """Train a pose network.

    Parameters
    ----------
    train_images : ndarray, shape (n, h, w, 3), uint8
        Full frames, RGB.
    train_coords : ndarray, shape (n, K, 2)
        Frame-pixel labels, NaN where unlabelled.
    flip_perm : ndarray, shape (K,)
        Left/right swap (:func:`posezoo.training.data.flip_permutation`).
    cfg : TrainConfig
    frame_wh : (int, int)
        Size of the frames (all equal).
    test_images, test_coords : optional
        Monitored every ``cfg.eval_every`` steps (mean pixel error in frame pixels);
        they never influence the training.
    init : path, optional
        Checkpoint to start from (fine-tuning) instead of the ImageNet weights.
    workdir : path, optional
        Where ``checkpoint.pt`` is written every ``cfg.checkpoint_every`` steps.
    progress : bool
        tqdm bar with the running loss.
    log : callable
        Receives one line per evaluation.
    sample_repeats : ndarray, shape (n,), optional
        Draws of each training frame per pass (default: one each).
    """
    _set_determinism(cfg.seed, cfg.threads)
    h, w = cfg.input_hw
    scale = (frame_wh[0] / w, frame_wh[1] / h)
    if abs(scale[0] - scale[1]) > 1e-6 * scale[0]:
        raise PosezooError(f"frames of {frame_wh[0]}x{frame_wh[1]} do not letterbox exactly into {w}x{h}; "
                           "choose an input size with the frames' aspect ratio")
    model = build_model(train_coords.shape[1], cfg, init).freeze_early(cfg.freeze_blocks)
    model.train()
    source = SampleSource(
        resize_frames(train_images, (w, h)), labels_to_network(train_coords, scale), flip_perm,
        stride=STRIDE, sigma=cfg.sigma, locref_radius=cfg.locref_radius, locref_std=cfg.locref_std,
        mean=INPUT_MEAN, std=INPUT_STD, augment_cfg=cfg.augment, seed=cfg.seed, repeats=sample_repeats,
    )
    test_small = resize_frames(test_images, (w, h)) if test_images is not None and len(test_images) else None
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in trainable if n.startswith(("stem", "blocks"))]
    head = [p for n, p in trainable if not n.startswith(("stem", "blocks"))]
    opt = torch.optim.AdamW([{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor, "base": cfg.backbone_lr_factor},
                             {"params": head, "lr": cfg.lr, "base": 1.0}], lr=cfg.lr, weight_decay=cfg.weight_decay)
    work = Path(workdir) if workdir else None
    ckpt_path = work / "checkpoint.pt" if work else None
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, unit="step", desc="train", dynamic_ncols=True)
    t0 = time.perf_counter()
    running = None
    try:
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * group["base"] * lr_factor(step, cfg)
            batch = {k: torch.from_numpy(v) for k, v in source.batch(cfg.batch_size).items()}
            heat, loc = model(batch["image"])
            loss, parts = pose_loss(heat, loc, batch, cfg.locref_weight, cfg.pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", heat=f"{parts['heatmap']:.4f}", locref=f"{parts['locref']:.4f}")
            done = step + 1
            if ckpt_path and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_checkpoint(ckpt_path, model, done, cfg)
            if test_small is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                pred = predict_torch(model, test_small, cfg)
                err = mean_error(pred[..., :2] * np.asarray(scale), test_coords)
                entry = {"step": done, "loss": round(running, 5), "test_mean_px": round(err, 3),
                         "seconds": round(time.perf_counter() - t0, 1)}
                history.append(entry)
                log(json.dumps(entry))
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return TrainResult(model, cfg, history, time.perf_counter() - t0, ckpt_path)
