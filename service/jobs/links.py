"""Signed, expiring result links: what a browser's ``<video src>`` or ``<a href>`` can fetch
without sending the API key (a page cannot put an ``Authorization`` header on them).

A link names the owner, the job, the result kind and an expiry time, with an HMAC-SHA256 of
those four under a key kept in the data directory (created once, mode 0600, so links survive
a restart and every worker process agrees). Nothing else can be fetched with it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path

KEY_FILE = "result-links.key"


class ResultLinks:
    def __init__(self, data_dir: str | Path):
        path = Path(data_dir) / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            self._key = path.read_bytes()
        else:
            key = os.urandom(32)
            with os.fdopen(fd, "wb") as f:
                f.write(key)
            self._key = key
        if len(self._key) < 32:
            raise RuntimeError(f"{path}: the result-link key is truncated; delete it to make a new one")

    def _sig(self, owner: str, job_id: str, kind: str, expires: int) -> str:
        msg = f"{owner}\n{job_id}\n{kind}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def sign(self, owner: str, job_id: str, kind: str, ttl_s: int) -> tuple[int, str]:
        """``(expires, signature)`` for a link valid ``ttl_s`` seconds."""
        expires = int(time.time()) + int(ttl_s)
        return expires, self._sig(owner, job_id, kind, expires)

    def check(self, owner: str, job_id: str, kind: str, expires: int, sig: str) -> bool:
        """Whether the link is genuine and not expired (constant-time comparison)."""
        if expires < time.time():
            return False
        return hmac.compare_digest(self._sig(owner, job_id, kind, expires), sig)
