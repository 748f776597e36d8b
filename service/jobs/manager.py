"""The job manager: admission (bounded queue), a pool of worker threads, the pipeline of one
job (fetch -> predict -> write -> render -> store), progress, cancellation, and recovery
after a crash or restart.

Inference runs in threads: ONNX Runtime, FFmpeg decoding and OpenCV drawing release the
GIL, so a few worker threads keep the cores busy while the web server stays responsive.

Layout of ``settings.data_dir``::

    jobs.sqlite            job records (service.jobs.store)
    uploads/<job>/input.*  uploaded videos, kept until their job ends (so it can resume)
    work/<job>/            scratch space of a running job (always removed at its end)
    results/<job>/         results of finished jobs (unless they go to S3)
    catalogs/<key>/        models fine-tuned by an API key (service.jobs.finetune), seen by that key only

With ``DATABASE_URL`` (several replicas, see :mod:`service.jobs.cluster`) the records live in
PostgreSQL, workers *claim* queued jobs under a lease instead of taking them from this
process's queue, every write of a running job is fenced (it lands only while this replica
still holds the job), queue limits count every replica's jobs, and uploads, results and
fine-tuned cards live in S3; the data directory only holds scratch space and caches.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from posezoo.errors import (
    ArtefactNotPublishedError,
    InputError,
    PosezooError,
    TruncatedVideoError,
    UnknownModelError,
    VideoError,
    ZooError,
)

from ..config import ServiceSettings
from .models import (
    TOP_DOWN_OPTIONS,
    FinetuneOptions,
    JobOptions,
    JobRecord,
    Progress,
    ResultFile,
)
from .storage import (
    ResultStore,
    SourceError,
    Sources,
    normalise_source_uri,
    s3_client,
    split_s3_uri,
)

log = logging.getLogger("posezoo.jobs")

ACTIVE = ("uploading", "queued", "running")
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".h264", ".ts"}


class DataDirInUseError(PosezooError):
    """Another server process holds the data directory's lock."""


class QueueFullError(PosezooError):
    """Every worker is busy and the queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class JobNotFoundError(PosezooError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class _Interrupted(BaseException):
    """Raised inside a job's progress callback to stop it (cancel or shutdown)."""


def error_code(exc: BaseException) -> tuple[int, str]:
    """HTTP status and error code of a posezoo error."""
    if isinstance(exc, (SourceError,)) or hasattr(exc, "status") and hasattr(exc, "code"):
        return exc.status, exc.code  # type: ignore[attr-defined]
    if isinstance(exc, QueueFullError):
        return 429, "queue_full"
    if isinstance(exc, JobNotFoundError):
        return 404, "not_found"
    if isinstance(exc, UnknownModelError):
        return 404, "unknown_model"
    if isinstance(exc, TruncatedVideoError):
        return 422, "truncated_video"
    if isinstance(exc, VideoError):
        return 422, "invalid_video"
    if isinstance(exc, (ArtefactNotPublishedError, ZooError)):
        return 422, "model_unavailable"
    if isinstance(exc, InputError):
        return 422, "bad_options"
    if isinstance(exc, PosezooError):
        return 400, "bad_request"
    return 500, "internal_error"


def validate_video(path: Path, *, max_pixels: int | None = None, allow_truncated: bool = False) -> dict:
    """Check that ``path`` is a decodable video before a job is queued: the frame size from
    the header (before anything is decoded), the first frame, and the packets near the end
    (which catches files cut short whose index is intact).

    Parameters
    ----------
    path : Path
    max_pixels : int, optional
        Largest ``width * height`` accepted (:class:`SourceError` 413 above it).
    allow_truncated : bool
        A video cut short is accepted (the job keeps the frames that decode); the returned
        ``truncated`` says why it looks cut short. A file whose first frame does not
        decode is refused either way.

    Raises
    ------
    VideoError, TruncatedVideoError, SourceError
    """
    import av

    from posezoo.video import probe

    info = probe(path)
    name = path.name
    if max_pixels and info.width * info.height > max_pixels:
        raise SourceError(
            f"{name}: the video is {info.width}x{info.height} ({info.width * info.height / 1e6:.1f} MP a frame), over "
            f"this server's limit of {max_pixels / 1e6:.1f} MP a frame (MAX_VIDEO_PIXELS)", status=413,
            code="too_large")
    out = {"width": info.width, "height": info.height, "fps": info.fps, "n_frames": info.n_frames,
           "codec": info.codec, "truncated": None}
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{name}: not a readable video ({exc})") from None
    with container as c:
        s = c.streams.video[0]
        try:
            first = next(c.decode(s), None)
        except (av.FFmpegError, EOFError) as exc:
            raise VideoError(f"{name}: damaged video: its first frame does not decode ({exc})") from None
        if first is None:
            raise VideoError(f"{name}: no frame could be decoded (empty or corrupt video stream)")
        try:
            _check_complete(c, s, info, name)
        except TruncatedVideoError as exc:
            if not allow_truncated:
                raise
            out["truncated"] = str(exc)
    return out


def _check_complete(c, s, info, name: str) -> None:
    """Demux (no decoding) stream ``s`` of the open container ``c`` from the last keyframe
    before the end: a file cut short whose index is intact stops delivering packets well
    before the stream's end. Raises :class:`TruncatedVideoError`."""
    import av

    if not (s.duration and s.time_base and info.n_frames > 2):
        return
    try:
        start = s.start_time or 0
        frame = int(1 / (info.fps * s.time_base)) if info.fps > 0 else 0
        target = start + s.duration - max(int(s.duration * 0.05), 2 * frame)
        c.seek(target, stream=s, backward=True, any_frame=False)
        last = None
        for packet in c.demux(s):
            if packet.size and packet.pts is not None:
                last = packet.pts if last is None else max(last, packet.pts)
    except (av.FFmpegError, EOFError, StopIteration) as exc:
        raise TruncatedVideoError(f"{name}: damaged or truncated video ({exc}); allow_truncated=true keeps the "
                                  "frames that decode", 0) from None
    if last is None or last < target:
        where = f"at {float((last - start) * s.time_base):.1f} s" if last is not None else "early"
        raise TruncatedVideoError(
            f"{name}: truncated video: its header announces {float(s.duration * s.time_base):.1f} s "
            f"but the stream stops {where}; is the file complete? (allow_truncated=true keeps the frames "
            "that decode)", 0)


@dataclass
class Reservation:
    """A slot in the queue, taken before an upload is read."""

    job_id: str
    owner: str
    released: bool = False
    kind: str = "video"


class JobManager:
    """Runs video jobs durably. Thread-safe; one instance per server process."""

    def __init__(self, settings: ServiceSettings, zoo=None):
        from posezoo.zoo import Zoo

        self.settings = settings
        self.root = Path(settings.data_dir).resolve()
        self.uploads = self.root / "uploads"
        self.work = self.root / "work"
        for d in (self.uploads, self.work):
            d.mkdir(parents=True, exist_ok=True)
        self._lockfile = _lock_data_dir(self.root)
        self.replica = settings.replica
        #: several replicas share a PostgreSQL store (and S3) instead of this process's SQLite file
        self.clustered = settings.database_url is not None
        if self.clustered:
            from .pg_store import PgJobStore

            try:
                self.store = PgJobStore(settings.database_url, self.replica, max_attempts=settings.max_attempts,
                                        retry_after=settings.retry_after_s)
            except BaseException:
                self._lockfile.close()
                raise
        else:
            from .store import JobStore

            self.store = JobStore(self.root / "jobs.sqlite")
        self.zoo = zoo or Zoo(s3_endpoint=settings.resolved_s3_endpoint)
        self._s3 = None
        self._s3_lock = threading.Lock()
        presign = None
        if settings.results_s3_uri and settings.s3_public_endpoint:
            presign = s3_client(settings.s3_public_endpoint)
        self.results = ResultStore(self.root / "results", settings.results_s3_uri,
                                   self.s3 if settings.results_s3_uri else None, presign)
        from .links import ResultLinks

        self.links = ResultLinks(self.root)
        self.sources = Sources(None, allow_https=settings.allow_https_sources, input_buckets=settings.input_buckets,
                               https_timeout_s=settings.https_timeout_s, max_bytes=settings.max_upload_bytes)
        self._lock = threading.Lock()
        self._active = 0  # reserved + queued + running video jobs
        self._ft_active = 0  # the same for fine-tune jobs (their own pool of one worker)
        self._per_owner: collections.Counter[str] = collections.Counter()  # video jobs of each key in _active
        self._image_slots = threading.BoundedSemaphore(settings.image_concurrency)
        self._image_pixels = _Budget(settings.max_image_pixels)
        self._ft_queue: queue.Queue[str | None] = queue.Queue()
        self.catalogs = self.root / "catalogs"
        self._owner_zoos: dict[str, object] = {}
        self._live: dict[str, JobRecord] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._secret_uris: dict[str, str] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._predictors: dict[str, object] = {}
        self._predictor_locks: dict[str, threading.Lock] = {}
        self._ready = False
        self._metrics = _Metrics()
        # clustered mode: the uploads this replica is receiving, the jobs it lost to another
        # replica, a wake-up for idle claimers, the heartbeat thread and the shared S3 files
        self._uploading: set[str] = set()
        self._lost: set[str] = set()
        self._wake = {"video": threading.Event(), "finetune": threading.Event()}
        self._keeper = None
        self.shared = None
        if self.clustered:
            from .cluster import SharedFiles

            self.shared = SharedFiles(self.s3, settings.results_s3_uri)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def s3(self):
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = s3_client(self.settings.resolved_s3_endpoint)
            return self._s3

    def start(self, warm: bool = True) -> "JobManager":
        self.sources.s3 = self.s3
        if self.clustered:
            self._start_cluster()
        else:
            self._recover()
            for i in range(self.settings.workers):
                t = threading.Thread(target=self._worker, name=f"posezoo-job-{i}", daemon=True)
                t.start()
                self._threads.append(t)
            # Training gets one worker of its own: a run takes the machine's cores for minutes, so it must
            # neither hold a video worker (and stall predictions behind it) nor run beside another run.
            t = threading.Thread(target=self._worker, args=(self._ft_queue, "finetune"), name="posezoo-finetune",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        if warm:
            try:
                self.predictor(self.settings.model_default)
            except PosezooError as exc:
                log.warning("default model %s cannot be loaded: %s", self.settings.model_default, exc)
        self._ready = True
        log.info("posezoo job manager ready (replica %s, %s store): %s", self.replica,
                 "PostgreSQL" if self.clustered else "SQLite",
                 {k: v for k, v in self.settings.public_dict().items()
                  if k in ("data_dir", "workers", "queue_size", "results_s3_uri")})
        return self

    @property
    def ready(self) -> bool:
        return self._ready and all(t.is_alive() for t in self._threads) and (
            self._keeper is None or self._keeper.alive)

    def stop(self, timeout: float = 10.0) -> None:
        """Interrupt running jobs (they run again at the next start) and stop the workers."""
        self._stopping.set()
        for ev in list(self._cancel.values()):
            ev.set()
        for _ in self._threads:
            self._queue.put(None)
            self._ft_queue.put(None)
        for ev in self._wake.values():
            ev.set()
        for t in self._threads:
            t.join(timeout)
        if self._keeper is not None:
            self._keeper.stop()
        self._ready = False
        self._lockfile.close()

    # -- clustered mode (DATABASE_URL) -------------------------------------------------------
    def _start_cluster(self) -> None:
        """Workers that claim jobs from the shared store, and the lease keeper. Nothing to
        recover: a job this replica ran before a crash is taken over when its lease ends
        (by any replica, this one included)."""
        from .cluster import LeaseKeeper

        for d in (self.work, self.uploads):  # scratch and half-received uploads of a previous run
            for sub in d.iterdir():
                shutil.rmtree(sub, ignore_errors=True)
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._claim_loop, args=("video",), name=f"posezoo-job-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        if self.finetune_unavailable() is None:  # a replica without PyTorch leaves training to the others
            t = threading.Thread(target=self._claim_loop, args=("finetune",), name="posezoo-finetune", daemon=True)
            t.start()
            self._threads.append(t)

        def running() -> list[str]:
            with self._lock:
                return [j for j, r in self._live.items() if r.status == "running" and j not in self._lost]

        def uploading() -> list[str]:
            with self._lock:
                return list(self._uploading)

        self._keeper = LeaseKeeper(self.store, self.settings.lease_s, running, uploading, self._on_lost,
                                   self._on_cancel, self._on_expired_uploads).start()

    def _claim_loop(self, kind: str) -> None:
        """One worker of a replica: claim the oldest job of ``kind`` from the shared store, run
        it, repeat; when there is none, wait (a local submit wakes it at once)."""
        from .pg_store import StoreUnavailable

        wake = self._wake[kind]
        idle_s = 0.5 if kind == "video" else 2.0
        while not self._stopping.is_set():
            try:
                rec = self.store.claim([kind], lease_s=self.settings.lease_s)
            except StoreUnavailable:
                self._stopping.wait(2.0)
                continue
            except Exception:  # never let a worker thread die
                log.error("claiming a %s job failed", kind, exc_info=True)
                self._stopping.wait(2.0)
                continue
            if rec is None:
                wake.wait(idle_s)
                wake.clear()
                continue
            if self._stopping.is_set():  # claimed while shutting down: give it back at once
                rec.status, rec.progress = "queued", Progress(stage="queued")
                self._save(rec, must=True)
                return
            with self._lock:
                self._live[rec.id] = rec
                self._cancel[rec.id] = threading.Event()
            log.info("job %s claimed by %s (attempt %d)", rec.id, self.replica, rec.attempts)
            self._run_in_worker(rec.id)

    def _on_lost(self, job_id: str) -> None:
        """Another replica holds the job now (this one missed its lease): stop, write nothing."""
        with self._lock:
            if job_id not in self._live:
                return
            self._lost.add(job_id)
            ev = self._cancel.get(job_id)
        log.warning("job %s: another replica took it over; stopping it here", job_id)
        if ev is not None:
            ev.set()

    def _on_cancel(self, job_id: str) -> None:
        with self._lock:
            ev = self._cancel.get(job_id)
        if ev is not None:
            ev.set()

    def _on_expired_uploads(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.shared.delete_inputs(job_id)

    def _save(self, rec: JobRecord, *, must: bool = False) -> bool:
        """Write a job's record. Clustered, a running job's write is fenced: False (nothing
        written) once another replica holds it. ``must``: a status change that may not be
        lost, retried while the database is unreachable (progress updates are skipped then)."""
        if not self.clustered:
            self.store.put(rec)
            return True
        from .pg_store import StoreUnavailable

        with self._lock:
            if rec.id in self._lost:
                return False
            held = rec.id in self._live
        delay = 1.0
        deadline = time.monotonic() + max(600.0, 10 * self.settings.lease_s)
        while True:
            try:
                if not held:
                    return self.store.put(rec)
                if self.store.fenced_put(rec):
                    return True
                self._on_lost(rec.id)
                return False
            except StoreUnavailable:
                if not must or time.monotonic() > deadline:
                    if must:
                        log.error("job %s: could not record its status %s: the job database stayed unavailable",
                                  rec.id, rec.status)
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def job_input(self, rec: JobRecord, work: Path) -> Path:
        """The local path of an uploaded job's input (a video, or a fine-tune data folder):
        where the upload lies, or, clustered, a copy from S3 in the job's scratch folder."""
        if rec.input_path and rec.input_path.startswith("s3://") and self.shared is not None:
            try:
                return self.shared.fetch_input(rec.input_path, work / "input")
            except Exception as exc:
                raise VideoError(f"the uploaded input is missing from the shared storage ({type(exc).__name__}); "
                                 "upload it again") from None
        return Path(rec.input_path or "")

    def _recover(self) -> None:
        """Jobs left active by a crash or restart: resume them, or fail them with a reason."""
        for d in self.work.iterdir():  # scratch of interrupted jobs
            shutil.rmtree(d, ignore_errors=True)
        for d in self.results.local_root.glob(".*.part"):
            shutil.rmtree(d, ignore_errors=True)
        resumed = []
        for rec in sorted(self.store.list(statuses=ACTIVE, limit=1_000_000), key=lambda r: r.created_at):
            reason = None
            if rec.status == "uploading":
                reason = "the server stopped while the video was being uploaded; upload it again"
            elif not self.settings.resume_interrupted:
                reason = "interrupted by a server restart (resuming is off); submit it again"
            elif rec.status == "running" and rec.attempts >= self.settings.max_attempts:
                reason = f"interrupted by a server restart {rec.attempts} times; giving up"
            elif rec.kind == "video" and rec.source.get("kind") == "upload" and not (
                    rec.input_path and Path(rec.input_path).is_file()):
                reason = "the uploaded video was lost in a server restart; upload it again"
            elif rec.source.get("kind") == "https":
                reason = "interrupted by a server restart; https sources are not kept, submit it again"
            elif rec.kind == "finetune" and not (rec.input_path and Path(rec.input_path).is_dir()):
                reason = "the uploaded labelled data was lost in a server restart; upload it again"
            if reason:
                rec.status, rec.error, rec.finished_at = "failed", {"error": "interrupted", "detail": reason}, time.time()
                rec.progress.stage = "done"
                self.store.put(rec)
                self._cleanup_inputs(rec.id)
                log.warning("job %s failed at recovery: %s", rec.id, reason)
                continue
            was = rec.status
            rec.status = "queued"
            rec.progress = Progress(stage="queued")
            if was == "running":
                again = "training started again from step 0" if rec.kind == "finetune" else \
                    "started again from the first frame"
                rec.notes.append(f"resumed after a server restart at {time.strftime('%Y-%m-%d %H:%M:%S')} "
                                 f"({again})")
            self.store.put(rec)
            resumed.append(rec)
        known = {r.id for r in resumed}
        for d in self.uploads.iterdir():
            if d.name not in known:
                shutil.rmtree(d, ignore_errors=True)
        with self._lock:
            for rec in resumed:
                if rec.kind == "finetune":
                    self._ft_active += 1
                    self._ft_queue.put(rec.id)
                else:
                    self._active += 1
                    self._per_owner[rec.owner] += 1
                    self._queue.put(rec.id)
                self._live[rec.id] = rec
                self._cancel[rec.id] = threading.Event()
        if resumed:
            log.warning("resuming %d interrupted job(s): %s", len(resumed), ", ".join(r.id for r in resumed))

    # -- models -----------------------------------------------------------------------------
    def owner_catalog(self, owner: str) -> Path:
        """The catalog of models fine-tuned by ``owner`` (seen by that key only)."""
        from .finetune import owner_slug

        return self.catalogs / owner_slug(owner)

    def _pull_owner_cards(self, owner: str | None, force: bool = False) -> bool:
        """Clustered: models other replicas fine-tuned for ``owner`` (their cards, from S3; at
        most every few seconds unless ``force``). Whether a card was added."""
        if self.shared is None or owner is None:
            return False
        from .finetune import owner_slug

        try:
            if self.shared.pull_cards(owner_slug(owner), self.owner_catalog(owner), 0.0 if force else 5.0):
                self.forget_owner_zoo(owner)
                return True
        except Exception as exc:  # S3 trouble: the key sees the models this replica knows
            log.warning("could not read the shared model catalog of %s: %s", owner, exc)
        return False

    def zoo_for(self, owner: str | None):
        """The zoo a key sees: its own fine-tuned models first, then the server's."""
        self._pull_owner_cards(owner)
        if owner is None or not self.owner_catalog(owner).is_dir():
            return self.zoo
        from posezoo.zoo import Zoo

        with self._lock:
            z = self._owner_zoos.get(owner)
            if z is None:
                base = self.zoo
                z = Zoo([self.owner_catalog(owner), *base.catalogs], include_bundled=False, cache_dir=base.cache_dir,
                        hf_cache_dir=base.hf_cache_dir, s3_endpoint=base.s3_endpoint)
                self._owner_zoos[owner] = z
            return z

    def _own(self, owner: str | None, card_dir: Path) -> bool:
        return owner is not None and Path(card_dir).is_relative_to(self.owner_catalog(owner))

    def _locate(self, spec: str, owner: str | None):
        try:
            try:
                return self.zoo_for(owner)._locate(spec)
            except UnknownModelError:
                # clustered: a model another replica registered a moment ago is looked for at once
                if not self._pull_owner_cards(owner, force=True):
                    raise
                return self.zoo_for(owner)._locate(spec)
        except UnknownModelError as exc:
            msg = re.sub(r" \(`posezoo zoo list`[^)]*\)", "", str(exc))
            raise UnknownModelError(f"{msg} (GET /v1/models lists the models)", exc.suggestions) from None

    def check_model(self, spec: str | None, owner: str | None = None, options: JobOptions | None = None) -> str:
        """``name@version`` of the model a job asks for; refuses unknown or unusable ones, and
        top-down options (``max_individuals``...) for a model that is not top-down."""
        spec = spec or self.settings.model_default
        card, _ = self._served_card(spec, owner)
        if not self.zoo_for(owner).ready(card):
            raise ArtefactNotPublishedError(f"{card.ref}: the ONNX artefact of this model (or of its detector) is not "
                                            "published yet; choose a model that /v1/models marks as ready")
        if card.task not in ("single_animal", "top_down"):
            raise ZooError(f"{card.ref}: a {card.task} model finds boxes, not poses; choose a pose model")
        if options is not None and card.task != "top_down":
            given = [k for k in TOP_DOWN_OPTIONS if getattr(options, k) is not None]
            if given:
                raise InputError(f"{', '.join(given)}: only top-down (multi-animal) models take these options; "
                                 f"{card.ref} is a single-animal model")
        return card.ref

    def predictor(self, spec: str, owner: str | None = None):
        """A cached :class:`~posezoo.predictor.PosePredictor` (loaded once per model)."""
        from posezoo.predictor import PosePredictor

        ref = self.check_model(spec, owner)
        zoo = self.zoo_for(owner)
        card_dir = zoo._locate(ref)[1]
        if self._own(owner, card_dir):
            ref = f"{ref}#{card_dir}"  # cache key: another key may have a model of the same name@version
        with self._lock:
            p = self._predictors.get(ref)
            if p is not None:
                return p
            lock = self._predictor_locks.setdefault(ref, threading.Lock())
        with lock:
            with self._lock:
                p = self._predictors.get(ref)
            if p is None:
                r = zoo.resolve(ref.split("#", 1)[0])
                if r.card.task == "top_down":  # detector + crops
                    from posezoo.topdown import load_top_down

                    p = load_top_down(r, zoo, device=self.settings.device, threads=self.settings.ort_threads)
                else:
                    p = PosePredictor(r.card, r.path, device=self.settings.device, threads=self.settings.ort_threads,
                                      source=r.source, sha256=r.card.artefact.sha256)
                with self._lock:
                    self._predictors[ref] = p
        return p

    def models(self, owner: str | None = None) -> list[dict]:
        allowed = self.settings.allowed_models

        def entry(c, **extra) -> dict:
            return {"name": c.name, "version": c.version, "ref": c.ref, "species": c.species, "task": c.task,
                    "view": c.view, "speed": c.speed, "priority": c.priority, "keypoints": c.keypoints,
                    "aliases": c.aliases, **extra}

        out = []
        own = set()
        self._pull_owner_cards(owner)
        if owner is not None and self.owner_catalog(owner).is_dir():
            from posezoo.zoo import Zoo

            mine = Zoo([self.owner_catalog(owner)], include_bundled=False).cards(all_versions=True)
            own = {c.ref for c in mine}
            out += [entry(c, ready=c.artefact.published, default=False, owner=owner,
                          metrics=(c.metrics or {}).get("test", {}).get("overall")) for c in mine]
        zoo, default = self.zoo_for(owner), self._default_ref()  # once, not per card
        for c in self.zoo.cards():
            if allowed is not None and c.name not in allowed and c.ref not in allowed:
                continue
            if c.ref in own:
                continue
            out.append(entry(c, ready=c.task != "detector" and zoo.ready(c), default=c.ref == default))
        return out

    def _default_ref(self) -> str | None:
        try:
            return self.zoo.card(self.settings.model_default).ref
        except PosezooError:
            return None

    def card(self, spec: str, owner: str | None = None) -> dict:
        return self._served_card(spec, owner)[0].model_dump(mode="json", exclude_none=True)

    def _served_card(self, spec: str, owner: str | None):
        """The card (and its directory) of a model this server serves to ``owner``: a zoo
        name, never a path on the server's disk, allowed by configuration or the owner's own."""
        if spec.endswith((".yaml", ".yml")) or "/" in spec:
            raise UnknownModelError(f"unknown model {spec!r}: name a zoo model (GET /v1/models lists them)")
        card, card_dir = self._locate(spec, owner)
        allowed = self.settings.allowed_models
        if allowed is not None and card.name not in allowed and card.ref not in allowed and not self._own(owner, card_dir):
            raise UnknownModelError(f"model {spec!r} is not served here; available: {', '.join(allowed)}")
        return card, card_dir

    # -- admission --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.settings.workers + self.settings.queue_size

    def reserve(self, owner: str, kind: str = "video") -> Reservation:
        """Take a queue slot (429 when none is left, or when ``owner`` holds its whole share)
        and a job id."""
        if self._stopping.is_set():
            raise QueueFullError("the server is shutting down", self.settings.retry_after_s)
        if self.clustered:
            return self._reserve_shared(owner, kind)
        with self._lock:
            if kind == "finetune":
                if self._ft_active >= 1 + self.settings.finetune_queue_size:
                    self._metrics.rejected.labels("queue_full").inc()
                    raise QueueFullError(
                        f"a fine-tune job is running and the fine-tune queue of {self.settings.finetune_queue_size} "
                        f"is full; try again later", max(self.settings.retry_after_s, 30))
                self._ft_active += 1
                return Reservation(uuid.uuid4().hex, owner, kind=kind)
            share = self.settings.key_share
            if self._per_owner[owner] >= share:
                self._metrics.rejected.labels("key_share").inc()
                raise QueueFullError(
                    f"this API key already has {self._per_owner[owner]} job(s) uploading, queued or running, its "
                    f"share of this server's queue ({share}); try again when one has finished",
                    self.settings.retry_after_s)
            if self._active >= self.capacity:
                self._metrics.rejected.labels("queue_full").inc()
                raise QueueFullError(f"{self._load_line()}; try again in {self.settings.retry_after_s} s",
                                     self.settings.retry_after_s)
            self._active += 1
            self._per_owner[owner] += 1
        return Reservation(uuid.uuid4().hex, owner)

    def _reserve_shared(self, owner: str, kind: str) -> Reservation:
        """Clustered admission: the limits count the jobs of every replica. The slot is an
        ``uploading`` record (its id is the job's), kept alive by this replica's heartbeat and
        failed by any replica if this one dies mid-upload."""
        s = self.settings
        res = Reservation(uuid.uuid4().hex, owner, kind=kind)
        placeholder = JobRecord(id=res.job_id, owner=owner, kind=kind, status="uploading",  # type: ignore[arg-type]
                                options=JobOptions(), model="", source={"kind": "upload"},
                                progress=Progress(stage="uploading"))
        if kind == "finetune":
            ok, why, n = self.store.admit(placeholder, waiting_limit=1 + s.finetune_queue_size, owner_limit=1 << 30,
                                          kinds=["finetune"])
        else:
            ok, why, n = self.store.admit(placeholder, waiting_limit=s.workers + s.queue_size,
                                          owner_limit=s.key_share, kinds=["video"])
        if not ok:
            self._metrics.rejected.labels(why or "queue_full").inc()
            if why == "key_share":
                raise QueueFullError(
                    f"this API key already has {n} job(s) uploading, queued or running on this service, its share "
                    f"of the queue ({s.key_share}); try again when one has finished", s.retry_after_s)
            what = "fine-tune" if kind == "finetune" else "video"
            raise QueueFullError(f"the queue is full: {n} {what} job(s) are waiting (uploading or queued) across the "
                                 f"service's replicas; try again in {s.retry_after_s} s",
                                 max(s.retry_after_s, 30) if kind == "finetune" else s.retry_after_s)
        with self._lock:
            self._uploading.add(res.job_id)
        return res

    def _load_line(self) -> str:
        """What fills the queue, for a 429 (called with ``_lock`` held)."""
        video = [r for r in self._live.values() if r.kind != "finetune"]
        running = sum(1 for r in video if r.status == "running")
        queued = sum(1 for r in video if r.status == "queued")
        uploading = self._active - running - queued
        return (f"the queue is full: {running} job(s) running on {self.settings.workers} worker(s), {queued} queued "
                f"and {uploading} upload(s) in progress take all {self.capacity} slots")

    def release(self, res: Reservation) -> None:
        """Give back a reservation whose job was never queued (and remove its upload)."""
        if res.released:
            return
        res.released = True
        with self._lock:
            if self.clustered:  # the slot is the uploading record, deleted below
                self._uploading.discard(res.job_id)
            elif res.kind == "finetune":
                self._ft_active -= 1
            else:
                self._active -= 1
                self._per_owner[res.owner] -= 1
        self._cleanup_inputs(res.job_id)
        rec = self.store.get(res.job_id)
        if rec is not None and rec.status == "uploading":
            self.store.delete(res.job_id)

    def upload_path(self, res: Reservation, filename: str | None) -> Path:
        suffix = Path(filename or "").suffix.lower()
        d = self.uploads / res.job_id
        d.mkdir(parents=True, exist_ok=True)
        return d / f"input{suffix if suffix in VIDEO_SUFFIXES else '.video'}"

    def begin_upload(self, res: Reservation, options: JobOptions, model: str,
                     finetune: FinetuneOptions | None = None) -> None:
        """Record the job as ``uploading`` (so a crash mid-upload leaves a failed job, not nothing)."""
        self.store.put(JobRecord(id=res.job_id, owner=res.owner, status="uploading", options=options, model=model,
                                 kind=res.kind, finetune=finetune,  # type: ignore[arg-type]
                                 source={"kind": "upload"}, progress=Progress(stage="uploading")))

    def submit_upload(self, res: Reservation, options: JobOptions, path: Path, filename: str | None,
                      nbytes: int) -> JobRecord:
        """Validate an uploaded video and queue its job (422 for a file that is not a good video)."""
        model = self.check_model(options.model, res.owner, options)
        if nbytes == 0:
            raise VideoError(f"{filename or 'the upload'}: file is empty (0 bytes)")
        try:
            info = validate_video(path, max_pixels=self.settings.max_video_pixels,
                                  allow_truncated=options.allow_truncated)
        except (VideoError, SourceError) as exc:
            text = str(exc).replace(str(path.parent) + "/", "").replace(path.name, filename or "upload")
            if isinstance(exc, SourceError):
                raise SourceError(text, exc.status, exc.code) from None
            raise type(exc)(text, *([exc.frames_read] if isinstance(exc, TruncatedVideoError) else [])) from None
        self._check_length(info)
        rec = JobRecord(id=res.job_id, owner=res.owner, options=options, model=model,
                        source={"kind": "upload", "filename": filename or "upload", "bytes": nbytes},
                        input_path=str(path), n_frames=info["n_frames"] or None,
                        progress=Progress(stage="queued", frames_total=info["n_frames"] or None))
        if info["truncated"]:
            rec.notes.append("the video looks cut short; allow_truncated is on, so the frames that decode are kept")
        self._metrics.upload_bytes.inc(nbytes)
        return self._enqueue(res, rec)

    def submit_uri(self, res: Reservation, options: JobOptions, uri: str) -> JobRecord:
        """Queue a job on an ``s3://`` (or allowed ``https://``) source, checked now."""
        model = self.check_model(options.model, res.owner, options)
        uri = normalise_source_uri(uri)  # what is checked below is exactly what the worker fetches
        if self.results.in_s3 and self.results.holds(uri):
            raise SourceError("s3:// sources may not name the server's results", status=403, code="forbidden_source")
        source = self.sources.describe(uri)
        rec = JobRecord(id=res.job_id, owner=res.owner, options=options, model=model, source=source)
        if source["kind"] == "https":
            self._secret_uris[rec.id] = uri  # never stored: it may carry a token
        return self._enqueue(res, rec)

    # -- fine-tune jobs ---------------------------------------------------------------------
    def finetune_unavailable(self) -> str | None:
        """Why this server cannot run fine-tune jobs, or ``None`` (no PyTorch import)."""
        from .finetune import unavailable_reason

        return unavailable_reason(self.settings)

    def finetune_upload_path(self, res: Reservation) -> Path:
        d = self.uploads / res.job_id
        d.mkdir(parents=True, exist_ok=True)
        return d / "labelled.zip"

    def submit_finetune(self, res: Reservation, options: FinetuneOptions, zip_path: Path, filename: str | None,
                        nbytes: int) -> JobRecord:
        """Extract (safely) and validate an uploaded labelled-data zip, then queue its fine-tune job.
        Anything wrong with the archive or the data is a 4xx now, naming the file and row."""
        from .archive import extract_zip
        from .finetune import check_target, default_name, plan, zip_limits
        from .uploads import UploadError

        if nbytes == 0:
            raise UploadError(f"{filename or 'the upload'} is empty (0 bytes)", 422, "invalid_archive")
        base = self.check_model(options.base_model, res.owner)
        zoo = self.zoo_for(res.owner)
        card = zoo.card(base)
        if card.task == "detector":
            raise InputError(f"{card.ref} is a detector; fine-tune jobs train pose models: choose a pose model "
                             "(single-animal or top-down) as base_model")
        root = zip_path.parent / "labelled"
        shutil.rmtree(root, ignore_errors=True)
        extracted = extract_zip(zip_path, root, zip_limits(self.settings))
        zip_path.unlink(missing_ok=True)  # the extracted folder is what a restart resumes from
        p = plan(root, options, card, self.settings)
        check_target(zoo, options.name or default_name(card), options.version)
        rec = JobRecord(id=res.job_id, owner=res.owner, kind="finetune", options=JobOptions(), finetune=options,
                        model=base, input_path=str(root),
                        source={"kind": "upload", "filename": filename or "labelled.zip", "bytes": nbytes,
                                "files": extracted.files, "label_file": p.label_file, "frames": p.frames,
                                "train_frames": p.train_frames, "test_frames": len(p.test_frames), "init": p.init,
                                "steps": p.steps, "batch_size": p.batch_size},
                        progress=Progress(stage="queued", step=0, steps_total=p.steps))
        self._metrics.upload_bytes.inc(nbytes)
        return self._enqueue(res, rec)

    def forget_owner_zoo(self, owner: str) -> None:
        """After a key's catalog changed: its zoo is re-read at the next use."""
        with self._lock:
            self._owner_zoos.pop(owner, None)

    def _check_length(self, info: dict) -> None:
        mf = self.settings.max_frames
        if mf and info.get("n_frames") and info["n_frames"] > mf:
            raise SourceError(f"the video has {info['n_frames']} frames, over this server's limit of {mf}",
                              status=413, code="too_large")

    def _enqueue(self, res: Reservation, rec: JobRecord) -> JobRecord:
        """Queue a validated job. Clustered, its input goes to S3 first (any replica may run
        it) and some replica's worker claims it from the store; else this process's queue."""
        rec.status = "queued"
        rec.progress.stage = "queued"
        kind = "finetune" if rec.kind == "finetune" else "video"
        if self.clustered and rec.input_path and not rec.input_path.startswith("s3://"):
            rec.input_path = self.shared.put_input(rec.id, Path(rec.input_path))
            self._cleanup_inputs_local(rec.id)
        self.store.put(rec)
        with self._lock:
            res.released = True  # the slot now belongs to the queued job
            if self.clustered:
                self._uploading.discard(res.job_id)
            else:
                self._live[rec.id] = rec
                self._cancel[rec.id] = threading.Event()
        if self.clustered:
            self._wake[kind].set()
        else:
            (self._ft_queue if kind == "finetune" else self._queue).put(rec.id)
        self._metrics.submitted.labels(kind if kind == "finetune" else rec.source.get("kind", "?")).inc()
        log.info("job %s queued (owner %s, model %s, source %s)", rec.id, rec.owner, rec.model, rec.source.get("kind"))
        return rec

    # -- queries ----------------------------------------------------------------------------
    def get(self, job_id: str, owner: str) -> JobRecord:
        """The job (live progress included); another owner's job is 'not found'."""
        with self._lock:
            rec = self._live.get(job_id)
            rec = rec.model_copy(deep=True) if rec is not None else None
        if rec is None:
            rec = self.store.get(job_id)
        if rec is None or rec.owner != owner or rec.status == "uploading":
            raise JobNotFoundError(f"no job {job_id!r} (for this API key)")
        return rec

    def list(self, owner: str, limit: int = 100) -> list[JobRecord]:
        recs = self.store.list(owner=owner, limit=limit)
        with self._lock:
            return [self._live[r.id].model_copy(deep=True) if r.id in self._live else r
                    for r in recs if r.status != "uploading"]

    def cancel(self, job_id: str, owner: str) -> JobRecord:
        """Cancel an active job, or delete a finished one with its results."""
        rec = self.get(job_id, owner)
        if rec.terminal:
            self.results.delete(rec.id, rec.results)
            self.store.delete(rec.id)
            rec.notes.append("deleted")
            return rec
        if self.clustered:  # whichever replica holds it: queued ones end now, running ones at their next heartbeat
            if self.store.cancel(job_id) == "cancelled":
                self._cleanup_inputs(job_id)
                self._metrics.finished.labels("cancelled").inc()
            self._on_cancel(job_id)  # held here: at once
            return self.get(job_id, owner)
        with self._lock:
            ev = self._cancel.get(job_id)
            live = self._live.get(job_id)
            if ev is not None:
                ev.set()
            if live is not None and live.status == "queued":  # never started: cancelled at once
                live.status, live.finished_at = "cancelled", time.time()
                live.error = {"error": "cancelled", "detail": "cancelled before it started"}
                live.progress.stage = "done"
                self.store.put(live)
                self._metrics.finished.labels("cancelled").inc()
        return self.get(job_id, owner)

    def result(self, job_id: str, owner: str, kind: str) -> tuple[JobRecord, ResultFile]:
        rec = self.get(job_id, owner)
        if rec.status != "succeeded":
            raise SourceError(f"job {job_id} is {rec.status}: no results" +
                              (f" ({rec.error['detail']})" if rec.error else ""), status=409, code="not_ready")
        rf = rec.results.get(kind)
        if rf is None:
            raise SourceError(f"job {job_id} has no {kind!r} result; it has {', '.join(rec.results)}",
                              status=404, code="not_found")
        return rec, rf

    def stats(self, cluster: bool = False) -> dict:
        """This server's load (``running``/``queued`` are its own); with ``cluster`` and a
        database, also the jobs of every replica (``cluster``, None while it is unreachable)."""
        out = self._local_stats()
        if cluster and self.clustered:
            from .pg_store import StoreUnavailable

            try:
                out["cluster"] = {st: self.store.count([st]) for st in ("uploading", "queued", "running")}
            except StoreUnavailable:
                out["cluster"] = None
        return out

    def _local_stats(self) -> dict:
        with self._lock:
            video = [r for r in self._live.values() if r.kind != "finetune"]
            ft = [r for r in self._live.values() if r.kind == "finetune"]
            running = sum(1 for r in video if r.status == "running")
            queued = sum(1 for r in video if r.status == "queued")
            ft_running = sum(1 for r in ft if r.status == "running")
            ft_queued = sum(1 for r in ft if r.status == "queued")
            return {"replica": self.replica, "store": "postgresql" if self.clustered else "sqlite",
                    "workers": self.settings.workers, "queue_size": self.settings.queue_size,
                    "running": running, "queued": queued,
                    "reserved": len(self._uploading) if self.clustered else self._active - running - queued,
                    "finetune": {"workers": 1, "queue_size": self.settings.finetune_queue_size,
                                 "running": ft_running, "queued": ft_queued}}

    def metrics_text(self) -> str:
        s = self.stats()
        self._metrics.running.set(s["running"])
        self._metrics.queued.set(s["queued"])
        return self._metrics.text()

    # -- images -----------------------------------------------------------------------------
    def take_image_slot(self) -> None:
        """One of ``IMAGE_CONCURRENCY`` slots for an image request, taken before its body is
        read (bodies and decoded images of unbounded numbers of requests would add up);
        waits up to ``IMAGE_WAIT_S``, then 429. Give it back with :meth:`give_image_slot`."""
        if not self._image_slots.acquire(timeout=self.settings.image_wait_s):
            self._metrics.rejected.labels("images_busy").inc()
            raise QueueFullError(f"all {self.settings.image_concurrency} image prediction slot(s) are busy; "
                                 f"try again in {self.settings.retry_after_s} s", self.settings.retry_after_s)

    def give_image_slot(self) -> None:
        self._image_slots.release()

    def predict_image(self, data: bytes, model: str | None, owner: str | None = None) -> dict:
        """Keypoints of one encoded image. Its size is read from the header first: more than
        ``MAX_IMAGE_PIXELS`` is refused before any decoding, and the pixels decoding at once are
        bounded by the same number (a 1 MB PNG can decode to 1.2 GB)."""
        import cv2
        import numpy as np

        if not data:
            raise VideoError("the image is empty (0 bytes)")
        width, height = check_image_size(data, self.settings.max_image_pixels)
        pixels = width * height
        p = self.predictor(model or self.settings.model_default, owner)
        if not self._image_pixels.acquire(pixels, timeout=self.settings.image_wait_s):
            raise QueueFullError("the server is decoding other large images; try again in "
                                 f"{self.settings.retry_after_s} s", self.settings.retry_after_s)
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                raise VideoError("not a readable image (PNG, JPEG, BMP, TIFF or WebP expected)")
            if img.shape[0] * img.shape[1] > pixels:  # the decoder disagrees with the header
                raise VideoError("the image decodes larger than its header says")
            t0 = time.perf_counter()
            poses = p.predict_images(img, colour_order="BGR")[0]  # (n_individuals, n_keypoints, 3)
            dt = time.perf_counter() - t0
            del img
        finally:
            self._image_pixels.release(pixels)

        def keypoints(kp) -> list[dict]:
            return [{"name": n, "x": _num(x), "y": _num(y), "likelihood": _num(lk)}
                    for n, (x, y, lk) in zip(p.keypoints, kp.tolist())]

        doc = {"model": p.card.ref, "width": width, "height": height, "keypoints": keypoints(poses[0]),
               "pcutoff": p.card.pcutoff, "inference_s": round(dt, 4)}
        if p.card.task == "top_down":  # every animal found (best detection first); "keypoints" is the first
            found = [i for i in range(len(poses)) if np.isfinite(poses[i, :, 2]).any()]
            doc["individuals"] = [{"name": f"animal{i}", "keypoints": keypoints(poses[i])} for i in found]
        return doc

    # -- the worker -------------------------------------------------------------------------
    def _worker(self, jobs: "queue.Queue[str | None] | None" = None, kind: str = "video") -> None:
        jobs = jobs if jobs is not None else self._queue
        while True:
            job_id = jobs.get()
            if job_id is None or self._stopping.is_set():
                return
            self._run_in_worker(job_id, release=lambda rec: self._release_slot(kind, rec))

    def _release_slot(self, kind: str, rec: JobRecord | None) -> None:
        """Give back the queue slot a finished job held (called with the lock held)."""
        if kind == "finetune":
            self._ft_active -= 1
        else:
            self._active -= 1
            if rec is not None:
                self._per_owner[rec.owner] -= 1

    def _run_in_worker(self, job_id: str, release=None) -> None:
        """Run one job on this worker thread, which no error may kill, then forget this server's
        in-memory state of it; ``release(record)`` runs under the same lock (slot bookkeeping)."""
        try:
            self._run(job_id)
        except BaseException:
            log.error("job %s: unexpected error in the worker", job_id, exc_info=True)
        finally:
            with self._lock:
                rec = self._live.pop(job_id, None)
                self._cancel.pop(job_id, None)
                self._secret_uris.pop(job_id, None)
                self._lost.discard(job_id)
                if release is not None:
                    release(rec)

    def _run(self, job_id: str) -> None:
        with self._lock:
            rec = self._live.get(job_id)
            cancel = self._cancel.get(job_id) or threading.Event()
        if rec is None:
            return
        if cancel.is_set() or rec.status == "cancelled":
            if rec.status != "cancelled":
                self._finish(rec, "cancelled", {"error": "cancelled", "detail": "cancelled before it started"})
            self._cleanup_inputs(job_id)
            return
        work = self.work / job_id
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if not self.clustered:  # clustered, the claim made it running (with the attempt and the replica)
            rec.status, rec.started_at, rec.attempts = "running", time.time(), rec.attempts + 1
            rec.replica = self.replica
        rec.error = None
        self._save(rec)
        tracker = _Tracker(self, rec, cancel)
        keep_input = False
        try:
            if rec.kind == "finetune":
                from .finetune import run_job

                results = run_job(self, rec, work, tracker)
            else:
                results = self._pipeline(rec, work, tracker)
            rec.results = results
            self._finish(rec, "succeeded", None)
        except _Interrupted:
            if job_id in self._lost:  # another replica runs it now: its input and record are not ours
                keep_input = True
            elif self._stopping.is_set():
                rec.status = "queued"
                rec.progress = Progress(stage="queued")
                rec.notes.append("interrupted by a server shutdown; it runs again at the next start" if not
                                 self.clustered else f"interrupted by the shutdown of replica {self.replica}; "
                                                     "another replica runs it")
                self._save(rec, must=True)
                keep_input = True
            else:
                self._finish(rec, "cancelled", {"error": "cancelled", "detail": "cancelled by the user"})
        except PosezooError as exc:
            _, code = error_code(exc)
            self._finish(rec, "failed", {"error": code, "detail": one_line(self._scrub(str(exc), rec))})
        except Exception as exc:
            log.error("job %s failed", job_id, exc_info=True)  # the traceback keeps its lines (see service.process)
            detail = one_line(self._scrub(f"{type(exc).__name__}: {exc}", rec), 200)
            self._finish(rec, "failed", {"error": "internal_error",
                                         "detail": f"internal error ({detail}); the server log has the details"})
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if not keep_input and job_id not in self._lost:
                self._cleanup_inputs(job_id)

    def _public_metadata(self, meta: dict, rec: JobRecord, video: Path) -> dict:
        """A result's metadata without this server's paths: the model's source says where it
        came from (``local:<file>``, ``hf://…``, ``s3://…``), not where it lies on disk."""
        import json

        meta = json.loads(json.dumps(meta, default=str))  # a deep copy, plain JSON types
        more = (video.parent, self.zoo.cache_dir, *getattr(self.zoo, "catalogs", []))

        def clean(value):
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            if isinstance(value, str):
                if value.startswith(("local:/", "file:/")):  # a model's or detector's source on this disk
                    scheme, path = value.split(":", 1)
                    return f"{scheme}:{Path(path).name}"
                return self._scrub(value, rec, more)
            return value

        return clean(meta)

    def _scrub(self, text: str, rec: JobRecord, more: tuple = ()) -> str:
        """Text without server paths: the job's scratch and upload folders, the data directory
        and ``more`` folders, longest first."""
        folders = {self.work / rec.id, self.uploads / rec.id, self.root, *map(Path, more)}
        for p in sorted((str(f) + "/" for f in folders), key=len, reverse=True):
            text = text.replace(p, "")
        return text

    def _finish(self, rec: JobRecord, status: str, error: dict | None) -> None:
        rec.status, rec.error, rec.finished_at = status, error, time.time()  # type: ignore[assignment]
        if status == "succeeded":
            rec.progress.stage, rec.progress.fraction, rec.progress.eta_s = "done", 1.0, 0.0
        else:
            rec.progress.eta_s = None
        if not self._save(rec, must=True):
            log.warning("job %s: its end (%s) was not recorded here: another replica holds it", rec.id, status)
            return
        self._metrics.finished.labels(status).inc()
        if rec.started_at and rec.kind != "finetune":
            self._metrics.duration.observe(rec.finished_at - rec.started_at)
        log.info("job %s %s%s", rec.id, status, f": {error['detail']}" if error else "")

    def _cleanup_inputs(self, job_id: str) -> None:
        self._cleanup_inputs_local(job_id)
        if self.shared is not None:
            self.shared.delete_inputs(job_id)

    def _cleanup_inputs_local(self, job_id: str) -> None:
        shutil.rmtree(self.uploads / job_id, ignore_errors=True)

    def _pipeline(self, rec: JobRecord, work: Path, tracker: "_Tracker") -> dict[str, ResultFile]:
        from posezoo.dlc import output_stem
        from posezoo.render import render_labeled_video

        opts = rec.options
        src = rec.source
        if src["kind"] == "upload":
            video = self.job_input(rec, work)
            if not video.is_file():
                raise VideoError("the uploaded video is missing on the server")
        else:
            tracker.stage("fetching")
            suffix = Path(src.get("filename", "")).suffix.lower()
            video = work / f"input{suffix if suffix in VIDEO_SUFFIXES else '.video'}"
            self.sources.fetch(src, self._secret_uris.get(rec.id), video)
            tracker.check()
            info = validate_video(video, max_pixels=self.settings.max_video_pixels,
                                  allow_truncated=opts.allow_truncated)
            self._check_length(info)
            rec.n_frames = info["n_frames"] or None
        predictor = self.predictor(rec.model, rec.owner)
        tracker.start(rec.n_frames or 0, 2 if opts.labeled_video else 1)
        tracker.stage("predicting")
        top_down = {} if predictor.card.task != "top_down" else {
            "max_individuals": opts.max_individuals, "detector_every": opts.detector_every or 1,
            "bbox_threshold": opts.bbox_threshold}
        table = predictor.predict_video(
            video, batch_size=opts.batch_size, progress=tracker.frames, filter=opts.filter,
            filter_window=opts.filter_window, allow_truncated=opts.allow_truncated, **top_down,
        )
        tracker.check()
        rec.n_frames = table.n_frames
        self._metrics.frames.inc(table.n_frames)
        name = Path(src.get("filename") or "video").stem or "video"
        meta = self._public_metadata(table.metadata, rec, video)
        from posezoo.predictor import fit_warning

        warning = fit_warning(predictor.card, meta.get("fit", {}), self.zoo_for(rec.owner))
        if warning:  # the job still succeeds: the user decides
            meta["fit"]["warning"] = warning
            rec.notes.append(f"warning: {warning}")
        meta["video"] = {**meta.get("video", {}), "path": src.get("filename") or src.get("uri")}
        meta["job"] = {"id": rec.id, "model": rec.model, "options": opts.model_dump(mode="json"),
                       "source": src, "created_at": rec.created_at, "attempts": rec.attempts}
        table = table.with_metadata(**meta)
        tracker.stage("writing")
        out = work / "out"
        stem = output_stem(name, table.scorer)  # DeepLabCut's <video><scorer>
        # no _meta.pickle: a client must never be handed a pickle to load (the CLI writes its own)
        paths = table.save(out, opts.formats, stem=stem, dlc_meta=False)
        files: dict[str, Path] = {k: v for k, v in paths.items() if k != "meta"}
        if opts.labeled_video:
            tracker.stage("rendering")
            pcut = opts.pcutoff if opts.pcutoff is not None else predictor.card.pcutoff
            files["video"] = render_labeled_video(
                video, table, out / f"{stem}_labeled.mp4", skeleton=predictor.card.skeleton, pcutoff=pcut,
                trail_length=opts.trail, progress=tracker.render_frames, draw_boxes=bool(opts.draw_boxes),
            )
        files["meta"] = paths["meta"]
        tracker.stage("storing")
        return self.results.store(rec.id, files)


def _lock_data_dir(root: Path):
    """Hold an exclusive lock on the data directory for the life of the process: two servers
    sharing one job store would run the same jobs twice."""
    import fcntl

    f = open(root / "server.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        raise DataDirInUseError(f"{root} is in use by another posezoo server (pid {other}); "
                                "give each server its own POSEZOO_SERVICE_DATA_DIR") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def check_data_dir_free(data_dir: Path) -> None:
    """Raise :class:`DataDirInUseError` when another server holds ``data_dir`` (the lock is
    taken and given back at once). The service checks this in ``bentoml serve``'s own
    process, before it starts a worker, so a second server exits instead of respawning
    workers that cannot start."""
    root = Path(data_dir).resolve()
    if (root / "server.lock").exists():
        _lock_data_dir(root).close()


def check_image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """``(width, height)`` of an encoded image, read from its header alone (Pillow reads
    the header lazily; no pixel is decoded).

    Raises
    ------
    VideoError
        Not an image.
    SourceError
        413: more than ``max_pixels`` pixels (``MAX_IMAGE_PIXELS``).
    """
    import io

    from PIL import Image, UnidentifiedImageError

    def too_large(size: str) -> SourceError:
        return SourceError(f"the image is {size}, over this server's limit of {max_pixels / 1e6:.1f} MP "
                           "(MAX_IMAGE_PIXELS)", status=413, code="too_large")

    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = int(im.width), int(im.height)
    except Image.DecompressionBombError:  # Pillow's own cap, far above ours
        raise too_large(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise VideoError(f"not a readable image (PNG, JPEG, BMP, TIFF or WebP expected): {exc}") from None
    if width * height > max_pixels:
        raise too_large(f"{width}x{height} ({width * height / 1e6:.1f} MP)")
    return width, height


class _Budget:
    """A counting semaphore over an amount (here: pixels being decoded). A request larger
    than the whole budget still runs, alone."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, amount: int, timeout: float) -> bool:
        amount = min(amount, self.total)
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + amount <= self.total, timeout=timeout):
                return False
            self.used += amount
            return True

    def release(self, amount: int) -> None:
        with self._cond:
            self.used -= min(amount, self.total)
            self._cond.notify_all()


def one_line(text: str, limit: int = 300) -> str:
    """An error detail as the API promises it: one line, no traceback, at most ``limit``
    characters (HDF5 and FFmpeg append multi-line error stacks to their messages)."""
    first = ""
    for line in str(text).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "HDF5-DIAG")):
            first = line
            break
    first = "".join(c if c.isprintable() else " " for c in first)
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _num(v: float) -> float | None:
    return None if v != v else round(float(v), 3)


class _Tracker:
    """Progress of one running job: in memory at every batch, in the store every second."""

    def __init__(self, manager: JobManager, rec: JobRecord, cancel: threading.Event):
        self.m = manager
        self.rec = rec
        self.cancel = cancel
        self.t0 = time.perf_counter()
        self.total_units = 0
        self.passes = 1
        self.done_before = 0  # units of finished passes
        self.stage_t0 = self.t0
        self.last_save = 0.0

    def check(self) -> None:
        if self.cancel.is_set():
            raise _Interrupted()

    def start(self, n_frames: int, passes: int) -> None:
        self.passes = passes
        self.total_units = n_frames * passes
        self.t0 = time.perf_counter()

    def stage(self, name: str) -> None:
        self.check()
        p = self.rec.progress
        if name == "rendering":
            self.done_before = self.rec.n_frames or p.frames_done
        p.stage = name
        if name in ("predicting", "rendering"):
            p.frames_done, p.fps = 0, None
            p.frames_total = self.rec.n_frames
            self.stage_t0 = time.perf_counter()
        self._save(force=True)

    def _update(self, done: int, total: int) -> None:
        self.check()
        p = self.rec.progress
        now = time.perf_counter()
        p.frames_done, p.frames_total = done, max(total, done) or None
        dt = now - self.stage_t0
        p.fps = round(done / dt, 2) if dt > 0 and done else None
        units_total = max(self.total_units, (p.frames_total or 0) * self.passes, 1)
        units_done = self.done_before + done
        p.fraction = round(min(units_done / units_total, 1.0), 4)
        elapsed = now - self.t0
        rate = units_done / elapsed if elapsed > 0 else 0
        p.eta_s = round((units_total - units_done) / rate, 1) if rate > 0 else None
        self._save()

    def frames(self, done: int, total: int) -> None:
        self._update(done, total)

    def render_frames(self, done: int, total: int) -> None:
        self._update(done, total or (self.rec.n_frames or done))

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_save >= 1.0:
            self.last_save = now
            self.m._save(self.rec)


class _Series:
    """One counter or gauge of :class:`_Metrics`, with optional labels (thread-safe)."""

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...] = ()):
        self.kind, self.name, self.doc, self.label_names = kind, name, doc, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}
        self._lock = threading.Lock()
        self._key: tuple[str, ...] = ()

    def labels(self, *values: str) -> "_Series":
        child = _Series.__new__(_Series)
        child.__dict__.update(self.__dict__)
        child._key = tuple(str(v) for v in values)
        return child

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self.values[self._key] = self.values.get(self._key, 0.0) + amount

    def set(self, value: float) -> None:
        with self._lock:
            self.values[self._key] = float(value)


class _Histogram:
    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.buckets = name, doc, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        import bisect

        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value


class _Metrics:
    """Prometheus metrics of the job system, kept in this process's memory.

    Not prometheus_client's Counter/Gauge: under BentoML those write to its shared
    multiprocess directory, whose collector then reported every family twice (once from
    the files, once from us) and summed in other servers' values. A collector over plain
    numbers is emitted exactly once, by ``__metrics__``, for this server only.
    """

    def __init__(self):
        self.submitted = _Series("counter", "posezoo_jobs_submitted", "Jobs queued", ("source",))
        self.finished = _Series("counter", "posezoo_jobs_finished", "Jobs ended, by status", ("status",))
        self.rejected = _Series("counter", "posezoo_jobs_rejected", "Requests refused for load", ("reason",))
        self.running = _Series("gauge", "posezoo_jobs_running", "Jobs running now")
        self.queued = _Series("gauge", "posezoo_jobs_queued", "Jobs waiting for a worker")
        self.frames = _Series("counter", "posezoo_frames_predicted", "Video frames predicted")
        self.upload_bytes = _Series("counter", "posezoo_upload_bytes", "Bytes of uploads accepted")
        self.duration = _Histogram("posezoo_job_duration_seconds", "Run time of a video job",
                                   (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200))
        self._series = (self.submitted, self.finished, self.rejected, self.running, self.queued, self.frames,
                        self.upload_bytes)

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for series in self._series:
            family = CounterMetricFamily if series.kind == "counter" else GaugeMetricFamily
            m = family(series.name, series.doc, labels=series.label_names)
            with series._lock:
                items = sorted(series.values.items())
            for key, value in items:
                m.add_metric(list(key), value)
            yield m
        h = self.duration
        with h._lock:
            counts, total = list(h.counts), h.sum
        cumulative, buckets = 0, []
        for le, n in zip([*map(str, h.buckets), "+Inf"], counts):
            cumulative += n
            buckets.append((le, cumulative))
        yield HistogramMetricFamily(h.name, h.doc, buckets=buckets, sum_value=total)

    def text(self) -> str:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry).decode()


__all__ = ["JobManager", "QueueFullError", "JobNotFoundError", "Reservation", "error_code", "validate_video",
           "split_s3_uri"]
