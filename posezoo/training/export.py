"""ONNX export of a trained :class:`~posezoo.training.model.PoseNet` and the parity
check against PyTorch that every registered model records in its card."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import PosezooError
from .model import PoseNet

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("heatmaps", "locref")


class _Exported(torch.nn.Module):
    """Wraps the network so the graph returns sigmoid heatmaps (card activation ``none``)."""

    def __init__(self, model: PoseNet):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heat, locref = self.model(image)
        return (heat if self.model.sigmoid else torch.sigmoid(heat)), locref


def export_onnx(model: PoseNet, path: str | Path, input_hw: tuple[int, int]) -> Path:
    """Write the network as ONNX: input ``image`` ``(N, 3, H, W)`` float32 with a
    dynamic batch, outputs ``heatmaps`` ``(N, K, H/4, W/4)`` (probabilities) and
    ``locref`` ``(N, 2K, H/4, W/4)``.

    Uses the TorchScript-based exporter (``dynamo=False``), opset 17: it gives a
    single self-contained file with a symbolic batch axis; the bytes are deterministic
    for given weights.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _Exported(model).eval()
    dummy = torch.zeros(2, 3, *input_hw)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer/deprecation chatter, not actionable
        torch.onnx.export(wrapped, (dummy,), buf, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          opset_version=OPSET, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
    import onnx

    proto = simplify(onnx.load_from_string(buf.getvalue()))
    proto.producer_name, proto.producer_version = "posezoo", "train"
    onnx.checker.check_model(proto)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString(deterministic=True))
    tmp.replace(path)
    return path


def simplify(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """Constant-fold the graph and fold zero ``Pad`` nodes into the ``Conv`` after them.

    TensorFlow "SAME" padding of the stride-2 convolutions exports as ``Pad`` nodes
    whose pads are computed by a chain of shape ops. ONNX Runtime then runs each
    ``Pad`` as a separate copy and converts the tensor out of and back into its
    blocked conv layout around it: measured here, 48 % of the CPU inference time.
    ``Conv`` takes asymmetric ``pads`` itself, so the padding moves there.

    The constants are folded by ONNX Runtime's basic (hardware-independent)
    optimisation level, whose output is standard ONNX; the result is then checked
    against PyTorch by :func:`parity`.
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "basic.onnx"
        src.write_bytes(proto.SerializeToString())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(dst)
        opts.log_severity_level = 3
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        folded = onnx.load(str(dst))
    graph = folded.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        value = pad.input[2] if len(pad.input) > 2 else ""
        users = consumers.get(pad.output[0], [])
        if (mode != b"constant" or pad.input[1] not in consts or (value and (value not in consts or consts[value].any()))
                or len(users) != 1 or users[0].op_type != "Conv"):
            continue
        pads = consts[pad.input[1]].tolist()  # [n0, c0, h0, w0, n1, c1, h1, w1]
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0 or (
                "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET")):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(helper.make_attribute(
            "pads", [old[0] + pads[2], old[1] + pads[3], old[2] + pads[6], old[3] + pads[7]]))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(init)
    return folded


def parity(model: PoseNet, onnx_path: str | Path, inputs: np.ndarray, *, threads: int | None = None) -> dict:
    """Compare ONNX Runtime and PyTorch outputs on normalised inputs.

    Parameters
    ----------
    inputs : ndarray, shape (n, 3, H, W), float32
        Normalised network inputs (e.g. the test frames).

    Returns
    -------
    dict
        ``max_abs_diff_heatmaps``, ``max_abs_diff_locref``, ``argmax_identical``
        (every keypoint of every image has the same heatmap argmax) and
        ``n_images``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    wrapped = _Exported(model).eval()
    max_h = max_l = 0.0
    same = True
    for i in range(0, len(inputs), 8):
        x = np.ascontiguousarray(inputs[i : i + 8], dtype=np.float32)
        with torch.no_grad():
            th, tl = (t.numpy() for t in wrapped(torch.from_numpy(x)))
        oh, ol = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        max_h = max(max_h, float(np.abs(th - oh).max()))
        max_l = max(max_l, float(np.abs(tl - ol).max()))
        n, k = th.shape[:2]
        same &= bool((th.reshape(n, k, -1).argmax(-1) == oh.reshape(n, k, -1).argmax(-1)).all())
    return {"n_images": int(len(inputs)), "max_abs_diff_heatmaps": max_h, "max_abs_diff_locref": max_l,
            "argmax_identical": same}


def check_parity(report: dict, tolerance: float = 1e-3) -> dict:
    """Raise if ONNX and PyTorch disagree beyond ``tolerance`` or on any argmax."""
    worst = max(report["max_abs_diff_heatmaps"], report["max_abs_diff_locref"])
    if worst > tolerance or not report["argmax_identical"]:
        raise PosezooError(f"ONNX export does not match PyTorch: {report} (tolerance {tolerance})")
    return report
