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
from dataclasses import dataclass
from typing import Any

import structlog

from analysis_service.metrics import Metrics
from analysis_service.sinks.postgres import PostgresLedger
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


@dataclass
class _Analysis:
    """What the prefetch window knows of one running analysis: its slot's progress reports."""

    key: int  # id() of its delivery
    first: float | None = None  # loop time of its first report (the file's header was read)
    last: tuple[float, float] | None = None  # loop time and fraction of its latest decoding report
    timer: asyncio.TimerHandle | None = None


class PrefetchHook:
    """Widens the broker's prefetch window by one for each request about to leave its slot, and
    keeps it so while the request is stored.

    Once a request's analysis is done its slot is free, but the request stays unacked until it is
    persisted, projected and published. With prefetch = slots the free slot would wait for that and
    for the next delivery; with a fixed larger prefetch, the extra delivery would be taken a whole
    analysis earlier, ahead of any urgent request published meanwhile. So exactly one more delivery
    is asked for per request (``basic.qos`` again; a classic queue's channel-wide limit), ``lead_s``
    before its analysis is expected to end: the next request then passes its ledger check and
    progress write while the analysis finishes, and waits for the slot as it frees, taken in
    priority order at that moment. It is given back (the window shrinks) once the request is
    published, before its ack.

    The expected end comes from the slot's progress reports (:meth:`report`): decoding (with the
    features) is nearly all of an analysis and reports its fraction as it goes, so the end is
    extrapolated from the first report, the latest one and a scale learnt from the analyses that
    ended here; a report from the analyzers (past decoding) widens at once. Without reports the
    window widens when the analysis ends.

    ``set_window(n)`` sets the prefetch count; its failures are its own to log (a closed channel is
    restored by aio-pika with the last value set).
    """

    def __init__(self, slots: int, set_window: Callable[[int], Awaitable[None]], *, lead_s: float) -> None:
        self._slots = slots
        self._set_window = set_window
        self._lead_s = lead_s
        #: Deliveries (by id) that asked for one more delivery: ending their analysis, or storing.
        self._ahead: set[int] = set()
        self._analyses: dict[str, _Analysis] = {}
        #: Learnt: an analysis ends at ``first + (t - first) * scale / fraction`` for a decoding
        #: report ``(t, fraction)``; 1.0 (as late as a linear estimate can be) until one ended.
        self._scale = 1.0
        self._window = slots
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def step_started(self, step: str, delivery: Delivery) -> None:
        request = delivery.request
        if delivery.urgent:  # the urgent queue's channel has a window of its own, never resized
            return
        if step == "analyse" and request is not None and delivery.outcome is None and delivery.stored is None:
            self._analyses[request.request_id] = _Analysis(id(delivery))

    async def step_finished(self, step: str, delivery: Delivery, seconds: float) -> None:
        if delivery.urgent:
            return
        if step == "analyse":
            self._learn(delivery)
            if delivery.used_slot:
                self._ahead.add(id(delivery))
                await self._resize()
        elif step == "publish":  # the last step: shrink before the ack, or the broker would
            await self._done(delivery)  # fill the window the ack opens with one more delivery

    async def settled(self, delivery: Delivery, settlement: Settlement) -> None:
        self._forget(delivery)
        await self._done(delivery)  # a delivery that ended before publishing (requeued, say)

    def report(self, request_id: str, fraction: float, stage: str) -> None:
        """A slot's progress report (called on the loop): when will its analysis end?"""
        analysis = self._analyses.get(request_id)
        if analysis is None or analysis.key in self._ahead or self._lead_s <= 0:
            return  # lead 0: the window widens when the analysis ends
        loop = asyncio.get_running_loop()
        now = loop.time()
        if analysis.first is None:
            analysis.first = now
            return
        if stage != "decode":  # the analyzers: a few per cent of the analysis are left
            self._ask_ahead(analysis.key)
            return
        if fraction <= 0.0:
            return
        analysis.last = (now, fraction)
        ends = analysis.first + (now - analysis.first) * self._scale / fraction
        if analysis.timer is not None:
            analysis.timer.cancel()
        analysis.timer = loop.call_at(ends - self._lead_s, self._ask_ahead, analysis.key)

    def _learn(self, delivery: Delivery) -> None:
        """Drop the ended analysis; learn the scale of the end's estimate from its last report."""
        analysis = self._forget(delivery)
        if analysis is None or analysis.first is None or analysis.last is None:
            return
        at, fraction = analysis.last
        if at > analysis.first:
            scale = fraction * (asyncio.get_running_loop().time() - analysis.first) / (at - analysis.first)
            self._scale += 0.2 * (min(max(scale, 0.05), 1.0) - self._scale)

    def _forget(self, delivery: Delivery) -> _Analysis | None:
        if delivery.request is None:
            return None
        analysis = self._analyses.get(delivery.request.request_id)
        if analysis is None or analysis.key != id(delivery):
            return None
        del self._analyses[delivery.request.request_id]
        if analysis.timer is not None:
            analysis.timer.cancel()
        return analysis

    def _ask_ahead(self, key: int) -> None:
        if key not in self._ahead:
            self._ahead.add(key)
            task = asyncio.create_task(self._resize())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _done(self, delivery: Delivery) -> None:
        if id(delivery) in self._ahead:
            self._ahead.discard(id(delivery))
            await self._resize()

    async def _resize(self) -> None:
        async with self._lock:  # the broker applies the calls in the order they are made
            # At most one extra delivery per slot: while a store is down, requests pile up in their
            # store phase, and the window must not grow with them.
            window = self._slots + min(len(self._ahead), self._slots)
            if window != self._window:
                self._window = window
                await self._set_window(window)


class ProgressHook:
    """Request progress in Redis: running while analysed, the terminal state once settled.

    Also forwards the pool processes' ``(request_id, fraction, stage)`` reports (throttled), and
    keeps the terminal updates Redis missed to write them again when it answers.
    """

    def __init__(
        self,
        progress: ProgressStore,
        best_effort: BestEffort,
        *,
        ledger: PostgresLedger | None = None,
        ledger_best_effort: BestEffort | None = None,
    ) -> None:
        self._progress = progress
        self._best_effort = best_effort
        #: Where a terminal update Redis missed is owed too, for any worker to pay (migration 0006).
        self._ledger = ledger
        self._ledger_best_effort = ledger_best_effort
        self._analysing: set[str] = set()
        self._last: dict[str, float] = {}
        self._debt: OrderedDict[str, AnalysisResultMessage] = OrderedDict()
        self._tasks: set[asyncio.Task[bool]] = set()

    async def step_started(self, step: str, delivery: Delivery) -> None:
        if step == "analyse" and delivery.outcome is None and delivery.stored is None:
            request = delivery.request
            assert request is not None
            self._analysing.add(request.request_id)
            # Counts as a report: the slot's first one (decoding at 0 %) follows within a moment and
            # is not written again; a short analysis then costs the start, a report every 0.5 s and
            # the outcome.
            self._last[request.request_id] = time.monotonic()
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
            self._last.pop(delivery.request.request_id, None)  # ended outside its analyse step
        if delivery.stored is None:
            return
        result = delivery.stored.result
        if not await self.write_terminal(result):
            self._debt[result.request_id] = result
            self._debt.move_to_end(result.request_id)
            while len(self._debt) > MAX_PROGRESS_DEBT:
                self._debt.popitem(last=False)
            await self._in_ledger("owe progress", "owe_progress", [result.request_id])

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

    async def repay(self, *, limit: int = 100) -> None:
        """Write again the terminal updates Redis missed (call periodically): this worker's, then,
        once Redis takes them, up to ``limit`` taken from the ledger's debts of any worker (one
        that died meanwhile, say); what Redis refuses of those is owed in the ledger again."""
        if not await self._pay(self._debt):
            return  # Redis is still down: try again later
        taken = await self._in_ledger("take progress owed", "claim_owed_progress", limit) or []
        debts = OrderedDict((result.request_id, result) for result in taken)
        if not await self._pay(debts, ledger_owes=False):
            await self._in_ledger("owe progress again", "owe_progress", list(debts))

    async def _pay(self, debts: OrderedDict[str, AnalysisResultMessage], *, ledger_owes: bool = True) -> bool:
        """Write ``debts`` in order, removing each one Redis takes; False at the first refusal.
        The ledger's flags of the ones paid are cleared (``ledger_owes``: they may be set)."""
        paid: list[str] = []
        try:
            while debts:
                request_id, result = next(iter(debts.items()))
                if not await self.write_terminal(result):
                    return False
                debts.pop(request_id, None)
                paid.append(request_id)
            return True
        finally:
            if paid and ledger_owes:
                await self._in_ledger("record progress written", "progress_paid", paid)

    async def _in_ledger(self, what: str, method: str, *args: Any) -> Any:
        """Call ``method`` of the ledger, best effort (None when there is none or it failed)."""
        if self._ledger is None or self._ledger_best_effort is None:
            return None
        return await self._ledger_best_effort(what, getattr(self._ledger, method), *args)

    @property
    def debt(self) -> int:
        """Terminal updates waiting for Redis."""
        return len(self._debt)

    def forward(self, request_id: str, fraction: float, stage: str) -> None:
        """A pool process's report (called on the loop): throttled to one update per 0.5 s.

        The engine's last report (1.0, ``"done"``) is not written: the terminal state, written
        when the request settles, says the same (one Redis write less per completed request).
        """
        if request_id not in self._analysing or fraction >= 1.0:
            return  # late (the request has moved on), or the analysis' end: the terminal state follows
        now = time.monotonic()
        if now - self._last.get(request_id, 0.0) < _PROGRESS_MIN_INTERVAL_S:
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
