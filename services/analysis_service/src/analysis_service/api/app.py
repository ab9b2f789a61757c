"""The job API: a FastAPI application over the request exchange, the outcome ledger and live progress.

See ``docs/api.md`` for the endpoints. :func:`create_app` builds the application from the
:class:`~analysis_service.settings.Settings`; :func:`serve` runs it under uvicorn (the
``analysis-service api`` command).

The process is stateless: submissions are rows in the ledger plus messages on the broker, statuses
and results are read from the ledger, progress from Redis. Any number of replicas can serve the
same clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import stat
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final

import structlog
from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import ValidationError
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from analysis_service.api.broker import BROKER_ERRORS, RequestPublisher
from analysis_service.api.events import ProgressHub, Subscription
from analysis_service.api.ledger import BatchRow, Cursor, JobLedger
from analysis_service.api.metrics import ApiMetrics
from analysis_service.api.models import (
    TERMINAL_STATES,
    BatchStatus,
    CancelAccepted,
    CheckResult,
    ErrorBody,
    ErrorDetail,
    Health,
    JobPage,
    JobState,
    JobStatus,
    JobSubmission,
    Readiness,
    StatusCounts,
    StreamEvent,
    SubmissionAccepted,
    SubmittedJob,
)
from analysis_service.audio.registry import build_registry
from analysis_service.errors import (
    AnalysisServiceError,
    ApiError,
    ApiKeyMissing,
    ApiKeyRejected,
    BatchFinished,
    BatchNotFound,
    BrokerUnavailable,
    FileMissing,
    FileUnreadable,
    InvalidAnalyses,
    InvalidCorrelationId,
    InvalidFile,
    InvalidOptions,
    InvalidPriority,
    InvalidQuery,
    InvalidRequest,
    JobFinished,
    JobNotFinished,
    JobNotFound,
    LedgerUnavailable,
    MalformedJson,
    PathOutsideMediaRoot,
    PermanentError,
    RequestTooLarge,
    TooManyFiles,
    TransientError,
    UnknownAnalyzer,
)
from analysis_service.media import resolve_media_path
from analysis_service.settings import Settings
from analysis_service.sinks._util import REDIS_TRANSIENT_ERRORS, redis_client
from service_shared.messages import ID_PATTERN, AnalysisRequest, AnalysisResultMessage

log = structlog.get_logger(__name__)

#: Seconds each readiness check may take.
READY_TIMEOUT_S: Final = 2.0
#: After Redis failed to answer, progress reads skip it (ledger only) for this long (seconds).
REDIS_BACKOFF_S: Final = 5.0
#: Most jobs per page of ``GET /v1/jobs``.
MAX_PAGE: Final = 500
#: A batch stream sends a fresh aggregate at most this often while jobs finish (seconds).
BATCH_SUMMARY_MIN_S: Final = 1.0

_ID_RE = re.compile(ID_PATTERN)


# ------------------------------------------------------------------------------------ resources


@dataclass
class Resources:
    """What the API talks to; opened by :meth:`open` and closed by :meth:`close`."""

    settings: Settings
    ledger: JobLedger
    publisher: RequestPublisher
    redis: Redis
    hub: ProgressHub
    metrics: ApiMetrics
    analyzers: frozenset[str]
    redis_skip_until: float = 0.0

    @classmethod
    async def open(cls, settings: Settings, metrics: ApiMetrics | None = None) -> Resources:
        """Connect to PostgreSQL (applying migrations) and RabbitMQ; Redis connects on first use.

        Raises
        ------
        StartupError
            Naming the dependency that could not be reached and why.
        """
        metrics = metrics or ApiMetrics()
        ledger = JobLedger(settings.postgres)
        try:
            await ledger.start()
        except AnalysisServiceError as exc:
            raise StartupError("PostgreSQL", str(exc)) from exc
        publisher = RequestPublisher(settings.rabbitmq)
        try:
            await publisher.start()
        except BROKER_ERRORS as exc:
            await ledger.close()
            raise StartupError("RabbitMQ", f"{type(exc).__name__}: {exc}") from exc
        redis = redis_client(settings.redis)
        hub_client = Redis.from_url(
            settings.redis.url,
            decode_responses=True,
            socket_connect_timeout=settings.redis.socket_timeout_s,
            health_check_interval=30,
        )
        hub = ProgressHub(
            hub_client,
            f"{settings.redis.key_prefix}:progress",
            settings.api.stream_queue_size,
            on_drop=metrics.stream_dropped.inc,
        )
        await hub.start()
        return cls(settings, ledger, publisher, redis, hub, metrics, frozenset(build_registry()))

    async def close(self) -> None:
        await self.hub.close()
        await self.publisher.close()
        await self.ledger.close()
        await self.redis.aclose()

    # ------------------------------------------------------------------ progress (Redis, best effort)
    def _redis_usable(self) -> bool:
        return time.monotonic() >= self.redis_skip_until

    def _redis_failed(self, exc: BaseException) -> None:
        if self._redis_usable():
            log.warning(
                "progress unavailable, answering from the ledger", error=f"{type(exc).__name__}: {exc}"
            )
        self.redis_skip_until = time.monotonic() + REDIS_BACKOFF_S
        self.metrics.redis_fallbacks.inc()

    def progress_key(self, request_id: str) -> str:
        return f"{self.settings.redis.key_prefix}:progress:{request_id}"

    async def progress(self, request_ids: list[str]) -> dict[str, dict[str, str]]:
        """The progress hashes of ``request_ids`` that exist; {} when Redis does not answer."""
        if not request_ids or not self._redis_usable():
            return {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for rid in request_ids:
                    pipe.hgetall(self.progress_key(rid))
                hashes = await pipe.execute()
        except REDIS_TRANSIENT_ERRORS as exc:
            self._redis_failed(exc)
            return {}
        return {rid: h for rid, h in zip(request_ids, hashes, strict=True) if h}


class StartupError(Exception):
    """A dependency the API cannot start without is unreachable."""

    def __init__(self, dependency: str, reason: str) -> None:
        super().__init__(f"{dependency}: {reason}")
        self.dependency = dependency
        self.reason = reason


# ------------------------------------------------------------------------------------ views


def _url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def job_status(row: Mapping[str, Any], progress: Mapping[str, Any] | None) -> JobStatus:
    """A job as the client sees it: the ledger row decides the status (a terminal row is final,
    whatever Redis says); the progress hash (or update) adds percent and stage while it runs."""
    status = JobState(row["status"])
    error: ErrorDetail | None = None
    if status in TERMINAL_STATES:
        percent, stage = 100.0, status.value
        if status is not JobState.COMPLETED:
            code = row["error_code"] or ("cancelled" if status is JobState.CANCELLED else "unknown")
            error = ErrorDetail(code=code, message=row["error_message"] or "")
    else:
        percent, stage = 0.0, status.value
        if progress:
            with contextlib.suppress(TypeError, ValueError):
                percent = min(max(float(progress.get("percent", 0.0)), 0.0), 99.9)
            stage = str(progress.get("stage") or stage)
    job_id = str(row["request_id"])
    return JobStatus(
        id=job_id,
        batch_id=row["batch_id"],
        file=row["file"],
        status=status,
        percent=percent,
        stage=stage,
        priority=row["priority"],
        analyses=list(row["analyses"]) if row["analyses"] is not None else None,
        correlation_id=row["correlation_id"],
        attempts=int(row["attempts"]),
        cancel_requested=row["cancel_requested_at"] is not None and status not in TERMINAL_STATES,
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        cancel_requested_at=row["cancel_requested_at"],
        error=error,
        url=_url(job_id),
        result_url=f"{_url(job_id)}/result",
    )


def batch_status(batch_id: str, row: BatchRow, progress: Mapping[str, Mapping[str, Any]]) -> BatchStatus:
    """A batch's aggregate: counts, mean percent (running jobs from their progress), ETA."""
    finished = row.counts["completed"] + row.counts["failed"] + row.counts["cancelled"]
    running_percent = 0.0
    for rid in row.running_ids:
        with contextlib.suppress(TypeError, ValueError):
            running_percent += min(max(float(progress.get(rid, {}).get("percent", 0.0)), 0.0), 99.9)
    percent = min(100.0, (100.0 * finished + running_percent) / row.total)
    done = finished == row.total
    eta: float | None = None
    if not done and finished > 0 and row.started_at is not None:
        elapsed = (datetime.now(UTC) - row.started_at).total_seconds()
        if elapsed > 0:
            eta = round((row.total - finished) * elapsed / finished, 1)
    return BatchStatus(
        id=batch_id,
        total=row.total,
        counts=StatusCounts(**row.counts),
        finished=finished,
        done=done,
        percent=round(percent, 2),
        eta_s=eta,
        cancel_requested=row.cancel_requested,
        failures_by_code=row.failures_by_code,
        submitted_at=row.submitted_at,
        started_at=row.started_at,
        finished_at=row.finished_at if done else None,
        url=f"/v1/batches/{batch_id}",
        jobs_url=f"/v1/jobs?batch={batch_id}",
    )


# ------------------------------------------------------------------------------------ errors


def _error_response(exc: AnalysisServiceError, status: int) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = ErrorBody(error=ErrorDetail(code=exc.code, message=str(exc)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def status_of(exc: AnalysisServiceError) -> int:
    """The HTTP status answering ``exc``: its own for API errors, 422 for what the request contract
    refuses, 503 for an unavailable dependency."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, RequestTooLarge):
        return 413
    if isinstance(exc, MalformedJson):
        return 400
    if isinstance(exc, PermanentError):
        return 422
    if isinstance(exc, TransientError):
        return 503
    return 500


#: Which error a refusal of a ``JobSubmission`` field becomes.
_FIELD_ERRORS: Final[dict[str, type[AnalysisServiceError]]] = {
    "files": InvalidFile,
    "priority": InvalidPriority,
    "analyses": InvalidAnalyses,
    "options": InvalidOptions,
    "correlation_id": InvalidCorrelationId,
}


def validation_error(errors: list[Any]) -> AnalysisServiceError:
    """The specific error for FastAPI's validation ``errors`` (the first one decides the code)."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or e.get('loc', ('body',))[0]}: {e.get('msg', '')}"
        for e in errors[:5]
    )
    if len(errors) > 5:
        problems += f"; and {len(errors) - 5} more"
    if loc[:1] != ("body",):
        return InvalidQuery(problems)
    if kind == "json_invalid" or (len(loc) == 1 and kind in ("model_attributes_type", "dict_type")):
        return MalformedJson(f"the body is not a JSON object: {problems}")
    field = str(loc[1]) if len(loc) > 1 else ""
    if field == "files" and len(loc) == 2 and kind == "too_long":
        return TooManyFiles(problems)
    if field == "files" and len(loc) == 2 and kind == "too_short":
        return InvalidFile(f"name at least one file: {problems}")
    return _FIELD_ERRORS.get(field, InvalidRequest)(problems)


def _ok_id(value: str, missing: type[ApiError]) -> str:
    """``value`` when it is a well-formed id; else the not-found error (no such id can exist)."""
    if not _ID_RE.match(value):
        raise missing(f"no such id: {value[:80]!r}")
    return value


# ------------------------------------------------------------------------------------ middleware


#: HTTP methods counted under their own name on ``/metrics``; any other is counted as ``other`` (a
#: label per method a client invents would grow the metrics without bound).
_METHOD_LABELS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyLimitAndMetrics:
    """ASGI middleware: refuses bodies over ``max_bytes`` with 413 before the app reads them, and
    counts/time requests by route template."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: ApiMetrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        method = scope["method"]
        method_label = method if method in _METHOD_LABELS else "other"  # any token is a method to h11

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body: list[bytes] | None = None
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                await self._too_large(send_wrapper)
                return
            if method in ("POST", "PUT", "PATCH"):
                body, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await self._too_large(send_wrapper)
                        return
                    body.append(chunk)
                    more = message.get("more_body", False)
                replay = b"".join(body)
                sent = False

                async def replay_receive() -> Message:
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": replay, "more_body": False}
                    return await receive()

                await self.app(scope, replay_receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, method_label, str(status)).inc()
            self.metrics.request_seconds.labels(template, method_label).observe(time.perf_counter() - started)

    async def _too_large(self, send: Send) -> None:
        self.metrics.refused.labels(RequestTooLarge.code).inc()
        response = _error_response(
            RequestTooLarge(f"the request body exceeds {self.max_bytes} bytes (api.max_body_bytes)"), 413
        )
        await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - a JSONResponse never reads
    return {"type": "http.disconnect"}


# ------------------------------------------------------------------------------------ the app


#: One Server-Sent Event (as OpenAPI 3.2 describes an event stream's items): ``event`` names the
#: type, ``data`` is a ``StreamEvent`` as JSON.
SSE_EVENT_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["state", "progress", "batch", "job"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/StreamEvent"},
        },
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}


def _error_doc(description: str) -> dict[str, Any]:
    """An error response in the OpenAPI document (always JSON, whatever the route's response class)."""
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


_ERRORS_401_403: dict[int | str, dict[str, Any]] = {
    401: _error_doc("No `Authorization: Bearer <key>` header (`missing_api_key`)."),
    403: _error_doc("The key is not one of `api.keys` (`invalid_api_key`)."),
}
_ERROR_422: dict[int | str, dict[str, Any]] = {
    422: _error_doc("A parameter is out of range (`invalid_query`).")
}
_ERROR_503: dict[int | str, dict[str, Any]] = {
    503: _error_doc("PostgreSQL is unavailable (`ledger_unavailable`).")
}
_ERROR_413: dict[int | str, dict[str, Any]] = {413: _error_doc("The body exceeds `api.max_body_bytes`.")}

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="One of the keys of `ANALYSIS_API__KEYS`, as `Authorization: Bearer <key>`.",
)


def check_key(authorization: str | None, keys: list[str]) -> None:
    """Accept ``authorization`` when it is ``Bearer <key>`` for one of ``keys``.

    Every key is compared in constant time (``hmac.compare_digest``), and all of them are, so the
    time taken does not tell which key came close. The key is never logged.

    Raises
    ------
    ApiKeyMissing
        No header, or not of the form ``Bearer <key>`` (401).
    ApiKeyRejected
        A well-formed header with a key that is not configured (403).
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiKeyMissing("send the API key as `Authorization: Bearer <key>`")
    presented = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise ApiKeyRejected("the API key is not valid")


def _query_names(dependant: Dependant) -> set[str]:
    """Every query parameter an operation (and its dependencies) takes."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def res_of(request: Request) -> Resources:
    resolved: Resources = request.app.state.resources
    return resolved


async def authenticated(
    request: Request, _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Resources:
    """The dependency of every ``/v1`` operation: a valid key, or 401/403 (see :func:`check_key`);
    then no query parameter the operation does not take (a misspelt filter must not list everything)."""
    check_key(request.headers.get("authorization"), request.app.state.api_keys)
    route = request.scope.get("route")
    if isinstance(route, APIRoute):
        known = _query_names(route.dependant)
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise InvalidQuery(f"unknown query parameter(s) {unknown}; this operation takes {sorted(known)}")
    return res_of(request)


Api = Annotated[Resources, Depends(authenticated)]


def _needs_key(dependant: Dependant) -> bool:
    return any(sub.call is authenticated or _needs_key(sub) for sub in dependant.dependencies)


class KeyFirstRoute(APIRoute):
    """An operation that takes :data:`Api` checks the key before FastAPI reads its body.

    FastAPI parses the JSON body before it solves dependencies, so without this a client holding no
    key got 400 ``malformed_json`` or 422 for its body (a description of the contract) before 401.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not _needs_key(self.dependant):
            return handler

        async def key_first(request: Request) -> Response:
            check_key(request.headers.get("authorization"), request.app.state.api_keys)
            return await handler(request)

        return key_first


def create_app(settings: Settings, *, resources: Resources | None = None) -> FastAPI:
    """The job API application.

    Parameters
    ----------
    settings : Settings
        The service's settings (``api``, ``postgres``, ``redis``, ``rabbitmq``,
        ``worker.media_root``).
    resources : Resources, optional
        Already opened connections (``serve`` opens them first so that a start-up failure is one
        log line). When omitted the application's lifespan opens and closes them.

    Raises
    ------
    ValueError
        When ``api.keys`` holds no key.
    """
    keys = settings.api.key_list()
    if not keys:
        raise ValueError("no API key configured: set ANALYSIS_API__KEYS (comma-separated keys)")
    metrics = resources.metrics if resources is not None else ApiMetrics()
    media_root = settings.worker.media_root

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = resources is None
        res = resources if resources is not None else await Resources.open(settings, metrics)
        app.state.resources = res
        try:
            yield
        finally:
            if owned:
                await res.close()

    app = FastAPI(
        title="analysis-service job API",
        version="1.0.0",
        summary="Submit audio analyses, follow them live, fetch results, cancel.",
        description='See docs/api.md. Every error response is `{"error": {"code", "message"}}`.',
        lifespan=lifespan,
    )
    app.router.route_class = KeyFirstRoute
    app.state.api_keys = keys
    if resources is not None:
        app.state.resources = resources
    app.add_middleware(BodyLimitAndMetrics, max_bytes=settings.api.max_body_bytes, metrics=metrics)

    # -------------------------------------------------------------- error handlers
    @app.exception_handler(AnalysisServiceError)
    async def _service_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AnalysisServiceError)
        status = status_of(exc)
        metrics.refused.labels(exc.code).inc()
        if status >= 500:
            log.warning("request failed", code=exc.code, error=str(exc))
        return _error_response(exc, status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        error = validation_error(list(exc.errors()))
        metrics.refused.labels(error.code).inc()
        return _error_response(error, status_of(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        body = ErrorBody(error=ErrorDetail(code=code, message=str(exc.detail)))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    # -------------------------------------------------------------- operations
    @app.get("/health", response_model=Health, tags=["operations"], summary="Liveness")
    async def health() -> Health:
        return Health(status="ok")

    @app.get(
        "/ready",
        response_model=Readiness,
        tags=["operations"],
        summary="Readiness: PostgreSQL, Redis and RabbitMQ (with the request exchange) answer",
        responses={503: {"model": Readiness, "description": "A dependency does not answer."}},
    )
    async def ready(request: Request) -> Response:
        res = res_of(request)
        checks: dict[str, Callable[[], Awaitable[Any]]] = {
            "postgres": res.ledger.ping,
            "redis": res.redis.ping,
            "rabbitmq": res.publisher.ping,
        }

        async def run(check: Callable[[], Awaitable[Any]]) -> CheckResult:
            try:
                await asyncio.wait_for(check(), READY_TIMEOUT_S)
            except TimeoutError:
                return CheckResult(ok=False, error=f"no answer within {READY_TIMEOUT_S:g} s")
            except Exception as exc:  # a check fails by raising anything; the reason is the answer
                return CheckResult(ok=False, error=f"{type(exc).__name__}: {exc}")
            return CheckResult(ok=True)

        results = await asyncio.gather(*(run(c) for c in checks.values()))
        body = Readiness(status="ready", checks=dict(zip(checks, results, strict=True)))
        if all(r.ok for r in results):
            return JSONResponse(body.model_dump(exclude_none=True))
        body.status = "not ready"
        return JSONResponse(body.model_dump(exclude_none=True), status_code=503)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "OK"}},
    )
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    # -------------------------------------------------------------- jobs
    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=SubmissionAccepted,
        tags=["jobs"],
        summary="Submit files for analysis (one job per file, together a batch)",
        responses={
            400: _error_doc("The body is not a JSON object (`malformed_json`)."),
            **_ERRORS_401_403,
            **_ERROR_413,
            422: _error_doc(
                "The submission is refused; nothing was published. Codes: `invalid_file`, "
                "`too_many_files`, `path_outside_media_root`, `file_not_found`, `file_unreadable`, "
                "`invalid_priority`, "
                "`invalid_analyses`, `unknown_analyzer`, `invalid_options`, `invalid_correlation_id`, "
                "`invalid_request`."
            ),
            503: _error_doc(
                "The ledger (`ledger_unavailable`) or the broker (`broker_unavailable`) "
                "did not take the submission; nothing was accepted."
            ),
        },
    )
    async def submit(submission: JobSubmission, res: Api, response: Response) -> SubmissionAccepted:
        if len(submission.files) > settings.api.max_files:
            raise TooManyFiles(
                f"{len(submission.files)} files; at most {settings.api.max_files} per submission "
                "(api.max_files)"
            )
        if len(set(submission.analyses)) != len(submission.analyses):
            raise InvalidAnalyses("analyses must not repeat a name")
        unknown = sorted(set(submission.analyses) - res.analyzers)
        if unknown:
            known = ", ".join(sorted(res.analyzers))
            raise UnknownAnalyzer(f"unknown analyzer(s) {unknown} (known: {known})")
        await asyncio.to_thread(_check_files, media_root, submission.files)

        batch_id = uuid.uuid4().hex
        try:
            requests = [
                AnalysisRequest.model_validate(
                    {
                        "request_id": uuid.uuid4().hex,
                        "file": file,
                        "priority": submission.priority,
                        "analyses": submission.analyses,
                        "options": submission.options.model_dump(),
                        "correlation_id": submission.correlation_id,
                    }
                )
                for file in submission.files
            ]
        except ValidationError as exc:  # the worker's contract refuses what the API's let through
            raise InvalidRequest(f"the request contract refuses this submission: {exc}") from exc
        await res.ledger.insert_queued(batch_id, requests, options_json=submission.options.model_dump_json())
        report = await res.publisher.publish(requests)
        if report.failure is not None:
            maybe_enqueued = [*report.confirmed, *report.uncertain]
            sent = set(maybe_enqueued)
            await res.ledger.withdraw(
                [r.request_id for r in requests if r.request_id not in sent], maybe_enqueued
            )
            log.warning(
                "submission refused by the broker",
                batch_id=batch_id,
                jobs=len(requests),
                published_then_cancelled=len(report.confirmed),
                unconfirmed_then_cancelled=len(report.uncertain),
                reason=report.failure,
            )
            raise BrokerUnavailable(
                f"RabbitMQ did not take the submission, nothing accepted: {report.failure}"
            )
        metrics.jobs_submitted.inc(len(requests))
        response.headers["Location"] = f"/v1/batches/{batch_id}"
        return SubmissionAccepted(
            batch_id=batch_id,
            url=f"/v1/batches/{batch_id}",
            jobs=[SubmittedJob(id=r.request_id, file=r.file, url=_url(r.request_id)) for r in requests],
        )

    @app.get(
        "/v1/jobs",
        response_model=JobPage,
        tags=["jobs"],
        summary="List jobs (oldest first), optionally of one status or batch",
        responses={
            400: _error_doc("`cursor` is not one this API handed out."),
            **_ERRORS_401_403,
            **_ERROR_422,
            **_ERROR_503,
        },
    )
    async def list_jobs(
        res: Api,
        status: Annotated[JobState | None, Query(description="Only jobs with this status.")] = None,
        batch: Annotated[str | None, Query(description="Only jobs of this batch.", max_length=200)] = None,
        cursor: Annotated[
            str | None, Query(description="`next_cursor` of the previous page.", max_length=1000)
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Jobs per page.")] = 100,
    ) -> JobPage:
        after = Cursor.decode(cursor) if cursor else None
        if batch is not None and not _ID_RE.match(batch):
            return JobPage(jobs=[], next_cursor=None)
        rows = await res.ledger.jobs(
            status=status.value if status else None, batch_id=batch, after=after, limit=limit + 1
        )
        more = len(rows) > limit
        rows = rows[:limit]
        live = [str(r["request_id"]) for r in rows if r["status"] not in TERMINAL_STATES]
        progress = await res.progress(live)
        jobs = [job_status(r, progress.get(str(r["request_id"]))) for r in rows]
        next_cursor = (
            Cursor(rows[-1]["submitted_at"], str(rows[-1]["request_id"])).encode() if more and rows else None
        )
        return JobPage(jobs=jobs, next_cursor=next_cursor)

    _JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
        **_ERRORS_401_403,
        **_ERROR_422,
        404: _error_doc("No such job (`job_not_found`)."),
        **_ERROR_503,
    }

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobStatus,
        tags=["jobs"],
        summary="A job's status, progress, timestamps and error",
        responses=_JOB_RESPONSES,
    )
    async def get_job(job_id: str, res: Api) -> JobStatus:
        row = await res.ledger.job(_ok_id(job_id, JobNotFound))
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        progress = await res.progress([job_id]) if row["status"] not in TERMINAL_STATES else {}
        return job_status(row, progress.get(job_id))

    @app.get(
        "/v1/jobs/{job_id}/result",
        response_model=AnalysisResultMessage,
        tags=["jobs"],
        summary="The job's stored result message (as published on the results exchange)",
        responses={
            **_JOB_RESPONSES,
            409: _error_doc("The job has no outcome yet (`job_not_finished`)."),
        },
    )
    async def get_result(job_id: str, res: Api) -> Response:
        row = await res.ledger.result(_ok_id(job_id, JobNotFound))
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        if row["status"] not in TERMINAL_STATES:
            raise JobNotFinished(f"job {job_id!r} is {row['status']}: it has no result yet")
        if row["result"] is not None:
            return Response(row["result"], media_type="application/json")
        # A result stored before the ledger kept whole messages: rebuild it from its columns.
        legacy: dict[str, Any] = {
            "schema_version": 1,
            "request_id": job_id,
            "correlation_id": row["correlation_id"],
            "status": row["status"],
            "file": row["file"],
            "content_hash": row["content_hash"],
            "output": json.loads(row["output"]) if row["output"] else None,
            "error": {"code": row["error_code"] or "unknown", "message": row["error_message"] or ""}
            if row["status"] != "completed"
            else None,
            "cached": bool(row["cached"]),
            "finished_at": (row["finished_at"] or datetime.now(UTC)).isoformat(),
        }
        return JSONResponse(legacy)

    @app.delete(
        "/v1/jobs/{job_id}",
        status_code=202,
        response_model=JobStatus,
        tags=["jobs"],
        summary="Cancel a job: a queued job is never analysed, a running one is stopped",
        responses={
            **_JOB_RESPONSES,
            409: _error_doc("The job already has its outcome (`job_finished`)."),
        },
    )
    async def cancel_job(job_id: str, res: Api) -> JobStatus:
        row = await res.ledger.cancel_job(_ok_id(job_id, JobNotFound))
        if row is None:
            current = await res.ledger.job(job_id)
            if current is None:
                raise JobNotFound(f"no job {job_id!r}")
            raise JobFinished(f"job {job_id!r} is already {current['status']}: it cannot be cancelled")
        metrics.cancellations.labels("job").inc()
        progress = await res.progress([job_id])
        return job_status(row, progress.get(job_id))

    # -------------------------------------------------------------- batches
    _BATCH_RESPONSES: dict[int | str, dict[str, Any]] = {
        **_ERRORS_401_403,
        **_ERROR_422,
        404: _error_doc("No such batch (`batch_not_found`)."),
        **_ERROR_503,
    }

    async def read_batch(res: Resources, batch_id: str) -> BatchStatus:
        row = await res.ledger.batch(_ok_id(batch_id, BatchNotFound))
        if row is None:
            raise BatchNotFound(f"no batch {batch_id!r}")
        return batch_status(batch_id, row, await res.progress(row.running_ids))

    @app.get(
        "/v1/batches/{batch_id}",
        response_model=BatchStatus,
        tags=["batches"],
        summary="A batch's counts by status, percent, ETA and failures by error code",
        responses=_BATCH_RESPONSES,
    )
    async def get_batch(batch_id: str, res: Api) -> BatchStatus:
        return await read_batch(res, batch_id)

    @app.delete(
        "/v1/batches/{batch_id}",
        status_code=202,
        response_model=CancelAccepted,
        tags=["batches"],
        summary="Cancel every job of the batch that has no outcome yet",
        responses={
            **_BATCH_RESPONSES,
            409: _error_doc("Every job already has its outcome (`batch_finished`)."),
        },
    )
    async def cancel_batch(batch_id: str, res: Api) -> CancelAccepted:
        count = await res.ledger.cancel_batch(_ok_id(batch_id, BatchNotFound))
        status = await read_batch(res, batch_id)
        if count == 0:
            raise BatchFinished(f"every job of batch {batch_id!r} already has its outcome")
        metrics.cancellations.labels("batch").inc(count)
        return CancelAccepted(batch=status, cancel_requested=count)

    # -------------------------------------------------------------- live streams
    _SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "Server-Sent Events until the outcome: `event:` is the type of the event, "
            "`data:` a `StreamEvent` (JSON); `: keepalive` comments while idle.",
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        },
    }

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["streams"],
        summary="A job's live progress as Server-Sent Events (also a WebSocket on the same path)",
        response_class=Response,
        responses={**_SSE_RESPONSES, **_JOB_RESPONSES},
    )
    async def job_events_sse(job_id: str, res: Api) -> Response:
        stream = await open_job_stream(res, job_id)
        return EventSourceResponse(_sse(stream, res, "sse"))

    @app.get(
        "/v1/batches/{batch_id}/events",
        tags=["streams"],
        summary="A batch's live progress as Server-Sent Events (also a WebSocket on the same path)",
        response_class=Response,
        responses={**_SSE_RESPONSES, **_BATCH_RESPONSES},
    )
    async def batch_events_sse(batch_id: str, res: Api) -> Response:
        stream = await open_batch_stream(res, batch_id)
        return EventSourceResponse(_sse(stream, res, "sse"))

    @app.websocket("/v1/jobs/{job_id}/events")
    async def job_events_ws(websocket: WebSocket, job_id: str) -> None:
        res = await _ws_auth(websocket, keys)
        if res is None:
            return
        try:
            stream = await open_job_stream(res, job_id)
        except AnalysisServiceError as exc:
            await websocket.send_denial_response(_error_response(exc, status_of(exc)))
            return
        await _ws_pump(websocket, stream, res)

    @app.websocket("/v1/batches/{batch_id}/events")
    async def batch_events_ws(websocket: WebSocket, batch_id: str) -> None:
        res = await _ws_auth(websocket, keys)
        if res is None:
            return
        try:
            stream = await open_batch_stream(res, batch_id)
        except AnalysisServiceError as exc:
            await websocket.send_denial_response(_error_response(exc, status_of(exc)))
            return
        await _ws_pump(websocket, stream, res)

    async def open_job_stream(res: Resources, job_id: str) -> Stream:
        """Subscribe first, then read the state: no update between the two is missed."""
        sub = res.hub.subscribe([_ok_id(job_id, JobNotFound)])
        try:
            row = await res.ledger.job(job_id)
            if row is None:
                raise JobNotFound(f"no job {job_id!r}")
            progress = await res.progress([job_id]) if row["status"] not in TERMINAL_STATES else {}
        except BaseException:
            res.hub.unsubscribe(sub)
            raise
        first = job_status(row, progress.get(job_id))
        return Stream(sub, _job_events(res, sub, row, first, settings.api.stream_poll_s))

    async def open_batch_stream(res: Resources, batch_id: str) -> Stream:
        ids = await res.ledger.batch_ids(_ok_id(batch_id, BatchNotFound))
        if not ids:
            raise BatchNotFound(f"no batch {batch_id!r}")
        sub = res.hub.subscribe(ids)
        try:
            first = await read_batch(res, batch_id)
        except BaseException:
            res.hub.unsubscribe(sub)
            raise
        return Stream(sub, _batch_events(res, sub, batch_id, first, settings.api.stream_poll_s, read_batch))

    def openapi() -> dict[str, Any]:
        """FastAPI's document, plus the error body every error response refers to."""
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error_schema.pop("$defs", {}))
            schemas["ErrorBody"] = error_schema
            event_schema = StreamEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in event_schema.pop("$defs", {}).items():
                schemas.setdefault(name, definition)
            schemas["StreamEvent"] = event_schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ------------------------------------------------------------------------------------ streams


def _check_files(media_root: Path, files: list[str]) -> None:
    """Every file resolves inside the media root and is a regular file there (runs in a thread: it
    touches disk). The messages name the file as the client did, never the media root's path."""
    for index, file in enumerate(files):
        try:
            path = resolve_media_path(media_root, file)
        except PathOutsideMediaRoot as exc:
            raise PathOutsideMediaRoot(f"files[{index}]: path {file!r} leads outside the media root") from exc
        except FileUnreadable:
            raise FileUnreadable(f"files[{index}]: the path {file!r} cannot be resolved") from None
        try:
            mode = path.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise FileMissing(f"files[{index}]: {file!r} does not exist in the media root") from None
        except OSError as exc:  # a name too long, a folder it may not enter
            raise FileUnreadable(f"files[{index}]: {file!r} cannot be read: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise InvalidFile(f"files[{index}]: {file!r} is not a regular file (a folder, device or pipe)")


@dataclass
class Stream:
    """An opened live stream: its subscription and its events (None: idle, a keep-alive is due)."""

    sub: Subscription
    events: AsyncIterator[StreamEvent | None]


async def _job_events(
    res: Resources, sub: Subscription, row: Any, first: JobStatus, poll_s: float
) -> AsyncIterator[StreamEvent | None]:
    """A job's events: its state, then one per progress update, ended by its terminal state.

    The ledger row decides the status: it is re-read when an update names another status than the
    row's (the row's status is then shown, Redis only adds percent and stage), and at least every
    ``poll_s`` seconds, updates or not, so an outcome whose progress message never came still ends
    the stream and a cancel request shows while progress keeps arriving.
    """
    yield StreamEvent(type="state", job=first)
    current = first
    progress: dict[str, Any] | None = None
    read_at = time.monotonic()
    while current.status not in TERMINAL_STATES:
        update = await sub.next(max(0.0, poll_s - (time.monotonic() - read_at)))
        if update is not None:
            progress = update
            if update.get("status") == current.status.value and time.monotonic() - read_at < poll_s:
                current = job_status(row, progress)
                yield StreamEvent(type="progress", job=current, dropped=sub.take_dropped())
                continue
        # Idle, a poll is due, or the worker announced another status: the ledger decides.
        read_at = time.monotonic()
        try:
            fresh = await res.ledger.job(current.id)
        except LedgerUnavailable:
            yield None  # PostgreSQL is unavailable: keep the client, try again at the next poll
            continue
        if fresh is None:  # deleted by an operator
            return
        row = fresh
        new = job_status(row, progress)
        if (new.status, new.cancel_requested) != (current.status, current.cancel_requested):
            current = new
            yield StreamEvent(type="state", job=current, dropped=sub.take_dropped())
        elif update is not None:
            current = new
            yield StreamEvent(type="progress", job=current, dropped=sub.take_dropped())
        else:
            yield None


async def _batch_events(
    res: Resources,
    sub: Subscription,
    batch_id: str,
    first: BatchStatus,
    poll_s: float,
    read_batch: Callable[[Resources, str], Awaitable[BatchStatus]],
) -> AsyncIterator[StreamEvent | None]:
    yield StreamEvent(type="batch", batch=first)
    current = first
    dirty = False
    last_summary = time.monotonic()
    while not current.done:
        wait = poll_s if not dirty else max(0.0, BATCH_SUMMARY_MIN_S - (time.monotonic() - last_summary))
        update = await sub.next(wait)
        if update is not None:
            yield StreamEvent(type="job", update=update, dropped=sub.take_dropped())
            if update.get("status") in TERMINAL_STATES:
                dirty = True
            if not dirty or time.monotonic() - last_summary < BATCH_SUMMARY_MIN_S:
                continue
        try:
            fresh = await read_batch(res, batch_id)
        except LedgerUnavailable:
            yield None
            continue
        last_summary = time.monotonic()
        dirty = False
        if fresh.model_dump(exclude={"eta_s"}) != current.model_dump(exclude={"eta_s"}):
            current = fresh
            yield StreamEvent(type="batch", batch=current)
        else:
            yield None


async def _sse(stream: Stream, res: Resources, transport: str) -> AsyncIterator[bytes]:
    gauge = res.metrics.stream_clients.labels(transport)
    gauge.inc()
    try:
        async for event in stream.events:
            if event is None:
                yield format_sse_event(comment="keepalive")
            else:
                yield format_sse_event(data_str=event.model_dump_json(), event=event.type)
    finally:
        res.hub.unsubscribe(stream.sub)
        gauge.dec()


async def _ws_auth(websocket: WebSocket, keys: list[str]) -> Resources | None:
    """The app's resources when the handshake carries a valid key; else the handshake is refused
    with the same 401/403 JSON body as HTTP, and None."""
    try:
        check_key(websocket.headers.get("authorization"), keys)
    except ApiError as exc:
        await websocket.send_denial_response(_error_response(exc, exc.status))
        return None
    resources: Resources = websocket.app.state.resources
    return resources


async def _ws_pump(websocket: WebSocket, stream: Stream, res: Resources) -> None:
    """Send the stream's events as JSON text frames until it ends (close 1000) or the client leaves."""
    gauge = res.metrics.stream_clients.labels("websocket")
    try:
        await websocket.accept()
    except BaseException:  # the client left during the handshake: nothing will unsubscribe later
        res.hub.unsubscribe(stream.sub)
        raise
    gauge.inc()

    async def watch_disconnect() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return

    watcher = asyncio.create_task(watch_disconnect())
    try:

        async def pump() -> None:
            async for event in stream.events:
                if event is not None:
                    await websocket.send_text(event.model_dump_json())

        pumper = asyncio.create_task(pump())
        done, _ = await asyncio.wait({watcher, pumper}, return_when=asyncio.FIRST_COMPLETED)
        if pumper in done:
            pumper.result()  # re-raise a failure of the stream
            if websocket.client_state is WebSocketState.CONNECTED:
                await websocket.close(1000)
        else:
            pumper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pumper
    except WebSocketDisconnect:
        pass  # the client left while an event was being sent: nothing more to do
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        res.hub.unsubscribe(stream.sub)
        gauge.dec()


# ------------------------------------------------------------------------------------ serving


#: Seconds open requests and streams get to finish after SIGTERM before they are cancelled (stream
#: clients reconnect and get the current state first).
SHUTDOWN_GRACE_S: Final = 10


async def serve(settings: Settings) -> int:
    """Run the API under uvicorn until SIGTERM/SIGINT; the process exit status.

    A dependency that cannot be reached at start-up is one log line naming it, and exit status 1.
    SIGTERM or SIGINT stop accepting connections, give open ones ``SHUTDOWN_GRACE_S`` seconds, close
    the connections to the services and exit 0.
    """
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the handlers below stop the server; uvicorn's would re-raise the signal at exit

    if not settings.api.key_list():
        log.error("api cannot start", reason="no API key configured: set ANALYSIS_API__KEYS")
        return 1
    try:
        resources = await Resources.open(settings)
    except StartupError as exc:
        log.error("api cannot start", dependency=exc.dependency, reason=exc.reason)
        return 1
    try:
        app = create_app(settings, resources=resources)
        config = uvicorn.Config(
            app,
            host=settings.api.host,
            port=settings.api.port,
            log_config=None,
            access_log=False,
            lifespan="on",
            ws="websockets-sansio",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
        server = Server(config)

        def stop(signum: int) -> None:
            log.info("api stopping", signal=signal.Signals(signum).name)
            server.force_exit = server.should_exit  # a second signal: do not wait for connections
            server.should_exit = True

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signum)
        log.info("api listening", host=settings.api.host, port=settings.api.port)
        await server.serve()
        return 0 if server.started else 1
    finally:
        await resources.close()
        log.info("api stopped")
