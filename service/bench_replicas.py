"""Jobs per minute with 1 replica vs N replicas, and the time a replica's death costs.

Starts a PostgreSQL cluster (initdb/pg_ctl in a temporary directory, as `nobody` when run
as root), a SeaweedFS S3 server and `bentoml serve` replicas on 127.0.0.1 (the harness of
tests/test_replicas.py), then, in one run:

1. one replica (``--threads-1`` ONNX Runtime threads), ``--jobs`` jobs of a synthetic
   ``--frames``-frame 640x480 clip with the bundled default model, all submitted at once;
2. ``--replicas`` replicas (``--threads-n`` threads each), the same jobs round-robin;
3. a long job on the N replicas, its replica SIGKILLed mid-job: the seconds from the kill to
   another replica taking it over (``--lease`` seconds of lease).

    python service/bench_replicas.py [--jobs 24] [--frames 300] [--replicas 3] [--lease 10]

On a 2-core machine the replicas share the same two cores: expect little gain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# run as a script, service/ itself would be sys.path[0] (and `service` this folder's service.py)
sys.path[:1] = [str(REPO), str(REPO / "tests")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--threads-1", type=int, default=os.cpu_count() or 1, help="ORT threads of the lone replica")
    ap.add_argument("--threads-n", type=int, default=max(1, (os.cpu_count() or 1) // 3),
                    help="ORT threads of each of the N replicas")
    ap.add_argument("--lease", type=float, default=10.0)
    args = ap.parse_args(argv)

    import httpx

    from pgserver import start_pg
    from posezoo.predictor import DEFAULT_MODEL
    from posezoo.synthetic import make_mouse_video
    from s3server import start_s3
    from service.config import hash_api_key
    from test_service import start_server

    token = "bench-replicas-token-0123456789"
    head = {"Authorization": f"Bearer {token}"}
    root = Path(tempfile.mkdtemp(prefix="posezoo-bench-replicas-"))
    clip = root / "clip.mp4"
    make_mouse_video(clip, args.frames, 640, 480, 30.0, seed=3)
    long_clip = root / "long.mp4"
    make_mouse_video(long_clip, max(args.frames * 4, 600), 640, 480, 30.0, seed=4)
    pg, s3 = start_pg(), start_s3(root / "s3")
    servers = []
    results: dict = {"jobs": args.jobs, "frames": args.frames, "model": DEFAULT_MODEL, "cores": os.cpu_count()}

    def env(threads: int, db: str, prefix: str) -> dict:
        return {**s3.env(), "POSEZOO_SERVICE_DATABASE_URL": db,
                "POSEZOO_SERVICE_RESULTS_S3_URI": f"s3://{s3.bucket}/{prefix}",
                "POSEZOO_SERVICE_API_KEYS": json.dumps({"bench": hash_api_key(token)}),
                "POSEZOO_SERVICE_WORKERS": "1", "POSEZOO_SERVICE_QUEUE_SIZE": str(args.jobs + 4),
                "POSEZOO_SERVICE_MAX_ACTIVE_PER_KEY": str(args.jobs + 4), "POSEZOO_SERVICE_THREADS": str(threads),
                "POSEZOO_SERVICE_LEASE_S": str(args.lease), "POSEZOO_SERVICE_DEFAULT_MODEL": DEFAULT_MODEL,
                "POSEZOO_SERVICE_FINETUNE_ENABLED": "false"}

    def wait(url: str, job_id: str, timeout: float = 3600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            j = httpx.get(f"{url}/v1/jobs/{job_id}", headers=head, timeout=30).json()
            if j["status"] in ("succeeded", "failed", "cancelled"):
                return j
            time.sleep(0.25)
        raise RuntimeError(f"job {job_id} did not finish")

    def run_jobs(urls: list[str]) -> float:
        t0 = time.perf_counter()
        ids = []
        for i in range(args.jobs):
            r = httpx.post(f"{urls[i % len(urls)]}/v1/jobs?formats=h5", headers=head, content=clip.read_bytes(),
                           timeout=120)
            r.raise_for_status()
            ids.append(r.json()["id"])
        ends = [wait(urls[0], i) for i in ids]
        bad = [e for e in ends if e["status"] != "succeeded"]
        if bad:
            raise RuntimeError(f"{len(bad)} job(s) did not succeed: {bad[0]}")
        return time.perf_counter() - t0

    try:
        for n, threads in ((1, args.threads_1), (args.replicas, args.threads_n)):
            db, prefix = pg.create_database(), f"bench-{uuid.uuid4().hex[:8]}"
            group = [start_server(root / f"n{n}-r{i}", {**env(threads, db, prefix),
                                                         "POSEZOO_SERVICE_REPLICA_ID": f"r{i}"}, timeout=180)
                     for i in range(n)]
            servers += group
            seconds = run_jobs([s.url for s in group])
            results[f"{n}_replica{'s' if n > 1 else ''}"] = {
                "threads_each": threads, "seconds": round(seconds, 1),
                "jobs_per_min": round(args.jobs / seconds * 60, 2),
                "frames_per_s": round(args.jobs * args.frames / seconds, 1)}
            print(json.dumps(results), flush=True)
            if n > 1:  # the takeover, on this group
                r = httpx.post(f"{group[0].url}/v1/jobs?formats=h5", headers=head, content=long_clip.read_bytes(),
                               timeout=120)
                job_id = r.json()["id"]
                while True:
                    j = httpx.get(f"{group[0].url}/v1/jobs/{job_id}", headers=head).json()
                    if j["status"] == "running" and j["progress"]["frames_done"] > 0:
                        break
                    time.sleep(0.05)
                victim = next(s for s in group if j["replica"] == f"r{group.index(s)}")
                t_kill = time.time()
                victim.kill()
                other = next(s for s in group if s is not victim)
                while True:
                    j = httpx.get(f"{other.url}/v1/jobs/{job_id}", headers=head).json()
                    if j["replica"] != f"r{group.index(victim)}":
                        break
                    time.sleep(0.05)
                taken = time.time() - t_kill
                end = wait(other.url, job_id)
                results["takeover"] = {"lease_s": args.lease, "seconds_to_takeover": round(taken, 2),
                                       "job_status": end["status"], "attempts": end["attempts"]}
            for s in group:
                s.stop()
        one = results["1_replica"]["jobs_per_min"]
        many = results[f"{args.replicas}_replicas"]["jobs_per_min"]
        results["ratio"] = round(many / one, 2)
        print(json.dumps(results, indent=2))
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception:
                pass
        s3.stop()
        pg.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
