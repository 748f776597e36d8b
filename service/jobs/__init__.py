"""Durable video jobs for the hosted service: records, storage, uploads, workers, API keys.

The HTTP layer (``service/``) is a thin adapter over :class:`JobManager`; nothing here
imports BentoML or a web framework.
"""

from .auth import ANONYMOUS, ApiKeys, AuthError
from .manager import (
    JobManager,
    JobNotFoundError,
    QueueFullError,
    Reservation,
    error_code,
    validate_video,
)
from .models import (
    RESULT_KINDS,
    TERMINAL,
    ErrorBody,
    FinetuneOptions,
    JobOptions,
    JobRecord,
    JobRequest,
    JobView,
    Progress,
    ResultFile,
)
from .storage import ResultStore, SourceError, Sources, check_public_host, redact_url
from .store import JobStore
from .uploads import (
    UploadError,
    check_declared_length,
    check_filename,
    paced,
    receive_multipart,
    receive_raw,
)

__all__ = [
    "ANONYMOUS", "ApiKeys", "AuthError", "ErrorBody", "FinetuneOptions", "JobManager", "JobNotFoundError",
    "JobOptions", "JobRecord", "JobRequest", "JobStore", "JobView", "Progress", "QueueFullError", "RESULT_KINDS", "Reservation", "ResultFile",
    "ResultStore", "SourceError", "Sources", "TERMINAL", "UploadError", "check_declared_length", "check_filename", "check_public_host",
    "error_code", "paced", "receive_multipart", "receive_raw", "redact_url", "validate_video",
]
