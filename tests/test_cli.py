"""The CLI as a user meets it: real subprocesses, real files, the real openfield video."""

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest

from conftest import OPENFIELD_FRAMES, noise_video

#: DeepLabCut scorers of the bundled models (files are <video><scorer>.h5)
MOUSE = "DLC_posezoo_mouse_1.4.0"
TINY = "DLC_posezoo_tiny_mouse_0.1.0"


def posezoo(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "posezoo", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("posezoo: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
def test_predict_real_openfield_video_all_outputs(openfield_video, tmp_path):
    from movement.io import load_poses

    r = posezoo("predict", openfield_video, "--out", tmp_path, "--format", "h5,csv,json,parquet",
                "--labeled-video", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr, r.stderr  # the mouse model fits the mouse video
    assert f"{OPENFIELD_FRAMES} frames" in r.stdout and "CPUExecutionProvider" in r.stdout
    stem = f"m3v1mp4{MOUSE}"  # the bundled default model, trained on the openfield labels
    ds = load_poses.from_dlc_file(tmp_path / f"{stem}.h5", fps=30)
    assert ds.sizes["time"] == OPENFIELD_FRAMES
    assert list(ds.keypoints.values) == ["snout", "leftear", "rightear", "tailbase"]
    # plausible poses on every frame: confident, and a mouse-sized body (the video is 640x480)
    # a single-animal DeepLabCut table (3 column levels): movement names its one animal individual_0
    pos = ds.position.sel(individuals="individual_0").values  # (time, space, keypoints)
    conf = ds.confidence.sel(individuals="individual_0").values
    assert np.median(conf) > 0.5 and (conf > 0.4).mean() > 0.95  # measured: 0.77 and 0.98
    assert (conf.max(axis=1) > 0.4).mean() > 0.99  # a confident point on all but a few frames (2 of 2330)
    body = np.linalg.norm(pos[:, :, 0] - pos[:, :, 3], axis=1)  # snout to tailbase
    assert 70 < np.median(body) < 170 and np.percentile(body, 99) < 250
    ears = np.linalg.norm(pos[:, :, 1] - pos[:, :, 2], axis=1)
    assert 5 < np.median(ears) < 40
    assert load_poses.from_dlc_file(tmp_path / f"{stem}.csv").sizes["time"] == OPENFIELD_FRAMES
    assert len(json.loads((tmp_path / f"{stem}.json").read_text())["frames"]) == OPENFIELD_FRAMES
    assert (tmp_path / f"{stem}.parquet").stat().st_size > 0
    meta = json.loads((tmp_path / f"{stem}.meta.json").read_text())
    assert meta["video"]["n_frames"] == OPENFIELD_FRAMES and meta["runtime"]["providers"] == ["CPUExecutionProvider"]
    with av.open(str(tmp_path / f"{stem}_labeled.mp4")) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.pix_fmt, s.frames) == ("h264", "yuv420p", OPENFIELD_FRAMES)
        assert sum(1 for _ in c.decode(s)) == OPENFIELD_FRAMES


def test_bad_inputs_give_one_clear_line(tmp_path, openfield_video):
    text = tmp_path / "notes.mp4"
    text.write_text("these are my notes, not a video\n" * 10)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(openfield_video.read_bytes()[:400_000])
    for path, needle in ((text, "not a readable video"), (empty, "file is empty"), (cut, "not a readable video"),
                         (tmp_path / "missing.mp4", "no such file")):
        r = posezoo("predict", path, "--out", tmp_path / "out", "--no-progress")
        assert_one_line_error(r, str(path), needle)
    assert_one_line_error(posezoo("predict", text, "--model", "superanimal_mouse"), "unknown model", "did you mean")
    assert_one_line_error(posezoo("predict", text, "--model", "horse_sideview"), "not published yet")
    r = posezoo("predict", text, "--format", "h5,xlsx")
    assert r.returncode == 2 and "unknown format" in r.stderr and "Traceback" not in r.stderr


def test_truncated_faststart_video_writes_partial_results_and_fails(tmp_path):
    from posezoo.synthetic import make_mouse_video

    full = tmp_path / "full.mp4"
    make_mouse_video(full, 60, 320, 240)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    r = posezoo("predict", cut, "--out", tmp_path / "out", "--no-progress", "--model", "posezoo_tiny_mouse")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "truncated" in r.stderr and "frames that decoded" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    meta = json.loads((tmp_path / "out" / f"cut{TINY}.meta.json").read_text())
    assert 0 < meta["truncated"]["frames_read"] < 60


def test_zoo_commands():
    r = posezoo("zoo", "list", "--json")
    listed = {m["name"]: m for m in json.loads(r.stdout)}
    assert listed["posezoo_tiny_mouse"]["published"] and not listed["superanimal_quadruped"]["published"]
    assert "superanimal_topviewmouse" in posezoo("zoo", "list").stdout
    assert "keypoints:" in posezoo("zoo", "show", "dog").stdout
    r = posezoo("zoo", "pull", "posezoo_tiny_mouse")
    assert r.returncode == 0 and "sha256 verified" in r.stdout


def test_demo_video_then_predict(tmp_path):
    r = posezoo("demo-video", tmp_path / "demo.mp4", "--frames", "30", "--size", "320x240")
    assert r.returncode == 0, r.stderr
    r = posezoo("predict", tmp_path / "demo.mp4", "--out", tmp_path, "--format", "json", "--labeled-video",
                "--filter", "median", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / f"demo{MOUSE}_filtered_labeled.mp4").exists() and (tmp_path / f"demo{MOUSE}.json").exists()


def test_bench_reports_every_figure(mouse_video):
    path, _ = mouse_video
    r = posezoo("bench", "--video", path, "--json", "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("model_only_fps", "end_to_end_fps", "pipeline_efficiency", "share_preprocess", "share_decoding",
                "share_video_wait", "peak_rss_mb_full", "peak_rss_mb_tenth", "peak_rss_ratio"):
        assert res[key] > 0, key
    assert res["frames"] == 60 and res["frames_tenth"] == 6
    r = posezoo("bench", "--video", path, "--no-rss", "--frames", "20")
    assert r.returncode == 0 and "pipeline efficiency" in r.stdout and "20 frames" in r.stdout


def test_species_first_model_choice(openfield_video, tmp_path):
    r = posezoo("predict", openfield_video, "--species", "mouse", "--view", "top", "--max-frames", "30",
                "--out", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "using posezoo_mouse@1.4.0" in r.stderr and (tmp_path / f"m3v1mp4{MOUSE}.h5").exists()
    # no ready dog model here: the message says exactly what to run for each candidate
    assert_one_line_error(posezoo("predict", openfield_video, "--species", "dog", "--out", tmp_path),
                          "no dog model is ready", "pip install 'posezoo[conversion]' && posezoo zoo pull "
                          "superanimal_quadruped", "pip install 'posezoo[conversion-tf]' && posezoo zoo pull full_dog")
    assert_one_line_error(posezoo("predict", openfield_video, "--species", "zebrafish"), "no model of the zoo",
                          "mouse")
    assert_one_line_error(posezoo("predict", openfield_video, "--species", "mouse", "--model", "posezoo_mouse"),
                          "not both")
    listed = {m["name"]: m for m in json.loads(posezoo("zoo", "list", "--json").stdout)}
    assert listed["posezoo_mouse"]["view"] == "top" and listed["posezoo_mouse"]["speed"] == "medium"  # 1.4.0: 400x300 with test-time flip, ~40 frames/s
    assert listed["posezoo_mouse"]["ready"] and not listed["superanimal_quadruped"]["ready"]
    table = posezoo("zoo", "list").stdout
    assert "view" in table.splitlines()[0] and "speed" in table.splitlines()[0]


def test_a_model_that_does_not_fit_the_video_warns(tmp_path):
    """The mouse model on a video of something else (here: noise) still answers, with a warning
    naming its species and view."""
    video = noise_video(tmp_path / "noise.mp4", 20)
    r = posezoo("predict", video, "--model", "posezoo_mouse", "--out", tmp_path, "--no-progress")
    assert r.returncode == 0, r.stderr
    warning = [line for line in r.stderr.splitlines() if line.startswith("posezoo: warning:")]
    assert len(warning) == 1 and "mouse model (top view)" in warning[0] and "another species or view" in warning[0]
    meta = json.loads((tmp_path / f"noise{MOUSE}.meta.json").read_text())
    assert meta["fit"]["fits"] is False and meta["fit"]["confident_frames"] < 0.5
