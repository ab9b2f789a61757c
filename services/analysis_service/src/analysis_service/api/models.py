"""The job API's request and response bodies (the OpenAPI document is generated from these)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from analysis_service.settings import MAX_SUBMISSION_FILES
from service_shared.messages import (
    ANALYZER_NAME_PATTERN,
    FILE_PATTERN,
    ID_PATTERN,
    MAX_ANALYSES,
    MAX_FILE_CHARS,
    AnalysisKind,
    RequestOptions,
)


class JobState(StrEnum):
    """Where a job is. ``completed``, ``failed`` and ``cancelled`` are terminal: they never change."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `path_outside_media_root`.")
    message: str = Field(description="What was refused and why.")


class ErrorBody(BaseModel):
    """Every error response of the API."""

    error: ErrorDetail


class JobSubmission(BaseModel):
    """``POST /v1/jobs``: files to analyse, as one batch."""

    model_config = ConfigDict(extra="forbid")

    files: list[Annotated[str, Field(min_length=1, max_length=MAX_FILE_CHARS, pattern=FILE_PATTERN)]] = Field(
        min_length=1,
        max_length=MAX_SUBMISSION_FILES,
        description="Paths of audio files, relative to (or inside) the media root; one job each. "
        f"At most `api.max_files` (default 10,000; never more than {MAX_SUBMISSION_FILES:,}).",
    )
    priority: int = Field(
        default=5, ge=0, le=9, strict=True, description="0 (lowest) to 9 (highest), a JSON integer."
    )
    analyses: list[Annotated[str, Field(pattern=ANALYZER_NAME_PATTERN)]] = Field(
        default_factory=lambda: [kind.value for kind in AnalysisKind],
        min_length=1,
        max_length=MAX_ANALYSES,
        json_schema_extra={"uniqueItems": True},
        description="Distinct analyzer names (built-in bpm, key, mood, or installed plugins); "
        "default: the built-ins.",
    )
    options: RequestOptions = Field(default_factory=RequestOptions)
    correlation_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="Carried into every job's result message."
    )


class SubmittedJob(BaseModel):
    id: str
    file: str
    url: str = Field(description="Path of the job's status, `/v1/jobs/{id}`.")


class SubmissionAccepted(BaseModel):
    """``202``: every job is recorded in the ledger and confirmed by the broker."""

    batch_id: str
    url: str = Field(description="Path of the batch's status, `/v1/batches/{id}`.")
    jobs: list[SubmittedJob]


class JobStatus(BaseModel):
    """A job as the ledger (status, timestamps, error) and live progress (percent, stage) see it."""

    id: str
    batch_id: str | None
    file: str | None
    status: JobState
    percent: float = Field(ge=0, le=100, description="0-100; 100 once terminal.")
    stage: str = Field(description="What the worker is doing (`decode`, `features`, ...) or the status.")
    priority: int | None
    analyses: list[str] | None
    correlation_id: str | None
    attempts: int = Field(description="Deliveries of the job that started analysing it.")
    cancel_requested: bool = Field(description="`DELETE` was accepted and the job is not yet terminal.")
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    cancel_requested_at: datetime | None
    error: ErrorDetail | None = Field(description="Why it failed or was cancelled (terminal only).")
    url: str
    result_url: str


class JobPage(BaseModel):
    """``GET /v1/jobs``: jobs ordered by submission time, then id."""

    jobs: list[JobStatus]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null at the end.")


class StatusCounts(BaseModel):
    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


class BatchStatus(BaseModel):
    """Aggregate progress of a batch."""

    id: str
    total: int
    counts: StatusCounts
    finished: int = Field(description="Jobs with a terminal outcome.")
    done: bool = Field(description="Every job is terminal.")
    percent: float = Field(ge=0, le=100, description="Mean progress of the jobs (terminal ones count 100).")
    eta_s: float | None = Field(
        description="Seconds until every job is terminal, at the rate jobs finished since the batch "
        "started; null before the first one finished or once done."
    )
    cancel_requested: int = Field(description="Jobs with a pending cancellation.")
    failures_by_code: dict[str, int] = Field(description="Failed jobs per error code.")
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    url: str
    jobs_url: str


class CancelAccepted(BaseModel):
    """``202`` of ``DELETE /v1/batches/{id}``."""

    batch: BatchStatus
    cancel_requested: int = Field(description="Jobs whose cancellation this request recorded or renewed.")


class Health(BaseModel):
    status: Literal["ok"]


class CheckResult(BaseModel):
    ok: bool
    error: str | None = None


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, CheckResult]


class StreamEvent(BaseModel):
    """One message of a live stream (WebSocket text frame, or the `data:` of a Server-Sent Event).

    ``type`` is ``state`` (a job's full status: first, on every status change and last),
    ``progress`` (a job's status after a progress update), ``batch`` (a batch's aggregate: first,
    when jobs finish, and last) or ``job`` (a job of a followed batch changed).
    """

    type: Literal["state", "progress", "batch", "job"]
    job: JobStatus | None = None
    batch: BatchStatus | None = None
    update: dict[str, Any] | None = Field(
        default=None, description="`job` events: the worker's progress update as published."
    )
    dropped: int = Field(
        default=0, description="Events dropped for this client since the previous one (it read too slowly)."
    )
