"""How much does the posezoo server's memory grow while it receives a large upload?

Starts `bentoml serve` (the repository's service) on 127.0.0.1 with a temporary data
directory, streams SIZE bytes (default 1 GiB) to POST /v1/jobs from a generator (the client
never holds the body either), samples the RSS of the whole server process tree every 20 ms,
and prints the increase over the idle server. The body is not a video, so the server
answers 422 once it has it all on disk (and deletes it): the upload path is what is measured.

    python service/bench_upload_rss.py [--size-mb 1024] [--chunk-kb 1024] [--multipart] [--json]

Target (issue 4): a 1 GB upload raises server RSS by less than 100 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--chunk-kb", type=int, default=1024)
    ap.add_argument("--multipart", action="store_true", help="send multipart/form-data (field 'video')")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    size = args.size_mb * MB
    with tempfile.TemporaryDirectory(prefix="posezoo-upload-bench-") as tmp:
        port = free_port()
        env = {**os.environ, "POSEZOO_SERVICE_DATA_DIR": f"{tmp}/data", "POSEZOO_SERVICE_ALLOW_ANONYMOUS": "true",
               "POSEZOO_SERVICE_MAX_UPLOAD_BYTES": str(size + MB), "BENTOML_DO_NOT_TRACK": "True",
               "BENTOML_HOME": f"{tmp}/bentoml", "HF_HUB_OFFLINE": "1"}
        log = open(f"{tmp}/server.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service.service:PoseZoo", "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    raise SystemExit(f"server did not start:\n{Path(tmp, 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
            # a first small request, so lazily created buffers exist before the baseline
            httpx.post(f"{url}/v1/jobs", content=b"warm-up", timeout=30)
            time.sleep(0.5)
            base = tree_rss(proc.pid)
            peak = [base]
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], tree_rss(proc.pid))
                    time.sleep(0.02)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            chunk = os.urandom(args.chunk_kb * 1024)

            def body():
                left = size
                while left > 0:
                    piece = chunk if left >= len(chunk) else chunk[:left]
                    left -= len(piece)
                    yield piece

            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            content = body()
            if args.multipart:
                boundary = "posezoo-bench-boundary"
                head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"formats\"\r\n\r\nh5\r\n"
                        f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"big.mp4\"\r\n"
                        "Content-Type: video/mp4\r\n\r\n").encode()
                tail = f"\r\n--{boundary}--\r\n".encode()
                content = (part for parts in ([head], body(), [tail]) for part in parts)
                headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                           "Content-Length": str(len(head) + size + len(tail))}
            t0 = time.perf_counter()
            r = httpx.post(f"{url}/v1/jobs?filename=big.mp4", content=content, headers=headers, timeout=600)
            elapsed = time.perf_counter() - t0
            stop.set()
            sampler.join()
        finally:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                try:
                    p.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            proc.wait(timeout=30)
    result = {"upload_mb": args.size_mb, "multipart": args.multipart, "status": r.status_code, "answer": r.json().get("error"),
              "seconds": round(elapsed, 2), "mb_per_s": round(args.size_mb / elapsed, 1),
              "rss_idle_mb": round(base / MB, 1), "rss_peak_mb": round(peak[0] / MB, 1),
              "rss_increase_mb": round((peak[0] - base) / MB, 1)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.size_mb} MB {'multipart' if args.multipart else 'raw'} upload in {result['seconds']} s ({result['mb_per_s']} MB/s), answer "
              f"{r.status_code} {result['answer']}: server RSS {result['rss_idle_mb']} MB idle, "
              f"{result['rss_peak_mb']} MB peak, +{result['rss_increase_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
