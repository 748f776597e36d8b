import numpy as np
import pytest

import posezoo
from posezoo.errors import InputError, PosezooError, TruncatedVideoError
from posezoo.video import iter_frames


def test_providers_and_threads_are_reported(tiny_predictor):
    assert tiny_predictor.providers == ["CPUExecutionProvider"]
    assert tiny_predictor.model.threads == 2


def test_cuda_request_on_a_cpu_only_runtime_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU build of onnxruntime is installed")
    with pytest.raises(PosezooError, match="posezoo\\[gpu\\]"):
        posezoo.load("posezoo_tiny_mouse", device="cuda")
    with pytest.raises(InputError, match="unknown device"):
        posezoo.load("posezoo_tiny_mouse", device="tpu")


def test_auto_device_falls_back_to_cpu():
    assert posezoo.load("posezoo_tiny_mouse", device="auto").providers[-1] == "CPUExecutionProvider"


def test_video_keypoints_land_on_the_mouse(tiny_predictor, mouse_video):
    path, truth = mouse_video
    table = tiny_predictor.predict_video(path, batch_size=7)
    assert table.data.shape == (60, 1, 4, 3)
    assert table.keypoints == ("snout", "leftear", "rightear", "tailbase")
    # the tiny model marks the dark body: within a body length of the true body centre
    centre = truth[:, 0, [0, 3], :2].mean(axis=1)
    err = np.linalg.norm(table.data[:, 0, 0, :2] - centre, axis=1)
    assert np.median(err) < 12 and err.max() < 30
    assert (table.data[..., 2] > 0.5).all()
    meta = table.metadata
    assert meta["model"]["name"] == "posezoo_tiny_mouse" and len(meta["model"]["sha256"]) == 64
    assert meta["video"]["n_frames"] == 60 and meta["video"]["width"] == 320
    assert meta["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert {"inference_s", "decode_s", "preprocess_s", "video_wait_s", "fps"} <= set(meta["timings"])


def test_results_do_not_depend_on_batch_size(tiny_predictor, mouse_video):
    path, _ = mouse_video
    a = tiny_predictor.predict_video(path, batch_size=1).data
    b = tiny_predictor.predict_video(path, batch_size=64).data
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_letterbox_maps_back_to_frame_pixels(tiny_predictor, tmp_path):
    from posezoo.synthetic import make_mouse_video

    # 640x360 into a 320x240 input: scaled by 1/2 and padded at the bottom
    path = tmp_path / "wide.mp4"
    truth = make_mouse_video(path, 20, 640, 360, seed=5)
    table = tiny_predictor.predict_video(path)
    centre = truth[:, 0, [0, 3], :2].mean(axis=1)
    assert np.median(np.linalg.norm(table.data[:, 0, 0, :2] - centre, axis=1)) < 20


@pytest.mark.parametrize("size_wh", [(320, 240), (480, 360), (213, 160), (800, 600)])
def test_resize_batch_is_opencv_image_by_image(size_wh):
    import cv2

    from posezoo.runtime import resize_batch

    # 480x360 and 213x160 are area averaging by a non-integer factor, where OpenCV takes at
    # most 4 channels (the batch laid out as channels failed there); 800x600 is up-sampling
    images = np.random.default_rng(0).integers(0, 256, (50, 480, 640, 3), dtype=np.uint8)
    interp = cv2.INTER_AREA if size_wh[0] <= 640 else cv2.INTER_LINEAR
    expected = np.stack([cv2.resize(im, size_wh, interpolation=interp) for im in images])
    got = resize_batch(images, size_wh)
    assert got.shape == expected.shape  # rounding may differ by 1 between OpenCV's 3- and 126-channel paths
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_images_of_a_size_the_input_does_not_divide(tiny_predictor, tmp_path):
    from posezoo.synthetic import make_mouse_video

    path = tmp_path / "odd.mp4"
    truth = make_mouse_video(path, 8, 500, 376, seed=3)  # into 320x240: scaled by 0.638
    frames = np.stack(list(iter_frames(path)))
    centre = truth[:, 0, [0, 3], :2].mean(axis=1)
    for data in (tiny_predictor.predict_images(frames)[:, 0], tiny_predictor.predict_video(path).data[:, 0]):
        assert np.median(np.linalg.norm(data[:, 0, :2] - centre, axis=1)) < 20


def test_predict_images_matches_video_path(tiny_predictor, mouse_video):
    path, _ = mouse_video
    frames = np.stack(list(iter_frames(path, max_frames=10)))
    from_images = tiny_predictor.predict_images(frames)
    from_bgr = tiny_predictor.predict_images(frames[..., ::-1], colour_order="BGR")
    from_video = tiny_predictor.predict_video(path, max_frames=10).data
    assert from_images.shape == (10, 1, 4, 3)
    np.testing.assert_allclose(from_images, from_bgr, atol=1e-5)
    np.testing.assert_allclose(from_images, from_video, atol=1e-4)  # same size: no resize on either path
    single = tiny_predictor.predict_images(frames[0])
    np.testing.assert_allclose(single[0], from_images[0], atol=1e-5)
    with pytest.raises(InputError, match="uint8"):
        tiny_predictor.predict_images(frames.astype(np.float32))
    with pytest.raises(InputError, match="shape"):
        tiny_predictor.predict_images(frames[..., :2])


def test_truncated_video_raises_or_returns_partial(tiny_predictor, tmp_path):
    from posezoo.synthetic import make_mouse_video

    full = tmp_path / "full.mp4"
    make_mouse_video(full, 60, 320, 240)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(TruncatedVideoError):
        tiny_predictor.predict_video(cut)
    partial = tiny_predictor.predict_video(cut, allow_truncated=True)
    assert 0 < partial.n_frames < 60
    assert partial.metadata["truncated"]["frames_read"] == partial.n_frames


def test_filtering_and_outliers_in_metadata(tiny_predictor, mouse_video):
    path, _ = mouse_video
    raw = tiny_predictor.predict_video(path)
    smooth = tiny_predictor.predict_video(path, filter="savgol", filter_window=7)
    assert smooth.metadata["filter"] == {"method": "savgol", "window": 7}
    assert not np.allclose(raw.xy, smooth.xy)
    np.testing.assert_array_equal(raw.likelihood, smooth.likelihood)
    assert set(raw.metadata["outliers"]) >= {"frames", "low_confidence", "jumps"}
