"""The HTTP API of the posezoo service (FastAPI, mounted on the BentoML service at ``/v1``).

A thin adapter: every decision is made by :class:`service.jobs.JobManager`. This module
only turns requests into calls (uploads are streamed to disk chunk by chunk, never held
in memory) and errors into ``{"error": code, "detail": message}`` answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from posezoo.errors import PosezooError
from service.jobs import (
    ApiKeys,
    AuthError,
    ErrorBody,
    FinetuneOptions,
    JobManager,
    JobOptions,
    JobRequest,
    JobView,
    QueueFullError,
    UploadError,
    check_declared_length,
    check_filename,
    error_code,
    paced,
    receive_multipart,
    receive_raw,
)

log = logging.getLogger("posezoo.service")

PREFIX = "/v1"
#: the web page's static files (no build step)
STATIC = pathlib.Path(__file__).with_name("static")
ResultKind = Literal["h5", "csv", "json", "parquet", "nwb", "slp", "video", "meta"]
MULTIPART_SLACK = 1 << 20

_ERR = {"model": ErrorBody}
ERRORS = {s: {**_ERR, "description": d} for s, d in {
    400: "bad request", 401: "missing or invalid API key", 404: "no such job, result or model (for this key)",
    409: "the job has no results (yet)", 413: "upload over the size limit", 415: "unsupported content type",
    422: "not a usable video, image, model or option", 429: "queue full: retry after Retry-After seconds",
}.items()}

_VIDEO_BODY = {"schema": {"type": "string", "format": "binary"}}
CREATE_BODY = {
    "required": True,
    "description": (
        "One of: (1) `multipart/form-data` with the video as the file field `video` (text fields: any job option, "
        "e.g. `model`, `formats`); (2) the raw video bytes with any `video/*` or `application/octet-stream` "
        "type, options in the query string; (3) `application/json` naming the video: "
        "`{\"source\": \"s3://bucket/key\", \"model\": ..., \"formats\": [...]}`. Uploads are streamed to disk; "
        "a Content-Length over the limit is refused with 413 before the body is read."
    ),
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["video"], "properties": {
            "video": {"type": "string", "format": "binary"}, "model": {"type": "string"},
            "formats": {"type": "string", "example": "h5,csv"}, "labeled_video": {"type": "boolean"}}}},
        "video/mp4": _VIDEO_BODY,
        "application/octet-stream": _VIDEO_BODY,
        "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
    },
}


_ZIP_BODY = {"schema": {"type": "string", "format": "binary"}}
FINETUNE_BODY = {
    "required": True,
    "description": "A zip of a DeepLabCut labelled-data folder: the raw body (`application/zip`, options in the query "
                   "string) or `multipart/form-data` with the zip as the file field `data` (text fields: any option). "
                   "Streamed to disk; over MAX_FINETUNE_BYTES is 413.",
    "content": {"application/zip": _ZIP_BODY, "application/octet-stream": _ZIP_BODY,
                "multipart/form-data": {"schema": {"type": "object", "required": ["data"], "properties": {
                    "data": {"type": "string", "format": "binary"}, "base_model": {"type": "string"},
                    "steps": {"type": "integer"}}}}},
}


def create_app(get_manager: Callable[[], JobManager]) -> FastAPI:
    """The API, bound to the job manager ``get_manager()`` returns (created at service start)."""
    app = FastAPI(
        title="posezoo API",
        version="1",
        description="Animal pose estimation jobs: upload a video (or name one in S3), follow its progress, "
                    "download DeepLabCut-compatible tables and a labelled video. Authenticate with "
                    "`Authorization: Bearer <API key>`.",
        openapi_tags=[{"name": "jobs"}, {"name": "models"}, {"name": "predict"}],
    )
    bearer = HTTPBearer(auto_error=False, description="An API key configured on the server")
    app.router.dependencies.append(Depends(_no_unknown_query))

    def manager() -> JobManager:
        m = get_manager()
        if m is None:
            raise PosezooError("the service is starting")
        return m

    def owner(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        return keys().owner(request.headers.get("authorization"))

    _keys: dict = {}

    def keys() -> ApiKeys:
        m = manager()
        if "k" not in _keys:
            _keys["k"] = ApiKeys(m.settings.api_keys, m.settings.allow_anonymous)
        return _keys["k"]

    # -- errors -------------------------------------------------------------------------------
    def error(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(PosezooError)
    async def _posezoo_error(request: Request, exc: PosezooError):
        status, code = error_code(exc)
        headers = {}
        if isinstance(exc, QueueFullError) or getattr(exc, "retry_after", None):  # 429, or 503 store unavailable
            headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, AuthError):
            headers["WWW-Authenticate"] = "Bearer"
        if str(exc) == "the service is starting":
            status, code, headers = 503, "starting", {"Retry-After": "2"}
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        if request.method in ("POST", "PUT"):
            headers["Connection"] = "close"  # the body may be unread: do not drain it, close
        return error(status, code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error(422, "bad_options", _first_error(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _pyd_validation(request: Request, exc: ValidationError):
        return error(422, "bad_options", _first_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        log.info("%s %s: the client disconnected during the upload", request.method, request.url.path)
        return error(400, "client_disconnected", "the client disconnected before the upload was complete",
                     {"Connection": "close"})

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")

    # -- jobs ---------------------------------------------------------------------------------
    @app.post("/jobs", status_code=202, response_model=JobView, tags=["jobs"], summary="Create a video job",
              responses=ERRORS, openapi_extra={"requestBody": CREATE_BODY})
    async def create_job(
        request: Request,
        who: str = Depends(owner),
        model: str | None = Query(None, description="zoo model name[@version] or alias"),
        formats: str | None = Query(None, description="comma-separated: h5,csv,json,parquet,nwb,slp (default h5,csv)"),
        labeled_video: bool | None = Query(None, description="render an H.264 labelled video (default false)"),
        batch_size: int | None = Query(None, ge=1, le=256),
        filter: Literal["median", "savgol"] | None = Query(None),
        filter_window: int | None = Query(None, ge=1, le=101),
        pcutoff: float | None = Query(None, ge=0, le=1, description="confidence cutoff for drawing"),
        trail: int | None = Query(None, ge=0, le=300),
        allow_truncated: bool | None = Query(None),
        max_individuals: int | None = Query(None, ge=1, le=32, description="top-down models: most animals"),
        detector_every: int | None = Query(None, ge=1, le=300, description="top-down models: detector every N frames"),
        bbox_threshold: float | None = Query(None, ge=0, le=1, description="top-down models: lowest detection score"),
        draw_boxes: bool | None = Query(None, description="top-down models: boxes in the labelled video"),
        filename: str | None = Query(None, description="name of the uploaded video (raw uploads)"),
    ) -> JSONResponse:
        """Upload a video (multipart or raw body) or name one (`s3://…` in a JSON body). Answers 202 with
        the job at once; follow it with `GET /v1/jobs/{id}` or `GET /v1/jobs/{id}/events`."""
        m = manager()
        filename = check_filename(filename)
        query = {k: v for k, v in dict(model=model, formats=formats, labeled_video=labeled_video,
                                       batch_size=batch_size, filter=filter, filter_window=filter_window,
                                       pcutoff=pcutoff, trail=trail, allow_truncated=allow_truncated,
                                       max_individuals=max_individuals, detector_every=detector_every,
                                       bbox_threshold=bbox_threshold, draw_boxes=draw_boxes).items()
                 if v is not None}
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await _read_small(request, 64 << 10, m)
            try:
                doc = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UploadError(f"the JSON body does not parse: {exc}", 400, "bad_request") from None
            if not isinstance(doc, dict):
                raise UploadError('the JSON body must be an object: {"source": "s3://bucket/key", ...}', 400,
                                  "bad_request")
            req = JobRequest.model_validate({**query, **doc})
            res = await run_in_threadpool(m.reserve, who)
            try:
                rec = await run_in_threadpool(m.submit_uri, res, JobOptions(**req.model_dump(exclude={"source"})),
                                              req.source)
            except BaseException:
                await run_in_threadpool(m.release, res)
                raise
            return _accepted(rec)

        if ctype == "application/x-www-form-urlencoded":
            raise UploadError("send the video as multipart/form-data (file field 'video') or as the raw body",
                              415, "unsupported_media_type")
        multipart = ctype == "multipart/form-data"
        limit = m.settings.max_upload_bytes
        check_declared_length(request.headers, limit + (MULTIPART_SLACK if multipart else 0))
        options = JobOptions(**query)
        await run_in_threadpool(m.check_model, options.model, who, options)  # refused before the body is read
        res = await run_in_threadpool(m.reserve, who)  # 429 before a byte of the body is read
        try:
            dest = m.upload_path(res, filename)
            await run_in_threadpool(m.begin_upload, res, options, options.model or m.settings.model_default)
            fields, name, nbytes = await _receive_body(
                request, m, dest, limit, multipart, filename=filename, file_fields=("video", "file"),
                missing="no video in the form: send it as the file field 'video'")
            options = JobOptions(**{**query, **fields})
            rec = await run_in_threadpool(m.submit_upload, res, options, dest, name, nbytes)
        except BaseException:
            await run_in_threadpool(m.release, res)
            raise
        return _accepted(rec)

    @app.get("/jobs", response_model=list[JobView], tags=["jobs"], summary="List this key's jobs", responses=ERRORS)
    async def list_jobs(who: str = Depends(owner), limit: int = Query(100, ge=1, le=1000)):
        recs = await run_in_threadpool(manager().list, who, limit)
        return [JobView.of(r, PREFIX) for r in recs]

    JobId = Path(..., description="the job id", pattern=r"^[0-9a-f]{32}$")

    @app.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"], summary="Job status and progress",
             responses=ERRORS)
    async def get_job(job_id: str = JobId, who: str = Depends(owner)):
        """Status (`queued`, `running`, `succeeded`, `failed`, `cancelled`), progress (stage, frames done/total,
        frames/s, ETA), results' download paths, or the error."""
        return JobView.of(await run_in_threadpool(manager().get, job_id, who), PREFIX)

    @app.get("/jobs/{job_id}/events", tags=["jobs"], summary="Follow a job (NDJSON stream)", responses={
        **ERRORS, 200: {"description": "one JobView JSON document per line, until the job ends",
                        "content": {"application/x-ndjson": {}}}})
    async def job_events(job_id: str = JobId, who: str = Depends(owner),
                         interval: float = Query(0.5, ge=0.1, le=30, description="seconds between updates")):
        """Streams the job as newline-delimited JSON: a line whenever it changes (and at least every 15 s),
        ending with the line of its final status."""
        m = manager()
        first = await run_in_threadpool(m.get, job_id, who)

        async def lines():
            rec, last, sent_at = first, None, 0.0
            while True:
                doc = JobView.of(rec, PREFIX).model_dump_json()
                now = time.monotonic()
                if doc != last or now - sent_at > 15:
                    yield doc + "\n"
                    last, sent_at = doc, now
                if rec.terminal:
                    return
                await asyncio.sleep(interval)
                rec = await run_in_threadpool(m.get, job_id, who)

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/jobs/{job_id}/results/{kind}", tags=["jobs"], summary="Download a result", responses={
        **ERRORS, 200: {"description": "the file (Range requests supported)", "content": {
            "application/x-hdf5": {}, "text/csv": {}, "application/json": {}, "application/vnd.apache.parquet": {},
            "application/x-nwb": {}, "application/x-sleap": {},
            "video/mp4": {}}},
        307: {"description": "redirect to a presigned S3 URL (results kept in S3)"}})
    async def get_result(job_id: str = JobId, kind: ResultKind = Path(..., description="result kind"),
                         who: str = Depends(owner),
                         redirect: bool = Query(True, description="for S3 results: redirect (true) or answer "
                                                                  "{\"url\": presigned URL} (false)")):
        """`h5`, `csv`, `json`, `parquet`, `nwb`, `slp` (pose tables), `video` (labelled H.264 MP4) or `meta` (metadata JSON)."""
        m = manager()
        rec, rf = await run_in_threadpool(m.result, job_id, who, kind)
        if rf.location == "local":
            path = m.results.local_path(rec.id, rf)
            if not path.is_file():
                raise UploadError(f"the {kind} result of job {job_id} is missing on the server", 410, "gone")
            return FileResponse(path, media_type=rf.content_type, filename=rf.filename)
        url = await run_in_threadpool(m.results.presign, rf, m.settings.presign_expiry_s)
        if redirect:
            return RedirectResponse(url, status_code=307)
        return {"url": url, "expires_in": m.settings.presign_expiry_s, "filename": rf.filename,
                "content_type": rf.content_type, "bytes": rf.bytes}

    @app.get("/jobs/{job_id}/results/{kind}/link", tags=["jobs"], summary="A signed, expiring result URL",
             responses=ERRORS)
    async def result_link(job_id: str = JobId, kind: ResultKind = Path(..., description="result kind"),
                          who: str = Depends(owner)):
        """`{"url", "expires_in"}`: a URL that fetches this result without the API key until it expires
        (`PRESIGN_EXPIRY_S`), for a browser's `<video src>` or download link (Range requests work).
        S3 results get a presigned S3 URL."""
        m = manager()
        rec, rf = await run_in_threadpool(m.result, job_id, who, kind)
        ttl = m.settings.presign_expiry_s
        if rf.location == "local":
            expires, sig = m.links.sign(who, job_id, kind, ttl)
            url = f"{PREFIX}/links/{job_id}/{kind}?" + urlencode({"owner": who, "expires": expires, "sig": sig})
        else:
            url = await run_in_threadpool(m.results.presign, rf, ttl)
        return {"url": url, "expires_in": ttl, "filename": rf.filename, "content_type": rf.content_type}

    @app.get("/links/{job_id}/{kind}", tags=["jobs"], summary="Fetch a result by its signed link",
             responses=ERRORS)
    async def signed_result(job_id: str = JobId, kind: ResultKind = Path(...), owner: str = Query(..., max_length=200),
                            expires: int = Query(...), sig: str = Query(..., pattern=r"^[0-9a-f]{64}$")):
        m = manager()
        if not m.links.check(owner, job_id, kind, expires, sig):
            raise UploadError("this result link is invalid or has expired: ask for a new one", 403, "forbidden")
        rec, rf = await run_in_threadpool(m.result, job_id, owner, kind)
        path = m.results.local_path(rec.id, rf)
        if rf.location != "local" or not path.is_file():
            raise UploadError(f"the {kind} result of job {job_id} is missing on the server", 410, "gone")
        return FileResponse(path, media_type=rf.content_type, filename=rf.filename)

    @app.get("/app", include_in_schema=False)
    async def page():
        """The web page (static: service/static/index.html)."""
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    @app.delete("/jobs/{job_id}", response_model=JobView, tags=["jobs"], summary="Cancel or delete a job",
                responses=ERRORS)
    async def delete_job(job_id: str = JobId, who: str = Depends(owner)):
        """Cancels a queued or running job; deletes a finished one and its results."""
        return JobView.of(await run_in_threadpool(manager().cancel, job_id, who), PREFIX)

    # -- models, images, fine-tuning -----------------------------------------------------------
    @app.get("/models", tags=["models"], summary="List zoo models", responses=ERRORS)
    async def list_models(who: str = Depends(owner)) -> list[dict]:
        """Every model of the zoo: name, version, species, keypoints, whether it is ready to serve."""
        return await run_in_threadpool(manager().models, who)

    @app.get("/models/{name}", tags=["models"], summary="Show a model card", responses=ERRORS)
    async def get_model(name: str = Path(..., description="name[@version] or alias"), who: str = Depends(owner)):
        return await run_in_threadpool(manager().card, name, who)

    @app.post("/predict/image", tags=["predict"], summary="Keypoints of one image (synchronous)", responses=ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "image/png": _VIDEO_BODY, "image/jpeg": _VIDEO_BODY, "application/octet-stream": _VIDEO_BODY,
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "image": {"type": "string", "format": "binary"}}}}}}})
    async def predict_image(request: Request, who: str = Depends(owner),
                            model: str | None = Query(None, description="zoo model (default: the server's)")):
        """The image as the raw body (or the multipart file field `image`); answers its keypoints as JSON:
        `{"model", "width", "height", "keypoints": [{"name", "x", "y", "likelihood"}], "pcutoff"}`."""
        m = manager()
        limit = m.settings.max_image_bytes
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        check_declared_length(request.headers, limit + (MULTIPART_SLACK if ctype == "multipart/form-data" else 0))
        await run_in_threadpool(m.take_image_slot)  # bounded: bodies and decoded images of many requests add up
        try:
            if ctype == "multipart/form-data":
                form = await request.form(max_files=1, max_fields=8)
                upload = form.get("image") or form.get("file")
                if upload is None or isinstance(upload, str):
                    raise UploadError("no image in the form: send it as the file field 'image'", 400, "bad_upload")
                data = await upload.read(limit + 1)
                if len(data) > limit:
                    raise UploadError(f"image is over the limit of {limit} bytes", 413, "too_large")
            else:
                data = await _read_small(request, limit, m)
            return await run_in_threadpool(m.predict_image, data, model, who)
        finally:
            m.give_image_slot()

    @app.post("/finetune", status_code=202, response_model=JobView, tags=["jobs"],
              summary="Fine-tune a model on DeepLabCut labelled data", openapi_extra={"requestBody": FINETUNE_BODY},
              responses={**ERRORS, 409: {**_ERR, "description": "the model name@version exists already"},
                         503: {**_ERR, "description": "fine-tuning is unavailable on this server"}})
    async def finetune(
        request: Request,
        who: str = Depends(owner),
        base_model: str | None = Query(None, description="zoo model name[@version] to start from (its keypoints)"),
        name: str | None = Query(None, description="name of the new model (default: <base>-ft)"),
        version: str | None = Query(None, description="version of the new model (default: the next free 1.0.N)"),
        steps: int | None = Query(None, ge=1, description="training steps (server default and cap)"),
        batch_size: int | None = Query(None, ge=1, description="frames per step (server default and cap)"),
        init: Literal["auto", "base", "imagenet"] | None = Query(None),
        head_width: int | None = Query(None, ge=8, le=256, description="ImageNet start only"),
        test_fraction: float | None = Query(None, gt=0, lt=1, description="held-out share (at least one frame)"),
        test: str | None = Query(None, description="comma-separated glob patterns of held-out frames"),
        seed: int | None = Query(None, ge=0),
        filename: str | None = Query(None, description="name of the uploaded zip (raw uploads)"),
    ) -> JSONResponse:
        """A zip of a DeepLabCut `labeled-data/<video>/` folder (`CollectedData_<scorer>.csv` and its PNG frames)
        as the raw body (`application/zip`) or the multipart file field `data`, plus a base model. The zip is
        extracted safely and the labelled data validated before the answer (4xx naming the file and row);
        then the job trains, evaluates on the held-out frames and registers `name@version`, visible to this
        API key only. Follow it like any job; `metrics` and `output_model` appear when it succeeds."""
        m = manager()
        filename = check_filename(filename)
        reason = m.finetune_unavailable()
        if reason:
            return error(503, "finetune_unavailable", reason)
        query = {k: v for k, v in dict(base_model=base_model, name=name, version=version, steps=steps,
                                       batch_size=batch_size, init=init, head_width=head_width,
                                       test_fraction=test_fraction, test=test, seed=seed).items() if v is not None}
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype in ("application/json", "application/x-www-form-urlencoded") or ctype.startswith("text/"):
            raise UploadError("send the labelled-data zip as the raw body (application/zip) or as the multipart "
                              "file field 'data'", 415, "unsupported_media_type")
        multipart = ctype == "multipart/form-data"
        limit = m.settings.max_finetune_bytes
        check_declared_length(request.headers, limit + (MULTIPART_SLACK if multipart else 0))
        options = FinetuneOptions(**query)
        res = await run_in_threadpool(m.reserve, who, "finetune")  # 429 before a byte of the body is read
        try:
            dest = m.finetune_upload_path(res)
            await run_in_threadpool(m.begin_upload, res, JobOptions(), options.base_model or m.settings.model_default,
                                    options)
            fields, name_, nbytes = await _receive_body(
                request, m, dest, limit, multipart, filename=filename, file_fields=("data", "file", "zip"),
                missing="no zip in the form: send it as the file field 'data'")
            options = FinetuneOptions(**{**query, **fields})
            rec = await run_in_threadpool(m.submit_finetune, res, options, dest, name_, nbytes)
        except BaseException:
            await run_in_threadpool(m.release, res)
            raise
        return _accepted(rec)

    @app.get("/server", tags=["models"], summary="Server limits and load")
    async def server(who: str = Depends(owner)):
        m = manager()
        s = m.settings
        load = await run_in_threadpool(m.stats, True)
        return {**load, "max_upload_bytes": s.max_upload_bytes, "max_image_bytes": s.max_image_bytes,
                "default_model": s.model_default, "results_in_s3": m.results.in_s3,
                "https_sources": s.allow_https_sources,
                # the fine-tune queue's load (from stats) and whether this server can train at all
                "finetune": {**load["finetune"], "status": m.finetune_unavailable() or "available"},
                "max_finetune_bytes": s.max_finetune_bytes, "max_finetune_steps": s.max_finetune_steps}

    @app.api_route("/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                   include_in_schema=False)
    async def _no_such_endpoint(request: Request, path: str):
        # BentoML answers paths no route matches in plain text; the API answers in JSON.
        from starlette.routing import Match

        allowed = sorted({m for r in app.routes if r.name != "_no_such_endpoint"
                          and r.matches(request.scope)[0] == Match.PARTIAL for m in getattr(r, "methods", ())})
        if allowed:
            return error(405, "method_not_allowed", f"{request.method} is not allowed here; use {', '.join(allowed)}",
                         {"Allow": ", ".join(allowed)})
        return error(404, "not_found", f"no endpoint /v1/{path[:100]} (see /v1/docs)")

    return app


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 408: "timeout", 413: "too_large", 415: "unsupported_media_type",
                 422: "bad_request", 429: "busy", 500: "internal_error", 503: "unavailable"}


class JsonErrors:
    """ASGI middleware: error answers that BentoML or Starlette write as plain text (an
    unknown path outside ``/v1``, a wrong method on ``/readyz``, ...) become the API's
    ``{"error": code, "detail": message}``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def wrapped(message):
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                ctype = headers.get(b"content-type", b"")
                if message["status"] >= 400 and (not ctype or ctype.startswith(b"text/plain")):
                    held.update(start=message, body=b"")
                    return
            elif message["type"] == "http.response.body" and held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                status = held["start"]["status"]
                text = held["body"].decode("utf-8", "replace").strip()[:300] or f"HTTP {status}"
                body = json.dumps({"error": _STATUS_CODES.get(status, "http_error"), "detail": text}).encode()
                keep = [(k, v) for k, v in held["start"].get("headers", [])
                        if k.lower() not in (b"content-type", b"content-length")]
                await send({**held["start"], "headers": [*keep, (b"content-type", b"application/json"),
                                                          (b"content-length", str(len(body)).encode())]})
                return await send({"type": "http.response.body", "body": body})
            await send(message)

        return await self.app(scope, receive, wrapped)


def _no_unknown_query(request: Request) -> None:
    """Refuse query parameters the endpoint does not take, as unknown form fields and JSON
    keys are refused: a typo (``fromats=``) must not silently fall back to a default."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    pending = [dependant]
    while pending:  # the route's own query parameters and those of its dependencies
        d = pending.pop()
        known.update(q.alias for q in d.query_params)
        pending.extend(d.dependencies)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise UploadError(f"unknown option(s) {unknown[:5]} in the query string; this endpoint takes "
                          f"{sorted(known) or 'none'}", 422, "bad_options")


def _accepted(rec) -> JSONResponse:
    """202 Accepted for a new job: its view, and its URL in ``Location``."""
    return JSONResponse(JobView.of(rec, PREFIX).model_dump(mode="json"), status_code=202,
                        headers={"Location": f"{PREFIX}/jobs/{rec.id}"})


def finetune_unavailable_reason() -> str | None:
    """Why fine-tune jobs cannot run here (``None`` when they can); never imports PyTorch."""
    from service.jobs.finetune import unavailable_reason

    return unavailable_reason()


def _body(request: Request, m: JobManager):
    """The request body's chunks, cut off (408) when the client stalls or trickles."""
    s = m.settings
    return paced(request.stream(), idle_timeout_s=s.upload_idle_timeout_s, min_rate=s.upload_min_rate,
                 grace_s=s.upload_rate_grace_s)


async def _receive_body(request: Request, m: JobManager, dest, limit: int, multipart: bool, *, filename: str,
                        file_fields: tuple[str, ...], missing: str) -> tuple[dict, str, int]:
    """Stream an upload (the raw body, or the file field of a form) to ``dest``; returns the
    form's other fields, the file's (checked) name and its size."""
    if not multipart:
        return {}, filename, await receive_raw(_body(request, m), dest, limit)
    up = await receive_multipart(_body(request, m), request.headers["content-type"], dest, limit,
                                 file_fields=file_fields)
    if up.file_path is None:
        raise UploadError(missing, 400, "bad_upload")
    fields = {k: v for k, v in up.fields.items() if k != "filename"}
    name = check_filename(up.filename) or check_filename(up.fields.get("filename")) or filename
    return fields, name, up.file_bytes


async def _read_small(request: Request, limit: int, m: JobManager) -> bytes:
    check_declared_length(request.headers, limit)
    buf = bytearray()
    async for chunk in _body(request, m):
        buf += chunk
        if len(buf) > limit:
            raise UploadError(f"request body is over the limit of {limit} bytes", 413, "too_large")
    return bytes(buf)


def _first_error(errors) -> str:
    if not errors:
        return "invalid request"
    e = errors[0]
    loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
    msg = e.get("msg", "invalid")
    return f"{loc}: {msg}" if loc else msg
