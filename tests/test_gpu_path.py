"""The GPU path without a GPU: provider selection and the TensorRT engine-cache key (pure
functions, fed fake provider lists), the I/O-binding run on the CPU against plain runs,
threaded frame conversion, top-down crops of several frames in one call, and the GPU
check script's dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from posezoo import runtime, video
from posezoo.errors import InputError, PosezooError

REPO = Path(__file__).resolve().parents[1]
MOUSE_ONNX = REPO / "models" / "posezoo_mouse" / "1.1.0" / "posezoo_mouse.onnx"
MOUSE_SHA = "9e8b46d411360d6c88f3a9ca358493a3b32b8446689be5a284580964f36b2e27"
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CUDA_ONLY = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_ONLY = ["AzureExecutionProvider", "CPUExecutionProvider"]


def names(providers):
    return runtime.provider_names(providers)


def options(providers, name):
    return next(p[1] for p in providers if isinstance(p, tuple) and p[0] == name)


# -- provider selection -----------------------------------------------------------------------
def test_auto_prefers_tensorrt_then_cuda_then_cpu():
    assert names(runtime.select_providers("auto", available=ALL)) == ALL
    assert names(runtime.select_providers("auto", available=CUDA_ONLY)) == CUDA_ONLY
    # a CPU-only wheel: unchanged behaviour, the CPU alone and no error
    assert runtime.select_providers("auto", available=CPU_ONLY) == ["CPUExecutionProvider"]
    assert runtime.select_providers("cpu", available=ALL) == ["CPUExecutionProvider"]


def test_explicit_devices_take_only_what_was_asked_for():
    assert names(runtime.select_providers("cuda", available=ALL)) == CUDA_ONLY
    assert names(runtime.select_providers("tensorrt", available=ALL)) == ALL
    with pytest.raises(PosezooError, match=r"no CUDAExecutionProvider.*posezoo\[gpu\]"):
        runtime.select_providers("cuda", available=CPU_ONLY)
    with pytest.raises(PosezooError, match="no TensorrtExecutionProvider"):
        runtime.select_providers("tensorrt", available=CUDA_ONLY)
    with pytest.raises(InputError, match="unknown device"):
        runtime.select_providers("tpu", available=ALL)


def test_precision_reaches_tensorrt_only():
    fp16 = runtime.select_providers("tensorrt:fp16", available=ALL, engine_cache="/c")
    fp32 = runtime.select_providers("tensorrt", available=ALL, engine_cache="/c")
    assert options(fp16, "TensorrtExecutionProvider")["trt_fp16_enable"] == "True"
    assert options(fp32, "TensorrtExecutionProvider")["trt_fp16_enable"] == "False"
    assert "trt_fp16_enable" not in options(fp16, "CUDAExecutionProvider")
    # the keyword wins over the suffix
    forced = runtime.select_providers("tensorrt", "fp16", available=ALL)
    assert options(forced, "TensorrtExecutionProvider")["trt_fp16_enable"] == "True"
    with pytest.raises(InputError, match="tensorrt:fp16"):
        runtime.select_providers("cuda:fp16", available=ALL)
    with pytest.raises(InputError, match="precision"):
        runtime.select_providers("tensorrt:int4", available=ALL)


def test_tensorrt_gets_the_engine_cache_and_the_batch_profile():
    profile = runtime.trt_profile_shapes([("image", ["batch", 3, 240, 320])], max_batch=128, opt_batch=32)
    assert profile == {"trt_profile_min_shapes": "image:1x3x240x320", "trt_profile_opt_shapes": "image:32x3x240x320",
                       "trt_profile_max_shapes": "image:128x3x240x320"}
    got = runtime.select_providers("auto", available=ALL, engine_cache="/cache/k", trt_profile=profile)
    trt = options(got, "TensorrtExecutionProvider")
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == "/cache/k"
    assert trt["trt_timing_cache_enable"] == "True" and trt["trt_timing_cache_path"] == "/cache/k"
    assert trt["trt_profile_max_shapes"] == "image:128x3x240x320"
    # no cache folder given: no cache options
    bare = options(runtime.select_providers("tensorrt", available=ALL), "TensorrtExecutionProvider")
    assert "trt_engine_cache_path" not in bare
    # another dynamic axis (fully convolutional models of any size): no explicit profile
    assert runtime.trt_profile_shapes([("image", ["batch", 3, "h", "w"])]) is None
    assert runtime.trt_profile_shapes([("image", [4, 3, 64, 64])])["trt_profile_max_shapes"] == "image:4x3x64x64"


def test_engine_cache_key_names_model_gpu_tensorrt_and_precision(tmp_path, monkeypatch):
    key = runtime.trt_cache_key(MOUSE_SHA, "NVIDIA H200", "10.9.0", "fp16")
    assert key == "9e8b46d411360d6c-nvidia-h200-trt10.9.0-fp16"
    others = {runtime.trt_cache_key(MOUSE_SHA[::-1], "NVIDIA H200", "10.9.0", "fp16"),
              runtime.trt_cache_key(MOUSE_SHA, "NVIDIA A100-SXM4-80GB", "10.9.0", "fp16"),
              runtime.trt_cache_key(MOUSE_SHA, "NVIDIA H200", "10.8.0", "fp16"),
              runtime.trt_cache_key(MOUSE_SHA, "NVIDIA H200", "10.9.0", "fp32")}
    assert key not in others and len(others) == 4
    assert runtime.trt_cache_key(MOUSE_SHA, "unknown", "unknown") == "9e8b46d411360d6c-unknown-trtunknown-fp32"
    with pytest.raises(InputError):
        runtime.trt_cache_key("not-a-hash", "gpu", "10")
    monkeypatch.setenv("POSEZOO_CACHE", str(tmp_path))
    where = runtime.engine_cache_dir(key)
    assert where == tmp_path / "trt-engines" / key
    assert not runtime.engine_is_cached(where)
    where.mkdir(parents=True)
    (where / "TensorrtExecutionProvider_TRTKernel_graph_main_123_0_0_fp16_sm90.engine").write_bytes(b"x")
    assert runtime.engine_is_cached(where)


def test_gpu_name_and_tensorrt_version_degrade_to_unknown(monkeypatch):
    runtime.gpu_name.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        assert runtime.gpu_name() == "unknown"
    finally:
        runtime.gpu_name.cache_clear()
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        v = runtime.tensorrt_version()
        assert v == "unknown" or v[0].isdigit()


# -- the session: I/O binding, notices ----------------------------------------------------------
def test_io_binding_path_matches_plain_run_on_the_bundled_model():
    model = runtime.OrtModel(MOUSE_ONNX, device="cpu", threads=2)
    assert not model.uses_gpu and model.binding_device == "cpu"
    x = np.random.default_rng(0).normal(0, 1, (5, 3, 240, 320)).astype(np.float32)
    plain = model.run({"image": x})
    bound = model.run_bound({"image": x})
    assert set(bound) == {"heatmaps", "locref"}
    for name in plain:
        assert bound[name].shape == plain[name].shape and bound[name].dtype == np.float32
        np.testing.assert_array_equal(bound[name], plain[name])
    # a subset of outputs, a non-contiguous input
    only = model.run_bound({"image": x[::2]}, ["heatmaps"])
    assert list(only) == ["heatmaps"]
    np.testing.assert_array_equal(only["heatmaps"], plain["heatmaps"][::2])


def test_gpu_sessions_run_through_the_binding_and_split_big_batches(monkeypatch):
    model = runtime.OrtModel(MOUSE_ONNX, device="cpu", threads=2)
    calls = []
    real = model.run_bound

    def spy(feeds, outputs=None, device=None):
        calls.append(len(feeds["image"]))
        return real(feeds, outputs, device="cpu")

    monkeypatch.setattr(model, "run_bound", spy)
    x = np.random.default_rng(1).normal(0, 1, (7, 3, 240, 320)).astype(np.float32)
    reference = model.run({"image": x})
    assert calls == []  # the CPU path is the plain session.run
    model.uses_gpu, model.max_batch = True, 3  # as a TensorRT session with a batch profile of 3
    got = model.run({"image": x})
    assert calls == [3, 3, 1]
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, atol=1e-5)


def test_tensorrt_first_build_is_announced(tmp_path, monkeypatch):
    # a wheel that offers TensorRT: the engine folder is keyed and created, and a missing engine
    # is announced before the (here CPU) session is made
    monkeypatch.setenv("POSEZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(runtime, "preload_gpu_libraries", lambda: "nothing")
    monkeypatch.setattr(runtime, "gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(runtime, "tensorrt_version", lambda: "10.9.0")
    seen = {}
    real_session = runtime.ort.InferenceSession

    def fake_session(path, sess_options=None, providers=None):
        if providers and providers != ["CPUExecutionProvider"]:
            seen["providers"] = providers
        return real_session(str(path), sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(runtime.ort, "InferenceSession", fake_session)
    notices = []
    with pytest.warns(RuntimeWarning, match="fell back"):
        model = runtime.OrtModel(MOUSE_ONNX, device="auto:fp16", threads=2, notify=notices.append)
    key = "9e8b46d411360d6c-nvidia-h200-trt10.9.0-fp16"
    assert model.engine_cache == tmp_path / "trt-engines" / key and model.engine_cache.is_dir()
    assert len(notices) == 1 and "first build can take a minute" in notices[0] and key in notices[0]
    assert model.notices == notices
    trt = options(seen["providers"], "TensorrtExecutionProvider")
    assert trt["trt_engine_cache_path"] == str(model.engine_cache) and trt["trt_fp16_enable"] == "True"
    assert trt["trt_profile_opt_shapes"] == "image:32x3x240x320"
    # the session fell back to the CPU: no binding, no TensorRT batch split
    assert not model.uses_gpu and model.max_batch is None
    # an engine in the cache: no notice
    (model.engine_cache / "a.engine").write_bytes(b"x")
    with pytest.warns(RuntimeWarning):
        again = runtime.OrtModel(MOUSE_ONNX, device="auto:fp16", threads=2, notify=notices.append)
    assert len(notices) == 1 and again.notices == []
    # asked for explicitly, a TensorRT that did not take the model is an error
    with pytest.raises(PosezooError, match="fell back"):
        runtime.OrtModel(MOUSE_ONNX, device="tensorrt", threads=2, notify=notices.append)


def test_cuda_on_a_cpu_only_wheel_is_a_clear_error():
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU build of onnxruntime is installed")
    with pytest.raises(PosezooError, match=r"posezoo\[gpu\]"):
        runtime.OrtModel(MOUSE_ONNX, device="cuda")
    with pytest.raises(PosezooError, match=r"posezoo\[gpu\]"):
        runtime.OrtModel(MOUSE_ONNX, device="tensorrt:fp16")
    assert runtime.OrtModel(MOUSE_ONNX, device="auto", threads=2).providers == ["CPUExecutionProvider"]


# -- decoding throughput ------------------------------------------------------------------------
def test_threaded_conversion_gives_the_same_batches(mouse_video):
    path, _ = mouse_video
    one = list(video.iter_batches(path, 7, size=(160, 120), convert_threads=1))
    many = list(video.iter_batches(path, 7, size=(160, 120), convert_threads=3, queue_batches=2, decode_threads=2))
    assert [b.start for b in many] == [b.start for b in one] == list(range(0, 60, 7))
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a.frames, b.frames)
    assert sum(len(b.frames) for b in video.iter_batches(path, 16, max_frames=33, convert_threads=2)) == 33


def test_threaded_conversion_keeps_truncation_and_stops_when_closed(mouse_video, tmp_path):
    path, _ = mouse_video
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    got = {}
    for threads in (1, 3):
        n = 0
        with pytest.raises(video.TruncatedVideoError) as err:
            for batch in video.iter_batches(cut, 8, convert_threads=threads):
                n += len(batch.frames)
        got[threads] = (n, err.value.frames_read)
    assert got[3] == got[1] and 0 < got[3][0] < 60
    # closing early stops the pool's threads: tests/test_video.py::test_closing_early_stops_the_decoder_thread


def test_default_conversion_threads_leave_small_machines_alone():
    assert video.default_convert_threads(2) == 1
    assert video.default_convert_threads(4) == 1
    assert video.default_convert_threads(16) == 4
    assert video.default_convert_threads(64) == 4


# -- top-down: crops of several frames in one call ---------------------------------------------
class CountingPose:
    """A pose network stand-in: each crop's keypoint is the crop's centre."""

    def __init__(self, crop_hw=(64, 48)):
        self.crop_hw = crop_hw
        self.card = SimpleNamespace(top_down=None, n_keypoints=1)
        self.calls: list[int] = []

    @property
    def crop_wh(self):
        return self.crop_hw[1], self.crop_hw[0]

    def raw(self, crops):
        self.calls.append(len(crops))
        return {"n": len(crops)}

    def decode(self, out):
        h, w = self.crop_hw
        return np.tile(np.array([[[w / 2, h / 2, 1.0]]], np.float32), (out["n"], 1, 1))


def test_top_down_crops_of_many_frames_share_one_call():
    from posezoo.topdown import CPU_MAX_CROPS, GPU_MAX_CROPS, estimate_poses

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(6)]
    boxes = []
    for i in range(6):
        xy = rng.uniform(10, 150, size=(i % 3 + 1, 2))
        boxes.append(np.concatenate([xy, xy + [40, 60]], axis=1).astype(np.float32))
    pose = CountingPose()
    poses = estimate_poses(pose, frames, boxes, max_crops=64)
    assert pose.calls == [12]  # 6 frames, 12 crops, one network call
    for p, b in zip(poses, boxes):  # each crop's centre maps back to its box's centre
        np.testing.assert_allclose(p[:, 0, :2], (b[:, :2] + b[:, 2:]) / 2, atol=0.6)
    pose.calls.clear()
    estimate_poses(pose, frames, boxes, max_crops=5)
    assert pose.calls == [5, 5, 2]
    assert GPU_MAX_CROPS == runtime.TRT_MAX_BATCH and GPU_MAX_CROPS > CPU_MAX_CROPS


# -- the GPU check script -----------------------------------------------------------------------
def test_gpu_check_plan_is_pure():
    from posezoo.gpu import plan_configs

    plan = {e["device"]: e for e in plan_configs(ALL, MOUSE_SHA, "NVIDIA H200", "10.9.0")}
    assert plan["cpu"]["providers"] == ["CPUExecutionProvider"]
    assert plan["cuda"]["providers"] == CUDA_ONLY and "engine_cache" not in plan["cuda"]
    assert plan["tensorrt:fp16"]["providers"] == ALL
    assert plan["tensorrt:fp16"]["engine_cache"].endswith("9e8b46d411360d6c-nvidia-h200-trt10.9.0-fp16")
    assert plan["tensorrt"]["engine_cache"].endswith("-fp32")
    cpu = {e["device"]: e for e in plan_configs(CPU_ONLY, MOUSE_SHA)}
    assert cpu["auto"]["providers"] == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in cpu["cuda"]["error"] and "providers" not in cpu["tensorrt:fp16"]


def test_gpu_check_script_dry_run():
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "gpu_check: installing" not in text  # a dry run installs nothing
    assert "dry run: nothing measured" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "CPUExecutionProvider" in lines["cpu"] and "CPUExecutionProvider" in lines["auto"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        assert "would not run here" in lines["cuda"] and "would not run here" in lines["tensorrt:fp16"]
    if "TensorrtExecutionProvider" in available:
        assert "TensorRT engine cache" in lines["tensorrt:fp16"]
    assert "HRNet-w32:" in text
