"""DeepLabCut's TensorFlow model zoo (DeepLabCut 2.x tarballs) -> ONNX models and posezoo cards.

A model-zoo tarball (``dlclibrary/dlcmodelzoo/modelzoo_urls.yaml``) holds ``pose_cfg.yaml``
(keypoint names in ``all_joints_names``, ``net_type``, ``stride``, ``locref_stdev``,
``mean_pixel``) and a TensorFlow checkpoint ``snapshot-N.{index,data-*}`` (often ``.meta``).
The network is DeepLabCut's ``PoseResnet``: TF-slim ``resnet_v1_{50,101,152}`` with
``output_stride=16`` (atrous block 4) and two ``conv2d_transpose`` heads (``part_pred``,
``locref_pred``) at stride 8.

The ONNX graph is written layer by layer from the checkpoint's variables (BatchNorm folded
into the convolutions), with TF-slim's padding rules reproduced exactly, so it accepts any
frame size, as DeepLabCut's TF predictor does:

- ``conv2d_same`` with stride 2: explicit symmetric padding, then VALID;
- stride-1 convolutions (``SAME``): symmetric padding (odd kernels, any dilation);
- ``pool1`` (3x3 max-pool, stride 2, ``SAME``): ``auto_pad=SAME_UPPER``, TF's rule (the extra
  row/column at the end);
- ``conv2d_transpose`` (3x3, stride 2, ``SAME``): a VALID transposed convolution cropped by
  its last row and column (TF's output ``2 * in``).

Input ``image`` ``(N, 3, H, W)`` float32: RGB minus ``mean_pixel`` (the card's normalisation);
outputs ``heatmaps`` ``(N, K, ceil(H/8), ceil(W/8))`` (logits; DeepLabCut applies the
sigmoid) and ``locref`` ``(N, 2K, ...)`` (``dx0, dy0, dx1, ...``, in units of
``locref_stdev``).

Serving needs none of this: only ``onnxruntime``. Reading the checkpoint needs TensorFlow
(``pip install 'posezoo[conversion-tf]'``); verification runs DeepLabCut's own TF predictor.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import superanimal
from .superanimal import ConversionError, Converted, _session, _write_entry, relative_max_diff

#: DeepLabCut model-zoo names converted by this path, with their networks
MODELS = ("primate_face", "full_dog", "horse_sideview", "full_cat", "full_macaque")
OPSET = 17
#: TF-slim's ``resnet_arg_scope`` BatchNorm epsilon (the fused kernel's attribute in DeepLabCut's graph)
BN_EPSILON = 1e-5
_RESNET = re.compile(r"^resnet_v1_(50|101|152)/")


# -- the tarball ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelZooTarball:
    """A model-zoo tarball, unpacked: its ``pose_cfg.yaml``, checkpoint prefix and licence text."""

    cfg: dict
    checkpoint: Path
    licence: str | None
    directory: Path

    @property
    def keypoints(self) -> list[str]:
        names = self.cfg.get("all_joints_names")
        if not names:
            raise ConversionError("pose_cfg.yaml has no all_joints_names")
        return [str(n) for n in names]

    @property
    def skeleton(self) -> list[tuple[str, str]]:
        """``skeleton`` pairs where the config gives them (DeepLabCut projects keep them in
        config.yaml; some tarballs carry them in pose_cfg.yaml), else none."""
        kp = set(self.keypoints)
        pairs = self.cfg.get("skeleton") or []
        return [(str(a), str(b)) for a, b in pairs if a in kp and b in kp]


def open_tarball(path: str | Path, workdir: str | Path) -> ModelZooTarball:
    """Unpack a model-zoo tarball into ``workdir`` the way ``dlclibrary`` does (regular files
    only, flattened to their base names) and find its config and newest snapshot."""
    import yaml

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if not member.isfile() or not name or name.startswith("."):
                    continue
                src = tar.extractfile(member)
                with src, open(workdir / name, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
    except (tarfile.TarError, OSError) as exc:
        raise ConversionError(f"{Path(path).name}: not a readable model-zoo tarball ({exc})") from exc
    cfg_path = workdir / "pose_cfg.yaml"
    if not cfg_path.is_file():
        raise ConversionError(f"{Path(path).name}: no pose_cfg.yaml in the tarball")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    snapshots = sorted((int(m.group(1)), p) for p in workdir.glob("snapshot-*.index")
                       if (m := re.fullmatch(r"snapshot-(\d+)\.index", p.name)))
    if not snapshots:
        raise ConversionError(f"{Path(path).name}: no snapshot-N.index checkpoint in the tarball")
    licence = None
    for p in sorted(workdir.iterdir()):
        if p.name.upper().startswith(("LICENSE", "LICENCE")):
            licence = next((ln.strip() for ln in p.read_text(errors="replace").splitlines() if ln.strip()), None)
    return ModelZooTarball(cfg, snapshots[-1][1].with_suffix(""), licence, workdir)


# -- TensorFlow -----------------------------------------------------------------------------------
def import_tensorflow():
    """TensorFlow, imported after torch and triton where they are installed: the other order
    crashes (triton's native library segfaults when loaded after TensorFlow's, and torch
    imports triton lazily, e.g. from torchvision or DeepLabCut)."""
    missing = [m for m in ("tensorflow",) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError("reading a TensorFlow model-zoo checkpoint needs TensorFlow: "
                              "pip install 'posezoo[conversion-tf]'")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for first in ("torch", "triton"):
        if importlib.util.find_spec(first) is not None:
            importlib.import_module(first)
    import tensorflow as tf

    return tf


def read_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a TF checkpoint ``prefix`` (``snapshot-N``), by name."""
    tf = import_tensorflow()
    try:
        reader = tf.train.load_checkpoint(str(prefix))
    except Exception as exc:  # NotFoundError, DataLossError: not worth importing their types
        raise ConversionError(f"cannot read the checkpoint {Path(prefix).name}: {exc}") from exc
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


# -- the ONNX graph -------------------------------------------------------------------------------
class _Graph:
    """ONNX nodes and initialisers, written from TF-slim variable names."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.w = weights
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        from onnx import helper

        out = self._name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, scope: str, *, stride: int = 1, rate: int = 1, relu: bool = True) -> str:
        """A TF-slim ``conv2d`` (+ BatchNorm, + ReLU) with its SAME padding made explicit;
        ``stride > 1`` is ``conv2d_same`` (explicit pad, VALID) or a 1x1 SAME (no pad)."""
        try:
            kernel = self.w[f"{scope}/weights"].astype(np.float64)  # (kh, kw, in, out)
        except KeyError:
            raise ConversionError(f"checkpoint has no {scope}/weights") from None
        kh = kernel.shape[0]
        w = kernel.transpose(3, 2, 0, 1)  # (out, in, kh, kw)
        if f"{scope}/BatchNorm/moving_mean" in self.w:
            bn = {k: self.w[f"{scope}/BatchNorm/{k}"].astype(np.float64)
                  for k in ("moving_mean", "moving_variance", "beta")}
            gamma = self.w.get(f"{scope}/BatchNorm/gamma", np.ones_like(bn["beta"])).astype(np.float64)
            scale = gamma / np.sqrt(bn["moving_variance"] + BN_EPSILON)
            w = w * scale[:, None, None, None]
            b = bn["beta"] - bn["moving_mean"] * scale
        else:
            b = self.w.get(f"{scope}/biases", np.zeros(w.shape[0])).astype(np.float64)
        # SAME at stride 1 and conv2d_same's explicit pad at stride 2 are both this symmetric pad
        # for odd kernels (a strided 1x1 SAME convolution pads nothing: the formula gives 0)
        p = (kh + (kh - 1) * (rate - 1) - 1) // 2
        y = self.node("Conv", [x, self.const("w", w.astype(np.float32)), self.const("b", b.astype(np.float32))],
                      "conv", kernel_shape=[kh, kh], strides=[stride, stride], dilations=[rate, rate],
                      pads=[p, p, p, p])
        return self.node("Relu", [y], "relu") if relu else y

    def deconv_same(self, x: str, scope: str) -> str:
        """``slim.conv2d_transpose(kernel 3, stride 2, SAME)``: output exactly twice the input."""
        kernel = self.w[f"{scope}/weights"]  # (kh, kw, out, in)
        w = kernel.transpose(3, 2, 0, 1).astype(np.float32)  # (in, out, kh, kw)
        b = self.w[f"{scope}/biases"].astype(np.float32)
        y = self.node("ConvTranspose", [x, self.const("w", w), self.const("b", b)], "deconv",
                      kernel_shape=list(kernel.shape[:2]), strides=[2, 2], pads=[0, 0, 0, 0])
        starts, ends, axes = (self.const("i", np.array(v, np.int64)) for v in ([0, 0], [-1, -1], [2, 3]))
        return self.node("Slice", [y, starts, ends, axes], "crop")


def resnet_depth(weights: dict[str, np.ndarray]) -> int:
    """50, 101 or 152: the TF-slim ResNet the checkpoint holds."""
    depths = {m.group(1) for name in weights if (m := _RESNET.match(name))}
    if len(depths) != 1:
        raise ConversionError("the checkpoint holds no TF-slim resnet_v1 (DeepLabCut's PoseResnet); "
                              "only ResNet model-zoo networks are converted")
    return int(depths.pop())


def build_onnx(weights: dict[str, np.ndarray], n_joints: int, *, opset: int = OPSET):
    """The ONNX model of DeepLabCut's TF ``PoseResnet`` from its checkpoint variables."""
    from onnx import TensorProto, helper

    depth = resnet_depth(weights)
    root = f"resnet_v1_{depth}"
    g = _Graph(weights)
    x = g.conv("image", f"{root}/conv1", stride=2)
    x = g.node("MaxPool", [x], "pool1", kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
    # TF-slim stack_blocks_dense with output_stride 16 (4 after the root block): block 3's
    # last unit keeps stride 1, and block 4 runs atrous at rate 2.
    current, rate, target = 1, 1, 4
    in_depth = 64
    for block, last_stride in ((1, 2), (2, 2), (3, 2), (4, 1)):
        units = sorted({int(m.group(1)) for name in weights
                        if (m := re.match(rf"{root}/block{block}/unit_(\d+)/", name))})
        if not units or units != list(range(1, len(units) + 1)):
            raise ConversionError(f"{root}/block{block}: units missing from the checkpoint")
        for u in units:
            scope = f"{root}/block{block}/unit_{u}/bottleneck_v1"
            stride = last_stride if u == units[-1] else 1
            if current == target:
                unit_stride, unit_rate = 1, rate
                rate *= stride
            else:
                unit_stride, unit_rate = stride, 1
                current *= stride
            out_depth = weights[f"{scope}/conv3/weights"].shape[3]
            if out_depth == in_depth:
                shortcut = x if unit_stride == 1 else g.node("MaxPool", [x], "subsample", kernel_shape=[1, 1],
                                                             strides=[unit_stride, unit_stride])
            else:
                shortcut = g.conv(x, f"{scope}/shortcut", stride=unit_stride, relu=False)
            r = g.conv(x, f"{scope}/conv1")
            r = g.conv(r, f"{scope}/conv2", stride=unit_stride, rate=unit_rate)
            r = g.conv(r, f"{scope}/conv3", relu=False)
            x = g.node("Relu", [g.node("Add", [shortcut, r], "add")], "unit")
            in_depth = out_depth
    outputs = [("heatmaps", "pose/part_pred/block4", n_joints), ("locref", "pose/locref_pred/block4", 2 * n_joints)]
    value_infos = []
    for name, scope, channels in outputs:
        if f"{scope}/weights" not in weights:
            raise ConversionError(f"checkpoint has no {scope} head (location refinement off?)")
        got = weights[f"{scope}/weights"].shape[2]
        if got != channels:
            raise ConversionError(f"{scope} has {got} channels, the config's {n_joints} joints need {channels}")
        y = g.deconv_same(x, scope)
        g.nodes.append(helper.make_node("Identity", [y], [name], name=name))
        value_infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, "h", "w"]))
    graph = helper.make_graph(
        g.nodes, f"deeplabcut_pose_resnet_v1_{depth}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])], value_infos,
        initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="posezoo")
    model.ir_version = min(model.ir_version, 9)
    return model


def export(tarball: ModelZooTarball, path: str | Path) -> Path:
    """Write the tarball's network as one self-contained ONNX file."""
    import onnx

    weights = read_checkpoint(tarball.checkpoint)
    model = build_onnx(weights, len(tarball.keypoints))
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


# -- DeepLabCut's own TF predictor (the oracle) ----------------------------------------------------
def import_dlc_tf():
    """DeepLabCut's TensorFlow package (``deeplabcut.pose_estimation_tensorflow``).

    Its data-loading modules import ``imgaug`` 0.4.0 (its last release), which reads
    ``np.sctypes``, removed in NumPy 2; DeepLabCut's ``tf-latest`` extra allows NumPy 2, so
    the attribute is put back, with NumPy 1's contents, before the import. Nothing here uses
    imgaug: only the network and the predictor are run.
    """
    import_tensorflow()
    if not hasattr(np, "sctypes"):
        np.sctypes = {"int": [np.int8, np.int16, np.int32, np.int64],
                      "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
                      "float": [np.float16, np.float32, np.float64, np.longdouble],
                      "complex": [np.complex64, np.complex128, np.clongdouble],
                      "others": [bool, object, bytes, str, np.void]}
    try:
        from deeplabcut.pose_estimation_tensorflow.config import load_config
        from deeplabcut.pose_estimation_tensorflow.core import predict
    except ImportError as exc:
        raise ConversionError(f"DeepLabCut's TensorFlow code cannot be imported ({exc}): "
                              "pip install 'posezoo[conversion-tf]'") from exc
    return load_config, predict


def dlc_config(tarball: ModelZooTarball) -> dict:
    """The tarball's pose_cfg.yaml merged with DeepLabCut's defaults, pointed at its snapshot,
    batch size 1 (DeepLabCut's single-frame ``getpose``)."""
    load_config, _ = import_dlc_tf()
    cfg = load_config(str(tarball.directory / "pose_cfg.yaml"))
    cfg["init_weights"] = str(tarball.checkpoint)
    cfg["batch_size"] = 1
    return cfg


class DlcTfPredictor:
    """DeepLabCut's TF session for a model-zoo network: ``setup_pose_prediction`` + ``getpose``."""

    def __init__(self, tarball: ModelZooTarball):
        _, self._predict = import_dlc_tf()
        self.cfg = dlc_config(tarball)
        self.sess, self.inputs, self.outputs = self._predict.setup_pose_prediction(self.cfg)

    def scoremaps(self, frame_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(h, w, K)`` sigmoid scoremap and ``(h, w, K, 2)`` locref (in pixels) of one RGB frame."""
        out = self.sess.run(self.outputs, feed_dict={self.inputs: frame_rgb[None].astype(float)})
        return self._predict.extract_cnn_output(out, self.cfg)

    def pose(self, frame_rgb: np.ndarray) -> np.ndarray:
        """``(K, 3)`` x, y, likelihood: DeepLabCut's ``getpose``."""
        return self._predict.getpose(frame_rgb, self.cfg, self.sess, self.inputs, self.outputs)

    def close(self):
        self.sess.close()


def onnx_scoremaps(onnx_path: str | Path, frames_rgb: np.ndarray, mean_pixel) -> tuple[np.ndarray, np.ndarray]:
    """The ONNX model's sigmoid heatmaps ``(n, K, h, w)`` and locref ``(n, 2K, h, w)``."""
    from posezoo.decoding import sigmoid

    x = (frames_rgb.astype(np.float32) - np.asarray(mean_pixel, np.float32)).transpose(0, 3, 1, 2)
    hm, lr = _session(Path(onnx_path)).run(["heatmaps", "locref"], {"image": np.ascontiguousarray(x)})
    return sigmoid(hm), lr


def verify(tarball: ModelZooTarball, onnx_path: str | Path, frame_rgb: np.ndarray | None = None,
           tol: float = 1e-4) -> float:
    """ONNX Runtime vs DeepLabCut's TF forward pass on one frame (default: a smooth random
    image of an odd size, which exercises TF's asymmetric SAME padding); raise above ``tol``."""
    if frame_rgb is None:
        g = np.random.default_rng(0)
        import cv2

        frame_rgb = cv2.resize(g.integers(0, 256, (25, 33, 3), dtype=np.uint8), (261, 197),
                               interpolation=cv2.INTER_CUBIC)
    dlc = DlcTfPredictor(tarball)
    try:
        ref, _ = dlc.scoremaps(frame_rgb)
    finally:
        dlc.close()
    got, _ = onnx_scoremaps(onnx_path, frame_rgb[None], tarball.cfg.get("mean_pixel", (123.68, 116.779, 103.939)))
    got = got[0].transpose(1, 2, 0)
    if got.shape != ref.shape:
        raise ConversionError(f"ONNX scoremaps {got.shape} vs DeepLabCut's {ref.shape}")
    err = relative_max_diff(got, ref)
    if not err <= tol:
        raise ConversionError(f"ONNX scoremaps differ from DeepLabCut's TF network by {err:.2e} (> {tol:g})")
    return err


# -- cards and the whole conversion ---------------------------------------------------------------
def _base_card(name: str):
    """The bundled catalog's card of ``name``: a model-zoo conversion starts from it."""
    base = superanimal._base_card(name)
    if base is None:
        raise ConversionError(f"{name!r} is not in the catalog (model-zoo models: {', '.join(MODELS)})")
    return base


def card(name: str, tarball: ModelZooTarball, *, notes: str | None = None, base=None):
    """The catalog's card of ``name`` (``base``, else read from the bundled catalog) completed
    from the tarball: keypoints, skeleton, licence, stride, location-refinement scale and
    mean pixel."""
    from posezoo.cards import InputSpec, OutputSpec

    base = base or _base_card(name)
    cfg = tarball.cfg
    if cfg.get("net_type") and not str(cfg["net_type"]).startswith("resnet_"):
        raise ConversionError(f"{name}: net_type {cfg['net_type']!r}; only ResNet model-zoo networks are converted")
    mean = tuple(float(v) for v in cfg.get("mean_pixel", base.input.mean))
    update = dict(
        keypoints=tarball.keypoints, keypoints_from_artefact=False,
        skeleton=tarball.skeleton or [tuple(p) for p in base.skeleton],
        # DeepLabCut feeds the frame as it is: no padding, the nominal stride
        input=InputSpec(size="any", resize="letterbox", pad_to=1, colour_order="RGB", pixel_range=1.0,
                        mean=mean, std=(1.0, 1.0, 1.0), input_name="image"),
        outputs=OutputSpec(heatmap="heatmaps", locref="locref", stride=float(cfg.get("stride", 8.0)),
                           locref_std=float(cfg.get("locref_stdev", 7.2801)), heatmap_activation="sigmoid",
                           nominal_stride=True),
        licence=tarball.licence or base.licence,
    )
    if notes and base.upstream is not None:
        update["upstream"] = base.upstream.model_copy(update={"notes": notes})
    data = base.model_dump()
    data.update(update)
    return type(base).model_validate(data)


def convert(name: str, tarball_path: str | Path, out: str | Path, *, verify_with_dlc: bool = True) -> Converted:
    """Convert a model-zoo tarball into ``out/<name>/1.0.0/{card.yaml, <name>.onnx}``."""
    t0 = time.perf_counter()
    base = _base_card(name)
    out = Path(out)
    staging = out / ".staging"
    with tempfile.TemporaryDirectory(prefix="posezoo-modelzoo-") as tmp:
        tb = open_tarball(tarball_path, tmp)
        onnx_path = export(tb, staging / base.artefact.filename)
        notes = "DeepLabCut 2.x TensorFlow model-zoo tarball; converted by posezoo"
        if verify_with_dlc:
            err = verify(tb, onnx_path)
            notes += f"; ONNX vs DeepLabCut TF scoremaps relative max difference {err:.2e} on the check frame"
        converted, d, path = _write_entry(card(name, tb, notes=notes, base=base), onnx_path, out)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return Converted(converted, d, path, time.perf_counter() - t0)


