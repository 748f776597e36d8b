"""`posezoo zoo pull` for models whose ONNX artefact is not published yet: fetch DeepLabCut's
checkpoint (a SuperAnimal ``.pt`` or a TensorFlow model-zoo tarball) with huggingface_hub,
convert, verify against DeepLabCut (PyTorch or TF), and cache the result in the zoo's
``converted`` catalog (``$POSEZOO_CACHE/converted``), where ``Zoo.resolve`` finds it."""

from __future__ import annotations

from pathlib import Path

from posezoo.errors import ModelNotCachedError, ZooError

from . import modelzoo
from .superanimal import ConversionError, convert_detector, convert_pose, parse_checkpoint_filename


def _checkpoint(card, hf_cache_dir: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    up = card.upstream
    if up is None or up.kind != "huggingface" or not (up.repo_id and up.filename):
        raise ZooError(f"{card.ref}: no upstream DeepLabCut checkpoint to convert from")
    try:
        return Path(hf_hub_download(up.repo_id, up.filename, cache_dir=hf_cache_dir))
    except Exception as exc:  # offline, no network, repository gone
        raise ModelNotCachedError(
            f"{card.ref}: cannot fetch the upstream checkpoint hf://{up.repo_id}/{up.filename} to convert it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); a network is needed once"
        ) from exc


def required_modules(card) -> tuple[str, tuple[str, ...]]:
    """The extra and the modules converting ``card`` needs."""
    if card.upstream is not None and card.upstream.is_model_zoo_tarball:
        return "conversion-tf", ("tensorflow", "tf_slim", "deeplabcut", "onnx")
    return "conversion", ("torch", "torchvision", "timm", "deeplabcut", "onnx")


def check_convertible(card) -> None:
    """Raise ``ZooError`` unless ``card``'s upstream checkpoint is one this package converts."""
    if card.upstream is None or card.upstream.kind != "huggingface" or not card.upstream.filename:
        raise ZooError(f"{card.ref}: no upstream DeepLabCut checkpoint to convert from")
    if not card.upstream.is_model_zoo_tarball:
        try:
            parse_checkpoint_filename(card.upstream.filename)
        except ConversionError as exc:
            raise ZooError(f"{card.ref}: {exc}") from None


def convert_card(zoo, card, checkpoint: str | Path, out: str | Path, *, verify: bool = True):
    """Convert one catalog entry from its upstream checkpoint file into the catalog directory
    ``out`` (a TF model-zoo tarball, or a SuperAnimal pose network / detector ``.pt``)."""
    check_convertible(card)
    try:
        if card.upstream.is_model_zoo_tarball:  # check_convertible: there is an upstream
            return modelzoo.convert(card.name, checkpoint, out, verify_with_dlc=verify)
        dataset, arch = parse_checkpoint_filename(card.upstream.filename)
        if card.task == "detector":
            return convert_detector(dataset, arch, out, checkpoint=checkpoint, verify=verify)
        _, det_arch = parse_checkpoint_filename(zoo.card(card.detector).upstream.filename)
        return convert_pose(dataset, arch, det_arch, out, checkpoint=checkpoint, verify=verify)
    except ConversionError as exc:
        raise ZooError(f"{card.ref}: conversion failed: {exc}") from exc


def convert_into_cache(zoo, spec: str, *, hf_cache_dir: str | None = None, verify: bool = True) -> list:
    """Convert ``spec`` (and its detector, for a top-down card) into ``zoo.converted_dir``."""
    import importlib.util

    card = zoo.card(spec)
    extra, needs = required_modules(card)
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ZooError(
            f"{card.ref}: the ONNX artefact is not published yet and converting it here needs the {extra} "
            f"extra (missing: {', '.join(missing)}): pip install 'posezoo[{extra}]'"
        )
    out = zoo.converted_dir
    todo = [card]
    if card.task == "top_down" and card.detector:
        todo.append(zoo.card(card.detector))
    done = []
    for c in todo:
        if c.artefact.published:
            continue
        check_convertible(c)
        done.append(convert_card(zoo, c, _checkpoint(c, hf_cache_dir), out, verify=verify))
    staging = out / ".staging"
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return done
