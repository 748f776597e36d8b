"""INT8 variants of posezoo's own heatmap models for the CPU: static QDQ quantisation.

The recipe (:class:`QuantRecipe`, what ``python -m conversion quantize`` runs):

1. **Exact graph rewrites of the fp32 model** (:func:`prepare_graph`; checked against the
   fp32 graph on the calibration frames): a ``BatchNormalization`` after ``Add(ConvTranspose,
   Conv)`` is folded into both convolutions, and every ``ConvTranspose`` with stride 2,
   kernel 4, pad 1 becomes a 3x3 ``Conv`` with four times the output channels followed by
   ``DepthToSpace`` (the sub-pixel form of the same operation). ONNX Runtime's CPU provider
   has no INT8 ``ConvTranspose`` nor ``BatchNormalization``: left as they are, they run in
   fp32 between dequantise/quantise pairs and layout transposes (a quarter of the INT8 time).
2. **Calibration** on the model's *training* frames (the card's ``training.split.train``; never
   the test frames), pre-processed exactly as the runtime does (:func:`calibration_inputs`).
3. ``onnxruntime.quantization.quantize_static`` in QDQ format: uint8 activations, int8
   weights **per output channel** (EfficientNet's depthwise convolutions lose several pixels
   with one scale per tensor), MinMax ranges; the output convolution and its ``Slice``/``Sigmoid``
   stay fp32 (heatmap peaks and location refinement keep their resolution).
4. **uint8 input** when the card's normalisation is one scale and an integer zero point
   (``(pixel / pixel_range - mean) / std`` with equal ``std`` and an integer ``mean * pixel_range``,
   as posezoo_mouse's 127/128): the input's quantisation parameters are set to exactly that,
   the input ``QuantizeLinear`` is removed and the graph takes the resized frame's pixels
   (``input.dtype: uint8``), so the runtime skips the float normalisation.

Nothing here needs PyTorch; it needs ``onnx`` (``pip install 'posezoo[quantize]'``).
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cards import Artefact, ModelCard
from .errors import PosezooError

#: Precisions a card can have (``ModelCard.precision``); ``fp32`` is the trained artefact.
PRECISIONS = ("fp32", "int8")

#: Version suffix of an INT8 variant: ``posezoo_mouse@1.1.0`` -> ``posezoo_mouse@1.1.0-int8``.
INT8_SUFFIX = "-int8"


@dataclass(frozen=True)
class QuantRecipe:
    """Settings of :func:`quantize_onnx` (recorded in the INT8 card)."""

    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    percentile: float = 99.999  # calibrate_method percentile only
    #: keep the graph's output convolution (and the Slice/Sigmoid after it) in fp32
    fp32_head: bool = True
    #: exact fp32 rewrites first (BatchNorm folding, ConvTranspose -> Conv + DepthToSpace)
    rewrite: bool = True
    #: uint8 pixels in when the card's normalisation allows it exactly
    uint8_input: bool = True
    calibration_batch: int = 8

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is in every extra that quantises
        raise PosezooError("INT8 quantisation needs the onnx package: pip install 'posezoo[quantize]'") from exc
    return onnx


# -- exact fp32 rewrites ------------------------------------------------------------------------
def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def prepare_graph(model):
    """Exact rewrites that let every convolution of posezoo's heatmap models run in INT8.

    * ``BatchNormalization(Add(ConvTranspose(x), Conv(y)))`` -> the per-channel scale goes
      into both weights, the shift into the first one's bias (also where the
      ``ConvTranspose``'s output is cropped by spatial ``Slice`` nodes, at input sizes whose
      stride-8 map has an odd side, e.g. 400x300);
    * ``ConvTranspose`` (stride 2, kernel 4, pads 1, no groups or dilation) -> ``Conv`` 3x3,
      pads 1, ``4 * C_out`` channels, then ``DepthToSpace`` (blocksize 2, DCR): output pixel
      ``(2i + r, 2j + s)`` of the transposed convolution reads inputs ``i-1..i+1`` with the
      taps ``k = 3, 1`` (``r = 0``) or ``k = 2, 0`` (``r = 1``).

    Returns a new ``onnx.ModelProto``; the graph's inputs and outputs are unchanged.
    """
    onnx = _onnx()
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def array(name):
        return numpy_helper.to_array(inits[name]).astype(np.float32)

    def set_array(name, value):
        new = numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
        inits[name].CopyFrom(new)

    def add_init(name, value):
        t = numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name)
        g.initializer.append(t)
        inits[name] = g.initializer[-1]

    def through_spatial_slices(name):
        """The node making ``name``, looking through ``Slice`` nodes that only crop the spatial
        axes (the head crops an up-sampled map to its skip's odd size): a per-channel scale and
        shift commute with them."""
        node = producer.get(name)
        while node is not None and node.op_type == "Slice":
            axes = node.input[3] if len(node.input) > 3 else ""
            if (not axes or axes not in inits or len(consumers.get(node.output[0], [])) != 1
                    or not set(numpy_helper.to_array(inits[axes]).tolist()) <= {2, 3, -1, -2}):
                return None
            node = producer.get(node.input[0])
        return node

    removed = []
    # 1. BatchNorm after Add(ConvTranspose, Conv), the ConvTranspose's output maybe cropped: fold into both
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        add = producer.get(bn.input[0])
        if add is None or add.op_type != "Add" or len(consumers.get(add.output[0], [])) != 1:
            continue
        if not all(i in inits for i in bn.input[1:5]):
            continue
        ins = [through_spatial_slices(i) for i in add.input]
        if any(p is None or p.op_type not in ("Conv", "ConvTranspose") or len(consumers[p.output[0]]) != 1
               or p.input[1] not in inits or len(consumers[p.input[1]]) != 1 for p in ins):
            continue
        gamma, beta, mean, var = (array(i) for i in bn.input[1:5])
        eps = float(_attrs(bn).get("epsilon", 1e-5))
        s = gamma / np.sqrt(var + eps)
        t = beta - mean * s
        for k, p in enumerate(ins):
            w = array(p.input[1])
            axis = 1 if p.op_type == "ConvTranspose" else 0
            group = int(_attrs(p).get("group", 1))
            if p.op_type == "ConvTranspose" and group != 1:
                break
            shape = [1] * w.ndim
            shape[axis] = -1
            set_array(p.input[1], w * s.reshape(shape))
            bias = array(p.input[2]) if len(p.input) > 2 and p.input[2] else np.zeros_like(s)
            bias = bias * s + (t if k == 0 else 0.0)
            name = f"{p.name}.folded_bias"
            add_init(name, bias)
            if len(p.input) > 2:
                p.input[2] = name
            else:
                p.input.append(name)
        else:
            for c in consumers.get(bn.output[0], []):
                for j, i in enumerate(c.input):
                    if i == bn.output[0]:
                        c.input[j] = add.output[0]
            for j, o in enumerate(g.output):
                if o.name == bn.output[0]:
                    raise PosezooError("a BatchNormalization that is a graph output cannot be folded")
            removed.append(bn)
    for n in removed:
        g.node.remove(n)

    # 2. ConvTranspose(stride 2, kernel 4, pads 1) -> Conv 3x3 (4 C_out) + DepthToSpace
    taps = {0: {0: 3, 1: 1}, 1: {1: 2, 2: 0}}  # parity -> {3x3 tap: 4x4 transposed-conv tap}
    for ct in [n for n in g.node if n.op_type == "ConvTranspose"]:
        a = _attrs(ct)
        if (list(a.get("strides", [1, 1])) != [2, 2] or list(a.get("kernel_shape", [4, 4])) != [4, 4]
                or list(a.get("pads", [0] * 4)) != [1, 1, 1, 1] or int(a.get("group", 1)) != 1
                or list(a.get("dilations", [1, 1])) != [1, 1] or a.get("output_padding")
                or a.get("output_shape") or ct.input[1] not in inits):
            continue
        wt = array(ct.input[1])  # (C_in, C_out, 4, 4)
        cin, cout = wt.shape[:2]
        w3 = np.zeros((4 * cout, cin, 3, 3), np.float32)
        for r in (0, 1):
            for s_ in (0, 1):
                block = (r * 2 + s_) * cout
                for dy, ky in taps[r].items():
                    for dx, kx in taps[s_].items():
                        w3[block : block + cout, :, dy, dx] = wt[:, :, ky, kx].T
        bias = array(ct.input[2]) if len(ct.input) > 2 and ct.input[2] else np.zeros(cout, np.float32)
        wname, bname, mid = f"{ct.name}.subpixel_weight", f"{ct.name}.subpixel_bias", f"{ct.output[0]}.subpixel"
        add_init(wname, w3)
        add_init(bname, np.tile(bias, 4))
        conv = helper.make_node("Conv", [ct.input[0], wname, bname], [mid], name=f"{ct.name}_subpixel",
                                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
        d2s = helper.make_node("DepthToSpace", [mid], [ct.output[0]], name=f"{ct.name}_depth_to_space",
                               blocksize=2, mode="DCR")
        idx = list(g.node).index(ct)
        g.node.remove(ct)
        g.node.insert(idx, d2s)
        g.node.insert(idx, conv)

    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    del g.value_info[:]
    onnx.checker.check_model(m)
    return m


# -- calibration --------------------------------------------------------------------------------
def calibration_inputs(card: ModelCard, images: np.ndarray) -> np.ndarray:
    """Frames ``(n, H, W, 3)`` uint8 RGB -> the fp32 network inputs the runtime would make."""
    from .runtime import normalise_batch, plan_resize, resize_batch

    arr = np.asarray(images)
    if card.input.colour_order != "RGB":
        arr = arr[..., ::-1]
    plan = plan_resize((arr.shape[2], arr.shape[1]), card.input)
    spec = card.input.model_copy(update={"dtype": "float32"})
    return normalise_batch(resize_batch(np.ascontiguousarray(arr), plan.resized_wh), spec, plan.input_hw)


def _reader(inputs: np.ndarray, name: str, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    # equal batches: the histogram calibrators (entropy, percentile) stack them
    batch = max(d for d in range(1, max(1, batch) + 1) if len(inputs) % d == 0)

    class FrameReader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{name: inputs[i : i + batch]} for i in range(0, len(inputs), batch)])

        def get_next(self):
            return next(self._it, None)

    return FrameReader()


def uint8_input_params(card: ModelCard) -> tuple[float, int] | None:
    """``(scale, zero_point)`` with ``(pixel - zero_point) * scale`` equal to the card's
    normalisation for every channel, or None when no such pair exists."""
    spec = card.input
    scales = {float(np.float32(1.0 / (spec.pixel_range * s))) for s in spec.std}
    zps = {m * spec.pixel_range for m in spec.mean}
    if len(scales) != 1 or len(zps) != 1:
        return None
    zp = zps.pop()
    if abs(zp - round(zp)) > 1e-6 or not 0 <= round(zp) <= 255:
        return None
    return scales.pop(), int(round(zp))


def _uint8_input(model, input_name: str, scale: float, zero_point: int):
    """Drop the input's QuantizeLinear: the graph takes the uint8 pixels it would produce."""
    from onnx import TensorProto, numpy_helper

    g = model.graph
    q = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == input_name]
    others = [n for n in g.node if input_name in n.input and n not in q]
    if len(q) != 1 or others:
        raise PosezooError(f"cannot give the quantised graph a uint8 input: {input_name!r} feeds "
                           f"{[n.op_type for n in q + others]}")
    q = q[0]
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    s, z = float(inits[q.input[1]]), int(inits[q.input[2]])
    if z != zero_point or abs(s - scale) > 1e-9 * scale or inits[q.input[2]].dtype != np.uint8:
        raise PosezooError(f"the input's quantisation ({s}, {z}) is not the card's normalisation ({scale}, {zero_point})")
    for n in g.node:
        for j, i in enumerate(n.input):
            if i == q.output[0]:
                n.input[j] = input_name
    g.node.remove(q)
    for inp in g.input:
        if inp.name == input_name:
            inp.type.tensor_type.elem_type = TensorProto.UINT8
    return model


def quantize_onnx(src: str | Path, dst: str | Path, card: ModelCard, images: np.ndarray,
                  recipe: QuantRecipe = QuantRecipe()) -> dict:
    """Quantise the fp32 ONNX ``src`` of ``card`` into ``dst`` (QDQ), calibrated on ``images``.

    Parameters
    ----------
    images : ndarray, shape (n, H, W, 3), uint8 RGB
        Calibration frames (the training frames, never the test frames).

    Returns
    -------
    dict
        What the card records: the recipe, the input mode, the node counts and the
        rewrite's maximum deviation from the fp32 graph on the calibration inputs.
    """
    onnx = _onnx()
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dst = Path(src), Path(dst)
    inputs = calibration_inputs(card, images)
    name = card.input.input_name
    fp32 = onnx.load(str(src))
    for i, n in enumerate(fp32.graph.node):  # node names select the fp32 head; some graphs have none
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    report: dict = {"recipe": recipe.as_dict(), "calibration_frames": int(len(images))}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        model = prepare_graph(fp32) if recipe.rewrite else fp32
        onnx.save(model, str(prepared))
        if recipe.rewrite:
            report["rewrite_max_abs_diff"] = _max_diff(src, prepared, inputs[: 2 * recipe.calibration_batch], name)
        head: list[str] = []
        if recipe.fp32_head:
            head = _head_nodes(model)
        extra: dict = {}
        params = uint8_input_params(card) if recipe.uint8_input and recipe.activation_type == "uint8" else None
        if params is not None:
            extra["TensorQuantOverrides"] = {name: [{"scale": np.array(params[0], np.float32),
                                                      "zero_point": np.array(params[1], np.uint8)}]}
        if recipe.calibrate_method == "percentile":
            extra["CalibPercentile"] = recipe.percentile
        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[recipe.calibrate_method]
        quantized = Path(tmp) / "quantized.onnx"
        quantize_static(str(prepared), str(quantized), _reader(inputs, name, recipe.calibration_batch),
                        quant_format=QuantFormat.QDQ, per_channel=recipe.per_channel,
                        activation_type=types[recipe.activation_type], weight_type=types[recipe.weight_type],
                        nodes_to_exclude=head, calibrate_method=method, extra_options=extra)
        q = onnx.load(str(quantized))
        if params is not None:
            q = _uint8_input(q, name, *params)
        report["input"] = {"dtype": "uint8" if params is not None else "float32",
                           **({"scale": params[0], "zero_point": params[1]} if params is not None else {})}
        q.producer_name, q.producer_version = "posezoo", "quantize"
        del q.metadata_props[:]
        onnx.checker.check_model(q)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp_dst = dst.with_name(dst.name + ".tmp")
        tmp_dst.write_bytes(q.SerializeToString(deterministic=True))
        tmp_dst.replace(dst)
    counts: dict[str, int] = {}
    for n in q.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    report["nodes"] = dict(sorted(counts.items()))
    report["onnxruntime"] = ort.__version__
    return report


def _head_nodes(model) -> list[str]:
    """The last convolution of the graph and every node after it (Slice, Sigmoid)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    head, todo = [], list(outputs)
    seen = set()
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        head.append(n.name)
        if n.op_type not in ("Conv",):
            todo.extend(i for i in n.input if i in producer)
    return head


def _max_diff(a: Path, b: Path, x: np.ndarray, name: str) -> float:
    import onnxruntime as ort

    outs = []
    for p in (a, b):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {name: x}))
    return float(max(np.abs(u - v).max() for u, v in zip(*outs)))


# -- the INT8 card ------------------------------------------------------------------------------
def int8_card(card: ModelCard, report: dict, *, calibration: dict, command: str | None) -> ModelCard:
    """The INT8 variant's card (its artefact is filled in when it is written)."""
    spec = card.input.model_copy(update={"dtype": report["input"]["dtype"]})
    training = dict(card.training or {})
    training.pop("checkpoint", None)  # fine-tune from the fp32 card; this graph is not a training state
    quant = {"method": "onnxruntime.quantization.quantize_static (QDQ, static, calibrated)",
             "base": card.ref, "base_sha256": card.artefact.sha256, **report, "calibration": calibration,
             "environment": {"python": platform.python_version(), "machine": platform.machine()},
             "command": command or ""}
    return card.model_copy(update={
        "version": card.version + INT8_SUFFIX,
        "description": f"INT8 (static QDQ) CPU variant of {card.ref}: " + card.description,
        "aliases": [], "precision": "int8", "variant_of": card.ref, "input": spec,
        "training": training or None, "metrics": None, "quantization": quant,
    })


def quantize_model(model: str, labelled: str | Path, store: str | Path = "models", *,
                   recipe: QuantRecipe = QuantRecipe(), zoo=None, evaluate: bool = True,
                   command: str | None = None, threads: int | None = None) -> ModelCard:
    """Quantise a zoo model on its training frames and register the INT8 variant.

    Parameters
    ----------
    model : str
        The fp32 model, ``name[@version]``.
    labelled : path
        The ``CollectedData_<scorer>.csv`` it was trained on: calibration uses the frames
        that the card's ``training.split.train`` names (all frames of the file that are not
        in ``training.split.test`` when the card records no train list).
    store : path
        The catalog directory the variant is written into (``<store>/<name>/<version>-int8/``,
        artefact location ``local``, beside the card).
    evaluate : bool
        Evaluate the variant on the card's split and record the metrics in its card.

    Returns
    -------
    ModelCard
        The registered INT8 card.
    """
    from .evaluate import card_splits, evaluate_model
    from .labelled import check_keypoints, load_labelled
    from .zoo import CARD_FILE, default_zoo, sha256_file

    zoo = zoo or default_zoo()
    resolved = zoo.resolve(model, precision="fp32")
    card = resolved.card
    if card.precision != "fp32":
        raise PosezooError(f"{card.ref} is already a {card.precision} variant: quantise its fp32 card {card.variant_of}")
    if card.task != "single_animal":
        raise PosezooError(f"{card.ref}: only single-animal heatmap models are quantised (task {card.task})")
    data = check_keypoints(load_labelled(labelled), card.keypoints)
    splits = card_splits(card, data)
    if splits is None or (not len(splits["train"]) and not len(splits["test"])):
        raise PosezooError(f"{card.ref}: its card records no train/test split naming frames of {labelled}")
    train = splits["train"]
    if not len(train):
        train = np.setdiff1d(np.arange(len(data)), splits["test"])
    train = np.asarray(train, int)
    if np.intersect1d(train, splits["test"]).size:
        raise PosezooError(f"{card.ref}: calibration frames overlap the test split")
    images = data.subset(train).load_images("RGB")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / (Path(card.artefact.filename).stem + "_int8.onnx")
        report = quantize_onnx(resolved.path, onnx_path, card, images, recipe)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        calibration = {"source": _source_name(data.source), "frames": len(train),
                       "first": data.names[train[0]], "last": data.names[train[-1]], "split": "train"}
        new = int8_card(card, report, calibration=calibration, command=command)
        directory = Path(store) / new.name / new.version
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / onnx_path.name
        shutil.copyfile(onnx_path, target)
        art = Artefact(locations=["local"], filename=target.name, sha256=sha256_file(target),
                       bytes=target.stat().st_size)
        card_path = new.model_copy(update={"artefact": art}).to_yaml(directory / CARD_FILE)
    new = ModelCard.from_yaml(card_path)
    if evaluate:
        ev = evaluate_model(str(card_path), labelled, device="cpu", threads=threads)
        base = card.metrics or {}
        metrics = {"evaluated_with": "posezoo evaluate (ONNX Runtime, runtime pre-processing)",
                   **{k: _round(v) for k, v in ev.metrics.items()}}
        if base.get("test", {}).get("overall"):
            metrics["fp32_test_overall"] = base["test"]["overall"]
        new = new.model_copy(update={"metrics": metrics})
        new.to_yaml(card_path)
    zoo.refresh()
    return new


def _source_name(path: Path) -> str:
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def _round(table: dict) -> dict:
    return {k: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in row.items()} for k, row in table.items()}
