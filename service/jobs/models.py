"""Pydantic schemas of jobs: what a client sends, what the store keeps, what a client sees."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from posezoo.table import FORMATS

JobStatus = Literal["uploading", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
Stage = Literal["uploading", "queued", "fetching", "predicting", "writing", "rendering", "storing", "done"]
#: stages of a fine-tune job
FinetuneStage = Literal["uploading", "queued", "extracting", "validating", "training", "evaluating", "registering",
                        "done"]
JobKind = Literal["video", "finetune"]

#: Result kinds a job can produce, with their file suffix and content type.
RESULT_KINDS: dict[str, tuple[str, str]] = {
    "h5": (".h5", "application/x-hdf5"),
    "csv": (".csv", "text/csv; charset=utf-8"),
    "json": (".json", "application/json"),
    "parquet": (".parquet", "application/vnd.apache.parquet"),
    "nwb": (".nwb", "application/x-nwb"),
    "slp": (".slp", "application/x-sleap"),
    "video": ("_labeled.mp4", "video/mp4"),
    "meta": (".meta.json", "application/json"),
}


#: Job options that only top-down (detector + pose) models take.
TOP_DOWN_OPTIONS = ("max_individuals", "detector_every", "bbox_threshold", "draw_boxes")


class JobOptions(BaseModel):
    """Options of a video job (query string, form fields or JSON body)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="zoo model name[@version] or alias (default: the server's default)")
    formats: list[str] = Field(default_factory=lambda: ["h5", "csv"], description=f"any of {', '.join(FORMATS)}")
    labeled_video: bool = Field(False, description="also render an H.264 labelled video")
    batch_size: int = Field(16, ge=1, le=256)
    filter: Literal["median", "savgol"] | None = Field(None, description="temporal filter of the positions")
    filter_window: int = Field(5, ge=1, le=101)
    pcutoff: float | None = Field(None, ge=0, le=1, description="confidence cutoff for drawing (default: the card's)")
    trail: int = Field(0, ge=0, le=300, description="trail length in frames drawn in the labelled video")
    allow_truncated: bool = Field(False, description="on a truncated video keep the frames that decoded")
    # top-down (multi-animal) models only
    max_individuals: int | None = Field(None, ge=1, le=32, description="top-down models: most animals tracked "
                                                                        "(default: the card's)")
    detector_every: int | None = Field(None, ge=1, le=300, description="top-down models: run the detector every N "
                                                                       "frames, carry boxes from poses in between "
                                                                       "(default 1)")
    bbox_threshold: float | None = Field(None, ge=0, le=1, description="top-down models: ignore detections "
                                                                       "scoring below this")
    draw_boxes: bool | None = Field(None, description="top-down models: draw each animal's box in the labelled "
                                                      "video")

    @field_validator("formats", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [f for f in v.split(",")]
        if isinstance(v, (list, tuple)):
            flat: list[str] = []
            for item in v:
                flat += [f.strip().lower() for f in str(item).split(",") if f.strip()]
            return flat
        return v

    @field_validator("formats")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown format(s) {bad}: choose from {', '.join(FORMATS)}")
        if not v:
            raise ValueError(f"at least one format is needed: choose from {', '.join(FORMATS)}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _filter_applies(self) -> "JobOptions":
        # the rule the job itself applies, checked before the job is accepted
        if self.filter:
            from posezoo.errors import InputError
            from posezoo.filtering import check_filter

            try:
                check_filter(self.filter, self.filter_window)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return self


class FinetuneOptions(BaseModel):
    """Options of a fine-tune job (query string or multipart form fields). Unset numbers take the
    server's defaults; the server caps them (``MAX_FINETUNE_STEPS``, ``MAX_FINETUNE_BATCH_SIZE``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    base_model: str | None = Field(None, description="zoo model name[@version] to start from, with the keypoints of "
                                                     "the labelled data (default: the server's default model)")
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_\-]*$", max_length=64,
                             description="name of the new model (default: <base name>-ft)")
    # Both end up as directory names: they start with a letter or digit (never '.' or '..').
    version: str | None = Field(None, pattern=r"^[0-9A-Za-z][0-9A-Za-z.\-+]*$", max_length=64,
                                description="version of the new model (default: the next free 1.0.N)")
    steps: int | None = Field(None, ge=1, description="training steps (default: the server's FINETUNE_STEPS)")
    batch_size: int | None = Field(None, ge=1, description="frames per step (default: the server's)")
    init: Literal["auto", "base", "imagenet"] = Field(
        "auto", description="start from the base model's training checkpoint (base), from ImageNet weights with the "
                            "base card's keypoints (imagenet), or the checkpoint when the card records one (auto)")
    head_width: int | None = Field(None, ge=8, le=256, description="head channels (ImageNet start only; default 64)")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="held-out share of the labelled frames (at least one)")
    test: list[str] | None = Field(None, description="glob patterns of held-out frames (instead of test_fraction)")
    seed: int = Field(0, ge=0)

    @field_validator("test", mode="before")
    @classmethod
    def _split_test(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p.strip() for p in v.split(",") if p.strip()]
        return v or None


class JobRequest(JobOptions):
    """JSON body of a job whose video is named by a URI instead of uploaded."""

    source: str = Field(..., description="s3://bucket/key (or https://… when the server allows it)")


class Progress(BaseModel):
    stage: str = "queued"
    frames_done: int = 0
    frames_total: int | None = None
    fps: float | None = None
    eta_s: float | None = None
    fraction: float = 0.0
    step: int | None = Field(None, description="fine-tune jobs: training steps done")
    steps_total: int | None = Field(None, description="fine-tune jobs: training steps in all")
    loss: float | None = Field(None, description="fine-tune jobs: running training loss")


class ResultFile(BaseModel):
    kind: str
    filename: str
    bytes: int
    content_type: str
    location: str = Field(description="'local' or the s3:// URI")


class JobRecord(BaseModel):
    """One job, as the store keeps it. ``owner`` is an API key's name, never the key."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    owner: str
    kind: JobKind = "video"
    status: JobStatus = "queued"
    options: JobOptions
    finetune: FinetuneOptions | None = None
    model: str
    source: dict[str, Any] = Field(default_factory=dict, description="kind, uri or filename, bytes")
    input_path: str | None = None
    progress: Progress = Field(default_factory=Progress)
    results: dict[str, ResultFile] = Field(default_factory=dict)
    error: dict[str, str] | None = None
    attempts: int = 0
    replica: str | None = Field(None, description="the replica that ran it last (REPLICA_ID)")
    notes: list[str] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    n_frames: int | None = None
    metrics: dict[str, Any] | None = None
    output_model: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class JobView(BaseModel):
    """What a client sees of a job (``GET /v1/jobs/{id}``)."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    kind: JobKind = "video"
    status: JobStatus
    model: str
    options: JobOptions
    finetune: FinetuneOptions | None = Field(None, description="fine-tune jobs: their options")
    source: dict[str, Any]
    progress: Progress
    results: dict[str, str] = Field(default_factory=dict, description="result kind -> download path")
    error: dict[str, str] | None = None
    attempts: int
    replica: str | None = Field(None, description="the service replica that ran the job last")
    notes: list[str]
    created_at: float
    started_at: float | None
    finished_at: float | None
    n_frames: int | None = None
    metrics: dict[str, Any] | None = Field(None, description="fine-tune jobs: evaluation of the new model "
                                                              "(posezoo.evaluate, per split and keypoint)")
    output_model: str | None = Field(None, description="fine-tune jobs: name@version of the registered model")

    @classmethod
    def of(cls, rec: JobRecord, base: str = "/v1") -> "JobView":
        return cls(
            id=rec.id, kind=rec.kind, status=rec.status, model=rec.model, options=rec.options,
            finetune=rec.finetune, source=rec.source, metrics=rec.metrics, output_model=rec.output_model,
            progress=rec.progress, error=rec.error, attempts=rec.attempts, replica=rec.replica, notes=rec.notes,
            created_at=rec.created_at, started_at=rec.started_at, finished_at=rec.finished_at,
            n_frames=rec.n_frames,
            results={k: f"{base}/jobs/{rec.id}/results/{k}" for k in rec.results},
        )


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": code, "detail": one line a user can act on}``."""

    error: str
    detail: str
