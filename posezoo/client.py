"""Python client of the posezoo service (plain HTTP with httpx against the documented API).

Quick use::

    from posezoo.client import Client

    with Client("http://localhost:3000", api_key="...") as client:
        result = client.predict("video.mp4", formats=["h5", "csv"], labeled_video=True, out="results")
        result.table            # PoseTable, read from the downloaded csv (never from the h5)
        result.paths            # {"h5": Path, "csv": Path, "video": Path, "meta": Path}
        client.predict("s3://bucket/videos/mouse.mp4")   # a video the server reads from S3

Uploads are streamed from the file (never read whole into memory), progress is shown with
tqdm, and requests answered 429/503 (queue full, starting) are retried after the server's
``Retry-After``. The API key is also read from ``POSEZOO_API_KEY``; sending it over plain
``http://`` to a host other than this machine warns (:class:`InsecureTransportWarning`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import PosezooError

CHUNK = 1 << 20
RETRY_STATUSES = (429, 503)

# Hosts already warned about (once per process each: a script making many clients is not
# helped by the same warning a hundred times).
_WARNED_HOSTS: set[str] = set()
_WARNED_LOCK = threading.Lock()


class InsecureTransportWarning(UserWarning):
    """The API key (and the results) would travel unencrypted to a host on the network."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost: it may resolve anywhere
        return False


def _warn_if_insecure(url: str, key: str | None) -> None:
    """Warn once per host when ``key`` would be sent over plain http to a non-loopback host."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not key or parts.scheme.lower() != "http" or _is_loopback(host):
        return
    with _WARNED_LOCK:
        if host in _WARNED_HOSTS:
            return
        _WARNED_HOSTS.add(host)
    warnings.warn(
        f"posezoo client: the API key is sent to {host} over plain http://, readable (and the results "
        "changeable) by anyone on the way; use https:// for a server on another machine",
        InsecureTransportWarning, stacklevel=3,
    )


class RemoteError(PosezooError):
    """The service refused a request or a job failed: ``status`` (HTTP), ``code``, ``detail``."""

    def __init__(self, message: str, status: int | None = None, code: str = "", detail: str = "",
                 job: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail
        self.job = job

    @classmethod
    def from_response(cls, r) -> "RemoteError":
        try:
            body = r.json()
            code, detail = str(body.get("error", "")), str(body.get("detail", ""))
        except Exception:
            code, detail = "", r.text[:300]
        return cls(f"HTTP {r.status_code} {code}: {detail}".strip(), r.status_code, code, detail)


@dataclass
class Prediction:
    """What :meth:`Client.predict` returns: the table, the downloaded files and the job."""

    table: Any  # posezoo.table.PoseTable
    paths: dict[str, Path] = field(default_factory=dict)
    job: dict = field(default_factory=dict)


def _is_uri(source) -> bool:
    return isinstance(source, str) and source.split("://", 1)[0].lower() in ("s3", "https", "http")


class Client:
    """Client of a posezoo server.

    Parameters
    ----------
    url : str
        The server, e.g. ``http://localhost:3000``.
    api_key : str, optional
        Sent as ``Authorization: Bearer``; default ``$POSEZOO_API_KEY``.
    timeout : float
        Seconds to wait for the server per read/write (not for a whole job).
    connect_timeout : float
    retries : int
        Attempts after a 429/503 answer or a failed connection.
    max_wait : float
        Longest pause between retries.
    progress : bool
        Show tqdm bars (upload and job progress) on stderr.
    """

    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60.0, connect_timeout: float = 10.0,
                 retries: int = 8, max_wait: float = 60.0, progress: bool = True, verify: bool = True):
        import httpx

        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("POSEZOO_API_KEY")
        _warn_if_insecure(self.url, key)
        headers = {"User-Agent": "posezoo-client"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.retries = retries
        self.max_wait = max_wait
        self.progress = progress
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout, verify=verify,
                                  follow_redirects=False)

    # -- plumbing ---------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # never shows the key
        return f"Client({self.url!r})"

    def _wait_time(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_wait) + random.uniform(0, 0.5)
            except ValueError:
                pass
        return min(self.max_wait, 0.5 * 2 ** attempt) + random.uniform(0, 0.5)

    def _request(self, method: str, path: str, *, body_factory=None, expect_redirect: bool = False, **kw):
        """One request with retries on 429/503 and on connection failures; raises RemoteError."""
        import httpx

        for attempt in range(self.retries + 1):
            if body_factory is not None:
                kw["content"] = body_factory()
            try:
                r = self._http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= self.retries:
                    raise RemoteError(f"cannot reach the posezoo server at {self.url}: {exc}") from None
                time.sleep(self._wait_time(attempt, None))
                continue
            except httpx.TransportError as exc:
                raise RemoteError(f"{method} {path}: connection to {self.url} failed: {type(exc).__name__}: {exc}") \
                    from None
            if r.status_code in RETRY_STATUSES and attempt < self.retries:
                time.sleep(self._wait_time(attempt, r.headers.get("retry-after")))
                continue
            if r.is_redirect and expect_redirect:
                return r
            if r.is_error:
                raise RemoteError.from_response(r)
            return r
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, path: str, **params) -> Any:
        return self._request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    # -- API --------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """The zoo's models (name, version, species, keypoints, ready)."""
        return self._get("/v1/models")

    def model(self, name: str) -> dict:
        """One model card."""
        return self._get(f"/v1/models/{name}")

    def job(self, job_id: str) -> dict:
        """A job's status, progress, results or error."""
        return self._get(f"/v1/jobs/{job_id}")

    def jobs(self, limit: int = 100) -> list[dict]:
        return self._get("/v1/jobs", limit=limit)

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued/running job, or delete a finished one and its results."""
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def server(self) -> dict:
        return self._get("/v1/server")

    def submit(self, video_or_uri: str | os.PathLike, *, model: str | None = None,
               formats: list[str] | tuple[str, ...] | str = ("h5",), labeled_video: bool = False,
               batch_size: int | None = None, filter: str | None = None, pcutoff: float | None = None,
               allow_truncated: bool | None = None, progress: bool | None = None) -> dict:
        """Create a job (upload a local video, or name an ``s3://`` / ``https://`` one); returns it at once."""
        fmts = formats.split(",") if isinstance(formats, str) else list(formats)
        opts = {"model": model, "formats": ",".join(fmts), "labeled_video": labeled_video, "batch_size": batch_size,
                "filter": filter, "pcutoff": pcutoff, "allow_truncated": allow_truncated}
        opts = {k: v for k, v in opts.items() if v is not None}
        if _is_uri(video_or_uri):
            body = {**opts, "formats": fmts, "source": str(video_or_uri)}
            return self._request("POST", "/v1/jobs", json=body).json()
        path = Path(video_or_uri)
        if not path.is_file():
            raise PosezooError(f"{path}: no such file")
        size = path.stat().st_size
        show = self.progress if progress is None else progress
        params = {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in opts.items()}
        params["filename"] = path.name
        return self._request(
            "POST", "/v1/jobs", params=params, body_factory=lambda: self._stream_file(path, size, show),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        ).json()

    @staticmethod
    def _stream_file(path: Path, size: int, show: bool) -> Iterator[bytes]:
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {path.name}", leave=False)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    if bar is not None:
                        bar.update(len(chunk))
                    yield chunk
        finally:
            if bar is not None:
                bar.close()

    def events(self, job_id: str, interval: float = 0.5) -> Iterator[dict]:
        """The job's NDJSON progress feed, one dict per update, until it ends (reconnects if dropped)."""
        import httpx

        failures = 0
        while True:
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", params={"interval": interval}) as r:
                    if r.status_code in RETRY_STATUSES:
                        raise httpx.TransportError("server busy or starting")
                    if r.is_error:
                        r.read()
                        raise RemoteError.from_response(r)
                    for line in r.iter_lines():
                        if line.strip():
                            failures = 0
                            doc = json.loads(line)
                            yield doc
                            if doc["status"] in ("succeeded", "failed", "cancelled"):
                                return
            except httpx.TransportError:
                failures += 1
                if failures > self.retries:
                    raise RemoteError(f"lost the connection to {self.url} while following job {job_id}") from None
                time.sleep(self._wait_time(failures, None))

    def wait(self, job_id: str, progress: bool | None = None) -> dict:
        """Follow a job until it ends (a tqdm bar per stage); returns the final job."""
        show = self.progress if progress is None else progress
        bar, stage, job = None, None, None
        try:
            for job in self.events(job_id):
                if not show:
                    continue
                from tqdm.auto import tqdm

                p = dict(job["progress"])
                if p.get("steps_total"):  # a fine-tune job: steps instead of frames
                    p["frames_total"], p["frames_done"] = p["steps_total"], p.get("step") or 0
                if p["stage"] != stage:
                    if bar is not None:
                        bar.close()
                    stage = p["stage"]
                    unit = "step" if job["progress"].get("steps_total") else "frame"
                    bar = tqdm(total=p.get("frames_total") or None, unit=unit, desc=stage, leave=False)
                if bar is not None:
                    if p.get("frames_total") and bar.total != p["frames_total"]:
                        bar.total = p["frames_total"]
                    bar.update(max(0, (p.get("frames_done") or 0) - bar.n))
                    if p.get("loss") is not None:
                        bar.set_postfix(loss=f"{p['loss']:.4g}", refresh=False)
                    if p.get("eta_s") is not None:
                        bar.set_postfix(eta=f"{p['eta_s']:.0f}s", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        return job or self.job(job_id)

    def download(self, job_id: str, kind: str, dest: str | os.PathLike = ".") -> Path:
        """Download one result (``h5``, ``csv``, ``json``, ``parquet``, ``nwb``, ``slp``, ``video``, ``meta``), streamed to
        ``dest`` (a directory keeps the server's file name); follows presigned S3 URLs (without the key)."""
        import httpx

        dest = Path(dest)
        with self._http.stream("GET", f"/v1/jobs/{job_id}/results/{kind}") as r:
            if r.is_redirect:
                url = r.headers["location"]
            elif r.is_error:
                r.read()
                raise RemoteError.from_response(r)
            else:
                name = _result_name(_filename(r.headers.get("content-disposition")), job_id, kind)
                target = dest / name if dest.is_dir() else dest
                self._save(r, target)
                return target
        with httpx.stream("GET", url, timeout=self.timeout) as s:  # a presigned URL: no API key to S3
            if s.is_error:
                s.read()
                raise RemoteError(f"downloading the {kind} result from S3 failed: HTTP {s.status_code}", s.status_code)
            name = _result_name(_filename(s.headers.get("content-disposition")) or Path(httpx.URL(url).path).name,
                                job_id, kind)
            target = dest / name if dest.is_dir() else dest
            self._save(s, target)
        return target

    @staticmethod
    def _save(resp, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        try:
            with open(tmp, "wb") as f:
                for chunk in resp.iter_bytes(CHUNK):
                    f.write(chunk)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def fetch_results(self, job: dict, out: str | os.PathLike = ".") -> dict[str, Path]:
        """Download every result of a finished job into the directory ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        return {kind: self.download(job["id"], kind, out) for kind in job.get("results", {})}

    def predict(self, video_or_uri: str | os.PathLike, *, model: str | None = None,
                formats: list[str] | tuple[str, ...] | str = ("h5",), labeled_video: bool = False,
                out: str | os.PathLike = ".", progress: bool | None = None, **options) -> Prediction:
        """Submit a video, follow the job, download its results into ``out`` and read the pose table.

        The table is read from the csv result, requested in addition to ``formats``: reading an
        h5 means unpickling what the server sent, and the server may not be the one you think.

        Raises :class:`RemoteError` when the server refuses the video or the job fails.
        """
        from .table import PoseTable

        fmts = formats.split(",") if isinstance(formats, str) else list(formats)
        if "csv" not in fmts:
            fmts.append("csv")  # the table is read back from it
        job = self.submit(video_or_uri, model=model, formats=fmts, labeled_video=labeled_video,
                          progress=progress, **options)
        job = self.wait(job["id"], progress=progress)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            raise RemoteError(f"job {job['id']} {job['status']}: {err.get('detail', '')}".strip(), None,
                              err.get("error", job["status"]), err.get("detail", ""), job)
        paths = self.fetch_results(job, out)
        if "csv" not in paths:
            raise RemoteError(f"job {job['id']} succeeded without the csv result it was asked for", None,
                              "missing_result", "csv", job)
        # the server names the files: a csv saved as "x.h5" is still read as a csv
        table = PoseTable.load(paths["csv"], fmt="csv")
        return Prediction(table, paths, job)

    def finetune(self, zip_path: str | os.PathLike, *, base_model: str | None = None, steps: int | None = None,
                 batch_size: int | None = None, name: str | None = None, version: str | None = None,
                 init: str | None = None, head_width: int | None = None, test_fraction: float | None = None,
                 wait: bool = True, progress: bool | None = None) -> dict:
        """Fine-tune ``base_model`` on a zip of DeepLabCut labelled data (``CollectedData_<scorer>.csv`` and
        its PNG frames). Streams the upload; with ``wait`` follows the job and returns it once it has
        succeeded (``job["output_model"]`` is the new ``name@version``, visible to this API key only;
        ``job["metrics"]`` its evaluation); raises :class:`RemoteError` when it is refused or fails."""
        path = Path(zip_path)
        if not path.is_file():
            raise PosezooError(f"{path}: no such file")
        opts = {"base_model": base_model, "steps": steps, "batch_size": batch_size, "name": name, "version": version,
                "init": init, "head_width": head_width, "test_fraction": test_fraction, "filename": path.name}
        size = path.stat().st_size
        show = self.progress if progress is None else progress
        job = self._request(
            "POST", "/v1/finetune", params={k: v for k, v in opts.items() if v is not None},
            body_factory=lambda: self._stream_file(path, size, show),
            headers={"Content-Type": "application/zip", "Content-Length": str(size)},
        ).json()
        if not wait:
            return job
        job = self.wait(job["id"], progress=progress)
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            raise RemoteError(f"job {job['id']} {job['status']}: {err.get('detail', '')}".strip(), None,
                              err.get("error", job["status"]), err.get("detail", ""), job)
        return job

    def predict_image(self, image, *, model: str | None = None) -> dict:
        """Keypoints of one image (a path, encoded bytes, or an RGB uint8 array)."""
        if isinstance(image, (str, os.PathLike)):
            data = Path(image).read_bytes()
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            import cv2
            import numpy as np

            ok, buf = cv2.imencode(".png", np.ascontiguousarray(np.asarray(image)[..., ::-1]))
            if not ok:
                raise PosezooError("cannot encode the image")
            data = buf.tobytes()
        params = {"model": model} if model else {}
        return self._request("POST", "/v1/predict/image", params=params, content=data,
                             headers={"Content-Type": "application/octet-stream"}).json()


#: What each result kind's file name ends with (the service's naming).
RESULT_SUFFIXES = {"h5": ".h5", "csv": ".csv", "json": ".json", "parquet": ".parquet", "nwb": ".nwb", "slp": ".slp",
                   "video": ".mp4",
                   "meta": ".meta.json"}


def _result_name(name: str | None, job_id: str, kind: str) -> str:
    """The file name a result is saved under: the server's, when it is a plain name with the
    kind's suffix; otherwise ``<job>.<suffix>``. A server must not choose to write
    ``.bashrc`` or ``evil.py`` into the user's directory."""
    suffix = RESULT_SUFFIXES.get(kind, f".{kind}")
    if name:
        name = os.path.basename(name.replace("\\", "/"))
    ok = bool(name) and name.endswith(suffix) and not name.startswith(".") and len(name) <= 255 \
        and all(c.isprintable() and c not in '<>:"|?*' for c in name)
    return name if ok else f"{job_id}{suffix}"


def _filename(disposition: str | None) -> str | None:
    if not disposition:
        return None
    from email.message import Message

    m = Message()
    m["content-disposition"] = disposition
    name = m.get_filename()
    return os.path.basename(name) if name else None
