"""What replicas sharing one PostgreSQL job store and one S3 bucket need beyond the store
itself (:mod:`service.jobs.pg_store`): shared input bytes and model catalogs in S3, and the
keeper thread that renews this replica's leases.

Layout under ``RESULTS_S3_URI`` (``s3://bucket/prefix``)::

    <job>/...                         results (service.jobs.storage.ResultStore)
    uploads/<job>/input.<ext>         an uploaded video, until its job ends
    uploads/<job>/labelled/...        an uploaded fine-tune data set (extracted), until its job ends
    models/<key>/<name>/<version>/... fine-tuned ONNX and checkpoints (service.jobs.finetune)
    catalogs/<key>/<name>/<version>/card.yaml   their cards: every replica's zoo for <key>

An upload is received, checked and validated by the replica the client talks to (on its
local disk, as without a database), then copied to S3 before the job is queued: whichever
replica claims the job downloads it into its scratch directory.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .storage import split_s3_uri

log = logging.getLogger("posezoo.jobs")


class SharedFiles:
    """Uploads and fine-tuned model cards in the results bucket (see the module doc)."""

    def __init__(self, s3, results_s3_uri: str):
        from boto3.s3.transfer import TransferConfig

        self.s3 = s3
        self.bucket, prefix = split_s3_uri(results_s3_uri.rstrip("/") + "/")
        self.prefix = prefix.strip("/")
        self._transfer = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=4)
        self._synced: dict[str, float] = {}
        self._sync_lock = threading.Lock()

    def _key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    # -- job inputs -------------------------------------------------------------------------
    def put_input(self, job_id: str, path: Path) -> str:
        """Upload a job's input (a file, or a folder's files) and return its ``s3://`` URI."""
        path = Path(path)
        if path.is_dir():
            base = self._key("uploads", job_id, path.name)
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                self.s3.upload_file(str(f), self.bucket, f"{base}/{f.relative_to(path).as_posix()}",
                                    Config=self._transfer)
            return f"s3://{self.bucket}/{base}/"
        key = self._key("uploads", job_id, path.name)
        self.s3.upload_file(str(path), self.bucket, key, Config=self._transfer)
        return f"s3://{self.bucket}/{key}"

    def fetch_input(self, uri: str, dest_dir: Path) -> Path:
        """Download a job's input (``put_input``'s URI) into ``dest_dir``; returns the local
        file, or folder for a URI ending in ``/``."""
        bucket, key = split_s3_uri(uri)
        dest_dir.mkdir(parents=True, exist_ok=True)
        if not key.endswith("/"):
            dest = dest_dir / Path(key).name
            self.s3.download_file(bucket, key, str(dest), Config=self._transfer)
            return dest
        root = dest_dir / Path(key.rstrip("/")).name
        for obj in self._list(bucket, key):
            rel = obj["Key"][len(key):]
            if not rel or ".." in rel.split("/"):
                continue
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(bucket, obj["Key"], str(target), Config=self._transfer)
        if not root.is_dir():
            raise FileNotFoundError(f"{uri}: nothing there")
        return root

    def delete_inputs(self, job_id: str) -> None:
        """Remove everything uploaded for a job (best effort: S3 trouble is only logged)."""
        try:
            keys = [o["Key"] for o in self._list(self.bucket, self._key("uploads", job_id) + "/")]
            for i in range(0, len(keys), 1000):
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                                  "Quiet": True})
        except Exception as exc:  # the job's end must not fail on a cleanup
            log.warning("job %s: could not remove its uploaded input from S3: %s", job_id, exc)

    def _list(self, bucket: str, prefix: str):
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    # -- per-key catalogs -------------------------------------------------------------------
    def push_card(self, slug: str, card_path: Path) -> None:
        """Share a key's new model: its card goes to ``catalogs/<key>/<name>/<version>/``
        (the artefacts it names are in S3 already)."""
        rel = card_path.parent.relative_to(card_path.parent.parent.parent).as_posix()  # <name>/<version>
        self.s3.upload_file(str(card_path), self.bucket, self._key("catalogs", slug, rel, "card.yaml"))
        with self._sync_lock:
            self._synced.pop(slug, None)

    def pull_cards(self, slug: str, catalog: Path, max_age_s: float = 5.0) -> bool:
        """Bring a key's cards other replicas registered into its local ``catalog`` (at most
        every ``max_age_s`` seconds). Returns whether a card was added."""
        with self._sync_lock:
            if time.monotonic() - self._synced.get(slug, -1e9) < max_age_s:
                return False
            self._synced[slug] = time.monotonic()
        base = self._key("catalogs", slug) + "/"
        added = False
        for obj in self._list(self.bucket, base):
            rel = obj["Key"][len(base):]
            parts = rel.split("/")
            if len(parts) != 3 or parts[2] != "card.yaml" or any(p in ("", ".", "..") for p in parts):
                continue
            dest = catalog / parts[0] / parts[1] / "card.yaml"
            if dest.is_file():
                continue
            tmp = dest.parent.with_name(f".{parts[1]}.part")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.s3.download_file(self.bucket, obj["Key"], str(tmp / "card.yaml"))
            if dest.parent.exists():  # a local copy without its card: replace it
                shutil.rmtree(dest.parent, ignore_errors=True)
            tmp.replace(dest.parent)  # the card appears all at once
            added = True
        return added


class LeaseKeeper:
    """This replica's heartbeat: renews the leases of the jobs it runs, marks its uploads
    alive, passes cancel requests on, and expires other replicas' abandoned uploads.

    ``on_lost(job_id)`` is called when another replica took a job over (stop it, write
    nothing); ``on_cancel(job_id)`` when a user cancelled it through any replica.
    """

    def __init__(self, store, lease_s: float, running: Callable[[], list[str]], uploading: Callable[[], list[str]],
                 on_lost: Callable[[str], None], on_cancel: Callable[[str], None],
                 on_expired_uploads: Callable[[list[str]], None], tick_s: float = 1.0):
        self.store = store
        self.lease_s = lease_s
        self.running, self.uploading = running, uploading
        self.on_lost, self.on_cancel, self.on_expired_uploads = on_lost, on_cancel, on_expired_uploads
        # renewing at a third of the lease survives two missed rounds (a slow database, a GC pause)
        self.renew_every = max(min(lease_s / 3, 10.0), 0.5)
        self.tick_s = min(tick_s, self.renew_every)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="posezoo-lease-keeper", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        from .pg_store import StoreUnavailable

        last_renew = last_sweep = 0.0
        while not self._stop.wait(self.tick_s):
            try:
                running = self.running()
                now = time.monotonic()
                if now - last_renew >= self.renew_every or running:
                    # every tick while jobs run (cancel flags reach them within a second), else at the renew rate
                    held, cancel = self.store.heartbeat(running, self.uploading(), self.lease_s)
                    last_renew = now
                    for job_id in running:
                        if job_id not in held:
                            self.on_lost(job_id)
                        elif job_id in cancel:
                            self.on_cancel(job_id)
                if now - last_sweep >= self.renew_every:
                    last_sweep = now
                    expired = self.store.expire_uploads(
                        3 * self.lease_s, "the replica receiving the upload stopped before it was complete; "
                                          "upload it again")
                    if expired:
                        log.warning("failed %d abandoned upload(s): %s", len(expired), ", ".join(expired))
                        self.on_expired_uploads(expired)
            except StoreUnavailable:
                pass  # logged by the store; leases are renewed when it is back
            except Exception:
                log.error("lease keeper: unexpected error", exc_info=True)
