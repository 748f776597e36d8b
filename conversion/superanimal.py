"""DeepLabCut 3 SuperAnimal PyTorch checkpoints -> ONNX models and posezoo model cards.

The networks are built from DeepLabCut's own SuperAnimal configs (``deeplabcut`` PyPI
package: ``PoseConfig.build_for_superanimal_inference``, ``PoseModel.build``,
``DETECTORS.build``), the checkpoint's state dict (key ``model``) is loaded strictly, and
the module is exported with the TorchScript ONNX exporter:

- pose networks: input ``image`` ``(N, 3, 256, 256)`` float32 (the crop normalised with
  ImageNet mean/std, as DeepLabCut does), outputs ``heatmaps`` ``(N, K, h, w)`` and, for
  ResNet-50, ``locref`` ``(N, 2K, h, w)``; dynamic batch.
- detectors (torchvision Faster R-CNN): input ``image`` ``(1, 3, H, W)`` float32, the frame
  normalised as DeepLabCut does; the graph contains torchvision's own
  ``GeneralizedRCNNTransform`` (second normalisation, resize to min 800 / max 1333), the
  RPN, RoIAlign, NMS and the 0.6 score threshold; outputs ``boxes`` (x1, y1, x2, y2 in input
  pixels), ``scores``, ``labels``; fixed batch of one frame, any frame size.

Nothing here is imported by ``posezoo`` at import time.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("quadruped", "topviewmouse")
POSE_MODELS = ("hrnet_w32", "resnet_50")
DETECTORS = ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")
UPSTREAM_REPOS = {
    "quadruped": "mwmathis/DeepLabCutModelZoo-SuperAnimal-Quadruped",
    "topviewmouse": "mwmathis/DeepLabCutModelZoo-SuperAnimal-TopViewMouse",
}
#: ``video_inference_superanimal(max_individuals=10)``
MAX_INDIVIDUALS = 10
VERSION = "1.0.0"
OPSET = 17
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted (wrong architecture, missing dependency...)."""


def _check(dataset: str, what: str, allowed: tuple[str, ...]) -> str:
    if dataset not in allowed:
        raise ConversionError(f"unknown {what} {dataset!r}: choose from {', '.join(allowed)}")
    return dataset


def super_animal(dataset: str) -> str:
    return f"superanimal_{_check(dataset, 'dataset', DATASETS)}"


def checkpoint_filename(dataset: str, arch: str) -> str:
    """DeepLabCut's model-zoo file name, e.g. ``superanimal_quadruped_hrnet_w32.pt``."""
    _check(arch, "architecture", POSE_MODELS + DETECTORS)
    return f"{super_animal(dataset)}_{arch}.pt"


def card_name(dataset: str, arch: str) -> str:
    """The zoo name: HRNet-w32 is the dataset's default pose model (``superanimal_<dataset>``)."""
    base = super_animal(dataset)
    return base if arch == "hrnet_w32" else f"{base}_{_check(arch, 'architecture', POSE_MODELS + DETECTORS)}"


def onnx_filename(dataset: str, arch: str, fp16: bool = False) -> str:
    return f"{super_animal(dataset)}_{arch}{'_fp16' if fp16 else ''}.onnx"


def parse_checkpoint_filename(filename: str) -> tuple[str, str]:
    """``superanimal_<dataset>_<arch>.pt`` -> ``(dataset, arch)``."""
    stem = Path(filename).name.removesuffix(".pt")
    for dataset in DATASETS:
        prefix = f"superanimal_{dataset}_"
        if stem.startswith(prefix) and stem[len(prefix):] in POSE_MODELS + DETECTORS:
            return dataset, stem[len(prefix):]
    raise ConversionError(f"{filename}: not a SuperAnimal checkpoint name (superanimal_<dataset>_<arch>.pt)")


# -- building DeepLabCut's networks ---------------------------------------------------------------
class _NoDownload(dict):
    pass


@contextlib.contextmanager
def no_weight_download():
    """Build torchvision detectors exactly as DeepLabCut does, minus the download.

    DeepLabCut builds e.g. ``fasterrcnn_mobilenet_v3_large_fpn(weights=None)``, which
    still loads ImageNet backbone weights (and, because of them, uses FrozenBatchNorm2d):
    the architecture depends on it. Here the backbone's weight *loading* is skipped
    (the checkpoint replaces every weight anyway), so the module is identical.
    """
    import torch
    from torchvision.models._api import WeightsEnum

    orig_get, orig_load = WeightsEnum.get_state_dict, torch.nn.Module.load_state_dict

    def load(self, state_dict, *args, **kwargs):
        if isinstance(state_dict, _NoDownload):
            return None
        return orig_load(self, state_dict, *args, **kwargs)

    WeightsEnum.get_state_dict = lambda self, *a, **k: _NoDownload()
    torch.nn.Module.load_state_dict = load
    try:
        yield
    finally:
        WeightsEnum.get_state_dict, torch.nn.Module.load_state_dict = orig_get, orig_load


def dlc_config(dataset: str, pose_model: str = "hrnet_w32", detector: str | None = "fasterrcnn_resnet50_fpn_v2",
               max_individuals: int = MAX_INDIVIDUALS):
    """DeepLabCut's own SuperAnimal inference config (a ``PoseConfig``)."""
    import logging
    import warnings

    from deeplabcut.pose_estimation_pytorch.config.pose import PoseConfig

    _check(pose_model, "pose model", POSE_MODELS)
    if detector is not None:
        _check(detector, "detector", DETECTORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            return PoseConfig.build_for_superanimal_inference(
                super_animal(dataset), model_name=pose_model, detector_name=detector,
                max_individuals=max_individuals, device="cpu",
            )
        finally:
            logging.disable(logging.NOTSET)


def build_pose_model(dataset: str, pose_model: str):
    """DeepLabCut's ``PoseModel`` for a SuperAnimal dataset and architecture (random weights)."""
    from deeplabcut.pose_estimation_pytorch.models import PoseModel

    cfg = dlc_config(dataset, pose_model, None)
    model = PoseModel.build(copy.deepcopy(cfg["model"]))
    model.eval()
    return model


def build_detector(dataset: str, detector: str):
    """DeepLabCut's ``FasterRCNN`` detector (random weights; nothing is downloaded)."""
    from deeplabcut.pose_estimation_pytorch.models import DETECTORS as DLC_DETECTORS

    cfg = dlc_config(dataset, "hrnet_w32", detector)
    with no_weight_download():
        det = DLC_DETECTORS.build(dict(cfg["detector"]["model"]))
    det.eval()
    return det


def load_checkpoint(module, path: str | Path):
    """Load a DeepLabCut snapshot (state dict under ``model``) strictly into ``module``."""
    import torch

    snapshot = torch.load(str(path), map_location="cpu", weights_only=True)
    state = snapshot["model"] if isinstance(snapshot, dict) and "model" in snapshot else snapshot
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConversionError(f"{path}: the checkpoint does not fit DeepLabCut's architecture: {exc}") from exc
    module.eval()
    return module


def save_checkpoint(module, path: str | Path) -> Path:
    """Write ``module``'s weights as DeepLabCut writes its snapshots (``{"model": state_dict}``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": module.state_dict()}, str(path))
    return path


def keypoints(dataset: str) -> list[str]:
    """Bodypart names from DeepLabCut's SuperAnimal project config."""
    return list(dlc_config(dataset, "hrnet_w32", None)["metadata"]["bodyparts"])


# -- export ---------------------------------------------------------------------------------------
class _PoseGraph:
    """Factory of the torch module exported for a pose network."""

    @staticmethod
    def wrap(model):
        import torch

        class PoseGraph(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, image):
                out = self.inner(image)["bodypart"]
                if "locref" in out:
                    return out["heatmap"], out["locref"]
                return out["heatmap"]

        return PoseGraph(model).eval()


def has_locref(model) -> bool:
    import torch

    with torch.no_grad():
        return "locref" in model(torch.zeros(1, 3, 64, 64))["bodypart"]


def export_pose(model, path: str | Path, *, crop_hw: tuple[int, int] = (256, 256), opset: int = OPSET) -> Path:
    """Export a DeepLabCut pose network (dynamic batch of crops)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    locref = has_locref(model)
    outputs = ["heatmaps", "locref"] if locref else ["heatmaps"]
    dynamic = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    x = torch.zeros(2, 3, *crop_hw)
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(_PoseGraph.wrap(model), (x,), str(path), input_names=["image"], output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    return _finalise(path)


def export_detector(detector, path: str | Path, *, sample_hw: tuple[int, int] = (480, 640), opset: int = OPSET) -> Path:
    """Export a DeepLabCut/torchvision Faster R-CNN (batch of one frame, any size)."""
    import torch

    class DetectorGraph(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            _, detections = self.inner([image[0]])
            d = detections[0]
            return d["boxes"], d["scores"], d["labels"]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tv = detector.model if hasattr(detector, "model") else detector
    tv.eval()
    # A sample with texture, so that the traced graph sees boxes survive every stage.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *sample_hw, generator=g)
    dynamic = {"image": {2: "height", 3: "width"}, "boxes": {0: "n"}, "scores": {0: "n"}, "labels": {0: "n"}}
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(DetectorGraph(tv).eval(), (x,), str(path), input_names=["image"],
                          output_names=["boxes", "scores", "labels"], dynamic_axes=dynamic,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    return _finalise(path)


@contextlib.contextmanager
def _quiet_export():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _finalise(path: Path) -> Path:
    """Check the exported graph and store it as one self-contained file."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    data = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=False)
    if data.exists():
        data.unlink()
    return path


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """A float16 copy of a pose network (inputs and outputs stay float32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save_model(model, str(dst))
    return Path(dst)


# -- cards ----------------------------------------------------------------------------------------
def _base_card(name: str):
    """The bundled catalog's card of ``name`` (description, licence, citation...), if any."""
    from posezoo.cards import ModelCard
    from posezoo.zoo import bundled_catalog

    path = bundled_catalog() / name / VERSION / "card.yaml"
    return ModelCard.from_yaml(path) if path.is_file() else None


_LICENCE = ("research use only (non-commercial), per DeepLabCut's README: 'SuperAnimal models are provided "
            "for research use only (non-commercial use).'")
_CITATION = ("Ye, S., Filippova, A., Lauer, J., Schneider, S., Vidal, M., Qiu, T., Mathis, A., Mathis, M. W. "
             "SuperAnimal pretrained pose estimation models for behavioral analysis. Nature Communications 15 "
             "(2024). https://doi.org/10.1038/s41467-024-48792-2")


def _provenance(dataset: str, model: str, base, *, filename, locations, sha256, n_bytes, revision, notes) -> dict:
    """The card fields every converted model shares: artefact, upstream checkpoint, licence,
    citation and pcutoff (kept from the catalog's card ``base`` when there is one)."""
    from posezoo.cards import Artefact, Upstream

    return dict(
        artefact=Artefact(locations=list(locations if locations is not None else ["hf://posezoo/zoo"]),
                          revision=revision, filename=filename or onnx_filename(dataset, model),
                          sha256=sha256, bytes=n_bytes),
        upstream=Upstream(kind="huggingface", repo_id=UPSTREAM_REPOS[dataset],
                          filename=checkpoint_filename(dataset, model), notes=notes),
        licence=base.licence if base else _LICENCE, citation=base.citation if base else _CITATION,
        pcutoff=base.pcutoff if base else 0.4,
    )


def _zoo_place(base) -> dict:
    """The catalog's view, speed class and priority of a model (what species-first selection reads)."""
    return {"view": base.view, "speed": base.speed, "priority": base.priority} if base else {}


def pose_card(dataset: str, pose_model: str, detector: str, *, filename: str | None = None,
              locations: list[str] | None = None, sha256: str | None = None, n_bytes: int | None = None,
              revision: str | None = None, kp: list[str] | None = None, notes: str | None = None):
    """The posezoo card of a converted SuperAnimal pose network."""
    from posezoo.cards import InputSpec, ModelCard, OutputSpec, TopDownSpec

    name = card_name(dataset, pose_model)
    base = _base_card(name)
    kp = kp or keypoints(dataset)
    if base is not None and base.keypoints and list(base.keypoints) != list(kp):
        raise ConversionError(f"{name}: the catalog's keypoints differ from DeepLabCut's project config")
    stride = 4.0 if pose_model == "hrnet_w32" else 8.0
    species = list(base.species) if base else (["mouse"] if dataset == "topviewmouse" else ["quadruped"])
    return ModelCard(
        name=name, version=VERSION,
        description=(base.description if base else f"SuperAnimal-{dataset} ({pose_model}), top-down."),
        species=species, aliases=list(base.aliases) if base else [], task="top_down", **_zoo_place(base),
        detector=f"{card_name(dataset, detector)}@{VERSION}", max_individuals=MAX_INDIVIDUALS,
        keypoints=kp, skeleton=list(base.skeleton) if base else [],
        input=InputSpec(size=(256, 256), resize="stretch", colour_order="RGB", pixel_range=255.0,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, input_name="image"),
        outputs=OutputSpec(heatmap="heatmaps", locref="locref" if pose_model == "resnet_50" else "",
                           stride=stride, locref_std=7.2801, heatmap_activation="none", clip_scores=True,
                           nominal_stride=True),
        decoder="heatmap_argmax_locref",
        top_down=TopDownSpec(margin=0, with_context=True),
        **_provenance(dataset, pose_model, base, filename=filename, locations=locations, sha256=sha256,
                      n_bytes=n_bytes, revision=revision, notes=notes),
    )


def detector_card(dataset: str, detector: str, *, filename: str | None = None, locations: list[str] | None = None,
                  sha256: str | None = None, n_bytes: int | None = None, revision: str | None = None,
                  notes: str | None = None):
    """The posezoo card of a converted SuperAnimal detector."""
    from posezoo.cards import DetectorSpec, InputSpec, ModelCard, OutputSpec

    name = card_name(dataset, detector)
    base = _base_card(name)
    return ModelCard(
        name=name, version=VERSION,
        description=(base.description if base else f"Animal detector of SuperAnimal-{dataset} ({detector})."),
        species=list(base.species) if base else ["animal"], aliases=[], task="detector", **_zoo_place(base),
        max_individuals=MAX_INDIVIDUALS, keypoints=[],
        input=InputSpec(size="any", resize="letterbox", pad_to=1, colour_order="RGB", pixel_range=255.0,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, input_name="image"),
        outputs=OutputSpec(heatmap="boxes", locref="", stride=1.0),
        decoder="detector_boxes",
        detection=DetectorSpec(boxes="boxes", scores="scores", labels="labels", batch=1, score_threshold=0.6,
                               graph_min_size=800, graph_max_size=1333, graph_mean=IMAGENET_MEAN,
                               graph_std=IMAGENET_STD, architecture=f"torchvision {detector}, 2 classes"),
        **_provenance(dataset, detector, base, filename=filename, locations=locations, sha256=sha256,
                      n_bytes=n_bytes, revision=revision, notes=notes),
    )


# -- the whole conversion -------------------------------------------------------------------------
@dataclass
class Converted:
    """One converted network: its card (artefact ``local``), directory and ONNX path."""

    card: object
    directory: Path
    path: Path
    seconds: float


def fetch_checkpoint(dataset: str, arch: str, cache_dir: str | None = None) -> Path:
    """Download DeepLabCut's checkpoint with huggingface_hub (its cache)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(UPSTREAM_REPOS[dataset], checkpoint_filename(dataset, arch), cache_dir=cache_dir))


def _write_entry(card, onnx_path: Path, catalog: Path):
    from posezoo.zoo import sha256_file

    d = catalog / card.name / card.version
    d.mkdir(parents=True, exist_ok=True)
    target = d / card.artefact.filename
    if onnx_path.resolve() != target.resolve():
        os.replace(onnx_path, target)
    art = card.artefact.model_copy(update={"locations": ["local"], "sha256": sha256_file(target),
                                           "bytes": target.stat().st_size, "revision": None})
    card = card.model_copy(update={"artefact": art})
    card.to_yaml(d / "card.yaml")
    return card, d, target


def convert_pose(dataset: str, pose_model: str, detector: str, out: str | Path, *, checkpoint: str | Path,
                 fp16: bool = False, verify: bool = True) -> Converted:
    """Convert one pose checkpoint into ``out/<name>/1.0.0/{card.yaml, *.onnx}``."""
    t0 = time.perf_counter()
    out = Path(out)
    model = load_checkpoint(build_pose_model(dataset, pose_model), checkpoint)
    staging = out / ".staging"
    onnx_path = export_pose(model, staging / onnx_filename(dataset, pose_model))
    notes = None
    if verify:
        err = verify_pose(model, onnx_path)
        notes = f"converted by posezoo; ONNX vs PyTorch heatmaps relative max difference {err:.2e} on the check input"
    if fp16:
        f16 = to_fp16(onnx_path, staging / onnx_filename(dataset, pose_model, fp16=True))
        card16 = pose_card(dataset, pose_model, detector, filename=f16.name, notes="float16 weights")
        card16 = card16.model_copy(update={"name": card16.name + "_fp16", "aliases": []})
        _write_entry(card16, f16, out)
    card = pose_card(dataset, pose_model, detector, notes=notes)
    card, d, path = _write_entry(card, onnx_path, out)
    return Converted(card, d, path, time.perf_counter() - t0)


def convert_detector(dataset: str, detector: str, out: str | Path, *, checkpoint: str | Path,
                     verify: bool = True) -> Converted:
    t0 = time.perf_counter()
    out = Path(out)
    det = load_checkpoint(build_detector(dataset, detector), checkpoint)
    onnx_path = export_detector(det, out / ".staging" / onnx_filename(dataset, detector))
    notes = None
    if verify:
        err = verify_detector(det, onnx_path)
        notes = f"converted by posezoo; ONNX vs PyTorch boxes max difference {err:.3f} px on the check input"
    card, d, path = _write_entry(detector_card(dataset, detector, notes=notes), onnx_path, out)
    return Converted(card, d, path, time.perf_counter() - t0)


def convert(dataset: str, pose_model: str, detector: str, out: str | Path, *, pose_checkpoint: str | Path | None = None,
            detector_checkpoint: str | Path | None = None, fp16: bool = False, verify: bool = True,
            hf_cache_dir: str | None = None) -> list[Converted]:
    """Convert a SuperAnimal pose network and its detector into the catalog directory ``out``.

    Checkpoints not given are fetched from DeepLabCut's Hugging Face repositories.
    """
    pose_ckpt = pose_checkpoint or fetch_checkpoint(dataset, pose_model, hf_cache_dir)
    det_ckpt = detector_checkpoint or fetch_checkpoint(dataset, detector, hf_cache_dir)
    done = [convert_detector(dataset, detector, out, checkpoint=det_ckpt, verify=verify),
            convert_pose(dataset, pose_model, detector, out, checkpoint=pose_ckpt, fp16=fp16, verify=verify)]
    staging = Path(out) / ".staging"
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return done


# -- verification ---------------------------------------------------------------------------------
def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("POSEZOO_CONVERT_THREADS", "0") or 0)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def relative_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|``."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


def verify_pose(model, onnx_path: Path, x: np.ndarray | None = None, tol: float = 1e-4) -> float:
    """Compare ONNX Runtime with PyTorch on ``x`` (default: a smooth random batch); raise above ``tol``."""
    import torch

    if x is None:
        g = np.random.default_rng(0)
        x = g.normal(0, 1, (2, 3, 256, 256)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x))["bodypart"]["heatmap"].numpy()
    got = _session(onnx_path).run(["heatmaps"], {"image": x})[0]
    err = relative_max_diff(got, ref)
    if not err <= tol:
        raise ConversionError(f"{onnx_path.name}: ONNX heatmaps differ from PyTorch by {err:.2e} (> {tol:g})")
    return err


def verify_detector(detector, onnx_path: Path, x: np.ndarray | None = None, tol: float = 0.5, top: int = MAX_INDIVIDUALS) -> float:
    """Compare ONNX Runtime with PyTorch: each of the ``top`` best ONNX boxes must have a PyTorch box
    within ``tol`` px (matched, not by rank: near-equal scores may swap ranks)."""
    import torch

    if x is None:
        g = np.random.default_rng(1)
        x = g.normal(0, 1, (1, 3, 240, 320)).astype(np.float32)
    tv = detector.model if hasattr(detector, "model") else detector
    with torch.no_grad():
        _, dets = tv([torch.from_numpy(x[0])])
    ref = dets[0]["boxes"].numpy()
    got = _session(onnx_path).run(["boxes"], {"image": x})[0]
    if abs(len(got) - len(ref)) > max(2, len(ref) // 20):
        raise ConversionError(f"{onnx_path.name}: ONNX finds {len(got)} boxes, PyTorch {len(ref)}")
    if not len(got):
        return 0.0
    err = float(np.abs(got[:top, None, :] - ref[None, :, :]).max(axis=2).min(axis=1).max())
    if not err <= tol:
        raise ConversionError(f"{onnx_path.name}: ONNX boxes differ from PyTorch by {err:.3f} px (> {tol:g})")
    return err
