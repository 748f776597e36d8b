"""Random-weight SuperAnimal checkpoints in exactly DeepLabCut's format, for tests and benchmarks.

The real checkpoints live on the Hugging Face Hub; where it cannot be reached, these stand in
for them: DeepLabCut's own architectures, DeepLabCut's snapshot layout (``{"model":
state_dict}``), random weights made numerically tame:

- BatchNorm statistics are calibrated on real images (a randomly initialised HRNet has
  exploding activations; with calibrated statistics its outputs are well conditioned and
  ONNX Runtime and PyTorch agree to float32 precision);
- the detector's classification bias favours "animal", so that boxes survive the 0.6
  score threshold and the whole top-down pipeline runs.

Random weights say nothing about accuracy: everything measured with them is mechanics and
numerical parity, never pose quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .superanimal import DETECTORS, IMAGENET_MEAN, IMAGENET_STD, build_detector, build_pose_model, save_checkpoint


def normalise(images: np.ndarray) -> np.ndarray:
    """``(n, h, w, 3)`` uint8 RGB -> ``(n, 3, h, w)`` float32, ImageNet-normalised (DeepLabCut's A.Normalize)."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def calibrate_batchnorm(module, batches) -> int:
    """Set every BatchNorm's running statistics to the cumulative average over ``batches``
    (float32 ``(n, 3, h, w)`` tensors fed to ``module``); returns the number of BN layers."""
    import torch

    from torchvision.ops import FrozenBatchNorm2d

    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    frozen = [m for m in module.modules() if isinstance(m, FrozenBatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.eval()
    for bn in bns:
        bn.train()
    counts: dict[int, int] = {}

    def frozen_stats(mod, args):  # FrozenBatchNorm2d: the same cumulative average, by hand
        x = args[0]
        n = counts.get(id(mod), 0)
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        if n == 0:
            mod.running_mean.copy_(mean)
            mod.running_var.copy_(var)
        else:
            mod.running_mean.mul_(n / (n + 1)).add_(mean / (n + 1))
            mod.running_var.mul_(n / (n + 1)).add_(var / (n + 1))
        counts[id(mod)] = n + 1

    hooks = [m.register_forward_pre_hook(frozen_stats) for m in frozen]
    try:
        with torch.no_grad():
            for x in batches:
                module(x)
    finally:
        for h in hooks:
            h.remove()
    module.eval()
    return len(bns) + len(frozen)


def random_pose_checkpoint(dataset: str, arch: str, path: str | Path, calibration_crops: np.ndarray,
                           seed: int = 0, batch: int = 8) -> Path:
    """A random ``superanimal_<dataset>_<arch>.pt`` with BatchNorm calibrated on ``calibration_crops``
    (uint8 RGB ``(n, 256, 256, 3)``)."""
    import torch

    torch.manual_seed(seed)
    model = build_pose_model(dataset, arch)
    x = torch.from_numpy(normalise(calibration_crops))
    calibrate_batchnorm(model, [x[i : i + batch] for i in range(0, len(x), batch)])
    return save_checkpoint(model, path)


def random_detector_checkpoint(dataset: str, detector: str, path: str | Path, calibration_frames: np.ndarray,
                               seed: int = 0, animal_bias: float = 3.0, score_weight_std: float = 0.05) -> Path:
    """A random detector checkpoint whose boxes pass the score threshold (see module doc)."""
    import torch

    assert detector in DETECTORS
    torch.manual_seed(seed)
    det = build_detector(dataset, detector)
    tv = det.model
    frames = torch.from_numpy(normalise(calibration_frames))
    # BatchNorm (resnet50_fpn_v2) statistics of the backbone on real frames, as the graph sees them
    # (torchvision's transform normalises and resizes first).
    images, _ = tv.transform([f for f in frames])
    calibrate_batchnorm(tv.backbone, [images.tensors[i : i + 1] for i in range(len(images.tensors))])
    with torch.no_grad():
        pred = tv.roi_heads.box_predictor
        pred.cls_score.weight.normal_(0.0, score_weight_std)
        pred.cls_score.bias.copy_(torch.tensor([0.0, animal_bias]))
    det.eval()
    return save_checkpoint(det, path)
