"""Things posezoo makes for itself: a procedurally rendered top-view mouse video with
known keypoints (the README demo and test data), and the tiny hand-built ONNX model
used by tests and as a stand-in default.

The tiny model is not trained: it marks the darkest blob of the frame (a dark mouse on
a light floor) for every keypoint. It exists so that every part of the pipeline can
run and be tested with a real ONNX model, offline, in milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .video import VideoWriter

MOUSE_KEYPOINTS = ("snout", "leftear", "rightear", "tailbase")
MOUSE_SKELETON = (("snout", "leftear"), ("snout", "rightear"), ("leftear", "tailbase"), ("rightear", "tailbase"))
MOUSE_FLIP_PAIRS = (("leftear", "rightear"),)


def mouse_trajectory(n_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Ground-truth keypoints of a mouse wandering over an arena.

    Returns
    -------
    ndarray, shape (n_frames, 1, 4, 3)
        ``snout, leftear, rightear, tailbase`` as ``x, y, 1.0`` in pixels.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames, dtype=np.float64)
    f1, f2 = rng.uniform(0.008, 0.02, 2)
    p1, p2 = rng.uniform(0, 2 * np.pi, 2)
    margin = 0.22
    cx = width * (0.5 + (0.5 - margin) * np.sin(f1 * t * 2 * np.pi / 4 + p1))
    cy = height * (0.5 + (0.5 - margin) * np.sin(f2 * t * 2 * np.pi / 4 + p2))
    vx, vy = np.gradient(cx), np.gradient(cy)
    heading = np.unwrap(np.arctan2(vy, vx))
    scale = min(width, height) / 480.0
    body = 55.0 * scale
    ux, uy = np.cos(heading), np.sin(heading)  # forward
    nx, ny = -uy, ux  # to the left of the heading in image coordinates (y down)
    snout = np.stack([cx + ux * body, cy + uy * body], -1)
    tail = np.stack([cx - ux * body * 0.9, cy - uy * body * 0.9], -1)
    head = np.stack([cx + ux * body * 0.55, cy + uy * body * 0.55], -1)
    ear_off = 0.28 * body
    left = np.stack([head[:, 0] - nx * ear_off, head[:, 1] - ny * ear_off], -1)
    right = np.stack([head[:, 0] + nx * ear_off, head[:, 1] + ny * ear_off], -1)
    xy = np.stack([snout, left, right, tail], axis=1)  # (n, 4, 2)
    out = np.concatenate([xy, np.ones(xy.shape[:2] + (1,))], axis=-1)
    return out[:, None].astype(np.float32)


def render_mouse_frame(pose: np.ndarray, width: int, height: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw one top-view frame (RGB uint8) of the mouse in ``pose`` ``(4, 3)``."""
    frame = np.full((height, width, 3), 215, np.uint8)
    cv2.rectangle(frame, (0, 0), (width - 1, height - 1), (120, 120, 120), max(2, width // 60))
    snout, left, right, tail = pose[:, :2]
    centre = (snout + tail) / 2
    axis = snout - tail
    length = float(np.hypot(*axis))
    angle = float(np.degrees(np.arctan2(axis[1], axis[0])))
    scale = 16  # sub-pixel drawing
    def p(v):
        return tuple(int(round(c * scale)) for c in v)
    cv2.ellipse(frame, p(centre - axis * 0.08), (int(length * 0.45 * scale), int(length * 0.22 * scale)),
                angle, 0, 360, (35, 35, 35), -1, cv2.LINE_AA, 4)
    head = snout - axis * 0.22
    cv2.ellipse(frame, p(head), (int(length * 0.2 * scale), int(length * 0.13 * scale)),
                angle, 0, 360, (45, 45, 45), -1, cv2.LINE_AA, 4)
    for ear in (left, right):
        cv2.circle(frame, p(ear), int(length * 0.07 * scale), (90, 70, 70), -1, cv2.LINE_AA, 4)
    tail_end = tail - axis * 0.9
    cv2.line(frame, p(tail), p(tail_end), (150, 130, 130), max(1, int(length * 0.04)), cv2.LINE_AA, 4)
    if rng is not None:
        noise = rng.normal(0, 4, frame.shape[:2])[..., None]
        frame = np.clip(frame + noise, 0, 255).astype(np.uint8)
    return frame


def make_mouse_video(
    path: str | os.PathLike,
    n_frames: int = 90,
    width: int = 320,
    height: int = 240,
    fps: float = 30.0,
    *,
    codec: str = "libx264",
    seed: int = 0,
) -> np.ndarray:
    """Write a synthetic top-view mouse video and return its ground-truth poses.

    Parameters
    ----------
    path : path
        Output file; the container follows the suffix (``.mp4``, ``.avi``, ``.mov``...).
    n_frames, width, height : int
    fps : float
        May be non-integer (e.g. ``30000 / 1001``).
    codec : str
        FFmpeg encoder, e.g. ``"libx264"`` (H.264) or ``"mpeg4"`` (MPEG-4 part 2).
    seed : int

    Returns
    -------
    ndarray, shape (n_frames, 1, 4, 3)
        Ground-truth ``x, y, 1`` of ``snout, leftear, rightear, tailbase``.
    """
    truth = mouse_trajectory(n_frames, width, height, seed)
    rng = np.random.default_rng(seed + 1)
    with VideoWriter(path, width, height, fps, codec=codec) as writer:
        for pose in truth[:, 0]:
            writer.write(render_mouse_frame(pose, width, height, rng))
    return truth


# -- the tiny model -------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_tiny_model(path: str | os.PathLike, n_keypoints: int = 4, *, stride: int = 8,
                     gain: float = 14.0, bias: float = -7.0) -> Path:
    """Write the tiny "darkest blob" heatmap model as ONNX (needs the ``onnx`` package).

    Input ``image`` ``(N, 3, H, W)``, ImageNet-normalised RGB; outputs ``heatmaps``
    ``(N, K, H/stride, W/stride)`` (sigmoid already applied) and ``locref``
    ``(N, 2K, H/stride, W/stride)`` (zeros). Dynamic batch and size; H and W must be
    multiples of ``stride``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    std = np.asarray(IMAGENET_STD, np.float32)
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    # darkness = 1 - mean_c(x_c * std_c + mean_c), as one 1x1 convolution
    w_dark = (-std / 3).reshape(1, 3, 1, 1).astype(np.float32)
    b_dark = np.array([1.0 - mean.sum() / 3], np.float32)
    w_heat = np.full((n_keypoints, 1, 1, 1), gain, np.float32)
    b_heat = np.full((n_keypoints,), bias, np.float32)
    w_loc = np.zeros((2 * n_keypoints, 1, 1, 1), np.float32)
    b_loc = np.zeros((2 * n_keypoints,), np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w_dark, "w_dark"), (b_dark, "b_dark"), (w_heat, "w_heat"), (b_heat, "b_heat"), (w_loc, "w_loc"), (b_loc, "b_loc"))]
    half = stride // 2
    nodes = [
        helper.make_node("Conv", ["image", "w_dark", "b_dark"], ["dark"]),
        # overlapping windows (2 x stride) centred on each output cell
        helper.make_node("AveragePool", ["dark"], ["pooled"], kernel_shape=[2 * stride, 2 * stride],
                         strides=[stride, stride], pads=[half, half, half, half], count_include_pad=0),
        helper.make_node("Conv", ["pooled", "w_heat", "b_heat"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["heatmaps"]),
        helper.make_node("Conv", ["pooled", "w_loc", "b_loc"], ["locref"]),
    ]
    graph = helper.make_graph(
        nodes, "posezoo_tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["batch", n_keypoints, "h", "w"]),
         helper.make_tensor_value_info("locref", TensorProto.FLOAT, ["batch", 2 * n_keypoints, "h", "w"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="posezoo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # deterministic bytes: the sha256 in the card must not change between builds
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def write_tiny_model_card(directory: str | os.PathLike, *, name: str = "posezoo_tiny_mouse",
                          version: str = "0.1.0", locations: list[str] | None = None):
    """Build the tiny model into ``directory`` and write its ``card.yaml`` beside it.

    ``python -c "from posezoo.synthetic import write_tiny_model_card as w;
    w('models/posezoo_tiny_mouse/0.1.0')"`` re-creates the committed files bit for bit.
    """
    from .cards import Artefact, InputSpec, ModelCard, OutputSpec, Upstream
    from .zoo import sha256_file

    directory = Path(directory)
    onnx_path = build_tiny_model(directory / f"{name}.onnx", len(MOUSE_KEYPOINTS))
    card = ModelCard(
        name=name,
        version=version,
        description=(
            "Tiny hand-built stand-in model (not trained): marks the darkest blob of the frame, "
            "i.e. a dark mouse on a light floor, for every keypoint. For tests and offline demos."
        ),
        species=["mouse"],
        task="single_animal",
        keypoints=list(MOUSE_KEYPOINTS),
        skeleton=[tuple(e) for e in MOUSE_SKELETON],
        flip_pairs=[tuple(e) for e in MOUSE_FLIP_PAIRS],
        input=InputSpec(size=(240, 320), resize="letterbox", colour_order="RGB", pixel_range=255.0,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD),
        outputs=OutputSpec(heatmap="heatmaps", locref="locref", stride=8, locref_std=7.2801,
                           heatmap_activation="none"),
        artefact=Artefact(locations=locations or ["local"], filename=onnx_path.name,
                          sha256=sha256_file(onnx_path), bytes=onnx_path.stat().st_size),
        upstream=Upstream(kind="trained", notes="built by posezoo.synthetic.build_tiny_model; no training data"),
        licence="Apache-2.0",
        citation="",
        pcutoff=0.4,
    )
    card.to_yaml(directory / "card.yaml")
    return card
