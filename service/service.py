"""posezoo as a BentoML (>= 1.4) service.

``bentoml serve`` (from the repository root, with bentofile.yaml) starts it. The whole API
is the FastAPI app of :mod:`service.app`, mounted at ``/v1`` with ``@bentoml.asgi_app``:
its routes read request bodies as streams, so uploads go to disk in chunks (BentoML's own
file inputs would hold a whole upload in memory). BentoML adds the process management,
``/livez``, ``/readyz`` (true once the job manager runs and the default model is loaded),
``/metrics`` (BentoML's metrics plus ``posezoo_*`` job metrics), the OpenAPI page at ``/``
(``/docs.json``; the API's own page is ``/v1/docs``), and the bento/container build.

Jobs are *not* BentoML tasks: ``@bentoml.task`` keeps its records in a SQLite file that is
deleted at every start. posezoo's :class:`~posezoo.jobs.JobManager` keeps them durably.
"""

from __future__ import annotations

import logging

import bentoml

from posezoo.jobs import JobManager
from posezoo.service_config import load_settings
from service.app import create_app

_state: dict[str, JobManager] = {}
app = create_app(lambda: _state.get("manager"))

logging.getLogger("posezoo").setLevel(logging.INFO)


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
        self.manager = JobManager(load_settings()).start()
        _state["manager"] = self.manager

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
