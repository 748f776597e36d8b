"""DeepLabCut 3 SuperAnimal PyTorch checkpoints -> ONNX models and posezoo model cards.

The networks are built from DeepLabCut's own SuperAnimal configs (``deeplabcut`` PyPI
package: ``PoseConfig.build_for_superanimal_inference``, ``PoseModel.build``,
``DETECTORS.build``), the checkpoint's state dict (key ``model``) is loaded strictly, and
the module is exported with the TorchScript ONNX exporter:

- pose networks: input ``image`` ``(N, 3, 256, 256)`` float32 (the crop normalised with
  ImageNet mean/std, as DeepLabCut does; the crop size is DeepLabCut's top-down crop),
  dynamic batch; outputs ``heatmaps`` ``(N, K, h, w)`` and, for ResNet-50, ``locref``
  ``(N, 2K, h, w)``; for RTMPose (CSPNeXt + RTMCC head) the SimCC vectors ``simcc_x``
  ``(N, K, W * split_ratio)`` and ``simcc_y`` ``(N, K, H * split_ratio)``.
- detectors (torchvision Faster R-CNN and SSDLite): input ``image`` ``(1, 3, H, W)``
  float32, the frame normalised as DeepLabCut does; the graph contains torchvision's own
  ``GeneralizedRCNNTransform`` (second normalisation and resize: min 800 / max 1333 for
  Faster R-CNN, a fixed 320x320 for SSDLite), the detection head, NMS and the score
  threshold; outputs ``boxes`` (x1, y1, x2, y2 in input pixels), ``scores``, ``labels``;
  fixed batch of one frame, any frame size.

Nothing here is imported by ``posezoo`` at import time.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATASETS = ("quadruped", "topviewmouse", "bird")
POSE_MODELS = ("hrnet_w32", "resnet_50", "rtmpose_s")
DETECTORS = ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "ssdlite")
UPSTREAM_REPOS = {
    "quadruped": "mwmathis/DeepLabCutModelZoo-SuperAnimal-Quadruped",
    "topviewmouse": "mwmathis/DeepLabCutModelZoo-SuperAnimal-TopViewMouse",
    "bird": "DeepLabCut/DeepLabCutModelZoo-SuperAnimal-Bird",
}
#: The (pose models, detectors) DeepLabCut publishes per dataset
#: (``dlclibrary/dlcmodelzoo/modelzoo_urls_pytorch.yaml``); other pairs have no checkpoint.
UPSTREAM_ARCHS = {
    "quadruped": (("hrnet_w32", "resnet_50", "rtmpose_s"),
                  ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "ssdlite")),
    "topviewmouse": (("hrnet_w32", "resnet_50"), ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")),
    "bird": (("resnet_50",), ("fasterrcnn_mobilenet_v3_large_fpn", "ssdlite")),
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


def check_available(dataset: str, arch: str) -> str:
    """``arch`` if DeepLabCut publishes a ``dataset`` checkpoint of it, else a ConversionError."""
    _check(arch, "architecture", POSE_MODELS + DETECTORS)
    poses, dets = UPSTREAM_ARCHS[_check(dataset, "dataset", DATASETS)]
    if arch not in poses + dets:
        raise ConversionError(f"DeepLabCut publishes no SuperAnimal-{dataset} {arch} checkpoint "
                              f"(pose models: {', '.join(poses)}; detectors: {', '.join(dets)})")
    return arch


def default_pose_model(dataset: str) -> str:
    """The dataset's reference pose model: HRNet-w32 where there is one (bird: ResNet-50)."""
    poses = UPSTREAM_ARCHS[_check(dataset, "dataset", DATASETS)][0]
    return "hrnet_w32" if "hrnet_w32" in poses else poses[0]


def default_detector(dataset: str, pose_model: str) -> str:
    """The detector a pose model's card names: ResNet-50-FPN-v2 where DeepLabCut has one; the
    fast RTMPose-s goes with the fast SSDLite; bird: Faster R-CNN MobileNet-v3."""
    dets = UPSTREAM_ARCHS[_check(dataset, "dataset", DATASETS)][1]
    if pose_model == "rtmpose_s" and "ssdlite" in dets:
        return "ssdlite"
    return "fasterrcnn_resnet50_fpn_v2" if "fasterrcnn_resnet50_fpn_v2" in dets else dets[0]


def checkpoint_filename(dataset: str, arch: str) -> str:
    """DeepLabCut's model-zoo file name, e.g. ``superanimal_quadruped_hrnet_w32.pt``."""
    check_available(dataset, arch)
    return f"{super_animal(dataset)}_{arch}.pt"


def card_name(dataset: str, arch: str) -> str:
    """The zoo name: HRNet-w32 is the dataset's default pose model (``superanimal_<dataset>``)."""
    base = super_animal(dataset)
    return base if arch == "hrnet_w32" else f"{base}_{_check(arch, 'architecture', POSE_MODELS + DETECTORS)}"


def onnx_filename(dataset: str, arch: str, fp16: bool = False) -> str:
    return f"{super_animal(dataset)}_{arch}{'_fp16' if fp16 else ''}.onnx"


def parse_checkpoint_filename(filename: str) -> tuple[str, str]:
    """``superanimal_<dataset>_<arch>.pt`` -> ``(dataset, arch)`` (a pair DeepLabCut publishes)."""
    stem = Path(filename).name.removesuffix(".pt")
    for dataset in DATASETS:
        prefix = f"superanimal_{dataset}_"
        if stem.startswith(prefix) and stem[len(prefix):] in POSE_MODELS + DETECTORS:
            return dataset, check_available(dataset, stem[len(prefix):])
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


def dlc_config(dataset: str, pose_model: str | None = None, detector: str | None = "fasterrcnn_resnet50_fpn_v2",
               max_individuals: int = MAX_INDIVIDUALS):
    """DeepLabCut's own SuperAnimal inference config (a ``PoseConfig``); ``pose_model``
    defaults to the dataset's :func:`default_pose_model`."""
    import logging
    import warnings

    from deeplabcut.pose_estimation_pytorch.config.pose import PoseConfig

    pose_model = pose_model or default_pose_model(dataset)
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


def dlc_crop_hw(cfg) -> tuple[int, int]:
    """``(height, width)`` of DeepLabCut's top-down crop for a pose config: its
    ``data.inference.top_down_crop``, else 256x256 (``get_inference_runners``' default)."""
    crop = cfg["data"]["inference"].get("top_down_crop") or {}
    return int(crop.get("height", 256)), int(crop.get("width", 256))


def build_pose_model(dataset: str, pose_model: str):
    """DeepLabCut's ``PoseModel`` for a SuperAnimal dataset and architecture (random weights)."""
    from deeplabcut.pose_estimation_pytorch.models import PoseModel

    cfg = dlc_config(dataset, check_available(dataset, pose_model), None)
    model = PoseModel.build(copy.deepcopy(cfg["model"]))
    model.eval()
    return model


def build_detector(dataset: str, detector: str):
    """DeepLabCut's detector (``FasterRCNN`` or ``SSDLite``; random weights; nothing is downloaded)."""
    from deeplabcut.pose_estimation_pytorch.models import DETECTORS as DLC_DETECTORS

    cfg = dlc_config(dataset, None, check_available(dataset, detector))
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
    return list(dlc_config(dataset, None, None)["metadata"]["bodyparts"])


# -- export ---------------------------------------------------------------------------------------
#: ONNX output names of each head output (DeepLabCut's ``bodypart`` head keys), in export order
_POSE_OUTPUTS = {"heatmap": "heatmaps", "locref": "locref", "x": "simcc_x", "y": "simcc_y"}


class _PoseGraph:
    """Factory of the torch module exported for a pose network."""

    @staticmethod
    def wrap(model, keys: tuple[str, ...]):
        import torch

        class PoseGraph(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, image):
                out = self.inner(image)["bodypart"]
                return tuple(out[k] for k in keys)

        return PoseGraph(model).eval()


def head_outputs(model, crop_hw: tuple[int, int] = (256, 256)) -> tuple[str, ...]:
    """The ``bodypart`` head's output keys, in export order: ``("heatmap",)``,
    ``("heatmap", "locref")`` or, for RTMPose's SimCC head, ``("x", "y")``.

    Probed on a crop of the real input size: the RTMCC head's MLP only fits that.
    """
    import torch

    with torch.no_grad():
        out = model(torch.zeros(1, 3, *crop_hw))["bodypart"]
    keys = tuple(k for k in _POSE_OUTPUTS if k in out)
    if keys not in (("heatmap",), ("heatmap", "locref"), ("x", "y")):
        raise ConversionError(f"unsupported DeepLabCut head outputs {sorted(out)} (heatmap[+locref] or SimCC x/y)")
    return keys


def has_locref(model) -> bool:
    return "locref" in head_outputs(model)


def export_pose(model, path: str | Path, *, crop_hw: tuple[int, int] = (256, 256), opset: int = OPSET) -> Path:
    """Export a DeepLabCut pose network (dynamic batch of ``crop_hw`` crops)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = head_outputs(model, crop_hw)
    outputs = [_POSE_OUTPUTS[k] for k in keys]
    dynamic = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    x = torch.zeros(2, 3, *crop_hw)
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(_PoseGraph.wrap(model, keys), (x,), str(path), input_names=["image"], output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    return _finalise(path)


def export_detector(detector, path: str | Path, *, sample_hw: tuple[int, int] = (480, 640), opset: int = OPSET) -> Path:
    """Export a DeepLabCut/torchvision detector, Faster R-CNN or SSDLite (batch of one frame, any size)."""
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


_SPECIES = {"topviewmouse": ["mouse"], "quadruped": ["quadruped"], "bird": ["bird"]}


def simcc_spec(cfg):
    """The card's SimCC section from DeepLabCut's own ``SimCCPredictor``, built from the pose
    config's ``model.heads.bodypart.predictor`` (its defaults included: apply_softmax...)."""
    from deeplabcut.pose_estimation_pytorch.models.predictors import PREDICTORS

    from posezoo.cards import SimCCSpec

    pred = PREDICTORS.build(copy.deepcopy(dict(cfg["model"]["heads"]["bodypart"]["predictor"])))
    if type(pred).__name__ != "SimCCPredictor":
        raise ConversionError(f"the pose head's predictor is {type(pred).__name__}, not SimCCPredictor")
    sigma = np.broadcast_to(np.asarray(pred.sigma, dtype=float), (2,))
    return SimCCSpec(x=_POSE_OUTPUTS["x"], y=_POSE_OUTPUTS["y"], split_ratio=float(pred.simcc_split_ratio),
                     sigma=(float(sigma[0]), float(sigma[1])), beta=float(pred.decode_beta),
                     apply_softmax=bool(pred.apply_softmax), normalize=bool(pred.normalize_outputs))


def _pose_outputs(pose_model: str, cfg) -> dict:
    """The card's ``outputs``/``decoder``/``simcc`` fields for a pose architecture."""
    from posezoo.cards import OutputSpec

    if pose_model == "rtmpose_s":
        return dict(outputs=OutputSpec(heatmap="", locref="", stride=1.0), decoder="simcc", simcc=simcc_spec(cfg))
    stride = 4.0 if pose_model == "hrnet_w32" else 8.0
    return dict(outputs=OutputSpec(heatmap="heatmaps", locref="locref" if pose_model == "resnet_50" else "",
                                   stride=stride, locref_std=7.2801, heatmap_activation="none", clip_scores=True,
                                   nominal_stride=True),
                decoder="heatmap_argmax_locref")


def pose_card(dataset: str, pose_model: str, detector: str, *, filename: str | None = None,
              locations: list[str] | None = None, sha256: str | None = None, n_bytes: int | None = None,
              revision: str | None = None, kp: list[str] | None = None, notes: str | None = None):
    """The posezoo card of a converted SuperAnimal pose network."""
    from posezoo.cards import InputSpec, ModelCard, TopDownSpec

    name = card_name(dataset, pose_model)
    base = _base_card(name)
    cfg = dlc_config(dataset, check_available(dataset, pose_model), None)
    check_available(dataset, detector)
    kp = kp or list(cfg["metadata"]["bodyparts"])
    if base is not None and base.keypoints and list(base.keypoints) != list(kp):
        raise ConversionError(f"{name}: the catalog's keypoints differ from DeepLabCut's project config")
    species = list(base.species) if base else list(_SPECIES[dataset])
    return ModelCard(
        name=name, version=VERSION,
        description=(base.description if base else f"SuperAnimal-{dataset} ({pose_model}), top-down."),
        species=species, aliases=list(base.aliases) if base else [], task="top_down", **_zoo_place(base),
        detector=f"{card_name(dataset, detector)}@{VERSION}", max_individuals=MAX_INDIVIDUALS,
        keypoints=kp, skeleton=list(base.skeleton) if base else [],
        input=InputSpec(size=dlc_crop_hw(cfg), resize="stretch", colour_order="RGB", pixel_range=255.0,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, input_name="image"),
        **_pose_outputs(pose_model, cfg),
        top_down=TopDownSpec(margin=0, with_context=True),
        **_provenance(dataset, pose_model, base, filename=filename, locations=locations, sha256=sha256,
                      n_bytes=n_bytes, revision=revision, notes=notes),
    )


@functools.cache
def detector_graph(detector: str) -> dict:
    """What torchvision's detector (built as DeepLabCut builds it) does inside the graph: its
    ``GeneralizedRCNNTransform`` sizes and mean/std and the score threshold it applies.

    Read from the module, not from DeepLabCut's config: DeepLabCut passes ``box_score_thresh=0.6``
    to every detector, but torchvision's ``ssdlite320_mobilenet_v3_large`` hands unknown keyword
    arguments to its transform, which ignores them, so SSDLite keeps its own 0.001 threshold.
    """
    dataset = next(d for d in DATASETS if detector in UPSTREAM_ARCHS[d][1])
    tv = build_detector(dataset, _check(detector, "detector", DETECTORS)).model
    t = tv.transform
    heads = getattr(tv, "roi_heads", tv)  # Faster R-CNN: roi_heads.score_thresh; SSD: score_thresh
    return dict(score_threshold=float(heads.score_thresh), graph_min_size=int(t.min_size[0]),
                graph_max_size=int(t.max_size), graph_mean=tuple(float(v) for v in t.image_mean),
                graph_std=tuple(float(v) for v in t.image_std), torchvision=type(tv).__name__)


def _architecture(detector: str) -> str:
    if detector == "ssdlite":  # DeepLabCut's SSDLite is torchvision's ssdlite320_mobilenet_v3_large
        return "torchvision ssdlite320_mobilenet_v3_large (DeepLabCut SSDLite), 2 classes"
    return f"torchvision {detector}, 2 classes"


def detector_card(dataset: str, detector: str, *, filename: str | None = None, locations: list[str] | None = None,
                  sha256: str | None = None, n_bytes: int | None = None, revision: str | None = None,
                  notes: str | None = None):
    """The posezoo card of a converted SuperAnimal detector."""
    from posezoo.cards import DetectorSpec, InputSpec, ModelCard, OutputSpec

    name = card_name(dataset, check_available(dataset, detector))
    base = _base_card(name)
    graph = {k: v for k, v in detector_graph(detector).items() if k != "torchvision"}
    return ModelCard(
        name=name, version=VERSION,
        description=(base.description if base else f"Animal detector of SuperAnimal-{dataset} ({detector})."),
        species=list(base.species) if base else ["animal"], aliases=[], task="detector", **_zoo_place(base),
        max_individuals=MAX_INDIVIDUALS, keypoints=[],
        input=InputSpec(size="any", resize="letterbox", pad_to=1, colour_order="RGB", pixel_range=255.0,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, input_name="image"),
        outputs=OutputSpec(heatmap="boxes", locref="", stride=1.0),
        decoder="detector_boxes",
        detection=DetectorSpec(boxes="boxes", scores="scores", labels="labels", batch=1,
                               architecture=_architecture(detector), **graph),
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
    crop_hw = dlc_crop_hw(dlc_config(dataset, pose_model, None))
    staging = out / ".staging"
    onnx_path = export_pose(model, staging / onnx_filename(dataset, pose_model), crop_hw=crop_hw)
    notes = None
    if verify:
        err = verify_pose(model, onnx_path, crop_hw=crop_hw)
        notes = f"converted by posezoo; ONNX vs PyTorch outputs relative max difference {err:.2e} on the check input"
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


def verify_pose(model, onnx_path: Path, x: np.ndarray | None = None, tol: float = 1e-4,
                crop_hw: tuple[int, int] = (256, 256)) -> float:
    """Compare ONNX Runtime with PyTorch on ``x`` ``(n, 3, h, w)`` (default: a random batch of
    two ``crop_hw`` crops), every output (heatmaps, locref; SimCC x, y); raise above ``tol``.

    Returns the largest relative max difference over the outputs.
    """
    import torch

    if x is None:
        g = np.random.default_rng(0)
        x = g.normal(0, 1, (2, 3, *crop_hw)).astype(np.float32)
    keys = head_outputs(model, tuple(x.shape[2:]))
    with torch.no_grad():
        out = model(torch.from_numpy(x))["bodypart"]
    got = _session(onnx_path).run([_POSE_OUTPUTS[k] for k in keys], {"image": x})
    errs = {_POSE_OUTPUTS[k]: relative_max_diff(g_, out[k].numpy()) for k, g_ in zip(keys, got)}
    name, err = max(errs.items(), key=lambda kv: kv[1])
    if not err <= tol:
        raise ConversionError(f"{onnx_path.name}: ONNX {name} differs from PyTorch by {err:.2e} (> {tol:g})")
    return err


def verify_detector(detector, onnx_path: Path, x: np.ndarray | None = None, tol: float = 0.5, top: int = MAX_INDIVIDUALS) -> float:
    """Compare ONNX Runtime with PyTorch: each of the ``top`` best ONNX boxes must have a PyTorch box
    within ``tol`` px (matched, not by rank: near-equal scores may swap ranks)."""
    import torch

    if x is None:  # a smooth random image: on per-pixel noise, near-tied proposals make boxes jump
        import cv2

        g = np.random.default_rng(1)
        coarse = g.normal(0, 1, (15, 20, 3)).astype(np.float32)
        x = np.ascontiguousarray(cv2.resize(coarse, (320, 240), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)[None])
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
