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


def random_ssdlite_checkpoint(dataset: str, path: str | Path, calibration_frames: np.ndarray, seed: int = 0,
                              animal_bias: float = 3.0, score_weight_std: float = 0.05) -> Path:
    """A random DeepLabCut SSDLite checkpoint (torchvision ``ssdlite320_mobilenet_v3_large``) whose
    boxes have distinct, high "animal" scores.

    Every BatchNorm (backbone and the SSDLite head's depthwise blocks) is calibrated on
    ``calibration_frames`` (uint8 RGB ``(n, h, w, 3)``) as the graph sees them (after
    torchvision's transform: 320x320, normalised to [-1, 1]); each feature map's class
    predictor gets small random weights and a bias favouring class 1 ("animal") for each
    anchor (channels are ordered anchor-major, class-minor).
    """
    import torch

    torch.manual_seed(seed)
    det = build_detector(dataset, "ssdlite")
    tv = det.model

    class BackboneAndHead(torch.nn.Module):  # what runs on the resized images, BatchNorm included
        def __init__(self):
            super().__init__()
            self.backbone, self.head = tv.backbone, tv.head

        def forward(self, x):
            return self.head(list(self.backbone(x).values()))

    if len(calibration_frames) < 2:  # the last feature maps are 1x1: train-mode BatchNorm needs a batch
        raise ValueError("random_ssdlite_checkpoint needs at least 2 calibration frames")
    frames = torch.from_numpy(normalise(calibration_frames))
    images, _ = tv.transform([f for f in frames])
    calibrate_batchnorm(BackboneAndHead(), [images.tensors])
    n_classes = 2
    with torch.no_grad():
        for block in tv.head.classification_head.module_list:
            conv = block[-1]
            conv.weight.normal_(0.0, score_weight_std)
            bias = torch.zeros(conv.out_channels // n_classes, n_classes)
            bias[:, 1] = animal_bias
            conv.bias.copy_(bias.reshape(-1))
    det.eval()
    return save_checkpoint(det, path)


# -- DeepLabCut 2.x TensorFlow model-zoo tarballs -------------------------------------------------
def modelzoo_pose_cfg(joints: list[str], net_type: str = "resnet_50") -> dict:
    """A model-zoo ``pose_cfg.yaml`` as DeepLabCut 2.x writes it for a single-animal ResNet
    (the fields its TF predictor and ``load_config`` read, with DeepLabCut's values)."""
    return {
        "all_joints": [[i] for i in range(len(joints))], "all_joints_names": list(joints),
        "batch_size": 1, "crop_pad": 0, "dataset": "training-datasets/iteration-0/UnaugmentedDataSet/data.mat",
        "dataset_type": "imgaug", "deterministic": False, "fg_fraction": 0.25, "global_scale": 0.8,
        "init_weights": "snapshot", "intermediate_supervision": False, "intermediate_supervision_layer": 12,
        "location_refinement": True, "locref_huber_loss": True, "locref_loss_weight": 0.05,
        "locref_stdev": 7.2801, "log_dir": "log", "max_input_size": 1500,
        "mean_pixel": [123.68, 116.779, 103.939], "mirror": False, "net_type": net_type,
        "num_joints": len(joints), "optimizer": "sgd", "pairwise_huber_loss": True, "pairwise_predict": False,
        "partaffinityfield_predict": False, "regularize": False, "scoremap_dir": "test", "shuffle": True,
        "snapshot_prefix": "snapshot", "stride": 8.0, "weigh_negatives": False,
        "weigh_only_present_joints": False, "weigh_part_predictions": False, "weight_decay": 0.0001,
    }


def random_modelzoo_tarball(path: str | Path, joints: list[str], calibration_frames: np.ndarray, *,
                            net_type: str = "resnet_50", seed: int = 0, snapshot: int = 1030000,
                            skeleton: list[tuple[str, str]] | None = None, licence: str | None = None) -> Path:
    """A model-zoo tarball in DeepLabCut 2.x's layout (``<stem>/pose_cfg.yaml`` and
    ``<stem>/snapshot-N.{index,data-00000-of-00001,meta}``), made with DeepLabCut's own TF code:
    ``PoseNetFactory.create(cfg).test(inputs)`` and a ``tf.compat.v1.train.Saver``.

    Random weights, with every BatchNorm's moving statistics set, layer by layer in graph
    order, to the statistics of its input on ``calibration_frames`` (uint8 RGB ``(n, h, w,
    3)``), and random gamma/beta, so that the scoremaps are well conditioned.
    """
    import tarfile
    import tempfile

    import yaml

    from .modelzoo import import_dlc_tf

    load_config, _ = import_dlc_tf()
    import tensorflow as tf
    from deeplabcut.pose_estimation_tensorflow.nnets.factory import PoseNetFactory

    path = Path(path)
    stem = path.name.removesuffix(".tar.gz")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="posezoo-tarball-") as tmp:
        d = Path(tmp) / stem
        d.mkdir()
        cfg_dict = modelzoo_pose_cfg(joints, net_type)
        if skeleton:
            cfg_dict["skeleton"] = [list(p) for p in skeleton]
        (d / "pose_cfg.yaml").write_text(yaml.safe_dump(cfg_dict, sort_keys=True))
        if licence:
            (d / "LICENSE").write_text(licence + "\n")
        cfg = load_config(str(d / "pose_cfg.yaml"))
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.set_random_seed(seed)
            inputs = tf.compat.v1.placeholder(tf.float32, shape=[None, None, None, 3])
            PoseNetFactory.create(cfg).test(inputs)
            variables = {v.op.name: v for v in tf.compat.v1.global_variables()}
            with tf.compat.v1.Session(graph=graph) as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                feed = {inputs: calibration_frames.astype(np.float32)}
                bns = [op for op in graph.get_operations() if op.type.startswith("FusedBatchNorm")]
                for op in bns:
                    scope = op.name.rsplit("/", 1)[0]  # .../BatchNorm
                    x = sess.run(op.inputs[0], feed)
                    c = x.shape[-1]
                    variables[f"{scope}/moving_mean"].load(x.mean(axis=(0, 1, 2)), sess)
                    variables[f"{scope}/moving_variance"].load(x.var(axis=(0, 1, 2)), sess)
                    # a residual branch's last BatchNorm scaled down, as in trained ResNets: the
                    # residual stream then stays well conditioned through all the units
                    lo, hi = (0.1, 0.4) if "/conv3/" in scope else (0.6, 1.4)
                    variables[f"{scope}/gamma"].load(rng.uniform(lo, hi, c).astype(np.float32), sess)
                    variables[f"{scope}/beta"].load(rng.normal(0.0, 0.1, c).astype(np.float32), sess)
                for name in ("pose/part_pred/block4/biases", "pose/locref_pred/block4/biases"):
                    v = variables[name]
                    v.load(rng.normal(0.0, 0.5, v.shape).astype(np.float32), sess)
                tf.compat.v1.train.Saver().save(sess, str(d / "snapshot"), global_step=snapshot)
        (d / "checkpoint").unlink(missing_ok=True)  # the tarballs carry the snapshot files only
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            tar.add(d, arcname=stem)
    return path
