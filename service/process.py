"""What the service process does beside answering requests: log lines that cannot be
forged, and a worker that does not outlive the ``bentoml serve`` process that started it."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("posezoo.service")

_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def escape_control_characters(text: str) -> str:
    """``text`` with control characters written as escapes: a request path with ``%0a``
    in it must not start a new line of the log (BentoML's access log prints the path
    as decoded)."""
    return text.translate(_CONTROL)


def install_log_escaping() -> None:
    """Every log record of this process gets its message escaped, whichever logger or
    handler writes it (BentoML's access log included). Tracebacks (``exc_info``) are
    formatted separately and keep their lines."""
    old = logging.getLogRecordFactory()
    if getattr(old, "_posezoo_escaping", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = old(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let logging report it as usual
            return record
        escaped = escape_control_characters(message)
        if escaped != message or record.args:
            record.msg, record.args = escaped, None
        return record

    factory._posezoo_escaping = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def watch_parent(on_orphaned: Callable[[], None], interval: float = 1.0) -> threading.Thread:
    """Call ``on_orphaned`` (then exit the process) once the parent process is gone.

    A BentoML worker whose ``bentoml serve`` parent was killed would otherwise run on,
    holding the data directory's lock, so that no new server could start on it.
    """
    parent = os.getppid()

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        log.error("the bentoml serve process (pid %d) is gone; this worker stops too", parent)
        try:
            on_orphaned()
        finally:
            os._exit(1)

    t = threading.Thread(target=run, name="posezoo-parent-watch", daemon=True)
    t.start()
    return t
