"""The service under attack and careless use (issue 9), against a real `bentoml serve` on
127.0.0.1 with results in a real SeaweedFS: every case answers a clear JSON 4xx (never a 202
that fails later), the server keeps serving, its memory stays within +500 MB of its steady
state, and nothing is left behind. The crafted inputs are made here, small."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, TINY, noise_video
from test_service import KEYS, MB, PeakRss, assert_error, auth, key_env, start_server, wait_job

RSS_BUDGET = 500 * MB


# -- crafted inputs --------------------------------------------------------------------------
def png_of_zeros(width: int, height: int) -> bytes:
    """A valid 8-bit greyscale PNG of zeros, compressed row by row (a 20000x20000 one is 0.5 MB
    and never exists uncompressed here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def black_video(path: Path, width: int, height: int, frames: int) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "ultrafast"}
        frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def slow_upload(port: int, who: str, total: int, *, byte_every_s: float | None = 1.0, first: bytes = b"",
                timeout: float = 60) -> tuple[int, dict, float]:
    """A raw upload that announces ``total`` bytes, sends ``first`` and then one byte every
    ``byte_every_s`` seconds (None: nothing more), until the server answers. Returns the
    status, the JSON answer and the seconds it took."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((f"POST /v1/jobs?filename=slow.mp4 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[who]}\r\n"
                   f"Content-Type: video/mp4\r\nContent-Length: {total}\r\n\r\n").encode() + first)
        data = b""
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([s], [], [], byte_every_s or 1.0)
            if ready:
                got = s.recv(65536)
                if not got:
                    break
                data += got
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep and len(body) >= _content_length(head):
                    break
            elif byte_every_s is not None:
                try:
                    s.sendall(b"\0")
                except OSError:
                    pass
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
    return status, json.loads(body) if body else {}, time.monotonic() - t0


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v)
    return 0


def assert_clean(server) -> None:
    """No upload or scratch file of a refused or finished request is left behind."""
    deadline = time.time() + 5
    while time.time() < deadline:
        left = [p for d in ("uploads", "work") for p in (server.data_dir / d).iterdir()]
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind: {left}")


def assert_serving(server) -> None:
    r = httpx.post(f"{server.url}/v1/predict/image", headers=auth("bob"), content=png_of_zeros(320, 240))
    assert r.status_code == 200, r.text


# -- the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mouse(tmp_path_factory) -> Path:
    from posezoo.synthetic import make_mouse_video

    path = tmp_path_factory.mktemp("hardening-videos") / "mouse.mp4"
    make_mouse_video(path, 300, 320, 240, 30.0, seed=1)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3):
    """One worker, a queue of four (a key's share: three), results in S3, uploads cut off after
    3 s of silence or below 4 kB/s once 2 s have passed."""
    d = tmp_path_factory.mktemp("hardening")
    srv = start_server(d / "data", {**s3.env(), **key_env(
        workers=1, queue_size=4, threads=2, retry_after_s=1, max_upload_bytes=40 * MB,
        results_s3_uri=f"s3://{s3.bucket}/results", upload_idle_timeout_s=3, upload_min_rate=4000,
        upload_rate_grace_s=2)})
    assert_serving(srv)  # steady state: the default model loaded, one image predicted
    yield srv
    srv.stop()


# -- 1, 2: memory bombs ----------------------------------------------------------------------
def test_image_memory_bombs_are_refused_from_the_header(server):
    url = f"{server.url}/v1/predict/image"
    bomb = png_of_zeros(20000, 20000)  # 400 MP: 1.2 GB as a colour image
    assert len(bomb) < 2 * MB
    with PeakRss(server) as rss:
        assert_error(httpx.post(url, headers=auth(), content=bomb), 413, "too_large", "MAX_IMAGE_PIXELS")
        body = assert_error(httpx.post(url, headers=auth(), content=png_of_zeros(10000, 10000)), 413, "too_large")
        assert "10000x10000" in body["detail"] and "40.0 MP" in body["detail"]
        with ThreadPoolExecutor(3) as pool:  # three at once
            for r in pool.map(lambda _: httpx.post(url, headers=auth(), content=bomb, timeout=60), range(3)):
                assert_error(r, 413, "too_large")
        huge = png_of_zeros(40000, 40000)  # past OpenCV's own cap (was a 500)
        assert_error(httpx.post(url, headers=auth(), content=huge), 413, "too_large", "MAX_IMAGE_PIXELS")
        assert_error(httpx.post(url, headers=auth(), files={"image": ("b.png", bomb)}), 413, "too_large")
        # just under the limit (36 MP), three at once: served, decoding one at a time
        big = png_of_zeros(6000, 6000)
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: httpx.post(url, headers=auth(), content=big, timeout=120), range(3)))
        assert all(r.status_code in (200, 429) for r in answers), [r.text[:200] for r in answers]
        assert any(r.status_code == 200 and r.json()["width"] == 6000 for r in answers)
    growth = rss.peak - rss.base
    print(f"\nimage bombs: server RSS {rss.base / MB:.0f} MB -> peak {rss.peak / MB:.0f} MB (+{growth / MB:.0f} MB)")
    assert growth < RSS_BUDGET
    assert_serving(server)


def test_video_memory_bomb_is_refused_from_the_header(server, tmp_path):
    bomb = black_video(tmp_path / "bomb.mp4", 8192, 8192, 30)  # 67 MP a frame in a ~200 KB file
    assert bomb.stat().st_size < 1 * MB
    with PeakRss(server) as rss:
        r = httpx.post(f"{server.url}/v1/jobs?labeled_video=true&filename=bomb.mp4", headers=auth(),
                       content=bomb.read_bytes())
        body = assert_error(r, 413, "too_large", "MAX_VIDEO_PIXELS")
        assert "8192x8192" in body["detail"]
        r = httpx.post(f"{server.url}/v1/jobs", headers=auth(), data={"labeled_video": "true"},
                       files={"video": ("bomb.mp4", bomb.read_bytes())})
        assert_error(r, 413, "too_large")
        # at the default limit (4096x2160), with a labelled video: it runs, within the budget
        big = black_video(tmp_path / "big.mp4", 4096, 2160, 20)
        r = httpx.post(f"{server.url}/v1/jobs?labeled_video=true&filename=big.mp4", headers=auth(),
                       content=big.read_bytes())
        assert r.status_code == 202, r.text
        job = wait_job(server, r.json()["id"], timeout=300)
        assert job["status"] == "succeeded", job
    growth = rss.peak - rss.base
    print(f"\nvideo bomb + a 4096x2160 labelled job: server RSS {rss.base / MB:.0f} MB -> peak "
          f"{rss.peak / MB:.0f} MB (+{growth / MB:.0f} MB)")
    assert growth < RSS_BUDGET
    assert_clean(server)


# -- 4: upload slots -------------------------------------------------------------------------
def test_slow_uploads_cannot_starve_the_queue(server, mouse):
    url = f"{server.url}/v1/jobs"
    with ThreadPoolExecutor(8) as pool:
        alice = [pool.submit(slow_upload, server.port, "alice", 10_000) for _ in range(5)]
        time.sleep(1.0)
        stats = httpx.get(f"{server.url}/v1/server", headers=auth("bob")).json()
        assert stats["reserved"] == 3, stats  # alice's share of the five slots
        bob = [pool.submit(slow_upload, server.port, "bob", 10_000) for _ in range(2)]
        time.sleep(0.5)
        # every slot is taken by uploads: the 429 says so
        r = httpx.post(f"{url}?filename=m.mp4", headers=auth("carol"), content=mouse.read_bytes())
        body = assert_error(r, 429, "queue_full", "upload(s) in progress")
        assert "5 upload(s) in progress" in body["detail"] and int(r.headers["retry-after"]) >= 1
        answers = [f.result() for f in alice + bob]
    refused = [a for a in answers if a[0] == 429]
    assert len(refused) == 2 and all("share" in a[1]["detail"] for a in refused), answers
    cut = [a for a in answers if a[0] == 408]
    assert len(cut) == 5 and all(a[1]["error"] == "upload_timeout" and "too slow" in a[1]["detail"] for a in cut)
    assert all(a[2] < 15 for a in cut), answers
    # a stalled upload (nothing after the first bytes) is cut off by the idle timeout
    status, body, took = slow_upload(server.port, "alice", 10_000, byte_every_s=None, first=b"\0" * 100)
    assert status == 408 and "stalled" in body["detail"] and took < 15, (status, body, took)
    # the slots are free again, nothing is left behind, and the server works
    stats = httpx.get(f"{server.url}/v1/server", headers=auth("bob")).json()
    assert stats["reserved"] == 0 and stats["queued"] == 0, stats
    assert_clean(server)
    r = httpx.post(f"{url}?filename=m.mp4", headers=auth("carol"), content=mouse.read_bytes())
    assert r.status_code == 202 and wait_job(server, r.json()["id"], "carol")["status"] == "succeeded"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'posezoo_jobs_rejected_total{reason="key_share"} 2.0' in metrics


# -- 5: another key's results ----------------------------------------------------------------
def test_results_cannot_be_named_as_a_source_in_any_spelling(server, mouse, s3):
    r = httpx.post(f"{server.url}/v1/jobs?labeled_video=true&filename=m.mp4", headers=auth(),
                   content=mouse.read_bytes())
    job = wait_job(server, r.json()["id"])
    assert job["status"] == "succeeded", job
    key = f"results/{job['id']}/mDLC_posezoo_tiny_mouse_0.1.0_labeled.mp4"
    s3.client().head_object(Bucket=s3.bucket, Key=key)  # it is there
    spellings = [f"s3://{s3.bucket}/{key}", f"s3://{s3.bucket}//{key}", f"S3://{s3.bucket}/{key}",
                 f"s3://{s3.bucket.upper()}/{key}", f"s3://{s3.bucket}/results//{job['id']}/mDLC_posezoo_tiny_mouse_0.1.0_labeled.mp4",
                 f"s3://{s3.bucket}/inputs/../{key}", f"s3://{s3.bucket}/./{key}", f" s3://{s3.bucket}/{key}"]
    for uri in spellings:
        r = httpx.post(f"{server.url}/v1/jobs", headers=auth("bob"), json={"source": uri})
        assert r.status_code in (400, 403), (uri, r.status_code, r.text)
        assert_error(r, r.status_code)
    assert not httpx.get(f"{server.url}/v1/jobs", headers=auth("bob")).json() or all(
        j["source"].get("uri", "").find(job["id"]) < 0 for j in httpx.get(f"{server.url}/v1/jobs",
                                                                        headers=auth("bob")).json())
    # an ordinary input in the same bucket is still accepted (normalised)
    s3.client().upload_file(str(mouse), s3.bucket, "inputs/mouse.mp4")
    r = httpx.post(f"{server.url}/v1/jobs", headers=auth("bob"), json={"source": f"S3://{s3.bucket}//inputs/mouse.mp4"})
    assert r.status_code == 202, r.text
    assert r.json()["source"]["uri"] == f"s3://{s3.bucket}/inputs/mouse.mp4"
    assert wait_job(server, r.json()["id"], "bob")["status"] == "succeeded"


# -- 6: allow_truncated ----------------------------------------------------------------------
def test_allow_truncated_keeps_the_frames_that_decode(server, mouse, tmp_path):
    data = mouse.read_bytes()
    cut = data[: len(data) // 2]
    url = f"{server.url}/v1/jobs?filename=cut.mp4"
    assert_error(httpx.post(url, headers=auth(), content=cut), 422, "truncated_video", "allow_truncated")
    for r in (httpx.post(f"{url}&allow_truncated=true", headers=auth(), content=cut),
              httpx.post(f"{server.url}/v1/jobs", headers=auth(), data={"allow_truncated": "true"},
                         files={"video": ("cut.mp4", cut)})):
        assert r.status_code == 202, r.text
        job = wait_job(server, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert 0 < job["n_frames"] < 300 and any("cut short" in n for n in job["notes"]), job
        meta = httpx.get(f"{server.url}{job['results']['meta']}", headers=auth(), follow_redirects=True).json()
        assert meta["truncated"]["frames_read"] == job["n_frames"]
    assert_clean(server)


# -- 7: everything a job would fail on is refused before the 202 ------------------------------
def test_options_and_names_are_refused_before_the_202(server, mouse):
    url = f"{server.url}/v1/jobs"
    video = mouse.read_bytes()
    n_jobs = len(httpx.get(url, headers=auth(), params={"limit": 1000}).json())
    assert_error(httpx.post(f"{url}?filter=savgol&filter_window=4", headers=auth(), content=video), 422,
                 "bad_options", "odd")
    assert_error(httpx.post(url, headers=auth(), data={"filter": "savgol", "filter_window": "4"},
                            files={"video": ("m.mp4", video)}), 422, "bad_options", "odd")
    assert_error(httpx.post(url, headers=auth(), json={"source": "s3://b/k.mp4", "filter": "median",
                                                       "filter_window": 2}), 422, "bad_options", "odd")
    assert_error(httpx.post(f"{url}?filename=a%00b.mp4", headers=auth(), content=video), 422, "bad_filename",
                 "control characters")
    long_name = "x" * 300 + ".mp4"
    body = assert_error(httpx.post(url, headers=auth(), params={"filename": long_name}, content=video), 422,
                        "bad_filename", "at most")
    assert len(body["detail"]) < 200
    assert_error(httpx.post(url, headers=auth(), files={"video": (long_name, video)}), 422, "bad_filename")
    # unknown options in the query string, as in a form or JSON
    assert_error(httpx.post(f"{url}?fromats=h5", headers=auth(), content=video), 422, "bad_options", "fromats")
    assert_error(httpx.post(url, headers=auth(), data={"fromats": "h5"}, files={"video": ("m.mp4", video)}), 422,
                 "bad_options")
    assert_error(httpx.get(f"{server.url}/v1/jobs?limt=5", headers=auth()), 422, "bad_options", "limt")
    assert_error(httpx.post(f"{server.url}/v1/predict/image?modle=x", headers=auth(), content=b"x"), 422,
                 "bad_options", "modle")
    # fine-tune names and versions that would be path segments
    for params in ({"version": ".."}, {"version": "."}, {"name": ".."}, {"version": "../x"}, {"steps": "3", "zz": "1"}):
        r = httpx.post(f"{server.url}/v1/finetune", headers={**auth(), "Content-Type": "application/zip"},
                       params=params, content=b"PK\x05\x06" + b"\0" * 18)
        assert_error(r, 422, "bad_options")
    assert len(httpx.get(url, headers=auth(), params={"limit": 1000}).json()) == n_jobs  # no job was created
    assert not any((server.data_dir / "catalogs").glob("**/*")) if (server.data_dir / "catalogs").exists() else True
    assert_clean(server)


def test_job_error_details_are_one_line():
    from service.jobs.manager import one_line

    hdf5 = ("HDF5ExtError: Problems creating the table\nHDF5-DIAG: Error detected in HDF5 (1.14.2) thread 0:\n"
            "  #000: H5D.c line 137 in H5Dcreate2(): unable to create dataset\n" * 20)
    assert one_line(hdf5) == "HDF5ExtError: Problems creating the table"
    tb = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\n"
    assert one_line(tb) == "ValueError: bad" and "\n" not in one_line("a\tb\x00c" * 200)
    assert len(one_line("y" * 5000)) == 300


# -- 8: operations ---------------------------------------------------------------------------
def test_control_characters_cannot_forge_log_lines(server):
    for path in ("/v1/jobs/%0aFORGED-A%20200%20OK", "/v1/x%0d%0aFORGED-B", "/%0aFORGED-C"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code in (401, 404) and r.headers["content-type"].startswith("application/json"), r.text
    time.sleep(0.5)
    lines = server.log().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")], [line for line in lines if "FORGED" in line]
    assert any("\\nFORGED-A" in line for line in lines)


def test_errors_outside_the_api_routes_are_json(server):
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/nope", 404), ("POST", "/readyz", 405),
                                 ("PUT", "/v1/jobs", 405), ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, f"{server.url}{path}", headers=auth())
        assert_error(r, status)


def test_metrics_are_emitted_once_and_per_server(server, tmp_path, mouse):
    def families(text: str) -> list[str]:
        return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE posezoo_")]

    text = httpx.get(f"{server.url}/metrics").text
    names = families(text)
    assert names and len(names) == len(set(names)), names
    # a second server with the same BENTOML_HOME (so the same multiprocess directory) counts its own jobs only
    other = start_server(server.data_dir.parent / "other-data", key_env(workers=1))
    try:
        r = httpx.post(f"{other.url}/v1/jobs?filename=m.mp4", headers=auth(), content=mouse.read_bytes())
        assert wait_job(other, r.json()["id"])["status"] == "succeeded"
        mine = httpx.get(f"{other.url}/metrics").text
        assert len(families(mine)) == len(set(families(mine)))
        assert 'posezoo_jobs_submitted_total{source="upload"} 1.0' in mine, [
            line for line in mine.splitlines() if "submitted" in line]
        assert 'posezoo_frames_predicted_total 300.0' in mine
    finally:
        other.stop()


def test_results_hold_no_server_paths(server, mouse):
    r = httpx.post(f"{server.url}/v1/jobs?formats=h5,csv,json,parquet&filename=m.mp4", headers=auth(),
                   content=mouse.read_bytes())
    job = wait_job(server, r.json()["id"])
    assert job["status"] == "succeeded", job
    meta = httpx.get(f"{server.url}{job['results']['meta']}", headers=auth(), follow_redirects=True).text
    doc = json.loads(meta)
    for needle in (str(server.data_dir), str(REPO), os.path.expanduser("~"), "/tmp/"):
        assert needle not in meta, needle
    assert doc["model"]["source"] == f"local:{TINY}.onnx" or not doc["model"]["source"].startswith("/")
    assert doc["video"]["path"] == "m.mp4"
    js = httpx.get(f"{server.url}{job['results']['json']}", headers=auth(), follow_redirects=True).text
    assert str(server.data_dir) not in js and str(REPO) not in js and "/tmp/" not in js


def test_a_second_server_on_the_same_data_directory_exits(server):
    env = {**os.environ, "POSEZOO_SERVICE_DATA_DIR": str(server.data_dir), "HF_HUB_OFFLINE": "1",
           "BENTOML_DO_NOT_TRACK": "True", **key_env()}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:PoseZoo", "--host", "127.0.0.1",
                        "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "in use by another posezoo server" in r.stderr + r.stdout, (r.stderr + r.stdout)[-2000:]
    assert time.monotonic() - t0 < 60
    assert httpx.get(f"{server.url}/livez").status_code == 200  # the first one is unharmed


def test_unknown_settings_are_refused_at_start(tmp_path):
    env = {**os.environ, "POSEZOO_SERVICE_DATA_DIR": str(tmp_path / "data"), "BENTOML_DO_NOT_TRACK": "True",
           "POSEZOO_SERVICE_INPUT_BUCKET": '["videos"]'}
    r = subprocess.run([sys.executable, "-m", "bentoml", "serve", "service.service:PoseZoo", "--port", "0"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert "POSEZOO_SERVICE_INPUT_BUCKET" in out and "did you mean POSEZOO_SERVICE_INPUT_BUCKETS" in out, out[-2000:]


def test_a_worker_does_not_outlive_its_server(tmp_path_factory):
    import psutil

    d = tmp_path_factory.mktemp("orphan")
    srv = start_server(d / "data", key_env(workers=1))
    workers = psutil.Process(srv.proc.pid).children(recursive=True)
    assert workers
    os.kill(srv.proc.pid, signal.SIGKILL)  # bentoml serve dies; its worker is left alone
    srv.proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(workers, timeout=20)
    for p in alive:
        p.kill()
    assert not alive, f"orphan worker(s) {[p.pid for p in alive]} still running"
    again = start_server(d / "data", key_env(workers=1))  # the lock was given back
    try:
        assert httpx.get(f"{again.url}/readyz").status_code == 200
    finally:
        again.stop()


def test_a_model_that_does_not_fit_the_video_says_so_in_the_job(server, tmp_path):
    """The mouse model on a video of noise: the job succeeds, its notes and metadata warn and name
    the model's species and view."""
    video = noise_video(tmp_path / "noise.mp4", 10)
    r = httpx.post(f"{server.url}/v1/jobs?model=posezoo_mouse&filename=noise.mp4", headers=auth(),
                   content=video.read_bytes())
    job = wait_job(server, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert any("mouse model (top view)" in n for n in job["notes"]), job["notes"]
    meta = httpx.get(f"{server.url}{job['results']['meta']}", headers=auth(), follow_redirects=True).json()
    assert meta["fit"]["fits"] is False and "another species or view" in meta["fit"]["warning"]
