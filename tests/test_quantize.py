"""The INT8 CPU path: static QDQ quantisation of posezoo's own models (posezoo.quantize),
the catalog's INT8 variant of the bundled model, `precision=` in the zoo and in `load`, and
`posezoo bench --precision fp32,int8`. Real models, real openfield frames and video."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnx")

import onnx
from conftest import REPO, SHARED

import posezoo
from posezoo.cards import ModelCard
from posezoo.errors import InputError, PrecisionError
from posezoo.evaluate import card_splits, evaluate_predictions
from posezoo.labelled import load_labelled
from posezoo.predictor import PosePredictor
from posezoo.quantize import (
    QuantRecipe,
    calibration_inputs,
    prepare_graph,
    quantize_onnx,
)
from posezoo.video import iter_frames
from posezoo.zoo import Zoo, sha256_file

LABELS = SHARED / "labeled-data" / "m4s1" / "CollectedData_Pranav.csv"
MOUSE = "posezoo_mouse"


@pytest.fixture(scope="module")
def labelled():
    if not LABELS.exists():
        pytest.fail(f"the real openfield labels are missing: {LABELS}")
    return load_labelled(LABELS)


@pytest.fixture(scope="module")
def video_frames(openfield_video):
    """32 real frames of the openfield video, spread over its first 640 (RGB, 640x480)."""
    return np.stack(list(iter_frames(openfield_video, max_frames=640)))[::20]


@pytest.fixture(scope="module")
def fp32_mouse():
    return posezoo.load(MOUSE, device="cpu", threads=2)


def _ops(path) -> dict:
    out: dict = {}
    for n in onnx.load(str(path)).graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def _with_dtype(card: ModelCard, report: dict) -> ModelCard:
    return card.model_copy(update={"input": card.input.model_copy(update={"dtype": report["input"]["dtype"]})})


def test_the_exact_rewrites_keep_the_fp32_outputs(fp32_mouse, labelled, tmp_path):
    """BatchNorm folding and ConvTranspose -> Conv + DepthToSpace are exact: same outputs."""
    import onnxruntime as ort

    card = fp32_mouse.card
    src = fp32_mouse.model.path
    prepared = prepare_graph(onnx.load(src))
    ops = {n.op_type for n in prepared.graph.node}
    assert "ConvTranspose" not in ops and "BatchNormalization" not in ops and "DepthToSpace" in ops
    onnx.save(prepared, str(tmp_path / "prepared.onnx"))
    x = calibration_inputs(card, labelled.subset(range(100, 104)).load_images("RGB"))  # test frames: any input
    a = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"image": x})
    b = ort.InferenceSession(str(tmp_path / "prepared.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    for u, v in zip(a, b):
        assert np.abs(u - v).max() < 1e-4


def test_quantise_the_bundled_model_on_a_few_training_frames(labelled, video_frames, tmp_path):
    """Calibrated on 8 real training frames: a QDQ graph with a uint8 input that the
    predictor runs on real video frames with keypoints close to fp32's (1.1.0, where these
    tolerances were set: 1.2.0's likelihoods differ by up to 0.16 with 8 calibration frames)."""
    fp32_mouse = posezoo.load(f"{MOUSE}@1.1.0", device="cpu", threads=2)
    card = fp32_mouse.card
    train = card_splits(card, labelled)["train"][::12][:8]
    dst = tmp_path / "mouse_int8.onnx"
    report = quantize_onnx(fp32_mouse.model.path, dst, card, labelled.subset(train).load_images("RGB"))
    ops = _ops(dst)
    assert ops.get("QuantizeLinear", 0) > 20 and ops.get("DequantizeLinear", 0) > 40
    assert "ConvTranspose" not in ops and "BatchNormalization" not in ops
    assert report["input"] == {"dtype": "uint8", "scale": 1 / 128, "zero_point": 127}
    assert report["rewrite_max_abs_diff"] < 1e-4
    assert onnx.load(str(dst)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dst.stat().st_size < 0.5 * (REPO / "models" / MOUSE / "1.1.0" / "posezoo_mouse.onnx").stat().st_size

    int8 = PosePredictor(_with_dtype(card, report), dst, device="cpu", threads=2)
    ref = fp32_mouse.predict_images(video_frames)[:, 0]
    got = int8.predict_images(video_frames)[:, 0]
    confident = ref[..., 2] > card.pcutoff
    assert confident.mean() > 0.8  # the bundled model sees the mouse in these frames
    dev = np.linalg.norm(got[..., :2] - ref[..., :2], axis=-1)[confident]
    print(f"\nint8 (8 calibration frames) vs fp32 on 32 video frames: median {np.median(dev):.2f} px, "
          f"90th percentile {np.percentile(dev, 90):.2f} px")
    assert np.median(dev) < 1.0 and np.percentile(dev, 90) < 3.0
    assert np.abs(got[..., 2] - ref[..., 2])[confident].max() < 0.15


def test_quantise_a_float_input_model(tiny_card_dir, video_frames, tmp_path):
    """A card whose normalisation is not one scale and an integer zero point (ImageNet
    mean/std) keeps its float input; the QDQ graph still runs through the predictor."""
    card = ModelCard.from_yaml(tiny_card_dir / "card.yaml")
    src = tiny_card_dir / card.artefact.filename
    dst = tmp_path / "tiny_int8.onnx"
    report = quantize_onnx(src, dst, card, video_frames[:8], QuantRecipe(fp32_head=False))
    assert report["input"] == {"dtype": "float32"}
    ops = _ops(dst)
    assert ops.get("QuantizeLinear", 0) >= 1 and ops.get("DequantizeLinear", 0) >= 3
    ref = PosePredictor(card, src, device="cpu", threads=2).predict_images(video_frames)[:, 0]
    got = PosePredictor(_with_dtype(card, report), dst, device="cpu", threads=2).predict_images(video_frames)[:, 0]
    dev = np.linalg.norm(got[..., :2] - ref[..., :2], axis=-1)
    print(f"\ntiny int8 vs fp32: median {np.median(dev):.1f} px, max {dev.max():.1f} px")
    # its heatmap is a flat blob: the argmax moves by a cell (stride 8 at 320x240 = 16 px at 640x480)
    assert np.median(dev) <= 16.01 and dev.max() <= 3 * 16.01


def test_the_catalog_int8_card_resolves_and_matches_its_file():
    zoo = Zoo()
    card = zoo.card(MOUSE, precision="int8")
    base = zoo.card(MOUSE)
    assert base.precision == "fp32" and base.version == "1.4.0"  # the newest version stays the fp32 one
    assert card.precision == "int8" and card.variant_of == base.ref and card.version == f"{base.version}-int8"
    assert card.input.dtype == "uint8" and card.keypoints == base.keypoints
    path = REPO / "models" / MOUSE / card.version / card.artefact.filename
    assert path.is_file() and sha256_file(path) == card.artefact.sha256 and path.stat().st_size == card.artefact.bytes
    assert card.artefact.sha256 != base.artefact.sha256
    resolved = zoo.resolve(MOUSE, precision="int8")
    assert resolved.path == path and resolved.card == card
    assert zoo.precisions(MOUSE) == ["fp32", "int8"] and zoo.precisions(card) == ["fp32", "int8"]
    assert zoo.card(f"{MOUSE}@{card.version}") == card  # named itself
    assert zoo.recommend("mouse").ref == base.ref
    assert [c.version for c in zoo.cards(all_versions=True) if c.name == MOUSE] == ["1.1.0", "1.1.0-int8", "1.2.0",
                                                                                  "1.2.0-int8", "1.3.0", "1.3.0-int8", "1.4.0",
                                                                                  "1.4.0-int8"]
    q = card.quantization
    assert q["base_sha256"] == base.artefact.sha256 and q["calibration"]["split"] == "train"
    assert q["command"].startswith("python -m conversion quantize --model posezoo_mouse")
    assert q["calibration"]["frames"] == len(base.training["split"]["train"]) == 100
    # the committed figures: within 0.3 px of the fp32 model's test error
    assert card.metrics["test"]["overall"]["mean_px"] <= base.metrics["test"]["overall"]["mean_px"] + 0.3


def test_load_picks_the_int8_variant_and_evaluates_close_to_fp32(fp32_mouse, labelled):
    int8 = posezoo.load(MOUSE, precision="int8", device="cpu", threads=2)
    assert int8.card.ref == f"{MOUSE}@1.4.0-int8" and int8.model.session.get_inputs()[0].type == "tensor(uint8)"
    assert posezoo.load(MOUSE, device="cpu").card.precision == "fp32"
    assert posezoo.load("default", precision="int8", device="cpu").card.precision == "int8"
    images = labelled.load_images("RGB")
    splits = {"test": card_splits(fp32_mouse.card, labelled)["test"]}
    e32 = evaluate_predictions(labelled, fp32_mouse.predict_images(images)[:, 0], splits).metrics["test"]["overall"]
    e8 = evaluate_predictions(labelled, int8.predict_images(images)[:, 0], splits).metrics["test"]["overall"]
    print(f"\ntest img0100-0115: fp32 {e32['mean_px']:.3f} px PCK@5 {e32['pck@5']:.3f}; "
          f"int8 {e8['mean_px']:.3f} px PCK@5 {e8['pck@5']:.3f}")
    assert e8["mean_px"] <= e32["mean_px"] + 0.3 and e8["pck@10"] >= e32["pck@10"] - 0.05


def test_bad_precisions_are_clear_errors():
    with pytest.raises(PrecisionError, match=r"unknown precision 'int4' for posezoo_mouse@1\.4\.0: use one of fp32, int8"):
        posezoo.load(MOUSE, precision="int4", device="cpu")
    with pytest.raises(InputError, match=r"posezoo_tiny_mouse@0\.1\.0 has no int8 variant; its precisions: fp32"):
        posezoo.load("posezoo_tiny_mouse", precision="int8", device="cpu")
    with pytest.raises(PrecisionError, match="models with int8: posezoo_mouse"):
        Zoo().card("posezoo_tiny_mouse", precision="int8")


def test_a_variant_in_a_catalog_of_its_own(tmp_path, tiny_card_dir):
    """A variant is found through its variant_of in any catalog; its base missing is named."""
    card = ModelCard.from_yaml(tiny_card_dir / "card.yaml")
    vdir = tiny_card_dir.parent / "0.1.0-int8"
    shutil.copytree(tiny_card_dir, vdir)
    card.model_copy(update={"version": "0.1.0-int8", "precision": "int8", "variant_of": card.ref}).to_yaml(
        vdir / "card.yaml")
    zoo = Zoo([tiny_card_dir.parent.parent], include_bundled=False)
    assert zoo.card("posezoo_tiny_mouse").version == "0.1.0"
    assert zoo.card("posezoo_tiny_mouse", precision="int8").version == "0.1.0-int8"
    shutil.rmtree(tiny_card_dir)
    orphan = Zoo([vdir.parent.parent], include_bundled=False)
    assert orphan.card("posezoo_tiny_mouse", precision="int8").version == "0.1.0-int8"  # itself
    with pytest.raises(posezoo.UnknownModelError, match="variant of posezoo_tiny_mouse@0.1.0, which this catalog"):
        orphan.precisions("posezoo_tiny_mouse")
    with pytest.raises(ValueError, match="variant_of"):
        ModelCard.model_validate({**card.model_dump(), "precision": "int8"})


def test_bench_compares_both_precisions_in_one_run(openfield_video, capsys):
    from posezoo.cli import main

    assert main(["bench", "--video", str(openfield_video), "--precision", "fp32,int8", "--frames", "96",
                 "--no-rss", "--device", "cpu", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["precisions"]) == {"fp32", "int8"} and r["baseline"] == "fp32"
    assert r["precisions"]["int8"]["model"] == f"{MOUSE}@1.4.0-int8" and r["precisions"]["fp32"]["frames"] == 96
    assert len(r["precisions"]["int8"]["end_to_end_fps_passes"]) == 2
    assert r["speedup_end_to_end"]["int8"] > 1.0 and r["speedup_model_only"]["int8"] > 1.0
    with pytest.raises(SystemExit):
        main(["bench", "--video", str(openfield_video), "--precision", "int4"])
