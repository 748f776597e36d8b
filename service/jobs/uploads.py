"""Streaming uploads: request bodies go to disk chunk by chunk, never whole into memory.

Framework-agnostic: the functions take the request's headers and an async iterator of
body chunks (Starlette's ``request.stream()``). A declared ``Content-Length`` over the
limit is refused before any byte of the body is read; a body without one (chunked) is
cut off as soon as it passes the limit.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from posezoo.errors import PosezooError

WRITE_BUFFER = 1 << 20
MAX_FIELD_BYTES = 64 << 10
MAX_FIELDS = 64


class UploadError(PosezooError):
    """The upload is refused: ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_upload"):
        super().__init__(message)
        self.status = status
        self.code = code


def check_declared_length(headers: Mapping[str, str], limit: int) -> int | None:
    """The declared ``Content-Length`` (``None`` when chunked); 413 when over ``limit``."""
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise UploadError(f"invalid Content-Length {value[:40]!r}", 400, "bad_request") from None
    if n > limit:
        raise UploadError(f"upload of {n} bytes is over the limit of {limit} bytes", 413, "too_large")
    return n


#: Longest uploaded file name (bytes of UTF-8): results are named after it, and most file
#: systems stop at 255 bytes for a whole name.
MAX_FILENAME_BYTES = 200


def check_filename(name: str | None) -> str | None:
    """The upload's file name, checked before anything is accepted: its last path component,
    no control characters, at most :data:`MAX_FILENAME_BYTES`. Raises :class:`UploadError` (422)."""
    if name is None:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if any(ord(c) < 32 or ord(c) == 127 for c in base):
        raise UploadError(f"the file name {name[:60]!r} contains control characters", 422, "bad_filename")
    if len(base.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise UploadError(f"the file name is {len(base.encode('utf-8'))} bytes long; at most {MAX_FILENAME_BYTES} "
                          "are accepted", 422, "bad_filename")
    if base in ("", ".", ".."):
        return None
    return base


async def paced(chunks: AsyncIterator[bytes], *, idle_timeout_s: float, min_rate: float = 0,
                grace_s: float = 0) -> AsyncIterator[bytes]:
    """Pass the body's chunks through, cutting off an upload that stalls or trickles.

    An upload holds a queue slot while it lasts, so a client sending a byte a second
    could hold every slot for hours. Raises :class:`UploadError` 408 when no chunk
    arrives for ``idle_timeout_s``, or when after ``grace_s`` the average rate is
    below ``min_rate`` bytes/s.
    """
    it = chunks.__aiter__()
    t0 = time.monotonic()
    n = 0
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), idle_timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadError(f"the upload stalled: nothing arrived for {idle_timeout_s:g} s", 408,
                              "upload_timeout") from None
        n += len(chunk)
        elapsed = time.monotonic() - t0
        if min_rate and elapsed > grace_s and n < min_rate * elapsed:
            raise UploadError(f"the upload is too slow: {n / elapsed:.0f} bytes/s on average after {elapsed:.0f} s, "
                              f"under this server's minimum of {min_rate:.0f} bytes/s", 408, "upload_timeout")
        yield chunk


class _Sink:
    """Buffered file writer that enforces a byte limit."""

    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = limit
        self.n = 0
        self._buf = bytearray()
        self._f = open(path, "wb")

    def write(self, data: bytes | memoryview) -> None:
        self.n += len(data)
        if self.n > self.limit:
            raise UploadError(f"upload is over the limit of {self.limit} bytes", 413, "too_large")
        self._buf += data
        if len(self._buf) >= WRITE_BUFFER:
            self._f.write(self._buf)
            self._buf.clear()

    def close(self) -> None:
        if self._f.closed:
            return
        if self._buf:
            self._f.write(self._buf)
            self._buf.clear()
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.path.unlink(missing_ok=True)


async def receive_raw(chunks: AsyncIterator[bytes], dest: Path, limit: int) -> int:
    """Write a raw body to ``dest``; returns its size. On any error ``dest`` is removed."""
    sink = _Sink(dest, limit)
    try:
        async for chunk in chunks:
            if chunk:
                sink.write(chunk)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return sink.n


@dataclass
class MultipartUpload:
    fields: dict[str, str] = field(default_factory=dict)
    file_path: Path | None = None
    filename: str | None = None
    file_bytes: int = 0
    file_field: str | None = None


async def receive_multipart(
    chunks: AsyncIterator[bytes],
    content_type: str,
    dest: Path,
    limit: int,
    file_fields: tuple[str, ...] = ("video", "file"),
) -> MultipartUpload:
    """Parse a ``multipart/form-data`` body as it arrives.

    Text fields (at most 64 KiB each) are returned; the one file part named in
    ``file_fields`` is written to ``dest``. The whole body counts against ``limit``.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UploadError("expected multipart/form-data with a boundary", 415, "unsupported_media_type")

    out = MultipartUpload()
    state: dict = {"headers": {}, "hname": b"", "hvalue": b"", "name": None, "filename": None, "buf": None,
                   "sink": None, "total": 0}

    def on_part_begin() -> None:
        state.update(headers={}, hname=b"", hvalue=b"", name=None, filename=None, buf=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hvalue"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hname"].decode("latin-1").lower()] = state["hvalue"]
        state["hname"], state["hvalue"] = b"", b""

    def on_headers_finished() -> None:
        disp, opts = parse_options_header(state["headers"].get("content-disposition", b""))
        if disp != b"form-data" or b"name" not in opts:
            raise UploadError("a multipart part has no form-data name", 400, "bad_upload")
        name = opts[b"name"].decode("utf-8", "replace")
        filename = opts.get(b"filename")
        state["name"] = name
        if filename is not None or name in file_fields:
            if name not in file_fields:
                raise UploadError(f"unexpected file field {name!r}: send the video as one of {list(file_fields)}",
                                  400, "bad_upload")
            if state["sink"] is not None or out.file_path is not None:
                raise UploadError("only one video file per request", 400, "bad_upload")
            state["sink"] = _Sink(dest, limit)
            out.filename = os.path.basename(filename.decode("utf-8", "replace")) if filename else None
            out.file_field = name
        else:
            if len(out.fields) >= MAX_FIELDS:
                raise UploadError("too many form fields", 400, "bad_upload")
            state["buf"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["sink"] is not None:
            state["sink"].write(memoryview(data)[start:end])
        elif state["buf"] is not None:
            state["buf"] += data[start:end]
            if len(state["buf"]) > MAX_FIELD_BYTES:
                raise UploadError(f"form field {state['name']!r} is over {MAX_FIELD_BYTES} bytes", 400, "bad_upload")

    def on_part_end() -> None:
        if state["sink"] is not None:
            state["sink"].close()
            out.file_path, out.file_bytes = dest, state["sink"].n
            state["sink"] = None
        elif state["buf"] is not None:
            out.fields[state["name"]] = bytes(state["buf"]).decode("utf-8", "replace")
            state["buf"] = None

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    })
    try:
        async for chunk in chunks:
            state["total"] += len(chunk)
            if state["total"] > limit + (1 << 20):  # the fields and boundaries get 1 MiB on top
                raise UploadError(f"upload is over the limit of {limit} bytes", 413, "too_large")
            if chunk:
                try:
                    parser.write(chunk)
                except UploadError:
                    raise
                except Exception as exc:  # python-multipart's parse errors
                    raise UploadError(f"malformed multipart body: {exc}", 400, "bad_upload") from None
        try:
            parser.finalize()
        except Exception as exc:
            raise UploadError(f"malformed multipart body: {exc}", 400, "bad_upload") from None
        if state["sink"] is not None:
            raise UploadError("the multipart body ended inside the video part (upload cut short?)", 400, "bad_upload")
    except BaseException:
        if state["sink"] is not None:
            state["sink"].abort()
        dest.unlink(missing_ok=True)
        raise
    return out
