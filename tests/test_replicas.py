"""Several service replicas over one PostgreSQL and one S3: three real `bentoml serve`
processes on 127.0.0.1, a real PostgreSQL cluster (initdb/pg_ctl, as `nobody`), a real
SeaweedFS. Jobs are submitted round-robin, replicas are SIGKILLed mid-job and the database
is restarted under load."""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import importlib.util

import httpx
import pytest

from pgserver import find_pg_bin, start_pg
import test_service
import test_service_finetune
from test_service import Server, start_server
from test_service_finetune import FAST

# fixtures shared with the single-server tests: the synthetic clips, and real openfield frames zipped
videos = test_service.videos
labelled = test_service_finetune.labelled
good_zip = test_service_finetune.good_zip

LEASE_S = 4.0
#: the keys of the replica tests (their own, so per-key limits do not mix with test_service's)
TOKENS = {f"user{i}": f"replica-test-token-{i:02d}-0123456789" for i in range(6)}
SHARE = 6  # MAX_ACTIVE_PER_KEY: cluster-wide


def hdr(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]}"}


class Cluster:
    def __init__(self, root: Path, pg, s3):
        from service.config import hash_api_key

        self.root, self.pg, self.s3 = root, pg, s3
        self.prefix = f"cluster-{uuid.uuid4().hex[:8]}"
        self.env = {
            **s3.env(),
            "POSEZOO_SERVICE_DATABASE_URL": pg.create_database("posezoo"),
            "POSEZOO_SERVICE_RESULTS_S3_URI": f"s3://{s3.bucket}/{self.prefix}",
            "POSEZOO_SERVICE_API_KEYS": json.dumps({k: hash_api_key(v) for k, v in TOKENS.items()}),
            "POSEZOO_SERVICE_WORKERS": "1", "POSEZOO_SERVICE_QUEUE_SIZE": "40", "POSEZOO_SERVICE_THREADS": "1",
            "POSEZOO_SERVICE_MAX_ACTIVE_PER_KEY": str(SHARE), "POSEZOO_SERVICE_LEASE_S": str(LEASE_S),
            "POSEZOO_SERVICE_RETRY_AFTER_S": "1", "POSEZOO_SERVICE_FINETUNE_THREADS": "1",
        }
        self.replicas: dict[str, Server] = {}

    def start(self, name: str) -> Server:
        srv = start_server(self.root / name, {**self.env, "POSEZOO_SERVICE_REPLICA_ID": name})
        self.replicas[name] = srv
        return srv

    def start_all(self, names) -> None:
        with ThreadPoolExecutor(len(names)) as ex:  # replicas starting together set the schema up once
            list(ex.map(self.start, names))

    def url(self, name: str) -> str:
        return self.replicas[name].url

    def stop(self) -> None:
        for srv in self.replicas.values():
            srv.stop()

    def claims(self, job_id: str) -> list[str]:
        """The replicas whose log says they claimed the job."""
        out = []
        for name, srv in self.replicas.items():
            out += [name] * len(re.findall(rf"job {job_id} claimed by {name}\b", srv.log()))
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3):
    if find_pg_bin() is None:
        pytest.skip("PostgreSQL is not installed: no initdb (Debian: apt-get install postgresql)")
    pg = start_pg()
    c = Cluster(tmp_path_factory.mktemp("replicas"), pg, s3)
    try:
        c.start_all(["r1", "r2", "r3"])
        yield c
    finally:
        c.stop()
        pg.close()


def submit(base: str, video: Path, who: str, query: str = "formats=h5") -> dict:
    r = httpx.post(f"{base}/v1/jobs?{query}", headers=hdr(who), content=video.read_bytes(), timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def job(base: str, job_id: str, who: str) -> dict:
    r = httpx.get(f"{base}/v1/jobs/{job_id}", headers=hdr(who), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(base: str, job_id: str, who: str, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = job(base, job_id, who)
        if j["status"] in ("succeeded", "failed", "cancelled"):
            return j
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {j}")


def wait_running(base: str, job_id: str, who: str, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while True:
        j = job(base, job_id, who)
        if j["status"] == "running" and j["progress"]["frames_done"] > 0:
            return j
        assert j["status"] in ("queued", "running") and time.time() < deadline, j
        time.sleep(0.05)


def test_round_robin_jobs_run_once_and_download_anywhere(cluster, videos, tmp_path):
    names = list(cluster.replicas)
    t0 = time.perf_counter()
    jobs = []
    for i in range(24):  # four keys, six jobs each: within every key's cluster-wide share
        who = f"user{i % 4}"
        jobs.append((submit(cluster.url(names[i % 3]), videos["short"], who), who))
    done = [wait_done(cluster.url(names[0]), j["id"], who) for j, who in jobs]
    seconds = time.perf_counter() - t0
    print(f"\n24 jobs on 3 replicas: {seconds:.1f} s, {24 / seconds * 60:.1f} jobs/min")
    for d in done:
        assert d["status"] == "succeeded", d
        assert d["attempts"] == 1 and d["replica"] in names, d
        assert cluster.claims(d["id"]) == [d["replica"]]  # claimed once, by the replica the record names
    assert len({d["replica"] for d in done}) >= 2  # the work was shared
    for d, (_, who) in zip(done, jobs):
        other = next(n for n in names if n != d["replica"])
        r = httpx.get(f"{cluster.url(other)}{d['results']['h5']}", headers=hdr(who), timeout=30)
        assert r.status_code == 307, r.text
        body = httpx.get(r.headers["location"], timeout=30)
        assert body.status_code == 200 and body.content[:8] == b"\x89HDF\r\n\x1a\n"
    # another key sees none of them, on any replica
    r = httpx.get(f"{cluster.url('r2')}/v1/jobs/{done[0]['id']}", headers=hdr("user5"), timeout=10)
    assert r.status_code == 404
    info = httpx.get(f"{cluster.url('r3')}/v1/server", headers=hdr("user0"), timeout=10).json()
    assert info["replica"] == "r3" and info["store"] == "postgresql"
    assert info["cluster"] == {"uploading": 0, "queued": 0, "running": 0}
    # uploads were removed from S3 once their jobs ended
    left = cluster.s3.client().list_objects_v2(Bucket=cluster.s3.bucket, Prefix=f"{cluster.prefix}/uploads/")
    assert left.get("KeyCount", 0) == 0


def test_queue_limits_are_global_and_cancel_works_across_replicas(cluster, videos):
    names = list(cluster.replicas)
    accepted = []
    for i in range(SHARE):  # slow jobs: they stay active while the limit is tested
        accepted.append(submit(cluster.url(names[i % 3]), videos["long"], "user4",
                               "formats=h5&labeled_video=true&batch_size=4"))
    for name in names:  # the share is the cluster's: every replica refuses the next one
        r = httpx.post(f"{cluster.url(name)}/v1/jobs", headers=hdr("user4"), content=videos["short"].read_bytes())
        assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
        assert f"share of the queue ({SHARE})" in r.json()["detail"]
    running = wait_running(cluster.url("r1"), accepted[0]["id"], "user4")
    # cancel every job through a replica that is not running it
    for j in accepted:
        holder = job(cluster.url("r1"), j["id"], "user4").get("replica")
        via = next(n for n in names if n != holder)
        r = httpx.delete(f"{cluster.url(via)}/v1/jobs/{j['id']}", headers=hdr("user4"), timeout=10)
        assert r.status_code == 200, r.text
    t0 = time.time()
    ends = [wait_done(cluster.url("r3"), j["id"], "user4", timeout=30) for j in accepted]
    assert all(e["status"] == "cancelled" for e in ends), ends
    assert time.time() - t0 < 15
    assert running["replica"] in names
    # slots were given back everywhere
    assert submit(cluster.url("r2"), videos["short"], "user4")["status"] == "queued"


def test_sigkill_mid_job_is_taken_over_and_the_replica_rejoins(cluster, videos, tmp_path):
    names = list(cluster.replicas)
    long = submit(cluster.url("r1"), videos["long"], "user5", "formats=h5&labeled_video=true&batch_size=4")
    first = wait_running(cluster.url("r1"), long["id"], "user5")
    victim = first["replica"]
    others = [n for n in names if n != victim]
    t_start = first["started_at"]
    # more jobs queued while it dies: none may be lost or run twice
    extra = [submit(cluster.url(others[i % 2]), videos["short"], "user5") for i in range(3)]
    t_kill = time.time()
    cluster.replicas[victim].kill()  # SIGKILL, arbiter and worker
    taken = None
    while time.time() - t_kill < 60:
        j = job(cluster.url(others[0]), long["id"], "user5")
        if j["replica"] != victim and j["status"] in ("running", "succeeded"):
            taken = time.time() - t_kill
            break
        time.sleep(0.1)
    assert taken is not None, j
    print(f"\nreplica {victim} killed: its job was taken over after {taken:.1f} s (lease {LEASE_S:g} s)")
    assert taken < LEASE_S + 5
    job_len = time.time() - t_start
    end = wait_done(cluster.url(others[1]), long["id"], "user5", timeout=LEASE_S + 3 * job_len + 60)
    assert end["status"] == "succeeded" and end["attempts"] == 2 and end["replica"] in others, end
    assert any("taken over" in n and victim in n for n in end["notes"]), end["notes"]
    # claimed twice in all: by the killed replica, then by the one that finished it (the logs are read
    # replica by replica, in the order the replicas happened to start, so the list is not chronological)
    assert sorted(cluster.claims(long["id"])) == sorted([victim, end["replica"]])
    r = httpx.get(f"{cluster.url(others[0])}{end['results']['video']}", headers=hdr("user5"), timeout=30)
    assert r.status_code == 307
    rendered = tmp_path / "long_labeled.mp4"
    rendered.write_bytes(httpx.get(r.headers["location"], timeout=60).content)
    import av

    with av.open(str(rendered)) as c:  # the whole video, rendered once by the replica that took over
        assert sum(1 for _ in c.decode(video=0)) == 600
    for e in extra:
        d = wait_done(cluster.url(others[0]), e["id"], "user5")
        assert d["status"] == "succeeded" and d["attempts"] == 1, d
    # the killed replica, restarted under the same name, rejoins: it serves reads and claims work
    cluster.start(victim)
    assert job(cluster.url(victim), long["id"], "user5")["status"] == "succeeded"
    later = [submit(cluster.url(victim), videos["short"], f"user{i % 4}") for i in range(6)]
    ran = [wait_done(cluster.url(victim), j["id"], f"user{i % 4}") for i, j in enumerate(later)]
    assert all(r["status"] == "succeeded" for r in ran)
    assert victim in {r["replica"] for r in ran}


def test_database_restart_while_jobs_run(cluster, videos):
    names = list(cluster.replicas)
    jobs = [submit(cluster.url(names[i]), videos["long"], f"user{i}", "formats=h5&labeled_video=true&batch_size=4")
            for i in range(3)]
    wait_running(cluster.url("r1"), jobs[0]["id"], "user0")
    cluster.pg.stop("fast")
    down = {}
    for name in names:  # while it is down: answers from memory, or 503 with Retry-After, never a 500
        r = httpx.get(f"{cluster.url(name)}/v1/jobs/{jobs[1]['id']}", headers=hdr("user1"), timeout=30)
        down[name] = r.status_code
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"] == "store_unavailable" and int(r.headers["retry-after"]) >= 1
    time.sleep(2)
    cluster.pg.start()
    statuses = []
    deadline = time.time() + 240
    pending = {j["id"]: f"user{i}" for i, j in enumerate(jobs)}
    while pending and time.time() < deadline:
        for job_id, who in list(pending.items()):
            for name in names:
                r = httpx.get(f"{cluster.url(name)}/v1/jobs/{job_id}", headers=hdr(who), timeout=30)
                statuses.append(r.status_code)
                assert r.status_code == 200, (name, r.status_code, r.text)  # no 5xx once it is back
                if r.json()["status"] in ("succeeded", "failed", "cancelled"):
                    assert r.json()["status"] == "succeeded", r.json()
                    pending.pop(job_id, None)
                    break
        time.sleep(0.3)
    assert not pending, pending
    print(f"\nreads while PostgreSQL was down: {down}")
    # the replicas still take new jobs
    assert wait_done(cluster.url("r3"), submit(cluster.url("r3"), videos["short"], "user3")["id"],
                     "user3")["status"] == "succeeded"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="fine-tuning needs PyTorch")
def test_finetune_on_one_replica_serves_from_all(cluster, good_zip, tmp_path):
    from posezoo.synthetic import make_mouse_video

    r = httpx.post(f"{cluster.url('r2')}/v1/finetune", headers={**hdr("user3"), "Content-Type": "application/zip"},
                   params={**FAST, "name": "shared-ft"}, content=good_zip.read_bytes(), timeout=60)
    assert r.status_code == 202, r.text
    done = wait_done(cluster.url("r3"), r.json()["id"], "user3", timeout=300)
    assert done["status"] == "succeeded" and done["kind"] == "finetune", done
    ref, ran = done["output_model"], done["replica"]
    assert ref == "shared-ft@1.0.0"
    for name in cluster.replicas:  # every replica's zoo for this key has it; other keys see nothing
        mine = {m["ref"]: m for m in httpx.get(f"{cluster.url(name)}/v1/models", headers=hdr("user3")).json()}
        assert ref in mine and mine[ref]["ready"] and mine[ref]["owner"] == "user3", (name, sorted(mine))
        theirs = httpx.get(f"{cluster.url(name)}/v1/models", headers=hdr("user2")).json()
        assert ref not in {m["ref"] for m in theirs}
    video = tmp_path / "mouse.mp4"
    make_mouse_video(video, 20, 320, 240, 30.0, seed=1)
    other = next(n for n in cluster.replicas if n != ran)
    jobs = [submit(cluster.url(other), video, "user3", f"formats=h5&model={ref}") for _ in range(3)]
    ends = [wait_done(cluster.url(ran), j["id"], "user3") for j in jobs]
    assert all(e["status"] == "succeeded" and e["model"] == ref and e["n_frames"] == 20 for e in ends), ends
    # the same name@version again, through yet another replica: 409
    r = httpx.post(f"{cluster.url(other)}/v1/finetune", headers={**hdr("user3"), "Content-Type": "application/zip"},
                   params={**FAST, "name": "shared-ft", "version": "1.0.0"}, content=good_zip.read_bytes())
    assert r.status_code == 409, r.text
