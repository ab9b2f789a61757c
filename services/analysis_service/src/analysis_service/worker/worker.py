"""The Worker: owns the broker connection, the analysis slots, the stores and their lifecycle.

Flow of one delivery (:meth:`Worker._handle`, the only place that acks, rejects or requeues):

1. parse and validate the request; resolve its file inside the media root;
2. read the header (duration gives the time limit), hash the file, look in the result cache;
3. analyse in a free slot (a crashed process is replaced and the request retried once);
4. store the outcome in PostgreSQL, Neo4j and on the results exchange, each behind its own circuit
   breaker, retrying with backoff until ``persist_deadline_s``;
5. ack a completed request; reject (dead-letter) a request that can never succeed — after its
   failed result is stored; requeue when the stores stay down or the worker shuts down.

Progress goes to Redis best-effort: when Redis is down its breaker opens and analysis and
persistence carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import psutil
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from pydantic import ValidationError

from analysis_service.audio.decode import content_hash, probe
from analysis_service.audio.registry import build_registry, resolve
from analysis_service.errors import (
    AnalysisServiceError,
    InternalError,
    InvalidRequest,
    PathOutsideMediaRoot,
    SinkUnavailable,
    WorkerCrashed,
)
from analysis_service.http.server import HttpServer
from analysis_service.metrics import Metrics
from analysis_service.settings import Settings, available_cpus
from analysis_service.sinks.base import ResultSink
from analysis_service.sinks.cache import ResultCache
from analysis_service.sinks.graph import GraphSink
from analysis_service.sinks.postgres import PostgresSink
from analysis_service.sinks.progress import ProgressStore
from analysis_service.sinks.resilience import Guard
from analysis_service.worker.publisher import ResultsPublisher
from analysis_service.worker.slots import SlotPool
from analysis_service.worker.topology import Topology, declare_topology
from service_shared.messages import (
    AnalysisRequest,
    AnalysisResultMessage,
    EngineOutput,
    ErrorInfo,
    ResultStatus,
)

log = structlog.get_logger(__name__)

#: Process exit statuses of ``analysis-service worker``.
EXIT_OK = 0
EXIT_BROKER_LOST = 3
EXIT_STARTUP_FAILED = 4

_PROGRESS_MIN_INTERVAL_S = 0.5


class Worker:
    """The analysis worker. Construct, then ``await run(stop)``; set ``stop`` to shut down.

    Parameters
    ----------
    settings : Settings
        All settings (built once at the entry point).
    metrics : Metrics, optional
        Metric objects (default: a fresh registry).
    """

    def __init__(self, settings: Settings, *, metrics: Metrics | None = None) -> None:
        self.settings = settings
        w = settings.worker
        self.concurrency = w.concurrency or available_cpus()
        self.metrics = metrics or Metrics(time_limit_s=w.time_limit_max_s)
        self.registry = build_registry()
        self._guards = {
            name: Guard.from_settings(name, w) for name in ("postgres", "neo4j", "results-exchange")
        }
        # Progress and cache are best effort: one attempt, then the breaker decides.
        self._redis_guard = Guard(
            "redis", threshold=w.breaker_threshold, ttl_s=w.breaker_ttl_s, attempts=1, max_wait_s=0.0
        )
        self._tasks: dict[asyncio.Task[None], AbstractIncomingMessage] = {}
        # Deliveries requeued by the shutdown: their tasks must not store, publish or settle.
        self._abandoned: set[int] = set()
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._fatal: asyncio.Event = asyncio.Event()
        self._exit_code = EXIT_OK
        self._stopping = False
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._topology: Topology | None = None
        self._consumer_tag: str | None = None
        self._slots: SlotPool | None = None
        self._sinks: list[ResultSink] = []
        self._started_sinks: set[str] = set()
        self._progress: ProgressStore | None = None
        self._cache: ResultCache | None = None
        self._http: HttpServer | None = None
        self._progress_queue: Any = None
        self._last_progress: dict[str, float] = {}
        self._progress_tasks: set[asyncio.Task[None]] = set()
        self._analysing: set[str] = set()  # request ids whose pool progress is forwarded
        self.counters = {"completed": 0, "failed": 0, "requeued": 0}

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> int:
        """Start everything, consume until ``stop`` is set (or the broker is lost), shut down.

        Returns the process exit status.
        """
        s = self.settings
        log.info("worker starting", concurrency=self.concurrency, media_root=str(s.worker.media_root))
        self._http = HttpServer(s.http, self.metrics, self._ready_checks())
        background: list[asyncio.Task[None]] = []
        try:
            await self._http.start()
            await self._start_stores()
            await self._start_slots()
            await self._connect()
            await self._start_consuming()
            background = [
                asyncio.create_task(self._memory_guard(), name="memory-guard"),
                asyncio.create_task(self._broker_watchdog(), name="broker-watchdog"),
                asyncio.create_task(self._sample_queue_depth(), name="queue-depth"),
            ]
            log.info("worker consuming", queue=s.rabbitmq.request_queue, prefetch=self.concurrency)
            stop_wait = asyncio.create_task(stop.wait())
            fatal_wait = asyncio.create_task(self._fatal.wait())
            await asyncio.wait({stop_wait, fatal_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            fatal_wait.cancel()
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            log.error("worker start-up failed", error=f"{type(exc).__name__}: {exc}")
            self._exit_code = EXIT_STARTUP_FAILED
        finally:
            await self._shutdown(background)
        return self._exit_code

    async def _start_stores(self) -> None:
        s = self.settings
        self._progress = ProgressStore(s.redis)
        self._cache = ResultCache(s.redis)
        self._sinks = [PostgresSink(s.postgres), GraphSink(s.neo4j)]
        for sink in self._sinks:
            try:
                await self._ensure_started(sink)
            except SinkUnavailable as exc:
                # Not fatal: the worker starts, /ready reports the store, and every write retries
                # start() first; requests wait for the store instead of being lost.
                log.warning("store unavailable at start-up", sink=sink.name, error=str(exc))

    async def _ensure_started(self, sink: ResultSink) -> None:
        if sink.name not in self._started_sinks:
            await sink.start()
            self._started_sinks.add(sink.name)

    async def _start_slots(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._progress_queue = ctx.Queue()
        self._slots = SlotPool(
            self.concurrency,
            max_tasks_per_child=self.settings.worker.max_tasks_per_child,
            progress_queue=self._progress_queue,
        )
        t = time.perf_counter()
        await self._slots.start()
        log.info(
            "analysis processes ready", slots=self.concurrency, seconds=round(time.perf_counter() - t, 2)
        )
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=self._pump_progress, args=(loop, self._progress_queue), name="progress-pump", daemon=True
        ).start()

    async def _connect(self) -> None:
        s = self.settings.rabbitmq
        self._connection = await aio_pika.connect_robust(s.url)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        assert isinstance(channel, AbstractRobustChannel)
        self._channel = channel
        await channel.set_qos(prefetch_count=self.concurrency)
        self._topology = await declare_topology(channel, s)
        self._sinks.append(ResultsPublisher(self._topology.results_exchange, channel, s))
        self._started_sinks.add("results-exchange")

    async def _start_consuming(self) -> None:
        assert self._topology is not None
        self._consumer_tag = await self._topology.request_queue.consume(self._on_message)
        self.metrics.consuming.set(1)

    async def _stop_consuming(self) -> None:
        if self._channel is not None and self._channel.is_closed:
            self._consumer_tag = None  # nothing to cancel: the broker requeues that channel's deliveries
        if self._topology is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            with contextlib.suppress(aio_pika.exceptions.AMQPError, asyncio.TimeoutError, RuntimeError):
                # The channel may already be gone (broker lost); its deliveries are then requeued
                # by the broker anyway.
                await asyncio.wait_for(self._topology.request_queue.cancel(tag), timeout=5)
        self.metrics.consuming.set(0)

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        grace = self.settings.worker.shutdown_grace_s
        self._stopping = True
        log.info("worker stopping", in_flight=len(self._tasks), grace_s=grace)
        await self._stop_consuming()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.warning("grace period over: requeueing unfinished requests", count=len(pending))
                for task in pending:
                    message = self._tasks[task]
                    self._abandoned.add(id(message))
                    await self._requeue(message, reason="shutdown")
                    task.cancel()
                if self._slots is not None:
                    await self._slots.close()  # running analyses cannot be interrupted: kill them
                await asyncio.gather(*pending, return_exceptions=True)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self._slots is not None:
            await self._slots.close()
        if self._progress_queue is not None:
            self._progress_queue.put(None)  # stops the pump thread
        for sink in self._sinks:
            await _close_quietly(sink.name, sink.close)
        for store in (self._progress, self._cache):
            if store is not None:
                await _close_quietly(store.name, store.close)
        if self._connection is not None:
            await _close_quietly("rabbitmq", self._connection.close)
        if self._http is not None:
            await self._http.stop()
        log.info("worker stopped", exit_code=self._exit_code, **self.counters)

    # ------------------------------------------------------------------ one delivery
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._handle(message))
        self._tasks[task] = message
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        message = self._tasks.pop(task)
        self._abandoned.discard(id(message))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery and decide its fate (ack / dead-letter / requeue)."""
        received = time.monotonic()
        self.metrics.semaphore_waiters.inc()
        waiting = True
        try:
            async with self._semaphore:
                self.metrics.semaphore_waiters.dec()
                waiting = False
                self.metrics.in_flight.inc()
                try:
                    await self._process(message, received)
                finally:
                    self.metrics.in_flight.dec()
        except asyncio.CancelledError:
            if id(message) not in self._abandoned:
                await self._requeue(message, reason="shutdown")
            raise
        except Exception:
            if id(message) in self._abandoned:
                raise  # already requeued by the shutdown
            # A bug, not bad input: keep the message (dead-letter queue) for inspection rather
            # than redeliver it forever.
            log.exception("unexpected error while handling a request: dead-lettered")
            await _settle(message.reject(requeue=False))
        finally:
            if waiting:
                self.metrics.semaphore_waiters.dec()
            structlog.contextvars.clear_contextvars()

    async def _process(self, message: AbstractIncomingMessage, received: float) -> None:
        outcome = await self._outcome(message, received)
        if id(message) in self._abandoned:
            return  # requeued by the shutdown: another delivery will do this work
        t = time.perf_counter()
        try:
            await self._persist(outcome)
        except SinkUnavailable as exc:
            log.error("stores unavailable past the deadline: requeueing", error=str(exc))
            await self._requeue(message, reason="stores unavailable")
            return
        self.metrics.stage_duration.labels(stage="persist").observe(time.perf_counter() - t)
        if id(message) in self._abandoned:
            return
        code = outcome.error.code if outcome.error else ""
        self.metrics.outcomes.labels(status=outcome.status.value, error_code=code).inc()
        await self._report(
            outcome.request_id,
            status=outcome.status.value,
            percent=100.0,
            stage="done" if outcome.status is ResultStatus.COMPLETED else "failed",
            error_code=outcome.error.code if outcome.error else None,
            error=outcome.error.message if outcome.error else None,
            summary=_summary(outcome.output),
        )
        if outcome.status is ResultStatus.COMPLETED:
            self.counters["completed"] += 1
            await _settle(message.ack())
            log.info("request completed", cached=outcome.cached)
        else:
            self.counters["failed"] += 1
            assert outcome.error is not None
            await _settle(message.reject(requeue=False))
            log.warning(
                "request failed: dead-lettered", error_code=outcome.error.code, error=outcome.error.message
            )

    async def _outcome(self, message: AbstractIncomingMessage, received: float) -> AnalysisResultMessage:
        """The result of one delivery: completed, or failed with a specific error code."""
        try:
            request = _parse(message)
        except InvalidRequest as exc:
            request_id = _fallback_request_id(message)
            structlog.contextvars.bind_contextvars(
                request_id=request_id, correlation_id=message.correlation_id
            )
            return _failed(request_id, message.correlation_id, None, exc)
        structlog.contextvars.bind_contextvars(
            request_id=request.request_id, correlation_id=request.correlation_id
        )
        # The broker orders by the AMQP priority property; the body's field is its default.
        priority = message.priority if message.priority is not None else request.priority
        self.metrics.requests_received.labels(priority=str(priority)).inc()
        log.info("request received", file=request.file, priority=priority, redelivered=message.redelivered)
        await self._report(
            request.request_id,
            status="running",
            percent=0.0,
            stage="started",
            correlation_id=request.correlation_id,
            file=request.file,
        )
        deliveries = await self._count_delivery(request.request_id)
        if deliveries is not None and deliveries > self.settings.worker.max_deliveries:
            return _failed(
                request.request_id,
                request.correlation_id,
                request.file,
                WorkerCrashed(
                    f"started {deliveries - 1} times without finishing (limit "
                    f"{self.settings.worker.max_deliveries}): the worker died while analysing it",
                    path=request.file,
                ),
            )
        try:
            output, digest, cached = await self._analyse(request)
        except AnalysisServiceError as exc:
            return _failed(request.request_id, request.correlation_id, request.file, exc)
        except Exception as exc:
            # An engine bug on this input: a failed result says so, and the request is
            # dead-lettered with it instead of being retried forever.
            log.exception("analysis raised an unexpected error")
            return _failed(
                request.request_id,
                request.correlation_id,
                request.file,
                InternalError(f"unexpected {type(exc).__name__} during analysis: {exc}", path=request.file),
            )
        finally:
            self.metrics.stage_duration.labels(stage="total").observe(time.monotonic() - received)
        return AnalysisResultMessage(
            request_id=request.request_id,
            correlation_id=request.correlation_id,
            status=ResultStatus.COMPLETED,
            file=request.file,
            content_hash=digest,
            output=output,
            cached=cached,
        )

    async def _analyse(self, request: AnalysisRequest) -> tuple[EngineOutput, str, bool]:
        """Run (or fetch from the cache) the engine for one valid request."""
        s = self.settings
        path = resolve_media_path(s.worker.media_root, request.file)
        info = await asyncio.to_thread(probe, path, settings=s.engine)
        digest = await asyncio.to_thread(content_hash, path)
        analyses = [a.value for a in request.analyses]
        versions = {a.name: a.version for a in resolve(self.registry, analyses)}
        timeline = request.options.timeline
        if request.options.use_cache and self._cache is not None:
            cached = await self._best_effort(
                "cache read",
                self._cache.get,
                digest,
                analyzer_versions=versions,
                analyses=analyses,
                timeline=timeline,
            )
            if cached is not None:
                self.metrics.cache_hits.inc()
                return cached, digest, True
            self.metrics.cache_misses.inc()
        w = s.worker
        limit = min(
            w.time_limit_max_s, w.time_limit_base_s + w.time_limit_per_audio_minute_s * info.duration_s / 60
        )
        assert self._slots is not None
        attempts = 1 + w.crash_retries
        self._analysing.add(request.request_id)
        try:
            output = await self._analyse_with_retry(request, str(path), analyses, timeline, limit, attempts)
        finally:
            self._analysing.discard(request.request_id)
            self._last_progress.pop(request.request_id, None)
        for stage, seconds in output.timings_s.items():
            if stage != "total":
                self.metrics.stage_duration.labels(stage=stage).observe(seconds)
        if self._cache is not None:
            await self._best_effort(
                "cache write",
                self._cache.put,
                digest,
                output,
                analyzer_versions=versions,
                analyses=analyses,
                timeline=timeline,
            )
        return output, digest, False

    async def _analyse_with_retry(
        self,
        request: AnalysisRequest,
        path: str,
        analyses: list[str],
        timeline: bool | None,
        limit: float,
        attempts: int,
    ) -> EngineOutput:
        """Analyse in a slot; a crashed process is replaced and the request retried."""
        assert self._slots is not None
        for attempt in range(1, attempts + 1):
            try:
                return await self._slots.analyze(
                    path,
                    settings=self.settings.engine,
                    analyses=analyses,
                    timeline=timeline,
                    progress_key=request.request_id,
                    time_limit_s=limit,
                )
            except WorkerCrashed:
                self.metrics.pool_restarts.inc()
                if attempt == attempts:
                    raise
                self.metrics.retries.labels(reason="worker_crashed").inc()
                log.warning("analysis process crashed: retrying", attempt=attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _persist(self, outcome: AnalysisResultMessage) -> None:
        """Store the outcome in PostgreSQL and Neo4j, then publish it on the results exchange.

        Failing stores are retried (behind their breakers, with backoff) until ``persist_deadline_s``;
        the result is announced only once both stores hold it.
        """
        deadline = time.monotonic() + self.settings.worker.persist_deadline_s
        stores = [s for s in self._sinks if s.name != "results-exchange"]
        publisher = [s for s in self._sinks if s.name == "results-exchange"]
        for stage in (stores, publisher):
            await self._write_all(stage, outcome, deadline)

    async def _write_all(
        self, sinks: list[ResultSink], outcome: AnalysisResultMessage, deadline: float
    ) -> None:
        pending = list(sinks)
        pause = 1.0
        while True:
            failed: list[ResultSink] = []
            errors: list[str] = []
            for sink in pending:
                guard = self._guards[sink.name]
                t = time.perf_counter()
                try:
                    await guard.call(self._write, sink, outcome)
                except SinkUnavailable as exc:
                    _raise_if_cancelling(exc)
                    self.metrics.sink_errors.labels(sink=sink.name).inc()
                    failed.append(sink)
                    errors.append(str(exc))
                else:
                    self.metrics.sink_latency.labels(sink=sink.name).observe(time.perf_counter() - t)
                finally:
                    self.metrics.set_breaker(sink.name, guard.state)
            if not failed:
                return
            if time.monotonic() + pause > deadline:
                raise SinkUnavailable("; ".join(errors))
            log.warning("stores unavailable: will retry", sinks=[f.name for f in failed], retry_in_s=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.settings.worker.sink_retry_max_wait_s)
            pending = failed

    async def _write(self, sink: ResultSink, outcome: AnalysisResultMessage) -> None:
        await self._ensure_started(sink)
        await sink.write(outcome)

    async def _count_delivery(self, request_id: str, *, delta: int = 1) -> int | None:
        """Count a start of ``request_id`` (None when Redis is unavailable: no limit then)."""
        if self._progress is None:
            return None
        total: int | None = await self._best_effort(
            "delivery count", self._progress.count_delivery, request_id, delta=delta
        )
        return total

    async def _requeue(self, message: AbstractIncomingMessage, *, reason: str) -> None:
        self.counters["requeued"] += 1
        # A requeue by the worker is not a crash: give the delivery back.
        with contextlib.suppress(InvalidRequest):
            request = _parse(message)
            await self._count_delivery(request.request_id, delta=-1)
        self.metrics.retries.labels(reason="requeued").inc()
        log.info("request requeued", reason=reason)
        await _settle(message.nack(requeue=True))

    # ------------------------------------------------------------------ progress (best effort)
    async def _report(self, request_id: str, **fields: Any) -> None:
        if self._progress is not None:
            await self._best_effort("progress", self._progress.update, request_id, **fields)

    async def _best_effort(
        self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """Call a Redis operation through its breaker; on failure record it and return None."""
        try:
            return await self._redis_guard.call(fn, *args, **kwargs)
        except SinkUnavailable as exc:
            _raise_if_cancelling(exc)
            self.metrics.sink_errors.labels(sink="redis").inc()
            log.debug("redis unavailable", operation=what, error=str(exc))
            return None
        finally:
            self.metrics.set_breaker("redis", self._redis_guard.state)

    def _pump_progress(self, loop: asyncio.AbstractEventLoop, queue: Any) -> None:
        """Thread: forward ``(request_id, fraction, stage)`` from pool processes to the loop."""
        while True:
            item = queue.get()
            if item is None:
                return
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(self._on_progress, *item)

    def _on_progress(self, request_id: str, fraction: float, stage: str) -> None:
        if request_id not in self._analysing:
            return  # a late message: the request has finished (its final state is written)
        now = time.monotonic()
        if now - self._last_progress.get(request_id, 0.0) < _PROGRESS_MIN_INTERVAL_S and fraction < 1.0:
            return
        self._last_progress[request_id] = now
        task = asyncio.create_task(
            self._report(
                request_id, status="running", percent=round(min(fraction, 0.99) * 100, 1), stage=stage
            )
        )
        self._progress_tasks.add(task)
        task.add_done_callback(self._progress_tasks.discard)

    # ------------------------------------------------------------------ guards and probes
    async def _memory_guard(self) -> None:
        """Stop taking deliveries while memory is above its limits; resume below 90 % of them."""
        w = self.settings.worker
        proc = psutil.Process()
        paused = False  # by this guard (shutdown and the watchdog stop consuming for good)
        while True:
            rss = proc.memory_info().rss + sum(_rss(c) for c in proc.children(recursive=True))
            system = memory_percent()
            over = rss > w.max_rss_mb * 2**20 or system > w.max_system_memory_percent
            under = rss < 0.9 * w.max_rss_mb * 2**20 and system < 0.9 * w.max_system_memory_percent
            if over and not paused and self._consumer_tag is not None:
                log.warning(
                    "memory above limit: pausing consumption",
                    rss_mb=round(rss / 2**20),
                    system_percent=system,
                )
                await self._stop_consuming()
                paused = True
            elif paused and under and not self._stopping:
                log.info("memory below limit: resuming consumption", rss_mb=round(rss / 2**20))
                await self._start_consuming()
                paused = False
            await asyncio.sleep(1.0)

    async def _broker_watchdog(self) -> None:
        """Exit (non-zero) when the broker connection stays down longer than ``reconnect_grace_s``."""
        grace = self.settings.rabbitmq.reconnect_grace_s
        down_since: float | None = None
        while True:
            conn, channel = self._connection, self._channel
            down = conn is None or conn.is_closed or channel is None or channel.is_closed
            if down:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > grace:
                    log.error("broker connection lost and not restored: exiting", grace_s=grace)
                    self._exit_code = EXIT_BROKER_LOST
                    self._fatal.set()
                    return
            else:
                down_since = None
            await asyncio.sleep(1.0)

    async def _sample_queue_depth(self) -> None:
        name = self.settings.rabbitmq.request_queue
        while True:
            channel = self._channel
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(aio_pika.exceptions.AMQPError, asyncio.TimeoutError):
                    q = await asyncio.wait_for(channel.declare_queue(name, passive=True), timeout=5)
                    count = q.declaration_result.message_count
                    if count is not None:
                        self.metrics.queue_depth.labels(queue=name).set(count)
            await asyncio.sleep(10.0)

    def _ready_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        async def rabbitmq() -> None:
            if self._channel is None or self._channel.is_closed:
                raise ConnectionError("no open channel to RabbitMQ")
            if self._consumer_tag is None:
                raise RuntimeError("not consuming (starting, paused by the memory guard, or stopping)")

        async def redis() -> None:
            if self._progress is None:
                raise RuntimeError("not started")
            await self._progress.ping()

        def store(name: str) -> Callable[[], Awaitable[None]]:
            async def check() -> None:
                sink = next((s for s in self._sinks if s.name == name), None)
                if sink is None:
                    raise RuntimeError("not started")
                await sink.ping()

            return check

        async def pool() -> None:
            if self._slots is None or not self._slots.healthy:
                raise RuntimeError("analysis processes not running")

        return {
            "rabbitmq": rabbitmq,
            "redis": redis,
            "postgres": store("postgres"),
            "neo4j": store("neo4j"),
            "process_pool": pool,
        }


# ---------------------------------------------------------------------- helpers
def resolve_media_path(media_root: Path, file: str) -> Path:
    """The absolute path of ``file`` inside ``media_root`` (symlinks resolved).

    Raises
    ------
    PathOutsideMediaRoot
        When the path (relative or absolute) leads outside the media root, e.g. ``../../etc``.
    """
    root = media_root.resolve()
    candidate = Path(file)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not path.is_relative_to(root):
        raise PathOutsideMediaRoot(f"path {file} leads outside the media root {root}", path=file)
    return path


def _parse(message: AbstractIncomingMessage) -> AnalysisRequest:
    try:
        return AnalysisRequest.model_validate_json(message.body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise InvalidRequest(f"request does not match the contract: {problems}") from exc


def _fallback_request_id(message: AbstractIncomingMessage) -> str:
    """An id for a request whose own id could not be read: its message id or a body digest."""
    import json

    with contextlib.suppress(ValueError, TypeError, AttributeError):
        rid = json.loads(message.body).get("request_id")
        if isinstance(rid, str) and 0 < len(rid) <= 200:
            return rid
    if message.message_id:
        return str(message.message_id)
    return "invalid-" + hashlib.sha256(message.body).hexdigest()[:32]


def _failed(
    request_id: str, correlation_id: str | None, file: str | None, exc: AnalysisServiceError
) -> AnalysisResultMessage:
    return AnalysisResultMessage(
        request_id=request_id,
        correlation_id=correlation_id,
        status=ResultStatus.FAILED,
        file=file,
        error=ErrorInfo(code=exc.code, message=str(exc)),
    )


def _summary(output: EngineOutput | None) -> dict[str, str] | None:
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


def _raise_if_cancelling(exc: BaseException) -> None:
    """Re-raise a cancellation that a client library turned into a connection error.

    Some drivers catch ``CancelledError`` inside their I/O and raise a connection error instead;
    the store adapters translate that to ``SinkUnavailable``, which must not be mistaken for an
    outage (and retried) while the worker is shutting this task down.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc


async def _settle(op: Awaitable[Any]) -> None:
    """Ack/nack/reject; on a closed channel the broker redelivers the message, which is safe."""
    try:
        await op
    except (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, RuntimeError) as exc:
        log.warning(
            "could not settle the delivery; the broker will redeliver it",
            error=f"{type(exc).__name__}: {exc}",
        )


async def _close_quietly(name: str, close: Callable[[], Awaitable[Any]]) -> None:
    try:
        await asyncio.wait_for(close(), timeout=10)
    except (OSError, TimeoutError, AnalysisServiceError, aio_pika.exceptions.AMQPError) as exc:
        log.warning("error while closing", component=name, error=f"{type(exc).__name__}: {exc}")


def memory_percent(*, cgroup: Path = Path("/sys/fs/cgroup")) -> float:
    """Percent of memory in use: of the cgroup v2 limit when there is one (a container), else the host's."""
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            return 100.0 * int((cgroup / "memory.current").read_text()) / int(limit)
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller here: the host's figure is the right one
    return float(psutil.virtual_memory().percent)


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
