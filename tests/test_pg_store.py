"""PgJobStore against a real PostgreSQL (tests/pgserver.py): the JobStore interface (checked
side by side with the SQLite store), claims from several processes, leases, fencing,
attempts, cancellation across replicas, concurrent schema setup and a database outage."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import traceback

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is in the service extra: pip install 'posezoo[service]'")

from pgserver import pg_server  # noqa: E402, F401  (the session fixture)
from service.jobs.models import JobOptions, JobRecord  # noqa: E402
from service.jobs.pg_store import SCHEMA_VERSION, PgJobStore, SchemaError, StoreUnavailable  # noqa: E402
from service.jobs.store import JobStore  # noqa: E402

CTX = mp.get_context("fork")  # children build their own stores; nothing of the parent's is used


def job(i: int, owner: str = "alice", status: str = "queued", kind: str = "video", t0: float = 1_000_000.0,
        **kw) -> JobRecord:
    return JobRecord(id=f"job{i:03d}", owner=owner, status=status, kind=kind, options=JobOptions(),
                     model="posezoo_tiny_mouse@0.1.0", created_at=t0 + i, **kw)


@pytest.fixture()
def pg_url(pg_server):  # noqa: F811
    return pg_server.create_database()


@pytest.fixture()
def pg(pg_url):
    s = PgJobStore(pg_url, "replica-a")
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = JobStore(tmp_path / "jobs.sqlite")
    else:
        s = PgJobStore(request.getfixturevalue("pg_url"), "replica-a")
    yield s
    s.close()


def _child(fn, q, *args):
    try:
        q.put(("ok", fn(*args)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def run_processes(fn, args_list, timeout: float = 30.0) -> list:
    """Run ``fn(*args)`` in one forked process each; their results (raises on a child's error)."""
    q = CTX.Queue()
    procs = [CTX.Process(target=_child, args=(fn, q, *args)) for args in args_list]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in procs:
            status, value = q.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"a child failed:\n{value}")
            out.append(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


# -- the JobStore interface, both stores ---------------------------------------------------
def test_round_trip(store):
    a, b = job(1), job(2, owner="bob", error={"error": "x", "detail": "y"}, notes=["n"], n_frames=7)
    store.put(a)
    store.put(b)
    assert store.get("job001") == a
    assert store.get("job002") == b
    assert store.get("nope") is None
    a.status, a.attempts = "running", 1
    a.progress.stage, a.progress.frames_done = "predicting", 12
    store.put(a)
    assert store.get("job001") == a
    store.delete("job001")
    assert store.get("job001") is None
    store.delete("job001")  # deleting a missing job is no error


def test_list_filters_and_order(store):
    recs = [job(i, owner="alice" if i % 2 else "bob", status=("queued", "running", "succeeded")[i % 3])
            for i in range(12)]
    for r in recs:
        store.put(r)
    newest_first = sorted(recs, key=lambda r: r.created_at, reverse=True)
    assert store.list() == newest_first
    assert store.list(limit=3) == newest_first[:3]
    assert store.list(owner="alice") == [r for r in newest_first if r.owner == "alice"]
    assert store.list(statuses=["queued", "running"]) == [r for r in newest_first if r.status != "succeeded"]
    assert store.list(owner="bob", statuses=("succeeded",)) == [
        r for r in newest_first if r.owner == "bob" and r.status == "succeeded"]
    assert store.list(statuses=[]) == []
    assert store.list(owner="nobody") == []


def test_both_stores_keep_the_same_documents(tmp_path, pg):
    lite = JobStore(tmp_path / "jobs.sqlite")
    try:
        recs = [job(i, kind="finetune" if i == 3 else "video", metrics={"rmse": 1.5, "per": [1, None]},
                    source={"kind": "upload", "bytes": 12}) for i in range(5)]
        for s in (lite, pg):
            for r in recs:
                s.put(r)
            s.delete("job002")
        assert [r.model_dump_json() for r in lite.list()] == [r.model_dump_json() for r in pg.list()]
        assert lite.get("job003") == pg.get("job003")
    finally:
        lite.close()


def test_threads_share_one_store(pg_url):
    s = PgJobStore(pg_url, "replica-a", pool_size=3)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                r = job(t * 100 + i)
                s.put(r)
                assert s.get(r.id) == r
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.count(statuses=["queued"]) == 120
    s.close()


# -- claims, leases, fencing ---------------------------------------------------------------
def _claim_all(url: str, replica: str, start_at: float) -> tuple[str, list[str]]:
    s = PgJobStore(url, replica)
    time.sleep(max(0.0, start_at - time.time()))  # all start claiming together
    got = []
    while (rec := s.claim(lease_s=60)) is not None:
        assert rec.status == "running" and rec.attempts == 1
        got.append(rec.id)
        time.sleep(0.002)  # let the others in between
    s.close()
    return replica, got


def test_concurrent_claims_take_each_job_once(pg, pg_url):
    for i in range(40):
        pg.put(job(i))
    start_at = time.time() + 1.0
    results = run_processes(_claim_all, [(pg_url, f"r{n}", start_at) for n in range(4)])
    claimed = [j for _, got in results for j in got]
    assert sorted(claimed) == sorted(f"job{i:03d}" for i in range(40))  # every job exactly once
    assert sum(1 for _, got in results if got) >= 2  # they did claim side by side
    for replica, got in results:
        for job_id in got:
            h = pg.holder(job_id)
            assert (h.claimed_by, h.attempts, h.status) == (replica, 1, "running") and h.held
            assert pg.get(job_id).attempts == 1
    assert pg.count(statuses=["running"]) == 40 and pg.count(statuses=["queued"]) == 0
    assert pg.claim() is None


def test_claim_takes_the_oldest_of_the_kinds(pg):
    pg.put(job(2))
    pg.put(job(1, kind="finetune"))
    pg.put(job(3))
    assert pg.claim(kinds=["video"]).id == "job002"
    assert pg.claim(kinds=["finetune"]).id == "job001"
    assert pg.claim(kinds=["finetune"]) is None
    assert pg.claim().id == "job003"
    pg.put(job(4, status="uploading"))
    pg.put(job(5, status="running"))  # running without a lease (a plain put): nobody's to take over
    assert pg.claim() is None  # uploads are not claimable


def test_expired_lease_is_taken_over_and_the_old_holder_fenced(pg, pg_url):
    b = PgJobStore(pg_url, "replica-b")
    pg.put(job(1))
    mine = pg.claim(lease_s=0.4)
    assert mine.attempts == 1
    assert pg.renew("job001", 0.4)
    assert b.claim() is None  # the lease is live
    time.sleep(0.6)
    theirs = b.claim(lease_s=30)
    assert theirs.id == "job001" and theirs.attempts == 2 and theirs.status == "running"
    assert any("taken over" in n and "replica-a" in n for n in theirs.notes)
    h = b.holder("job001")
    assert (h.claimed_by, h.attempts) == ("replica-b", 2) and h.held
    # the old holder lost it: renew and fenced writes fail and write nothing
    assert not pg.renew("job001", 30)
    mine.progress.stage = "writing"
    assert not pg.fenced_put(mine)
    mine.status = "succeeded"
    assert not pg.put(mine, owner_replica="replica-a")
    assert pg.get("job001") == theirs
    # the new holder writes and finishes; finishing releases the lease, keeps who ran it
    theirs.progress.stage = "predicting"
    assert b.fenced_put(theirs)
    theirs.status, theirs.attempts = "succeeded", 99  # attempts belong to claim
    assert b.fenced_put(theirs)
    got = pg.get("job001")
    assert got.status == "succeeded" and got.attempts == 2
    h = pg.holder("job001")
    assert (h.claimed_by, h.attempts, h.lease_until, h.held) == ("replica-b", 2, None, False)
    assert not b.renew("job001")
    assert pg.claim() is None
    b.close()


def test_requeued_job_is_claimed_again(pg, pg_url):
    pg.put(job(1))
    rec = pg.claim(lease_s=30)
    rec.status = "queued"  # a graceful shutdown gives it back
    assert pg.fenced_put(rec)
    b = PgJobStore(pg_url, "replica-b")
    again = b.claim()
    assert again.id == "job001" and again.attempts == 2 and b.holder("job001").claimed_by == "replica-b"
    b.close()


def test_max_attempts_fails_the_job_with_the_reason(pg_url):
    stores = [PgJobStore(pg_url, f"r{i}", max_attempts=2) for i in range(3)]
    stores[0].put(job(1))
    stores[0].put(job(2, t0=2_000_000.0))
    assert stores[0].claim(lease_s=0.2).id == "job001"
    time.sleep(0.35)
    assert stores[1].claim(lease_s=0.2).attempts == 2
    time.sleep(0.35)
    nxt = stores[2].claim(lease_s=30)  # job001 is failed on the way, job002 claimed
    assert nxt.id == "job002"
    rec = stores[2].get("job001")
    assert rec.status == "failed" and rec.finished_at is not None and rec.progress.stage == "done"
    assert rec.error["error"] == "lease_expired"
    assert "stopped 2 times" in rec.error["detail"]
    h = stores[2].holder("job001")
    assert (h.claimed_by, h.attempts, h.lease_until) == ("r1", 2, None)
    assert stores[2].claim() is None
    for s in stores:
        s.close()


def test_cancel_across_stores(pg, pg_url):
    b = PgJobStore(pg_url, "replica-b")
    pg.put(job(1))
    pg.put(job(2))
    pg.put(job(3, status="succeeded"))
    running = pg.claim(lease_s=30)
    assert running.id == "job001" and not pg.cancel_requested("job001")
    assert b.request_cancel("job001")  # another replica asks
    assert pg.cancel_requested("job001") and pg.holder("job001").cancel_requested
    assert pg.renew("job001", 30)  # still the holder: it stops and finishes as cancelled
    running.status = "cancelled"
    assert pg.fenced_put(running)
    # a flagged queued job is cancelled by the next claim instead of being run
    assert b.request_cancel("job002")
    pg.put(job(4))
    assert b.claim().id == "job004"
    rec = pg.get("job002")
    assert rec.status == "cancelled" and rec.error == {"error": "cancelled", "detail": "cancelled before it started"}
    assert not b.request_cancel("job003")  # finished
    assert not b.request_cancel("missing") and not b.cancel_requested("missing")
    b.close()


def test_count_is_global(pg, pg_url):
    b = PgJobStore(pg_url, "replica-b")
    for i in range(6):
        pg.put(job(i, owner="alice" if i < 4 else "bob", kind="finetune" if i == 5 else "video"))
    b.claim()
    pg.put(job(9, status="failed"))
    assert b.count() == 6  # ACTIVE by default
    assert pg.count(["running"]) == 1
    assert pg.count(["queued", "running"], owner="alice") == 4
    assert pg.count(["queued"], owner="bob", kinds=["finetune"]) == 1
    assert pg.count(["failed", "succeeded"]) == 1
    b.close()


# -- schema --------------------------------------------------------------------------------
def _open_store(url: str, replica: str, start_at: float) -> int:
    time.sleep(max(0.0, start_at - time.time()))
    s = PgJobStore(url, replica)
    s.close()
    return s.schema_version


def test_replicas_setting_up_the_schema_together(pg_url):
    start_at = time.time() + 1.0
    assert run_processes(_open_store, [(pg_url, f"r{n}", start_at) for n in range(4)]) == [SCHEMA_VERSION] * 4
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == [
            (v,) for v in range(1, SCHEMA_VERSION + 1)]
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'jobs'").fetchone()[0] == 1
    PgJobStore(pg_url, "late").close()  # idempotent
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version (version, description) VALUES (999, 'from the future')")
    with pytest.raises(SchemaError, match="999"):
        PgJobStore(pg_url, "old")


# -- the database goes away and comes back -------------------------------------------------
def test_outage_raises_store_unavailable_then_recovers(pg_server, pg_url):  # noqa: F811
    s = PgJobStore(pg_url, "replica-a", connect_timeout=2, retry_after=7)
    s.put(job(1))
    pg_server.stop()
    try:
        for call in (lambda: s.get("job001"), lambda: s.put(job(2)), lambda: s.claim(), lambda: s.renew("job001"),
                     lambda: s.count(), lambda: PgJobStore(pg_url, "replica-b", retry_after=7)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                call()
            assert time.monotonic() - t0 < 5
            assert info.value.retry_after == 7 and info.value.status == 503
            assert "127.0.0.1" not in str(info.value)  # no internals in what clients see
        assert not s.ping()
    finally:
        pg_server.start()
    assert s.ping()
    assert s.get("job001") == job(1)  # the same store object works again
    s.put(job(2))
    assert s.claim().id == "job001"
    # a restart while connections sit idle in the pool: the next call reconnects at once
    pg_server.restart()
    assert [r.id for r in s.list()] == ["job002", "job001"]
    s.close()


# -- what the replicas' managers use ----------------------------------------------------------
def _admit_many(url: str, replica: str, start_at: float, n: int) -> int:
    s = PgJobStore(url, replica)
    time.sleep(max(0.0, start_at - time.time()))
    admitted = 0
    for i in range(n):
        rec = JobRecord(id=f"{replica}-{i}", owner="alice", status="uploading", options=JobOptions(), model="m")
        admitted += s.admit(rec, waiting_limit=7, owner_limit=100)[0]
    s.close()
    return admitted


def test_admission_is_global_and_atomic(pg, pg_url):
    # four processes race to admit 5 each into a cluster-wide queue of 7: exactly 7 get in
    got = run_processes(_admit_many, [(pg_url, f"r{i}", time.time() + 1.0, 5) for i in range(4)])
    assert sum(got) == 7 and pg.count(["uploading"]) == 7
    ok, why, n = pg.admit(job(50, status="uploading"), waiting_limit=100, owner_limit=7)
    assert (ok, why, n) == (False, "key_share", 7)  # alice holds 7 active jobs across the replicas
    ok, why, n = pg.admit(job(51, owner="bob", status="uploading"), waiting_limit=7, owner_limit=7)
    assert (ok, why, n) == (False, "queue_full", 7)
    assert pg.admit(job(52, owner="bob", status="uploading"), waiting_limit=8, owner_limit=7)[0]
    assert pg.holder("job052").claimed_by == "replica-a"  # the receiving replica keeps it alive


def test_cancel_heartbeat_and_abandoned_uploads(pg, pg_url):
    b = PgJobStore(pg_url, "replica-b")
    pg.put(job(1))
    pg.put(job(2))
    assert b.cancel("job001") == "cancelled"  # queued: at once, by any replica
    rec = pg.get("job001")
    assert rec.status == "cancelled" and rec.error["error"] == "cancelled" and rec.finished_at
    running = pg.claim(lease_s=30)
    assert running.id == "job002" and running.replica == "replica-a"
    assert b.cancel("job002") == "requested" and pg.get("job002").status == "running"
    held, cancel = pg.heartbeat(["job002"], [], 30)
    assert held == {"job002"} and cancel == {"job002"}
    assert b.heartbeat(["job002"], [], 30) == (set(), set())  # b holds nothing
    assert b.cancel("job001") is None and b.cancel("missing") is None
    # an upload whose replica stopped marking it alive is failed; a live one is kept
    assert pg.admit(job(3, status="uploading"), waiting_limit=10, owner_limit=10)[0]
    assert b.admit(job(4, status="uploading"), waiting_limit=10, owner_limit=10)[0]
    time.sleep(1.2)
    pg.heartbeat([], ["job003"], 30)
    assert pg.expire_uploads(1.0, "the replica receiving the upload stopped") == ["job004"]
    gone = pg.get("job004")
    assert gone.status == "failed" and gone.error["detail"] == "the replica receiving the upload stopped"
    assert pg.get("job003").status == "uploading"
    b.close()
