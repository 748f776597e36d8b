"""Where results live (a local directory or an S3 bucket/prefix) and where videos come from
(``s3://`` objects, and ``https://`` URLs whose host is public).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from posezoo.errors import PosezooError

from .models import RESULT_KINDS, ResultFile


class SourceError(PosezooError):
    """A job's source cannot be used: ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_source"):
        super().__init__(message)
        self.status = status
        self.code = code


def s3_client(endpoint: str | None, *, read_timeout: float = 60):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=read_timeout,
                      signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def split_s3_uri(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    bucket, key = u.netloc, u.path.lstrip("/")
    if u.scheme != "s3" or not bucket:
        raise SourceError(f"{uri!r} is not an s3://bucket/key URI", code="bad_source")
    return bucket, key


def normalise_source_uri(uri: str) -> str:
    """The canonical form of a job's source URI, before any check is made on it.

    ``s3://`` URIs get a lower-case scheme and bucket, and their key loses empty
    segments (``s3://b//k`` and ``S3://B/k`` both mean ``s3://b/k``: that is what parsing
    and S3 make of them, so checks must see it too); ``.`` and ``..`` segments are refused.
    Other schemes are returned as given (their own checks parse them).
    """
    if not isinstance(uri, str) or any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise SourceError("the source URI contains control characters", code="bad_source")
    u = urlparse(uri.strip())
    if u.scheme.lower() != "s3":
        return uri.strip()
    if u.query or u.fragment or u.params:
        raise SourceError(f"{uri[:200]!r}: an s3:// source has no query or fragment", code="bad_source")
    segments = [seg for seg in u.path.split("/") if seg]
    if any(seg in (".", "..") for seg in segments):
        raise SourceError(f"{uri[:200]!r}: '.' and '..' are not allowed in an s3:// key", code="bad_source")
    bucket = u.netloc.lower()
    if not bucket:
        raise SourceError(f"{uri[:200]!r} is not an s3://bucket/key URI", code="bad_source")
    return f"s3://{bucket}/{'/'.join(segments)}"


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment (presigned URLs carry secrets there)."""
    u = urlparse(url)
    host = u.hostname or ""
    if u.port:
        host = f"{host}:{u.port}"
    return urlunparse((u.scheme, host, u.path, "", "", ""))


# -- results ---------------------------------------------------------------------------------
class ResultStore:
    """Results of finished jobs: ``<data_dir>/results/<job>/`` or ``s3://bucket/prefix/<job>/``."""

    def __init__(self, local_root: Path, s3_uri: str | None = None, s3=None, presign_s3=None):
        self.local_root = Path(local_root)
        self.local_root.mkdir(parents=True, exist_ok=True)
        self.s3_uri = s3_uri
        self.s3 = s3
        self.presign_s3 = presign_s3 or s3
        if s3_uri:
            self.bucket, prefix = split_s3_uri(s3_uri.rstrip("/") + "/")
            self.prefix = prefix.strip("/")

    @property
    def in_s3(self) -> bool:
        return bool(self.s3_uri)

    def holds(self, uri: str) -> bool:
        """Whether the (normalised) ``s3://`` URI names something under the results prefix."""
        if not self.in_s3 or not uri.startswith("s3://"):
            return False
        bucket, key = split_s3_uri(uri)
        if bucket.lower() != self.bucket.lower():
            return False
        return not self.prefix or key == self.prefix or key.startswith(self.prefix + "/")

    def _key(self, job_id: str, filename: str) -> str:
        return "/".join(p for p in (self.prefix, job_id, filename) if p)

    def store(self, job_id: str, files: dict[str, Path]) -> dict[str, ResultFile]:
        """Move (or upload) ``{kind: path}`` into the store; returns their descriptions."""
        out: dict[str, ResultFile] = {}
        if self.in_s3:
            from boto3.s3.transfer import TransferConfig

            cfg = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=4)
            for kind, path in files.items():
                key = self._key(job_id, path.name)
                ctype = RESULT_KINDS[kind][1]
                self.s3.upload_file(str(path), self.bucket, key, ExtraArgs={"ContentType": ctype}, Config=cfg)
                out[kind] = ResultFile(kind=kind, filename=path.name, bytes=path.stat().st_size, content_type=ctype,
                                       location=f"s3://{self.bucket}/{key}")
            return out
        dest = self.local_root / job_id
        tmp = self.local_root / f".{job_id}.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for kind, path in files.items():
            shutil.move(str(path), tmp / path.name)
            out[kind] = ResultFile(kind=kind, filename=path.name, bytes=(tmp / path.name).stat().st_size,
                                   content_type=RESULT_KINDS[kind][1], location="local")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)  # results appear all at once
        return out

    def local_path(self, job_id: str, rf: ResultFile) -> Path:
        return self.local_root / job_id / rf.filename

    def exists(self, job_id: str, rf: ResultFile) -> bool:
        if rf.location == "local":
            return self.local_path(job_id, rf).is_file()
        bucket, key = split_s3_uri(rf.location)
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except Exception:
            return False

    def presign(self, rf: ResultFile, expiry_s: int) -> str:
        bucket, key = split_s3_uri(rf.location)
        return self.presign_s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": bucket, "Key": key, "ResponseContentType": rf.content_type,
                    "ResponseContentDisposition": f'attachment; filename="{rf.filename}"'},
            ExpiresIn=expiry_s,
        )

    def delete(self, job_id: str, results: dict[str, ResultFile]) -> None:
        shutil.rmtree(self.local_root / job_id, ignore_errors=True)
        for rf in results.values():
            if rf.location.startswith("s3://") and self.s3 is not None:
                bucket, key = split_s3_uri(rf.location)
                try:
                    self.s3.delete_object(Bucket=bucket, Key=key)
                except Exception:
                    pass


# -- sources ---------------------------------------------------------------------------------
def check_public_host(host: str, port: int) -> list[str]:
    """Resolve ``host`` and refuse it unless every address is public (no loopback,
    private, link-local, multicast, reserved or unspecified address)."""
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise SourceError(f"cannot resolve host {host!r}: {exc.strerror}", code="bad_source") from None
    addrs = sorted({info[4][0] for info in infos})
    if not addrs:
        raise SourceError(f"host {host!r} has no address", code="bad_source")
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            raise SourceError(
                f"source host {host!r} resolves to {a}, a private/loopback/reserved address: refused",
                status=403, code="forbidden_source",
            )
    return addrs


class Sources:
    """Validates job sources at submission and fetches them in the worker."""

    def __init__(self, s3=None, *, allow_https: bool = False, input_buckets: list[str] | None = None,
                 https_timeout_s: float = 30.0, max_bytes: int | None = None):
        self.s3 = s3
        self.allow_https = allow_https
        self.input_buckets = input_buckets
        self.https_timeout_s = https_timeout_s
        self.max_bytes = max_bytes

    def describe(self, uri: str) -> dict:
        """Check ``uri`` now (the object exists, the host is public); returns the job's ``source``."""
        scheme = urlparse(uri).scheme.lower()
        if scheme == "s3":
            return self._check_s3(uri)
        if scheme in ("http", "https"):
            return self._check_https(uri)
        raise SourceError(f"unsupported source {uri[:200]!r}: use s3://bucket/key"
                          + (" or https://…" if self.allow_https else ""), code="bad_source")

    def _check_s3(self, uri: str) -> dict:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        bucket, key = split_s3_uri(uri)
        if not key:
            raise SourceError(f"{uri}: no object key", code="bad_source")
        if self.input_buckets is not None and bucket not in self.input_buckets:
            raise SourceError(f"bucket {bucket!r} is not an allowed input bucket", status=403, code="forbidden_source")
        if self.s3 is None:
            raise SourceError("this server has no S3 configured", code="bad_source")
        try:
            head = self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise SourceError(f"{uri} does not exist", status=404, code="source_not_found") from None
            if code in ("403", "AccessDenied"):
                raise SourceError(f"{uri}: access denied", status=403, code="forbidden_source") from None
            raise SourceError(f"{uri}: S3 answered {code or exc}", status=502, code="s3_error") from None
        except NoCredentialsError:
            raise SourceError("this server has no S3 credentials: it cannot read s3:// sources", code="bad_source") \
                from None
        except BotoCoreError as exc:
            raise SourceError(f"{uri}: S3 cannot be reached ({type(exc).__name__})", status=502, code="s3_error") from None
        size = int(head.get("ContentLength", 0))
        if size == 0:
            raise SourceError(f"{uri} is empty (0 bytes)", status=422, code="invalid_video")
        if self.max_bytes and size > self.max_bytes:
            raise SourceError(f"{uri} is {size} bytes, over the limit of {self.max_bytes}", status=413, code="too_large")
        return {"kind": "s3", "uri": uri, "bytes": size, "filename": Path(key).name}

    def _check_https(self, uri: str) -> dict:
        u = urlparse(uri)
        if not self.allow_https:
            raise SourceError("http(s) sources are disabled on this server (POSEZOO_SERVICE_ALLOW_HTTPS_SOURCES); "
                              "upload the video or name an s3:// object", status=403, code="forbidden_source")
        if not u.hostname:
            raise SourceError(f"{redact_url(uri)}: no host", code="bad_source")
        check_public_host(u.hostname, u.port or 443)
        if u.scheme != "https":
            raise SourceError("only https:// URLs are accepted, not plain http://", status=403, code="forbidden_source")
        return {"kind": "https", "uri": redact_url(uri), "filename": Path(u.path).name or "video.mp4"}

    def fetch(self, source: dict, secret_uri: str | None, dest: Path) -> Path:
        """Download the source to ``dest`` (in chunks)."""
        if source["kind"] == "s3":
            from boto3.s3.transfer import TransferConfig
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = split_s3_uri(source["uri"])
            try:
                self.s3.download_file(bucket, key, str(dest), Config=TransferConfig(max_concurrency=4))
            except (ClientError, BotoCoreError) as exc:
                raise SourceError(f"{source['uri']}: download failed ({type(exc).__name__})", status=502) from None
            return dest
        if source["kind"] == "https":
            return self._fetch_https(secret_uri or source["uri"], dest)
        raise SourceError(f"cannot fetch a {source['kind']!r} source")

    def _fetch_https(self, uri: str, dest: Path, redirects: int = 5) -> Path:
        import httpx

        for _ in range(redirects + 1):
            u = urlparse(uri)
            if u.scheme != "https" or not u.hostname:
                raise SourceError(f"redirect to a non-https URL {redact_url(uri)} refused", status=403)
            check_public_host(u.hostname, u.port or 443)  # again: DNS may have changed
            with httpx.stream("GET", uri, timeout=self.https_timeout_s, follow_redirects=False) as r:
                if r.is_redirect:
                    uri = str(r.next_request.url) if r.next_request else ""
                    continue
                if r.status_code != 200:
                    raise SourceError(f"{redact_url(uri)} answered HTTP {r.status_code}", status=422)
                n = 0
                with open(dest, "wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        n += len(chunk)
                        if self.max_bytes and n > self.max_bytes:
                            raise SourceError(f"{redact_url(uri)} is over the limit of {self.max_bytes} bytes", 413)
                        f.write(chunk)
                return dest
        raise SourceError("too many redirects", status=422)
