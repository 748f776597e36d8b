"""posezoo as a BentoML (>= 1.4) service.

``bentoml serve`` (from the repository root, with bentofile.yaml) starts it. The whole API
is the FastAPI app of :mod:`service.app`, mounted at ``/v1`` with ``@bentoml.asgi_app``:
its routes read request bodies as streams, so uploads go to disk in chunks (BentoML's own
file inputs would hold a whole upload in memory). BentoML adds the process management,
``/livez``, ``/readyz`` (true once the job manager runs and the default model is loaded),
``/metrics`` (BentoML's metrics plus ``posezoo_*`` job metrics), the OpenAPI page at ``/``
(``/docs.json``; the API's own page is ``/v1/docs``), and the bento/container build.

Jobs are *not* BentoML tasks: ``@bentoml.task`` keeps its records in a SQLite file that is
deleted at every start. posezoo's :class:`~service.jobs.JobManager` keeps them durably.

This module is imported twice: by ``bentoml serve`` itself (to read the service
definition) and by its worker. Settings are checked at import, so a bad setting, or a
data directory another server holds, stops ``bentoml serve`` with a clear message and
a non-zero status before any worker starts.
"""

from __future__ import annotations

import logging
import os
import signal

import bentoml

from posezoo.errors import PosezooError
from service.app import JsonErrors, create_app
from service.config import load_settings
from service.jobs import JobManager
from service.jobs.manager import DataDirInUseError, check_data_dir_free
from service.process import install_log_escaping, watch_parent

install_log_escaping()
logging.getLogger("posezoo").setLevel(logging.INFO)


def _in_worker() -> bool:
    """True in BentoML's worker process (it sets the worker index before importing us)."""
    from bentoml._internal.context import server_context

    return server_context.worker_index is not None


def _stop_server() -> None:
    """A worker that cannot start must not be respawned for ever: stop ``bentoml serve``."""
    logging.getLogger("posezoo.service").error("posezoo cannot start; stopping the server")
    os.kill(os.getppid(), signal.SIGTERM)


def _check_startup() -> None:
    try:
        settings = load_settings()  # unknown or invalid settings
        check_data_dir_free(settings.data_dir)  # another server on the same data directory
    except PosezooError as exc:
        if _in_worker():  # two servers started at once both passed the check in their own process
            _stop_server()
            raise
        raise SystemExit(f"posezoo: error: {exc}") from None


_check_startup()

_state: dict[str, JobManager] = {}
app = create_app(lambda: _state.get("manager"))


@bentoml.service(
    name="posezoo",
    # One API worker process: it owns the job queue; the jobs themselves run on the job
    # manager's threads (POSEZOO_SERVICE_WORKERS), which keep the cores busy.
    workers=1,
    # BentoML's timeout runs until the first byte of the answer: a long upload must fit in it.
    traffic={"timeout": 6 * 3600},
    resources={"cpu": "2"},
)
@bentoml.asgi_app(app, path="/v1")
class PoseZoo:
    """Animal pose estimation jobs (see /v1/docs)."""

    def __init__(self) -> None:
        try:
            self.manager = JobManager(load_settings()).start()
        except DataDirInUseError:  # lost a race with a server started at the same moment
            _stop_server()
            raise
        _state["manager"] = self.manager
        watch_parent(lambda: self.manager.stop(timeout=5))

    def __is_ready__(self) -> bool:
        return self.manager.ready

    def __is_alive__(self) -> bool:
        return self.manager.ready

    def __metrics__(self, content: str) -> str:
        return content + self.manager.metrics_text()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        _state.pop("manager", None)
        self.manager.stop()


PoseZoo.add_asgi_middleware(JsonErrors)
