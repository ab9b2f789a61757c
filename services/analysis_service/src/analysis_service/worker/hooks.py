"""Hooks around the delivery pipeline: metrics, log context and progress (dramatiq's middleware).

They observe :class:`~analysis_service.worker.pipeline.Delivery` objects as the steps run and never
change what the pipeline does. Progress is best effort: a Redis that is down only costs progress
updates, and the terminal state of every request whose update was lost is written again as soon as
Redis answers (so a finished request never looks unfinished while this worker lives; readers that
must be exact read the ledger).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from analysis_service.metrics import Metrics
from analysis_service.sinks.progress import ProgressStore
from analysis_service.worker.pipeline import Delivery, Settlement
from service_shared.messages import AnalysisResultMessage, EngineOutput, ResultStatus

log = structlog.get_logger(__name__)

_PROGRESS_MIN_INTERVAL_S = 0.5
#: Most terminal progress updates kept for repair while Redis is down (oldest dropped first).
MAX_PROGRESS_DEBT = 100_000

BestEffort = Callable[..., Awaitable[Any]]


class LogContextHook:
    """Binds ``request_id`` and ``correlation_id`` to every log line of a delivery; logs its end."""

    async def step_started(self, step: str, delivery: Delivery) -> None:
        if step == "check":
            request = delivery.request
            structlog.contextvars.bind_contextvars(
                request_id=delivery.request_id,
                correlation_id=request.correlation_id if request else delivery.message.correlation_id,
            )
            if request is not None:
                log.info(
                    "request received",
                    file=request.file,
                    priority=delivery.message.priority,
                    redelivered=delivery.repeat,
                )

    async def step_finished(self, step: str, delivery: Delivery, seconds: float) -> None:
        if step == "check" and delivery.claimed_id is not None:
            structlog.contextvars.bind_contextvars(
                request_id=delivery.request_id, claimed_request_id=delivery.claimed_id
            )

    async def settled(self, delivery: Delivery, settlement: Settlement) -> None:
        stored = delivery.stored
        if stored is None:
            log.info("request requeued", settlement=settlement.value)
            return
        result = stored.result
        fields: dict[str, Any] = {"settlement": settlement.value, "replay": not stored.written}
        if result.error is not None:
            fields |= {"error_code": result.error.code, "error": result.error.message}
        if result.status is ResultStatus.COMPLETED:
            log.info("request completed", cached=result.cached, **fields)
        else:
            log.warning(f"request {result.status.value}", **fields)


class MetricsHook:
    """Prometheus metrics of deliveries: received, in flight, stage durations, outcomes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def step_started(self, step: str, delivery: Delivery) -> None:
        if step == "check" and delivery.request is not None:
            self.metrics.requests_received.labels(priority=str(delivery.request.priority)).inc()
            sent = delivery.message.timestamp
            if sent is not None:  # producers that stamp their messages (submit, the job API)
                wait = time.time() - sent.timestamp()
                self.metrics.stage_duration.labels(stage="queue_wait").observe(max(wait, 0.0))

    async def step_finished(self, step: str, delivery: Delivery, seconds: float) -> None:
        m = self.metrics
        if step == "analyse" and delivery.outcome is not None and delivery.outcome.output is not None:
            for stage, value in delivery.outcome.output.timings_s.items():
                if stage != "total":
                    m.stage_duration.labels(stage=stage).observe(value)
            m.stage_duration.labels(stage="total").observe(seconds)
            if delivery.outcome.cached:
                m.cache_hits.inc()
        elif step == "persist":
            m.stage_duration.labels(stage="persist").observe(seconds)

    async def settled(self, delivery: Delivery, settlement: Settlement) -> None:
        m = self.metrics
        if settlement in (Settlement.REQUEUE, Settlement.RETRY_LATER):
            m.retries.labels(reason=settlement.value).inc()
            return
        stored = delivery.stored
        if stored is None or not stored.written:
            return
        result = stored.result
        m.outcomes.labels(
            status=result.status.value, error_code=result.error.code if result.error else ""
        ).inc()
        if result.status is ResultStatus.COMPLETED:
            m.last_success.set_to_current_time()
            if result.output is not None and not result.cached:
                m.audio_seconds.inc(result.output.duration_s)


class PrefetchHook:
    """Widens the broker's prefetch window by one while an analysed request is being stored.

    Once a request's analysis is done its slot is free, but the request stays unacked until it is
    persisted, projected and published. With prefetch = slots the free slot would wait for that and
    for the next delivery; with a fixed larger prefetch, the extra delivery would be taken a whole
    analysis earlier, ahead of any urgent request published meanwhile. Asking for exactly one more
    delivery per request in its store phase (``basic.qos`` again; a classic queue's channel-wide
    limit) fetches the next request when the slot frees, in priority order at that moment.

    ``set_window(n)`` sets the prefetch count; its failures are its own to log (a closed channel is
    restored by aio-pika with the last value set).
    """

    def __init__(self, slots: int, set_window: Callable[[int], Awaitable[None]]) -> None:
        self._slots = slots
        self._set_window = set_window
        self._storing: set[int] = set()
        self._window = slots
        self._lock = asyncio.Lock()

    async def step_started(self, step: str, delivery: Delivery) -> None:
        return None

    async def step_finished(self, step: str, delivery: Delivery, seconds: float) -> None:
        if step == "analyse" and delivery.used_slot:
            await self._resize(lambda storing: storing.add(id(delivery)))
        elif step == "publish":  # the last step: shrink before the ack, or the broker would
            await self._done(delivery)  # fill the window the ack opens with one more delivery

    async def settled(self, delivery: Delivery, settlement: Settlement) -> None:
        await self._done(delivery)  # a delivery that ended before publishing (requeued, say)

    async def _done(self, delivery: Delivery) -> None:
        if id(delivery) in self._storing:
            await self._resize(lambda storing: storing.discard(id(delivery)))

    async def _resize(self, change: Callable[[set[int]], None]) -> None:
        async with self._lock:  # the broker applies the calls in the order they are made
            change(self._storing)
            # At most one extra delivery per slot: while a store is down, requests pile up in their
            # store phase, and the window must not grow with them.
            window = self._slots + min(len(self._storing), self._slots)
            if window != self._window:
                self._window = window
                await self._set_window(window)


class ProgressHook:
    """Request progress in Redis: running while analysed, the terminal state once settled.

    Also forwards the pool processes' ``(request_id, fraction, stage)`` reports (throttled), and
    keeps the terminal updates Redis missed to write them again when it answers.
    """

    def __init__(self, progress: ProgressStore, best_effort: BestEffort) -> None:
        self._progress = progress
        self._best_effort = best_effort
        self._analysing: set[str] = set()
        self._last: dict[str, float] = {}
        self._debt: OrderedDict[str, AnalysisResultMessage] = OrderedDict()
        self._tasks: set[asyncio.Task[bool]] = set()

    async def step_started(self, step: str, delivery: Delivery) -> None:
        if step == "analyse" and delivery.outcome is None and delivery.stored is None:
            request = delivery.request
            assert request is not None
            self._analysing.add(request.request_id)
            await self._update(
                request.request_id,
                status="running",
                percent=0.0,
                stage="started",
                correlation_id=request.correlation_id,
                file=request.file,
            )

    async def step_finished(self, step: str, delivery: Delivery, seconds: float) -> None:
        if step == "analyse" and delivery.request is not None:
            self._analysing.discard(delivery.request.request_id)
            self._last.pop(delivery.request.request_id, None)

    async def settled(self, delivery: Delivery, settlement: Settlement) -> None:
        if delivery.request is not None:
            self._analysing.discard(delivery.request.request_id)
        if delivery.stored is None:
            return
        result = delivery.stored.result
        if not await self.write_terminal(result):
            self._debt[result.request_id] = result
            self._debt.move_to_end(result.request_id)
            while len(self._debt) > MAX_PROGRESS_DEBT:
                self._debt.popitem(last=False)

    async def write_terminal(self, result: AnalysisResultMessage) -> bool:
        """Write the terminal progress of ``result``; False when Redis did not take it."""
        done = await self._update(
            result.request_id,
            status=result.status.value,
            percent=100.0,
            stage="done" if result.status is ResultStatus.COMPLETED else result.status.value,
            error_code=result.error.code if result.error else None,
            error=result.error.message if result.error else None,
            correlation_id=result.correlation_id,
            file=result.file,
            summary=summary(result.output),
        )
        return done

    async def repay(self) -> None:
        """Write again the terminal updates Redis missed (call periodically)."""
        while self._debt:
            request_id, result = next(iter(self._debt.items()))
            if not await self.write_terminal(result):
                return  # still down: try again later
            self._debt.pop(request_id, None)

    @property
    def debt(self) -> int:
        """Terminal updates waiting for Redis."""
        return len(self._debt)

    def forward(self, request_id: str, fraction: float, stage: str) -> None:
        """A pool process's report (called on the loop): throttled to one update per 0.5 s."""
        if request_id not in self._analysing:
            return  # late: the request has moved on
        now = time.monotonic()
        if now - self._last.get(request_id, 0.0) < _PROGRESS_MIN_INTERVAL_S and fraction < 1.0:
            return
        self._last[request_id] = now
        task = asyncio.create_task(
            self._update(
                request_id, status="running", percent=round(min(fraction, 0.99) * 100, 1), stage=stage
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _update(self, request_id: str, **fields: Any) -> bool:
        """One progress update through the Redis breaker; True when Redis took it."""
        done = await self._best_effort("progress", self._write, request_id, **fields)
        return done is True

    async def _write(self, request_id: str, **fields: Any) -> bool:
        await self._progress.update(request_id, **fields)
        return True


def summary(output: EngineOutput | None) -> dict[str, str] | None:
    """The headline results, as progress-hash fields."""
    if output is None:
        return None
    fields = {"duration_s": f"{output.duration_s:.1f}"}
    if output.tempo:
        fields["bpm"] = f"{output.tempo.bpm:.1f}"
    if output.key:
        fields |= {"key": output.key.key, "camelot": output.key.camelot}
    if output.mood:
        fields["mood"] = output.mood.label
    return fields
