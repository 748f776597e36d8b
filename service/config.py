"""Settings of the hosted service (``service/``) and its job machinery (:mod:`service.jobs`).

Every setting comes from an environment variable ``POSEZOO_SERVICE_<NAME>`` (upper
case), or from a YAML/JSON file named by ``POSEZOO_SERVICE_CONFIG`` (keys are the
lower-case field names); environment variables win over the file. Complex values
(``api_keys``, lists) are JSON in the environment, e.g.
``POSEZOO_SERVICE_API_KEYS='{"alice": "<sha256 hex of alice's token>"}'``.

API keys are never configured in clear: only the sha256 of each token is stored
(:func:`hash_api_key`, or ``posezoo remote hash-key TOKEN``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from posezoo.errors import PosezooError

CONFIG_ENV = "POSEZOO_SERVICE_CONFIG"
ENV_PREFIX = "POSEZOO_SERVICE_"


def hash_api_key(token: str) -> str:
    """The sha256 hex digest of an API token: what the configuration stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class _FileSource(PydanticBaseSettingsSource):
    """Values from the YAML/JSON file named by ``POSEZOO_SERVICE_CONFIG``."""

    def __init__(self, settings_cls):
        super().__init__(settings_cls)
        path = os.environ.get(CONFIG_ENV)
        self._data: dict[str, Any] = {}
        if path:
            p = Path(path)
            try:
                text = p.read_text()
            except OSError as exc:
                raise PosezooError(f"{CONFIG_ENV}={path}: cannot read the service configuration: {exc}") from exc
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise PosezooError(f"{path}: the service configuration must be a mapping of settings")
            unknown = sorted(set(data) - set(settings_cls.model_fields))
            if unknown:
                raise PosezooError(f"{path}: unknown service setting(s) {unknown}")
            self._data = data

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class ServiceSettings(BaseSettings):
    """Configuration of the posezoo service. See the README's "Service" section."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=())

    # -- storage ----------------------------------------------------------------------------
    data_dir: Path = Field(Path("posezoo-service-data"), description="job database, uploads, work and local results")
    results_s3_uri: str | None = Field(None, description="s3://bucket/prefix: keep results in S3 (presigned downloads)")
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint (default POSEZOO_S3_ENDPOINT, then boto3's)")
    s3_public_endpoint: str | None = Field(None, description="endpoint written into presigned URLs (default: s3_endpoint)")
    presign_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    input_buckets: list[str] | None = Field(None, description="if set, only these buckets are accepted as s3:// sources")
    database_url: str | None = Field(None, description="postgresql://...: share jobs with other replicas (needs "
                                                       "results_s3_uri); default: a SQLite file in data_dir")
    replica_id: str | None = Field(None, max_length=60, description="this replica's name in job records "
                                                                    "(default: host name and pid)")
    lease_s: float = Field(30.0, ge=2, le=3600, description="with database_url: a running job's lease; a replica "
                                                            "silent this long loses its jobs to the others")

    # -- jobs -------------------------------------------------------------------------------
    workers: int = Field(1, ge=1, le=64, description="jobs running at once")
    queue_size: int = Field(4, ge=0, le=10_000, description="jobs waiting beyond the running ones; more get 429")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 429")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per job (default: cores / workers)")
    device: Literal["auto", "cpu", "cuda", "tensorrt", "tensorrt:fp16"] = "auto"
    default_model: str | None = Field(None, description="model when a job names none (default: posezoo's DEFAULT_MODEL)")
    allowed_models: list[str] | None = Field(None, description="if set, only these model names are served")
    resume_interrupted: bool = Field(True, description="after a restart, re-run interrupted jobs (else mark them failed)")
    max_attempts: int = Field(2, ge=1, description="runs a job gets (a restart mid-job costs one)")
    max_frames: int | None = Field(None, ge=1, description="refuse videos longer than this many frames")
    max_active_per_key: int | None = Field(
        None, ge=1, description="jobs one API key may have uploading, queued or running at once "
                                "(default: half of workers + queue_size, at least 1)")

    # -- requests ---------------------------------------------------------------------------
    max_upload_bytes: int = Field(4 << 30, ge=1, description="largest video upload (413 above)")
    max_image_bytes: int = Field(20 << 20, ge=1, description="largest image for /v1/predict/image")
    max_finetune_bytes: int = Field(2 << 30, ge=1, description="largest labelled-data zip for fine-tuning")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest image (width x height) for "
                                                                "/v1/predict/image, read from its header (413)")
    # DCI 4K: at this size a labelled-video job costs ~400 MB; 4096x4096 would be near 500 MB
    max_video_pixels: int = Field(4096 * 2160, ge=1, description="largest video frame (width x height), read "
                                                                 "from the header before any decoding (413)")
    image_concurrency: int = Field(2, ge=1, le=64, description="image predictions decoded and run at once")
    image_wait_s: float = Field(10.0, ge=0, description="how long an image request waits for a slot (then 429)")
    upload_idle_timeout_s: float = Field(60.0, gt=0, description="an upload that sends nothing for this long "
                                                                 "is cut off (408) and its slot freed")
    upload_min_rate: int = Field(16 << 10, ge=0, description="slowest average upload rate in bytes/s accepted "
                                                             "once upload_rate_grace_s has passed (408 below)")
    upload_rate_grace_s: float = Field(30.0, ge=0, description="seconds before upload_min_rate is enforced")

    # -- fine-tune jobs ---------------------------------------------------------------------
    finetune_enabled: bool = Field(True, description="accept fine-tune jobs (they also need PyTorch on the server)")
    finetune_queue_size: int = Field(2, ge=0, le=1000, description="fine-tune jobs waiting beyond the running one")
    finetune_threads: int | None = Field(None, ge=1, description="PyTorch threads of a training run (default: cores)")
    finetune_steps: int = Field(300, ge=1, description="training steps when a job names none")
    finetune_batch_size: int = Field(8, ge=1, description="frames per step when a job names none")
    max_finetune_steps: int = Field(5000, ge=1, description="most training steps a job may ask for")
    max_finetune_batch_size: int = Field(32, ge=1, description="largest batch a job may ask for")
    max_finetune_frames: int = Field(2000, ge=2, description="most labelled frames in one fine-tune job")
    max_finetune_unzipped_bytes: int = Field(4 << 30, ge=1, description="largest total size the zip unpacks to")
    max_finetune_members: int = Field(20_000, ge=1, description="most members (files) in the zip")
    max_finetune_ratio: float = Field(100.0, ge=1, description="highest compression ratio of the zip (zip bombs)")
    allow_https_sources: bool = Field(False, description="accept https:// video URLs (never private/loopback hosts)")
    https_timeout_s: float = Field(30.0, gt=0)

    # -- access -----------------------------------------------------------------------------
    api_keys: dict[str, str] = Field(default_factory=dict, description="key name -> sha256 hex of the token")
    allow_anonymous: bool = Field(False, description="requests without a key act as the user 'anonymous'")

    @field_validator("api_keys")
    @classmethod
    def _hashes(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, digest in v.items():
            d = digest.lower().removeprefix("sha256:")
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise ValueError(f"api_keys[{name!r}] must be the sha256 hex digest of the token, not the token")
            out[name] = d
        return out

    @field_validator("results_s3_uri")
    @classmethod
    def _s3_uri(cls, v: str | None) -> str | None:
        if v and not v.startswith("s3://"):
            raise ValueError("results_s3_uri must look like s3://bucket/prefix")
        return v or None

    @field_validator("database_url")
    @classmethod
    def _pg_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must look like postgresql://user@host:5432/dbname")
        return v or None

    @model_validator(mode="after")
    def _shared_bytes(self) -> "ServiceSettings":
        if self.database_url and not self.results_s3_uri:
            raise ValueError("database_url needs results_s3_uri: replicas share uploads, results and fine-tuned "
                             "models through S3")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        return init_settings, env_settings, _FileSource(settings_cls)

    # -- derived ----------------------------------------------------------------------------
    @property
    def resolved_s3_endpoint(self) -> str | None:
        return self.s3_endpoint or os.environ.get("POSEZOO_S3_ENDPOINT") or None

    @property
    def replica(self) -> str:
        """This replica's name: ``REPLICA_ID`` or ``<host>:<pid>``."""
        import socket

        return self.replica_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def model_default(self) -> str:
        from posezoo.predictor import DEFAULT_MODEL

        return self.default_model or DEFAULT_MODEL

    @property
    def key_share(self) -> int:
        """Most jobs (uploading, queued or running) one API key may hold: a slow or greedy
        client must not take every slot of the queue."""
        if self.max_active_per_key:
            return self.max_active_per_key
        return max(1, -(-(self.workers + self.queue_size) // 2))

    @property
    def ort_threads(self) -> int:
        if self.threads:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.workers)

    def public_dict(self) -> dict[str, Any]:
        """The settings without secrets (key hashes are left out too), for logs."""
        d = self.model_dump(mode="json")
        d["api_keys"] = sorted(self.api_keys)
        return d


def load_settings(**overrides) -> ServiceSettings:
    """Settings from the environment and ``POSEZOO_SERVICE_CONFIG``; errors are one line."""
    from pydantic import ValidationError

    _refuse_unknown_environment()
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if not loc:  # a rule over several settings
            raise PosezooError(f"invalid service settings: {first['msg'].removeprefix('Value error, ')}") from exc
        raise PosezooError(f"invalid service setting {loc} ({ENV_PREFIX}{loc.upper()}): {first['msg']}") from exc


def _refuse_unknown_environment() -> None:
    """A ``POSEZOO_SERVICE_*`` variable that names no setting is an error, not ignored: a typo
    in ``INPUT_BUCKETS`` would otherwise leave every bucket open."""
    import difflib

    known = {ENV_PREFIX + name.upper() for name in ServiceSettings.model_fields} | {CONFIG_ENV}
    unknown = sorted(k for k in os.environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k.upper(), sorted(known), n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        raise PosezooError(f"unknown service setting(s) in the environment: {', '.join(hints)}; "
                           "the README's Settings table lists them")
