"""Durable job records in PostgreSQL, shared by several service replicas.

:class:`PgJobStore` keeps the same :class:`~service.jobs.models.JobRecord` JSON documents as
the SQLite :class:`~service.jobs.store.JobStore`, with the same ``put``/``get``/``list``/
``delete``/``close`` methods and results (the documents are kept as ``json`` text, byte for
byte as put), so a caller of those cannot tell the two apart. On
top of them it offers what replicas sharing one database need: claiming queued jobs under a
lease, fenced writes, global counts, cancellation across replicas and a versioned schema.

Guarantees
----------
At most one holder
    A job is *held* by the replica named in its ``claimed_by`` column while its status is
    ``running``. :meth:`PgJobStore.claim` picks a job with ``SELECT ... FOR UPDATE SKIP
    LOCKED`` and changes ``claimed_by`` in the same transaction, so two replicas claiming at
    once never take the same job: each queued job is claimed exactly once, and a job changes
    hands only under its row lock.
Leases
    :meth:`~PgJobStore.claim` sets ``lease_until = now() + lease_s`` with the *database's*
    clock (``now()``); no replica's clock is ever compared with another's. The holder calls
    :meth:`~PgJobStore.renew` well before the lease ends (every ``lease_s / 3`` or so). Once
    the lease has passed, any replica's ``claim`` may take the job over (status stays
    ``running``, ``claimed_by`` changes, ``attempts`` goes up by one, the progress restarts
    and a note says so). Until somebody does, the old holder still holds it and may renew.
    A replica that lost a job learns it from ``renew`` (False) or from a fenced
    ``put(rec, owner_replica=...)`` / :meth:`~PgJobStore.fenced_put` (False, nothing
    written): it must stop working on the job at once. Side effects outside the database
    (result files) may still come from both replicas for up to one renew interval, so
    they should be written under names that include the attempt, or be idempotent.
Fenced writes
    ``put(rec)`` without ``owner_replica`` is the SQLite store's unconditional upsert (for
    records nobody holds: uploading, queued, cancelled before start, administrative fixes).
    ``put(rec, owner_replica=r)`` writes only if replica ``r`` still holds the job (status
    ``running`` and ``claimed_by = r`` in the database) and returns whether it did. Every
    write of a running job goes through it, the last one included: writing a status other
    than ``running`` (succeeded, failed, cancelled, or queued again at a shutdown) releases
    the lease. ``claimed_by`` is kept afterwards, naming the last replica that ran the job.
Attempts and ``MAX_ATTEMPTS``
    ``attempts`` counts the claims of a job (the column, mirrored in the record). It is
    owned by ``claim``: a fenced put keeps the database's count whatever the record says.
    When a job whose lease expired has already been claimed ``max_attempts`` times, the
    next ``claim`` does not run it again: it marks it ``failed`` with the error
    ``{"error": "lease_expired", "detail": "the replica running it stopped N times; ..."}``
    (the manager's ``{"error": code, "detail": line}`` shape) and looks for another job.
    A job put back to ``queued`` on purpose (a graceful shutdown) is claimed again whatever
    its count, as the manager's recovery does.
    A job made ``running`` by a plain ``put`` (never claimed, so without a lease) is never
    taken over: that is the single-replica flow, where the manager's restart recovery
    deals with it.
Cancellation
    :meth:`~PgJobStore.request_cancel` sets a flag column of an active job; the holder
    polls :meth:`~PgJobStore.cancel_requested` when it renews and finishes the job as
    cancelled. A flagged job that nobody holds (queued, or with an expired lease) is marked
    ``cancelled`` by the next ``claim`` instead of being run.
Schema
    The ``schema_version`` table records the migrations applied (:data:`MIGRATIONS`, in
    order). Each store applies the missing ones when it is created, in one transaction that
    holds ``pg_advisory_xact_lock``, so replicas starting together apply each migration
    exactly once and the others find the schema ready. A database newer than this code
    raises :class:`SchemaError`.
Unreachable database
    Connections come from a small pool of this store's own; each call runs in one
    transaction on one connection, so the store is thread-safe. Connecting is bounded by
    ``connect_timeout``, statements by ``statement_timeout_s``, a dead peer by TCP
    keepalives. When the database cannot be reached every call raises
    :class:`StoreUnavailable` (HTTP 503, ``retry_after`` seconds); a connection found dead
    is dropped, and once the database is back the next call connects again: no restart.
    A call whose connection broke before its commit is retried once on a fresh
    connection (nothing of it was committed); a failure *during* commit is reported as
    ``StoreUnavailable`` (the write may or may not have happened, retrying a put is safe).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import errors as pg_errors

from posezoo.errors import PosezooError

from .models import JobRecord, Progress

log = logging.getLogger("posezoo.jobs")

T = TypeVar("T")

#: claims of a job whose lease expired after which it fails instead of running again
MAX_ATTEMPTS = 3
#: statuses of jobs that are not finished
ACTIVE = ("uploading", "queued", "running")
#: ``pg_advisory_xact_lock`` key serialising schema migrations ("posezoo" + 1)
SCHEMA_LOCK_KEY = 0x706F73657A6F6F01

#: Ordered migrations: (version, description, SQL). Append only; never edit a published one.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "jobs: one JSON document a job, with lease columns", """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    doc JSON NOT NULL,  -- json, not jsonb: the document's text (and key order) exactly as put
    claimed_by TEXT,
    lease_until TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX jobs_owner ON jobs (owner, created_at);
CREATE INDEX jobs_status ON jobs (status);
CREATE INDEX jobs_claimable ON jobs (created_at) WHERE status IN ('queued', 'running');
"""),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_NOW_S = "extract(epoch from clock_timestamp())::float8"


def _ended(rec: JobRecord, status: str, error: dict, now_s: float) -> str:
    """``rec`` made terminal by the store itself (at ``now_s``, database clock); its JSON."""
    rec.status, rec.error, rec.finished_at = status, error, now_s  # type: ignore[assignment]
    rec.progress.stage, rec.progress.eta_s = "done", None
    return rec.model_dump_json()


class StoreUnavailable(PosezooError):
    """The job database cannot be reached (or is overloaded): try again after ``retry_after``
    seconds. The HTTP layer answers 503 with a ``Retry-After`` header."""

    status = 503
    code = "store_unavailable"

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class SchemaError(PosezooError):
    """The database's schema is newer than this posezoo knows: upgrade this replica."""


@dataclass(frozen=True)
class Holder:
    """Who runs (or last ran) a job, by the database's columns."""

    job_id: str
    status: str
    #: the replica that claimed it last (kept after it finished), None if never claimed
    claimed_by: str | None
    #: claims so far
    attempts: int
    #: end of the lease (epoch seconds, database clock); None when nobody holds it
    lease_until: float | None
    #: seconds of lease left by the database's clock (negative: expired); None without lease
    lease_left_s: float | None
    cancel_requested: bool

    @property
    def held(self) -> bool:
        """A replica holds it now with a live lease."""
        return self.status == "running" and self.lease_left_s is not None and self.lease_left_s > 0


class PgJobStore:
    """Thread-safe PostgreSQL store of :class:`JobRecord` s, shared by replicas.

    Parameters
    ----------
    url
        libpq connection string or URI (``postgresql://user@host:5432/db``).
    replica_id
        This replica's name, unique among the replicas sharing the database (e.g. the
        host name and pid): recorded in ``claimed_by``.
    max_attempts
        Claims of a job whose lease keeps expiring before it fails (see the module doc).
    pool_size
        Most connections open at once; a call waits up to ``pool_timeout`` for a free one.
    connect_timeout
        Seconds a new connection may take (libpq counts at least 2).
    statement_timeout_s
        Longest a statement (lock waits included) may run on the server.
    retry_after
        Seconds :class:`StoreUnavailable` tells clients to wait.
    """

    def __init__(self, url: str, replica_id: str, *, max_attempts: int = MAX_ATTEMPTS, pool_size: int = 8,
                 connect_timeout: float = 3.0, pool_timeout: float = 10.0, statement_timeout_s: float = 30.0,
                 retry_after: int = 5):
        if not replica_id:
            raise ValueError("replica_id must be a non-empty name")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.url = url
        self.replica_id = replica_id
        self.max_attempts = max_attempts
        self.connect_timeout = connect_timeout
        self.pool_timeout = pool_timeout
        self.statement_timeout_s = statement_timeout_s
        self.retry_after = retry_after
        self.pool_size = pool_size
        self._lock = threading.Lock()
        self._idle: list[psycopg.Connection] = []
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False
        self.schema_version = self._tx(self._migrate)

    # -- connections ------------------------------------------------------------------------
    def _unavailable(self, why: str, exc: BaseException | None = None) -> StoreUnavailable:
        # The detail (host, port) goes to the log, not to clients.
        log.warning("job database unavailable: %s%s", why, f" ({str(exc).strip().splitlines()[0]})"
                    if exc is not None and str(exc).strip() else "")
        return StoreUnavailable(f"the job database is unavailable ({why}); try again in {self.retry_after} s",
                                self.retry_after)

    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(2, int(round(self.connect_timeout))),
                keepalives=1, keepalives_idle=10, keepalives_interval=3, keepalives_count=3,
                tcp_user_timeout=int(max(self.connect_timeout, self.statement_timeout_s) * 1000),
                application_name=f"posezoo {self.replica_id}"[:63])
            conn.execute(f"SET statement_timeout = {int(self.statement_timeout_s * 1000)}")
            return conn
        except psycopg.OperationalError as exc:
            raise self._unavailable("cannot connect", exc) from exc

    def _acquire(self) -> tuple[psycopg.Connection, bool]:
        if self._closed:
            raise RuntimeError("the job store is closed")
        if not self._slots.acquire(timeout=self.pool_timeout):
            raise self._unavailable(f"all {self.pool_size} connections busy for {self.pool_timeout:g} s")
        try:
            while True:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    return self._connect(), False
                if not (conn.closed or conn.broken):
                    return conn, True
                self._discard(conn)
        except BaseException:
            self._slots.release()
            raise

    @staticmethod
    def _discard(conn: psycopg.Connection) -> None:
        try:
            conn.close()
        except Exception:  # already dead
            pass

    def _release(self, conn: psycopg.Connection) -> None:
        try:
            bad = conn.closed or conn.broken or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
            if bad or self._closed:
                self._discard(conn)
            else:
                with self._lock:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    def _tx(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run ``fn(conn)`` in one transaction; connection trouble becomes StoreUnavailable."""
        for attempt in (0, 1):
            conn, reused = self._acquire()
            committing = False
            try:
                with conn.transaction():
                    out = fn(conn)
                    committing = True
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                broken = conn.closed or conn.broken
                self._release(conn)
                if attempt == 0 and not committing and (
                        (broken and reused) or isinstance(exc, pg_errors.TransactionRollback) and not broken):
                    continue  # dropped while idle (nothing of this call ran), or a deadlock: once more
                if isinstance(exc, pg_errors.QueryCanceled):
                    raise self._unavailable("a statement timed out", exc) from exc
                raise self._unavailable("connection lost" if broken else "database error", exc) from exc
            except BaseException:
                self._release(conn)
                raise
            self._release(conn)
            return out
        raise AssertionError("unreachable")

    def _migrate(self, conn: psycopg.Connection) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                     "description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise SchemaError(f"the job database has schema version {current}, newer than this posezoo's "
                              f"{SCHEMA_VERSION}: upgrade this replica")
        for version, description, sql in MIGRATIONS:
            if version > current:
                conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                             (version, description))
                log.info("job database migrated to schema version %d: %s", version, description)
        return SCHEMA_VERSION

    # -- the JobStore interface -------------------------------------------------------------
    def put(self, rec: JobRecord, *, owner_replica: str | None = None) -> bool:
        """Insert or replace a job's record.

        Without ``owner_replica``: unconditionally, as :meth:`JobStore.put` (True). A status
        other than ``running`` releases any lease. With ``owner_replica``: only while that
        replica holds the job (status ``running``, ``claimed_by = owner_replica``); returns
        False, writing nothing, when it does not (another replica took it over, or it was
        finished or deleted meanwhile). The database's ``attempts`` are kept then.
        """
        if owner_replica is None:
            doc = rec.model_dump_json()

            def write(conn: psycopg.Connection) -> bool:
                conn.execute(
                    "INSERT INTO jobs (id, owner, kind, status, created_at, updated_at, doc, attempts) "
                    f"VALUES (%s, %s, %s, %s, %s, {_NOW_S}, %s::json, %s) "
                    "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, updated_at = EXCLUDED.updated_at, "
                    "doc = EXCLUDED.doc, attempts = EXCLUDED.attempts, "
                    "lease_until = CASE WHEN EXCLUDED.status = 'running' THEN jobs.lease_until END",
                    (rec.id, rec.owner, rec.kind, rec.status, rec.created_at, doc, rec.attempts))
                return True
        else:
            def write(conn: psycopg.Connection) -> bool:
                row = conn.execute("SELECT attempts FROM jobs WHERE id = %s AND status = 'running' "
                                   "AND claimed_by = %s FOR UPDATE", (rec.id, owner_replica)).fetchone()
                if row is None:
                    return False
                held = rec if rec.attempts == row[0] else rec.model_copy(update={"attempts": row[0]})
                conn.execute(
                    f"UPDATE jobs SET status = %(status)s, updated_at = {_NOW_S}, doc = %(doc)s::json, "
                    "lease_until = CASE WHEN %(status)s = 'running' THEN lease_until END WHERE id = %(id)s",
                    {"status": rec.status, "doc": held.model_dump_json(), "id": rec.id})
                return True
        return self._tx(write)

    def fenced_put(self, rec: JobRecord) -> bool:
        """``put(rec, owner_replica=self.replica_id)``: write only while this replica holds the job."""
        return self.put(rec, owner_replica=self.replica_id)

    def get(self, job_id: str) -> JobRecord | None:
        row = self._tx(lambda c: c.execute("SELECT doc::text FROM jobs WHERE id = %s", (job_id,)).fetchone())
        return JobRecord.model_validate_json(row[0]) if row else None

    def list(self, owner: str | None = None, statuses: Iterable[str] | None = None,
             limit: int = 1000) -> list[JobRecord]:
        where, args = _job_filter(owner=owner, statuses=statuses)
        rows = self._tx(lambda c: c.execute(f"SELECT doc::text FROM jobs WHERE {where} ORDER BY created_at DESC "
                                            "LIMIT %s", [*args, limit]).fetchall())
        return [JobRecord.model_validate_json(r[0]) for r in rows]

    def delete(self, job_id: str) -> None:
        self._tx(lambda c: c.execute("DELETE FROM jobs WHERE id = %s", (job_id,)))

    def close(self) -> None:
        """Close the connections (those in use close when their call ends)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    def __enter__(self) -> "PgJobStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- replicas ---------------------------------------------------------------------------
    def claim(self, kinds: Iterable[str] | None = None, lease_s: float = 30.0) -> JobRecord | None:
        """Take the oldest claimable job of ``kinds`` (None: any): a queued one, or a running
        one whose lease expired. It becomes ``running``, held by this replica until
        ``now() + lease_s`` (database clock), with one more attempt. Flagged jobs are
        cancelled and jobs out of attempts failed on the way (see the module doc).
        None when there is nothing to claim."""
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        kind_list = None if kinds is None else list(kinds)
        while True:
            done, rec = self._tx(lambda c: self._claim_one(c, kind_list, lease_s))
            if done:
                return rec

    def _claim_one(self, conn: psycopg.Connection, kinds: list[str] | None,
                   lease_s: float) -> tuple[bool, JobRecord | None]:
        """One transaction of :meth:`claim`: (True, claimed or None) or (False, None) after
        cancelling or failing a job (the caller looks again)."""
        row = conn.execute(
            "SELECT id, status, attempts, claimed_by, cancel_requested, doc::text, "
            "extract(epoch from now())::float8 FROM jobs "
            "WHERE (status = 'queued' OR status = 'running' AND lease_until < now()) "
            "AND (%(kinds)s::text[] IS NULL OR kind = ANY(%(kinds)s::text[])) "
            "ORDER BY created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED", {"kinds": kinds}).fetchone()
        if row is None:
            return True, None
        job_id, status, attempts, last, cancel, doc, now_s = row
        rec = JobRecord.model_validate_json(doc)
        expired = status == "running"
        if cancel or (expired and attempts >= self.max_attempts):
            if cancel:
                doc = _ended(rec, "cancelled", {"error": "cancelled", "detail": "cancelled before it started" if not
                             expired else "cancelled by the user after the replica running it stopped"}, now_s)
            else:
                doc = _ended(rec, "failed", {"error": "lease_expired", "detail": f"the replica running it stopped "
                                             f"{attempts} times (last: {last}); giving up"}, now_s)
                log.warning("job %s failed: its lease expired after %d attempts", job_id, attempts)
            conn.execute(f"UPDATE jobs SET status = %s, doc = %s::json, lease_until = NULL, updated_at = {_NOW_S} "
                         "WHERE id = %s", (rec.status, doc, job_id))
            return False, None
        if expired:
            rec.progress = Progress(stage="queued")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now_s))
            rec.notes.append(f"taken over at {when} by {self.replica_id}: {last or 'its replica'} stopped renewing "
                             "its lease (started again from the beginning)")
            log.warning("job %s: lease of %s expired, taken over (attempt %d)", job_id, last, attempts + 1)
        rec.status, rec.attempts, rec.started_at = "running", attempts + 1, now_s
        rec.error, rec.finished_at, rec.replica = None, None, self.replica_id
        conn.execute(
            "UPDATE jobs SET status = 'running', claimed_by = %s, attempts = %s, "
            f"lease_until = now() + %s * interval '1 second', updated_at = {_NOW_S}, doc = %s::json "
            "WHERE id = %s", (self.replica_id, rec.attempts, float(lease_s), rec.model_dump_json(), job_id))
        return True, rec

    def renew(self, job_id: str, lease_s: float = 30.0) -> bool:
        """Extend this replica's lease to ``now() + lease_s``; False if it does not hold the
        job any more (taken over, finished, deleted): stop working on it then."""
        row = self._tx(lambda c: c.execute(
            "UPDATE jobs SET lease_until = now() + %s * interval '1 second' "
            "WHERE id = %s AND status = 'running' AND claimed_by = %s RETURNING id",
            (float(lease_s), job_id, self.replica_id)).fetchone())
        return row is not None

    def holder(self, job_id: str) -> Holder | None:
        """Who holds (or last held) the job, its attempts and its lease; None if no such job."""
        row = self._tx(lambda c: c.execute(
            "SELECT status, claimed_by, attempts, extract(epoch from lease_until)::float8, "
            "extract(epoch from lease_until - now())::float8, cancel_requested FROM jobs WHERE id = %s",
            (job_id,)).fetchone())
        return Holder(job_id, *row) if row else None

    def count(self, statuses: Iterable[str] = ACTIVE, owner: str | None = None,
              kinds: Iterable[str] | None = None) -> int:
        """Jobs of all replicas with one of ``statuses`` (of ``owner``, of ``kinds``)."""
        where, args = _job_filter(owner=owner, statuses=statuses, kinds=kinds)
        return self._tx(lambda c: c.execute(f"SELECT count(*) FROM jobs WHERE {where}", args).fetchone()[0])

    def request_cancel(self, job_id: str) -> bool:
        """Flag an active job for cancellation, whichever replica runs it; False if there is
        no such active job."""
        row = self._tx(lambda c: c.execute(
            "UPDATE jobs SET cancel_requested = TRUE WHERE id = %s AND status = ANY(%s) RETURNING id",
            (job_id, list(ACTIVE))).fetchone())
        return row is not None

    def cancel_requested(self, job_id: str) -> bool:
        """Whether somebody asked to cancel the job (False if there is no such job)."""
        row = self._tx(lambda c: c.execute("SELECT cancel_requested FROM jobs WHERE id = %s",
                                           (job_id,)).fetchone())
        return bool(row and row[0])

    def ping(self) -> bool:
        """Whether the database answers now (for readiness probes); never raises."""
        try:
            return self._tx(lambda c: c.execute("SELECT 1").fetchone()[0] == 1)
        except StoreUnavailable:
            return False

    # -- what a replica's manager needs on top ----------------------------------------------
    def admit(self, rec: JobRecord, *, waiting_limit: int, owner_limit: int,
              kinds: Iterable[str] = ("video",)) -> tuple[bool, str | None, int]:
        """Insert ``rec`` (an ``uploading`` placeholder held by this replica) if the cluster has
        room: fewer than ``waiting_limit`` jobs of ``kinds`` waiting (uploading or queued, all
        replicas) and fewer than ``owner_limit`` active jobs of ``rec.owner``. The counts and the
        insert happen under one transaction-level advisory lock, so replicas admitting at once
        never overshoot. Returns ``(admitted, reason, count)``: reason ``"queue_full"`` or
        ``"key_share"`` with the count that hit the limit."""
        kind_list = list(kinds)

        def tx(conn: psycopg.Connection) -> tuple[bool, str | None, int]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY + 1,))
            mine = conn.execute("SELECT count(*) FROM jobs WHERE owner = %s AND status = ANY(%s) AND kind = ANY(%s)",
                                (rec.owner, list(ACTIVE), kind_list)).fetchone()[0]
            if mine >= owner_limit:
                return False, "key_share", mine
            waiting = conn.execute("SELECT count(*) FROM jobs WHERE status = ANY(%s) AND kind = ANY(%s)",
                                   (["uploading", "queued"], kind_list)).fetchone()[0]
            if waiting >= waiting_limit:
                return False, "queue_full", waiting
            conn.execute(
                "INSERT INTO jobs (id, owner, kind, status, created_at, updated_at, doc, claimed_by) "
                f"VALUES (%s, %s, %s, %s, %s, {_NOW_S}, %s::json, %s)",
                (rec.id, rec.owner, rec.kind, rec.status, rec.created_at, rec.model_dump_json(), self.replica_id))
            return True, None, waiting
        return self._tx(tx)

    def cancel(self, job_id: str, detail: str = "cancelled before it started") -> str | None:
        """Cancel a job whoever holds it: a queued one is ``cancelled`` at once (under its row
        lock, so no replica claims it meanwhile): ``"cancelled"``; a running one is flagged
        for its holder (:meth:`request_cancel`): ``"requested"``; None for no active job."""
        def tx(conn: psycopg.Connection) -> str | None:
            row = conn.execute(f"SELECT status, doc::text, {_NOW_S} FROM jobs WHERE id = %s FOR UPDATE",
                               (job_id,)).fetchone()
            if row is None or row[0] not in ACTIVE:
                return None
            if row[0] == "running":
                conn.execute("UPDATE jobs SET cancel_requested = TRUE WHERE id = %s", (job_id,))
                return "requested"
            doc = _ended(JobRecord.model_validate_json(row[1]), "cancelled", {"error": "cancelled", "detail": detail},
                         row[2])
            conn.execute(f"UPDATE jobs SET status = 'cancelled', doc = %s::json, lease_until = NULL, "
                         f"updated_at = {_NOW_S} WHERE id = %s", (doc, job_id))
            return "cancelled"
        return self._tx(tx)

    def heartbeat(self, running: Iterable[str], uploading: Iterable[str], lease_s: float) -> tuple[set[str], set[str]]:
        """One round trip for a replica's keeper: renew the leases of the ``running`` jobs it
        holds, mark its ``uploading`` placeholders alive (``updated_at``), and read the cancel
        flags. Returns ``(held, cancel)``: the running ids it still holds, and those of them
        somebody asked to cancel."""
        run_ids, up_ids = list(running), list(uploading)

        def tx(conn: psycopg.Connection) -> tuple[set[str], set[str]]:
            held, cancel = set(), set()
            if run_ids:
                rows = conn.execute(
                    "UPDATE jobs SET lease_until = now() + %s * interval '1 second' WHERE id = ANY(%s) "
                    "AND status = 'running' AND claimed_by = %s RETURNING id, cancel_requested",
                    (float(lease_s), run_ids, self.replica_id)).fetchall()
                held = {r[0] for r in rows}
                cancel = {r[0] for r in rows if r[1]}
            if up_ids:
                conn.execute(f"UPDATE jobs SET updated_at = {_NOW_S} WHERE id = ANY(%s) AND status = 'uploading' "
                             "AND claimed_by = %s", (up_ids, self.replica_id))
            return held, cancel
        return self._tx(tx)

    def expire_uploads(self, idle_s: float, detail: str) -> list[str]:
        """Fail ``uploading`` placeholders nobody has marked alive for ``idle_s`` seconds (the
        replica receiving the upload died): they must not hold a queue slot for ever. Returns
        their ids."""
        def tx(conn: psycopg.Connection) -> list[str]:
            rows = conn.execute(
                f"SELECT id, doc::text, {_NOW_S} FROM jobs WHERE status = 'uploading' AND updated_at < {_NOW_S} - %s "
                "FOR UPDATE SKIP LOCKED", (float(idle_s),)).fetchall()
            for job_id, doc, now_s in rows:
                doc = _ended(JobRecord.model_validate_json(doc), "failed", {"error": "interrupted", "detail": detail},
                             now_s)
                conn.execute(f"UPDATE jobs SET status = 'failed', doc = %s::json, updated_at = {_NOW_S} "
                             "WHERE id = %s", (doc, job_id))
            return [r[0] for r in rows]
        return self._tx(tx)


def _job_filter(*, owner: str | None = None, statuses: Iterable[str] | None = None,
                kinds: Iterable[str] | None = None) -> tuple[str, list]:
    """A WHERE clause (with its parameters) for the given filters; None filters nothing."""
    clauses, args = ["TRUE"], []
    for column, value in (("owner", owner), ("status", statuses), ("kind", kinds)):
        if value is None:
            continue
        clauses.append(f"{column} = %s" if isinstance(value, str) else f"{column} = ANY(%s)")
        args.append(value if isinstance(value, str) else list(value))
    return " AND ".join(clauses), args
