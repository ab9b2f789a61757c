"""One delivery's pipeline: parse → ledger check → analyse in a slot → persist → project → publish.

Each step is a small method that reads and fills a :class:`Delivery`; none of them acks or rejects.
The settlement (ack, dead-letter, requeue now, requeue with a delay) is decided once, at the end,
by :func:`decide` from what the delivery holds, and carried out by the worker in one place.

The ledger (PostgreSQL, :class:`~analysis_service.sinks.postgres.PostgresLedger`) is what makes a
request end in exactly one outcome:

* **check** — :meth:`~PostgresLedger.begin` either starts the request or says why not: it already
  has a terminal outcome (it is then re-announced, nothing is analysed), its id belongs to another
  request (the message is failed under an id derived from its body), or its cancellation was
  requested (it ends ``cancelled`` unanalysed), or another worker holds its lease (it is running
  there; the delivery is requeued with a delay). A request that started ``max_deliveries`` times
  without an outcome (it kills workers; counted in the ledger, and on quorum queues also by the
  broker's ``x-delivery-count``) fails with ``worker_crashed`` here, before it can kill another
  one; one that has an outcome never does.
* **persist** — :meth:`~PostgresLedger.finish` stores the outcome unless another delivery stored one
  first; from here on every step works on *the stored outcome*, not on this delivery's.
* **project** — the graph gets the stored outcome (so it names the same outcome as PostgreSQL).
* **publish** — the results exchange gets the stored outcome; ``message_id`` is the request id,
  so consumers can drop the rare duplicate (results are at-least-once). A redelivery of a request
  whose result the broker already confirmed (a lost ack) publishes nothing.

Every store call is retried with backoff behind its circuit breaker, each attempt bounded by
``asyncio.timeout`` to what is left of ``persist_deadline_s``; past the deadline the step raises
:class:`RetryLater` and the request is requeued with a delay, never in a hot loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from analysis_service.audio.registry import Analyzer, resolve
from analysis_service.cancellation import checkpoint, raise_if_cancelling
from analysis_service.errors import (
    AnalysisServiceError,
    Cancelled,
    InternalError,
    InvalidAnalyses,
    InvalidCorrelationId,
    InvalidEncoding,
    InvalidFile,
    InvalidOptions,
    InvalidPriority,
    InvalidRequest,
    InvalidRequestId,
    MalformedJson,
    RequestIdConflict,
    RequestTooLarge,
    SinkRejected,
    SinkUnavailable,
    WorkerCrashed,
)
from analysis_service.media import resolve_media_path
from analysis_service.pool import FileFacts, inspect_file, run_analysis_job
from analysis_service.settings import Settings
from analysis_service.sinks.base import ResultSink
from analysis_service.sinks.cache import ResultCache
from analysis_service.sinks.postgres import (
    Finished,
    IdConflict,
    Known,
    PostgresLedger,
    RequestFields,
    Started,
)
from analysis_service.sinks.resilience import Guard
from analysis_service.worker.slots import Phase, Slot, SlotPool
from service_shared.messages import (
    ID_PATTERN,
    AnalysisRequest,
    AnalysisResultMessage,
    EngineOutput,
    ErrorInfo,
    ResultStatus,
)

log = structlog.get_logger(__name__)

#: Header of a requeued copy: how many of its starts ended in an orderly requeue (not a crash).
GIVEN_BACK_HEADER = "x-analysis-given-back"
#: Header of a requeued copy: how often it was requeued with a delay.
REQUEUES_HEADER = "x-analysis-requeues"
#: Header a quorum queue sets: how often the broker delivered the message before.
DELIVERY_COUNT_HEADER = "x-delivery-count"

_T = TypeVar("_T")


class Settlement(StrEnum):
    """What happens to a delivery once the pipeline is done with it."""

    ACK = "ack"
    DEAD_LETTER = "dead_letter"
    REQUEUE = "requeue"  # at once (shutdown)
    RETRY_LATER = "retry_later"  # after rabbitmq.retry_delay_s (stores unavailable)


class RetryLater(Exception):
    """A store stayed unavailable past the deadline: requeue the request with a delay."""


@dataclass
class Delivery:
    """One delivery of a request, as it walks the pipeline.

    ``message`` is the delivery to settle; when the broker redelivers a message whose first delivery
    is still being worked on here (its channel died in a connection blip), the new delivery replaces
    it and the running pipeline settles that one instead.
    """

    message: AbstractIncomingMessage
    received: float
    request_id: str
    fields: RequestFields
    request: AnalysisRequest | None = None
    #: The request's file inside the media root (absolute, symlinks resolved), found by :func:`parse`.
    path: str | None = None
    problem: AnalysisServiceError | None = None
    claimed_id: str | None = None
    counted_start: bool = False
    #: A ledger start was sent: it may have committed though no reply came (see ``lease``).
    start_sent: bool = False
    #: This delivery's lease token: a retried ``begin`` whose reply was lost finds its own lease,
    #: and a give-back or heartbeat touches only a lease this delivery still holds.
    lease: str = field(default_factory=lambda: uuid.uuid4().hex)
    outcome: AnalysisResultMessage | None = None
    stored: Finished | None = None
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    duration_s: float | None = None
    #: The analysis held a slot (and has given it back): the delivery is now only storing.
    used_slot: bool = False
    #: Delivered from the urgent queue, on its own channel (outside the request queue's window).
    urgent: bool = False

    @property
    def repeat(self) -> bool:
        """The broker delivered this message before, or it is our own requeued copy."""
        headers = self.message.headers or {}
        return bool(self.message.redelivered) or REQUEUES_HEADER in headers

    @property
    def result(self) -> AnalysisResultMessage:
        """The outcome the ledger holds (after persist) or the one decided here."""
        if self.stored is not None:
            return self.stored.result
        assert self.outcome is not None, "no outcome decided yet"
        return self.outcome


class Hook(Protocol):
    """Observes the pipeline (metrics, log context, progress): never changes what it does."""

    async def step_started(self, step: str, delivery: Delivery) -> None: ...

    async def step_finished(self, step: str, delivery: Delivery, seconds: float) -> None: ...

    async def settled(self, delivery: Delivery, settlement: Settlement) -> None: ...


# ---------------------------------------------------------------------------------------- parse
def parse(message: AbstractIncomingMessage, *, settings: Settings, registry: dict[str, Analyzer]) -> Delivery:
    """The first step, run as the message arrives: a :class:`Delivery` that either holds a valid
    request or the ``problem`` that makes it invalid (a specific :class:`InvalidRequest`)."""
    body = message.body
    received = time.monotonic()
    try:
        request = _validate(body, max_bytes=settings.worker.max_body_bytes)
    except AnalysisServiceError as exc:
        # A body refused before parsing (too large, not UTF-8) is never parsed for its id.
        parsed = not isinstance(exc, RequestTooLarge | InvalidEncoding)
        rid = (_claimed_id(body) if parsed else None) or rejected_id(body)
        digest = "body:" + hashlib.sha256(body).hexdigest()
        return Delivery(message, received, rid, RequestFields(fingerprint=digest), problem=exc)
    fields = RequestFields.of(request)
    try:
        resolve(registry, request.analyses)  # an unknown (plugin) analyzer: unknown_analyzer
        path = resolve_media_path(settings.worker.media_root, request.file)
    except AnalysisServiceError as exc:
        # A valid request this worker cannot run keeps its fingerprint: its outcome ends the row
        # the job API recorded for it (the same request), not one of its own.
        return Delivery(message, received, request.request_id, fields, problem=exc)
    return Delivery(message, received, request.request_id, fields, request=request, path=str(path))


def rejected_id(body: bytes) -> str:
    """The id an outcome is stored under when the message's own id cannot be used."""
    return "rejected-" + hashlib.sha256(body).hexdigest()[:32]


def _claimed_id(body: bytes) -> str | None:
    """The ``request_id`` an invalid body claims, when it is well-formed."""
    try:
        claimed = json.loads(body).get("request_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(claimed, str) and re.fullmatch(ID_PATTERN, claimed):
        return claimed
    return None


_FIELD_ERRORS: dict[str, type[InvalidRequest]] = {
    "request_id": InvalidRequestId,
    "correlation_id": InvalidCorrelationId,
    "file": InvalidFile,
    "priority": InvalidPriority,
    "analyses": InvalidAnalyses,
    "options": InvalidOptions,
}


def _validate(body: bytes, *, max_bytes: int) -> AnalysisRequest:
    """Parse and validate a request body (size first, then encoding, JSON, contract)."""
    if len(body) > max_bytes:
        raise RequestTooLarge(f"request body is {len(body)} bytes; at most {max_bytes} are accepted")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEncoding(f"request body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedJson(f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedJson(f"request body must be a JSON object, not {type(data).__name__}")
    try:
        return AnalysisRequest.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors[:10]) + (
            f"; and {len(errors) - 10} more" if len(errors) > 10 else ""
        )
        first = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else ""
        kind = _FIELD_ERRORS.get(first, InvalidRequest)
        raise kind(f"request does not match the contract: {problems}") from None


def decide(delivery: Delivery) -> Settlement:
    """The settlement of a delivery whose outcome is stored and announced.

    A failed outcome this delivery decided is dead-lettered (kept for inspection); a repeat of a
    request that was already finished is acked, whatever its outcome.
    """
    stored = delivery.stored
    assert stored is not None, "decide() needs the stored outcome"
    if stored.written and stored.result.status is ResultStatus.FAILED:
        return Settlement.DEAD_LETTER
    return Settlement.ACK


def failed(
    request_id: str,
    exc: AnalysisServiceError,
    *,
    request: AnalysisRequest | None = None,
    claimed_id: str | None = None,
    status: ResultStatus = ResultStatus.FAILED,
) -> AnalysisResultMessage:
    """A failed (or cancelled) outcome carrying ``exc``'s code and message."""
    return AnalysisResultMessage(
        request_id=request_id,
        claimed_request_id=claimed_id,
        correlation_id=request.correlation_id if request else None,
        status=status,
        file=request.file if request else None,
        error=ErrorInfo(code=exc.code, message=str(exc)),
    )


# ------------------------------------------------------------------------------------- pipeline
@dataclass
class Pipeline:
    """The steps of a delivery and what they need (built by the worker once its parts run)."""

    settings: Settings
    registry: dict[str, Analyzer]
    ledger: PostgresLedger
    graph: ResultSink
    publisher: ResultSink
    slots: SlotPool
    cache: ResultCache | None
    guards: dict[str, Guard]
    hooks: Sequence[Hook] = ()
    best_effort: Callable[..., Awaitable[Any]] | None = None
    prepare: Callable[[str], Awaitable[None]] | None = None

    async def run(self, delivery: Delivery) -> Settlement:
        """Walk the steps; the settlement to carry out (``RETRY_LATER`` when a store stayed down)."""
        steps = (
            ("check", self.check),
            ("analyse", self.analyse),
            ("persist", self.persist),
            ("project", self.project),
            ("publish", self.publish),
        )
        try:
            for name, step in steps:
                checkpoint()
                for hook in self.hooks:
                    await hook.step_started(name, delivery)
                started = time.perf_counter()
                await step(delivery)
                for hook in self.hooks:
                    await hook.step_finished(name, delivery, time.perf_counter() - started)
        except RetryLater as exc:
            log.warning("stores unavailable past the deadline: requeued with a delay", reason=str(exc))
            return Settlement.RETRY_LATER
        return decide(delivery)

    # -- check ------------------------------------------------------------------------------------
    async def check(self, d: Delivery) -> None:
        """Ask the ledger whether this delivery may run (see the module docstring)."""
        if d.problem is not None:
            d.outcome = failed(d.request_id, d.problem)
            return
        assert d.request is not None
        quorum = self.settings.rabbitmq.queue_type == "quorum"
        d.start_sent = True
        begun = await self._store(
            "postgres",
            self.ledger.begin,
            d.request_id,
            d.fields,
            count_attempt=True,
            given_back=_int_header(d.message, GIVEN_BACK_HEADER),
            lease=d.lease,
            deadline=time.monotonic() + self.settings.worker.persist_deadline_s,
        )
        limit = self.settings.worker.max_deliveries
        if isinstance(begun, Started):
            d.counted_start = True
            starts = begun.attempts
            if quorum:  # the broker counts too (its redeliveries); the larger count decides
                starts = max(starts, _int_header(d.message, DELIVERY_COUNT_HEADER) + 1)
            if starts > limit:
                d.outcome = failed(
                    d.request_id,
                    WorkerCrashed(
                        f"started {starts - 1} times without finishing (limit {limit}): the worker "
                        "died while analysing it",
                        path=d.request.file,
                    ),
                    request=d.request,
                )
            return
        assert isinstance(begun, Known)
        record = begun.record
        if record.fingerprint != d.fields.fingerprint:
            self._rekey(d, record.file)
        elif record.terminal:
            assert record.result is not None
            d.stored = Finished(record.result, written=False, published=record.published)
        elif not record.cancel_requested:  # another worker holds its lease: it is running there
            raise RetryLater("the request is running in another worker (its lease is live)")
        else:
            d.outcome = failed(
                d.request_id,
                Cancelled("cancelled before it started", path=d.request.file),
                request=d.request,
                status=ResultStatus.CANCELLED,
            )

    def _rekey(self, d: Delivery, owner_file: str | None) -> None:
        """Fail ``d`` as reusing the id of another request, under an id derived from its body."""
        claimed = d.request_id
        d.claimed_id = claimed
        d.request_id = rejected_id(d.message.body)
        d.fields = RequestFields(fingerprint="body:" + hashlib.sha256(d.message.body).hexdigest())
        # An invalid body keeps its own, more specific code; only its key changes.
        problem = d.problem or RequestIdConflict(
            f"request id {claimed!r} already belongs to another request"
            + (f" (file {owner_file!r})" if owner_file else "")
        )
        d.outcome = failed(d.request_id, problem, claimed_id=claimed)

    # -- analyse ----------------------------------------------------------------------------------
    async def analyse(self, d: Delivery) -> None:
        """Analyse the file in a slot (or take the cached output) unless the outcome is known."""
        if d.outcome is not None or d.stored is not None:
            return
        request = d.request
        assert request is not None
        try:
            output, digest, cached = await self._analyse(d, request)
        except Cancelled as exc:
            d.outcome = failed(d.request_id, exc, request=request, status=ResultStatus.CANCELLED)
            return
        except AnalysisServiceError as exc:
            d.outcome = failed(d.request_id, exc, request=request)
            return
        d.duration_s = output.duration_s
        d.outcome = AnalysisResultMessage(
            request_id=request.request_id,
            correlation_id=request.correlation_id,
            status=ResultStatus.COMPLETED,
            file=request.file,
            content_hash=digest,
            output=output,
            cached=cached,
        )

    async def _analyse(self, d: Delivery, request: AnalysisRequest) -> tuple[EngineOutput, str, bool]:
        """``(output, content hash, cached)``; a crashed analysis process is retried
        ``crash_retries`` times (on a fresh process)."""
        attempts = 1 + self.settings.worker.crash_retries
        for attempt in range(1, attempts + 1):
            try:
                return await self._analyse_once(d, request)
            except WorkerCrashed:
                if attempt == attempts:
                    raise
                log.warning("analysis process crashed: retrying", attempt=attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _analyse_once(self, d: Delivery, request: AnalysisRequest) -> tuple[EngineOutput, str, bool]:
        """Probe and hash the file in a slot, answer from the cache or analyse it in the same slot."""
        s = self.settings
        path = d.path
        assert path is not None, "parse() resolves the path of every valid request"
        analyses = list(request.analyses)
        versions = {a.name: a.version for a in resolve(self.registry, analyses)}
        timeline = request.options.timeline
        bpm_range = request.options.bpm_range or s.engine.bpm_range  # the one it runs with: the cache's key
        slot = await self._slot_for(d, request.priority)
        try:
            facts: FileFacts = await self._cancellable(
                d,
                self.slots.call(
                    slot,
                    inspect_file,
                    path,
                    s.engine,
                    time_limit_s=inspect_limit_s(path, s.worker.time_limit_base_s),
                    path=path,
                ),
            )
            if request.options.use_cache and self.cache is not None and self.best_effort:
                hit = await self.best_effort(
                    "cache read",
                    self.cache.get,
                    facts.content_hash,
                    analyzer_versions=versions,
                    analyses=analyses,
                    timeline=timeline,
                    bpm_range=bpm_range,
                )
                if hit is not None:
                    return hit, facts.content_hash, True
            checkpoint()
            bound = facts.duration_bound_s(max_duration_s=s.engine.max_duration_s)
            w = s.worker
            limit = min(
                w.time_limit_max_s, w.time_limit_base_s + w.time_limit_per_audio_minute_s * bound / 60
            )
            try:
                output: EngineOutput = await self._cancellable(
                    d,
                    self.slots.call(
                        slot,
                        run_analysis_job,
                        path,
                        s.engine,
                        analyses,
                        timeline,
                        request.request_id,
                        bpm_range,
                        time_limit_s=limit,
                        path=path,
                        cpu_priority=request.priority,
                    ),
                )
            except Cancelled:
                if slot.phase is Phase.ANALYSED:  # it had its CPU: the analysis was stopped
                    raise
                waited = "cancelled while waiting for a CPU; not analysed"
                raise Cancelled(waited, path=request.file) from None
        finally:
            self.slots.release(slot)
            d.used_slot = True
        if self.cache is not None and self.best_effort:
            await self.best_effort(
                "cache write",
                self.cache.put,
                facts.content_hash,
                output,
                analyzer_versions=versions,
                analyses=analyses,
                timeline=timeline,
                bpm_range=bpm_range,
            )
        return output, facts.content_hash, False

    async def _slot_for(self, d: Delivery, priority: int) -> Slot:
        """Wait for a slot (highest priority first; an urgent slot for the urgent queue's
        deliveries) unless the request's cancellation comes first.

        A delivery taken while another is stored (``overlap_stores``) may wait here; cancelling ends it
        at once, unanalysed, instead of when a slot frees.
        """
        return await self._cancellable(
            d,
            self.slots.acquire(priority, urgent=d.urgent),
            cancelled="cancelled while waiting for an analysis slot",
            undo=self.slots.release,
        )

    async def _cancellable(
        self,
        d: Delivery,
        work: Awaitable[_T],
        *,
        cancelled: str = "cancelled while running; its analysis process was stopped",
        undo: Callable[[_T], None] | None = None,
    ) -> _T:
        """Await ``work`` unless the request's cancellation (or the delivery's own, at shutdown)
        comes first; the work is then cancelled (a slot's process is killed), and ``undo`` is given
        what it produced if it finished in the same instant (a slot handed over: given back)."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(d.cancel.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the delivery itself is cancelled (shutdown)
            await _drop(task, undo)
            raise
        finally:
            waiter.cancel()
        if not task.done():
            await _drop(task, undo)
            raise Cancelled(cancelled, path=d.request.file if d.request else None)
        return task.result()

    # -- persist, project, publish --------------------------------------------------------------
    async def persist(self, d: Delivery) -> None:
        """Store the outcome in the ledger; afterwards ``d.stored`` is what the ledger holds."""
        if d.stored is not None:
            return
        assert d.outcome is not None
        deadline = time.monotonic() + self.settings.worker.persist_deadline_s
        for _ in range(3):  # the outcome, then at most a re-keyed or a minimal one
            try:
                d.stored = await self._store(
                    "postgres", self.ledger.finish, d.outcome, d.fields, deadline=deadline
                )
                return
            except IdConflict as exc:
                self._rekey(d, exc.record.file)
            except SinkRejected as exc:
                log.error("the ledger refused the outcome: storing a minimal failed outcome", error=str(exc))
                d.outcome = failed(d.request_id, exc, claimed_id=d.claimed_id)
        raise InternalError(f"the ledger refused every outcome of {d.request_id!r}")

    async def project(self, d: Delivery) -> None:
        """Write the stored outcome to the graph."""
        assert d.stored is not None
        deadline = time.monotonic() + self.settings.worker.persist_deadline_s
        try:
            await self._store("neo4j", self.graph.write, d.stored.result, deadline=deadline)
        except SinkRejected as exc:
            # The ledger holds the outcome; the graph cannot take it (a bug): say so loudly.
            log.error("the graph refused the stored outcome", error=str(exc))

    async def publish(self, d: Delivery) -> None:
        """Announce the stored outcome, unless this is a redelivery of one already announced."""
        assert d.stored is not None
        if d.stored.published and d.repeat:
            return  # the broker confirmed it before; this delivery only lost its ack
        deadline = time.monotonic() + self.settings.worker.persist_deadline_s
        await self._store("results-exchange", self.publisher.write, d.stored.result, deadline=deadline)
        await self._mark_published(d.stored.result.request_id)

    async def _mark_published(self, request_id: str) -> None:
        """Record the confirmed publish (losing it only costs a duplicate result later)."""
        try:
            async with asyncio.timeout(self.settings.postgres.command_timeout_s):
                await self.ledger.mark_published(request_id)
        except (SinkUnavailable, SinkRejected, TimeoutError) as exc:
            log.info("could not record the publish", error=str(exc))

    async def _store(
        self,
        name: str,
        fn: Callable[..., Awaitable[_T]],
        *args: Any,
        deadline: float,
        **kwargs: Any,
    ) -> _T:
        """Call a store through its breaker, retrying with backoff; each attempt bounded by what is
        left until ``deadline``. Raises :class:`RetryLater` past the deadline."""
        guard = self.guards[name]
        pause = 0.25
        max_wait = self.settings.worker.sink_retry_max_wait_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                return await _bounded(
                    guard.call(self._attempt, name, fn, *args, **kwargs), max(remaining, 0.05)
                )
            except (SinkUnavailable, TimeoutError) as exc:
                raise_if_cancelling(exc)
                error = str(exc) or f"no answer within {max(remaining, 0.05):.1f} s"
                if time.monotonic() + pause >= deadline:
                    raise RetryLater(f"{name}: {error}") from exc
                log.info("store unavailable: will retry", store=name, retry_in_s=pause, error=error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, max_wait)

    async def _attempt(self, name: str, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        if self.prepare is not None:
            await self.prepare(name)
        return await fn(*args, **kwargs)


#: Bytes per second a slot surely reads while it hashes a file (a slow disk), for its time limit.
_MIN_READ_BYTES_PER_S = 20e6


def inspect_limit_s(path: str, base_s: float) -> float:
    """Time limit of reading a file's header and hashing it: the base limit plus its size at a slow
    disk's speed (the size is the one thing the main process learns of the file: a ``stat``)."""
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0  # the slot reports why it cannot read it
    return base_s + size / _MIN_READ_BYTES_PER_S


async def _bounded(work: Awaitable[_T], seconds: float) -> _T:
    """Await ``work`` for at most ``seconds``, then cancel it and raise ``TimeoutError`` at once.

    The cancelled work is not waited for: a driver may spend its own time-outs (the Bolt driver's
    ``connection_timeout``) closing a connection to a server that stopped answering, which would
    stretch ``persist_deadline_s`` far past its value.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    task.add_done_callback(_retrieve)
    raise TimeoutError


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Done callback of abandoned work: fetch its outcome so that it is not reported as lost."""
    if not task.cancelled():
        task.exception()


def _int_header(message: AbstractIncomingMessage, name: str) -> int:
    value = (message.headers or {}).get(name)
    if isinstance(value, int | str) and str(value).isdigit():
        return int(value)
    return 0


async def _drop(task: asyncio.Future[_T], undo: Callable[[_T], None] | None) -> None:
    """Cancel ``task`` and wait for it; pass what it produced anyway to ``undo``."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if undo is not None and not task.cancelled() and task.exception() is None:
        undo(task.result())
