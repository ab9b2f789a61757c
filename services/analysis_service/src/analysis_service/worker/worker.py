"""The Worker: owns the broker connection, the analysis slots, the stores and their lifecycle.

A delivery walks :class:`~analysis_service.worker.pipeline.Pipeline` (parse → ledger check →
analyse in a slot → persist → project → publish); :meth:`Worker._settle` is the only place that
acks, dead-letters or requeues, from the :class:`~analysis_service.worker.pipeline.Settlement` the
pipeline returned. Metrics, log context and progress are hooks around the steps.

Deliveries of one request id never run side by side in one worker: a redelivery that arrives while
its first delivery is still being worked on (the broker connection blipped, so that delivery's
channel is gone) is adopted by the running work, which settles the new delivery when it is done; a
second copy published while the first runs waits for it, then finds its outcome in the ledger.

Shutdown (SIGTERM, or the broker lost for good) runs in a fixed, logged order: stop consuming (and
refuse, by requeueing, anything a reconnecting channel still delivers), drain in-flight work for
``shutdown_grace_s``, requeue the rest and kill their analyses, close the slots, the stores, the
connection and the HTTP server, then log the counters and the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import psutil
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from analysis_service.audio.registry import build_registry
from analysis_service.cancellation import raise_if_cancelling
from analysis_service.errors import AnalysisServiceError, InternalError, SinkRejected, SinkUnavailable
from analysis_service.http.server import HttpServer
from analysis_service.media import resolve_media_path
from analysis_service.metrics import Metrics
from analysis_service.pool import close_progress_queue
from analysis_service.settings import Settings, available_cpus, cpu_set
from analysis_service.sinks.cache import ResultCache
from analysis_service.sinks.graph import GraphSink
from analysis_service.sinks.postgres import PostgresLedger
from analysis_service.sinks.progress import ProgressStore
from analysis_service.sinks.resilience import Guard
from analysis_service.worker.hooks import LogContextHook, MetricsHook, PrefetchHook, ProgressHook
from analysis_service.worker.host_cpus import HostCpuTokens
from analysis_service.worker.pipeline import (
    GIVEN_BACK_HEADER,
    REQUEUES_HEADER,
    Delivery,
    Pipeline,
    RetryLater,
    Settlement,
    _int_header,
    decide,
    failed,
    parse,
)
from analysis_service.worker.publisher import ResultsPublisher
from analysis_service.worker.slots import SlotPool
from analysis_service.worker.topology import Topology, declare_topology, declare_urgent_queue

__all__ = ["EXIT_BROKER_LOST", "EXIT_OK", "EXIT_STARTUP_FAILED", "Worker", "resolve_media_path"]

log = structlog.get_logger(__name__)

#: Process exit statuses of ``analysis-service worker``.
EXIT_OK = 0
EXIT_BROKER_LOST = 3
EXIT_STARTUP_FAILED = 4

_STORES = ("postgres", "neo4j", "results-exchange")
_AMQP_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    OSError,
    TimeoutError,
)


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
        #: Slots (spare ones included): the requests the worker holds in its slots at once.
        self.slot_count = self.concurrency + w.spare_slots
        self.metrics = metrics or Metrics(time_limit_s=w.time_limit_max_s)
        self.registry = build_registry()
        # One attempt per call: the pipeline retries with backoff until its deadline.
        self._guards = {
            name: Guard(
                name, threshold=w.breaker_threshold, ttl_s=w.breaker_ttl_s, attempts=1, max_wait_s=0.0
            )
            for name in (*_STORES, "redis")
        }
        self._tasks: dict[asyncio.Task[None], Delivery] = {}
        self._inflight: dict[str, tuple[Delivery, asyncio.Task[None]]] = {}
        #: The last task created for each request id: a new copy runs after it, so copies of one
        #: request run one at a time and the running one is the one in ``_inflight``.
        self._latest: dict[str, asyncio.Task[None]] = {}
        self._fatal: asyncio.Event = asyncio.Event()
        self._exit_code = EXIT_OK
        self._stopping = False
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._topology: Topology | None = None
        self._consumer_tag: str | None = None
        #: The urgent queue's consumer, on a channel of its own (its window is never full of the
        #: request queue's deliveries).
        self._urgent_channel: AbstractRobustChannel | None = None
        self._urgent_queue: AbstractQueue | None = None
        self._urgent_tag: str | None = None
        self._slots: SlotPool | None = None
        self._ledger: PostgresLedger | None = None
        self._graph: GraphSink | None = None
        self._publisher: ResultsPublisher | None = None
        self._started: set[str] = set()
        self._progress: ProgressStore | None = None
        self._progress_hook: ProgressHook | None = None
        self._prefetch_hook: PrefetchHook | None = None
        self._cache: ResultCache | None = None
        self._pipeline: Pipeline | None = None
        self._memory_paused = False  # consumption held by the memory guard (see _memory_guard)
        self._process = psutil.Process()
        self._slot_processes: dict[int, psutil.Process] = {}
        self._http: HttpServer | None = None
        self._progress_queue: Any = None
        self._pump: threading.Thread | None = None
        self.counters = {"completed": 0, "failed": 0, "cancelled": 0, "requeued": 0}

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> int:
        """Start everything, consume until ``stop`` is set (or the broker is lost), shut down.

        Returns the process exit status. A start-up failure is logged in one line naming the
        dependency and the reason, and ends with :data:`EXIT_STARTUP_FAILED`.
        """
        s = self.settings
        log.info("worker starting", concurrency=self.concurrency, media_root=str(s.worker.media_root))
        self._http = HttpServer(s.http, self.metrics, self._ready_checks())
        background: list[asyncio.Task[None]] = []
        try:
            if await self._start():
                background = [
                    asyncio.create_task(self._memory_guard(), name="memory-guard"),
                    asyncio.create_task(self._broker_watchdog(), name="broker-watchdog"),
                    asyncio.create_task(self._sample_queue_depth(), name="queue-depth"),
                    asyncio.create_task(self._heartbeat(), name="heartbeat"),
                    asyncio.create_task(self._repair_progress(), name="progress-repair"),
                    asyncio.create_task(self._heal_slots(), name="slot-heal"),
                ]
                if self._memory_paused:
                    log.info("worker started, not consuming until memory is below its limits")
                else:
                    self._log_consuming()
                stop_wait = asyncio.create_task(stop.wait())
                fatal_wait = asyncio.create_task(self._fatal.wait())
                await asyncio.wait({stop_wait, fatal_wait}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                fatal_wait.cancel()
        finally:
            await self._shutdown(background)
        return self._exit_code

    async def _start(self) -> bool:
        """Start the parts in order; False (logged in one line, exit status set) when one fails."""
        assert self._http is not None
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("http server", self._http.start),
            ("stores", self._start_stores),
            ("analysis processes", self._start_slots),
            ("rabbitmq", self._connect),
            ("consumer", self._start_consuming_unless_over_memory),
        )
        for dependency, start in steps:
            try:
                await start()
            except Exception as exc:  # start-up: whatever failed, say which part and why, no traceback
                log.error(
                    "worker start-up failed", dependency=dependency, error=f"{type(exc).__name__}: {exc}"
                )
                self._exit_code = EXIT_STARTUP_FAILED
                return False
        return True

    async def _start_stores(self) -> None:
        s = self.settings
        self._progress = ProgressStore(s.redis)
        self._cache = ResultCache(s.redis)
        self._ledger = PostgresLedger(s.postgres, lease_s=s.worker.lease_s)
        self._graph = GraphSink(s.neo4j)
        for sink in (self._ledger, self._graph):
            try:
                await asyncio.wait_for(self._ensure_started(sink), timeout=s.worker.persist_deadline_s)
            except (SinkUnavailable, SinkRejected, TimeoutError) as exc:
                # Not fatal: the worker starts, /ready reports the store, and every write retries
                # start() first; requests wait for the store instead of being lost.
                log.warning("store unavailable at start-up", sink=sink.name, error=str(exc) or "time-out")

    async def _ensure_started(self, sink: PostgresLedger | GraphSink) -> None:
        if sink.name not in self._started:
            await sink.start()
            self._started.add(sink.name)

    async def _start_slots(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._progress_queue = ctx.Queue()
        self._slots = SlotPool(
            self.concurrency,
            spare=self.settings.worker.spare_slots,
            urgent=self.settings.worker.urgent_slots,
            nice=self.settings.worker.slot_nice,
            max_tasks_per_child=self.settings.worker.max_tasks_per_child,
            progress_queue=self._progress_queue,
            cpu_tokens=self._host_cpu_tokens(),
        )
        self.metrics.slots.set(self.concurrency)
        t = time.perf_counter()
        await self._slots.start()
        log.info(
            "analysis processes ready",
            slots=self.concurrency,
            spare_slots=self._slots.spare,
            urgent_slots=self._slots.urgent,
            seconds=round(time.perf_counter() - t, 2),
        )
        loop = asyncio.get_running_loop()
        self._pump = threading.Thread(
            target=self._pump_progress, args=(loop, self._progress_queue), name="progress-pump", daemon=True
        )
        self._pump.start()

    def _host_cpu_tokens(self) -> HostCpuTokens | None:
        """The host's CPU tokens for the slots (None: sharing is off), logged once."""
        w = self.settings.worker
        if not w.share_host_cpus:
            log.info("host cpu tokens off", slots=self.concurrency)
            return None
        tokens = HostCpuTokens.for_cpus(
            w.host_cpus_base(), cpu_set(), on_wait=self.metrics.host_cpu_wait.observe
        )
        # Slots above the tokens only wait for one (more slots than CPUs buy nothing then).
        log.info(
            "host cpu tokens", directory=str(tokens.directory), tokens=tokens.count, slots=self.concurrency
        )
        return tokens

    async def _connect(self) -> None:
        s = self.settings.rabbitmq
        self._connection = await aio_pika.connect_robust(s.url)
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        assert isinstance(channel, AbstractRobustChannel)
        self._channel = channel
        # global: the limit is the channel's, so a consumer re-created after a pause does not
        # add another window of deliveries on top of those still held. Quorum queues refuse a
        # global limit (the broker closes the connection), so theirs is per consumer.
        await channel.set_qos(prefetch_count=self.slot_count, global_=s.queue_type == "classic")
        self._topology = await declare_topology(channel, s)
        self._publisher = ResultsPublisher(self._topology.results_exchange, channel, s)
        if s.urgent_queue:
            urgent = await self._connection.channel(publisher_confirms=False)
            assert isinstance(urgent, AbstractRobustChannel)
            self._urgent_channel = urgent
            await urgent.set_qos(prefetch_count=self._urgent_window(), global_=s.queue_type == "classic")
            self._urgent_queue = await declare_urgent_queue(urgent, s)

    def _urgent_window(self) -> int:
        """Prefetch of the urgent queue's channel.

        With urgent slots, as many deliveries as urgent slots: they run there, so a worker takes
        only the urgent requests it can start at once (another worker starts the others, and none
        waits here with a start counted against it). Without, they run in the slots ahead of the
        rest: twice the slots (spare ones included), so that a freed slot finds the next urgent
        request already here (a request's slot frees before its ack lets the next one come).
        """
        urgent = self.settings.worker.urgent_slots
        return urgent if urgent else 2 * self.slot_count

    def _build_pipeline(self) -> Pipeline:
        assert self._ledger is not None
        assert self._graph is not None
        assert self._slots is not None
        assert self._publisher is not None
        assert self._progress is not None
        self._progress_hook = ProgressHook(
            self._progress,
            self._best_effort,
            ledger=self._ledger,
            ledger_best_effort=self._ledger_best_effort,
        )
        self._prefetch_hook = self._window_hook()
        return Pipeline(
            settings=self.settings,
            registry=self.registry,
            ledger=self._ledger,
            graph=self._graph,
            publisher=self._publisher,
            slots=self._slots,
            cache=self._cache,
            guards=self._guards,
            hooks=(
                LogContextHook(),
                MetricsHook(self.metrics),
                self._progress_hook,
                *((self._prefetch_hook,) if self._prefetch_hook else ()),
            ),
            best_effort=self._best_effort,
            prepare=self._prepare,
        )

    def _window_hook(self) -> PrefetchHook | None:
        """The prefetch window's hook, when the stores of one request overlap the next analysis.

        Only classic queues: a quorum queue's prefetch is per consumer, and ``basic.qos`` applies
        to consumers started after it.
        """
        s = self.settings
        if not s.worker.overlap_stores or s.rabbitmq.queue_type != "classic":
            return None
        return PrefetchHook(self.slot_count, self._set_window, lead_s=s.worker.prefetch_lead_s)

    async def _set_window(self, prefetch: int) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        try:
            await asyncio.wait_for(channel.set_qos(prefetch_count=prefetch, global_=True), timeout=5)
        except _AMQP_ERRORS as exc:
            raise_if_cancelling(exc)
            log.info("could not resize the prefetch window", prefetch=prefetch, error=str(exc) or "time-out")

    async def _prepare(self, store: str) -> None:
        """Start a store that was unavailable at start-up, before its first use."""
        if store == "postgres" and self._ledger is not None:
            await self._ensure_started(self._ledger)
        elif store == "neo4j" and self._graph is not None:
            await self._ensure_started(self._graph)

    async def _start_consuming_unless_over_memory(self) -> None:
        """Start consuming, unless memory is already above its limits: then the memory guard starts
        the consumers once it is below them (a consumer started now would be sent a prefetch window
        of deliveries at once, before the guard could pause it)."""
        memory = self._memory()
        if memory.over:
            log.warning(
                "memory above limit at start-up: not consuming",
                rss_mb=memory.rss_mb,
                system_percent=memory.system_percent,
            )
            self._memory_paused = True
            return
        await self._start_consuming()

    async def _start_consuming(self) -> None:
        assert self._topology is not None
        if self._pipeline is None:
            self._pipeline = self._build_pipeline()
        # Urgent first: without urgent slots, queued urgent requests then take the free slots.
        if self._urgent_queue is not None:
            self._urgent_tag = await self._urgent_queue.consume(self._on_urgent_message)
        try:
            self._consumer_tag = await self._topology.request_queue.consume(self._on_message)
        except BaseException:
            await self._stop_consuming()  # all or nothing: not the urgent queue alone
            raise
        if self._stopping:  # the shutdown began while the consumers started: it found none to stop
            await self._stop_consuming()
            return
        self.metrics.consuming.set(1)

    async def _stop_consuming(self) -> None:
        """Cancel the consumers; also when a channel is closed, so a reconnect does not restore them.

        Both at once: on a closed channel each cancel waits out its time-out.
        """
        cancels = []
        if self._topology is not None and self._consumer_tag is not None:
            tag, self._consumer_tag = self._consumer_tag, None
            cancels.append(_cancel_consumer(self._topology.request_queue, tag))
        if self._urgent_queue is not None and self._urgent_tag is not None:
            tag, self._urgent_tag = self._urgent_tag, None
            cancels.append(_cancel_consumer(self._urgent_queue, tag))
        await asyncio.gather(*cancels)
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
                # _handle requeues each delivery; the slot's process is killed
                await _cancel_and_wait(pending, what="request")
        await _cancel_and_wait(set(background), what="background")
        if self._slots is not None:
            await self._slots.close()
        if self._progress_queue is not None:
            await close_progress_queue(self._progress_queue, self._pump, wait_s=5.0)
        if self._progress_hook is not None and self._progress_hook.debt:
            log.warning("terminal progress left unwritten (Redis down)", requests=self._progress_hook.debt)
        for name, closer in (
            ("postgres", self._ledger.close if self._ledger else None),
            ("neo4j", self._graph.close if self._graph else None),
            ("redis-progress", self._progress.close if self._progress else None),
            ("redis-cache", self._cache.close if self._cache else None),
            ("rabbitmq", self._connection.close if self._connection else None),
        ):
            if closer is not None:
                await _close_quietly(name, closer)
        if self._http is not None:
            await self._http.stop()
        log.info("worker stopped", exit_code=self._exit_code, **self.counters)

    # ------------------------------------------------------------------ one delivery
    async def _on_urgent_message(self, message: AbstractIncomingMessage) -> None:
        await self._on_message(message, urgent=True)

    async def _on_message(self, message: AbstractIncomingMessage, *, urgent: bool = False) -> None:
        if self._stopping or self._pipeline is None:
            # A reconnecting channel can deliver during the shutdown: hand it back untouched.
            await _settle(message.nack(requeue=True))
            return
        delivery = parse(message, settings=self.settings, registry=self.registry)
        delivery.urgent = urgent
        running = self._inflight.get(delivery.request_id)
        if (
            running is not None
            and delivery.fields.fingerprint == running[0].fields.fingerprint
            and _channel_closed(running[0].message)
        ):
            # Its first delivery's channel died (a blip): the running work adopts this delivery of
            # the same request. Another message reusing the id runs after it and gets its own
            # outcome (request_id_conflict).
            log.info("redelivery adopted by the running work", request_id=delivery.request_id)
            running[0].message = message
            return
        key = delivery.request_id
        task = asyncio.create_task(self._handle(delivery, after=self._latest.get(key)))
        self._tasks[task] = delivery
        self._latest[key] = task
        task.add_done_callback(self._tasks.pop)
        task.add_done_callback(functools.partial(self._forget_latest, key))

    def _forget_latest(self, key: str, task: asyncio.Task[None]) -> None:
        if self._latest.get(key) is task:
            del self._latest[key]

    async def _handle(self, d: Delivery, *, after: asyncio.Task[None] | None) -> None:
        """Run the pipeline for one delivery, then settle it from the pipeline's verdict."""
        pipeline = self._pipeline
        assert pipeline is not None
        key = d.request_id
        try:
            if after is not None:  # another copy of this request runs here: its outcome comes first
                await asyncio.wait({after})
            self._inflight[key] = (d, asyncio.current_task())  # type: ignore[assignment]
            settlement = await self._run_counted(pipeline, d)
        except asyncio.CancelledError:
            await self._settle(d, Settlement.REQUEUE)
            raise
        except Exception as exc:  # a bug: the last resort still leaves one outcome behind
            settlement = await self._last_resort(pipeline, d, exc)
        finally:
            if self._inflight.get(key, (None,))[0] is d:
                del self._inflight[key]
        await self._settle(d, settlement)
        for hook in pipeline.hooks:
            await hook.settled(d, settlement)
        structlog.contextvars.clear_contextvars()

    async def _run_counted(self, pipeline: Pipeline, d: Delivery) -> Settlement:
        """The pipeline, counted in flight (its analysis waits for a slot inside, by priority)."""
        self.metrics.in_flight.inc()
        try:
            return await pipeline.run(d)
        finally:
            self.metrics.in_flight.dec()

    async def _last_resort(self, pipeline: Pipeline, d: Delivery, exc: Exception) -> Settlement:
        """An unexpected error: still store, announce and report a failed outcome, then dead-letter."""
        log.error(
            "unexpected error while handling a request: failing it",
            error=f"{type(exc).__name__}: {exc}",
            exc_info=exc,
        )
        d.outcome = failed(
            d.request_id,
            InternalError(f"unexpected {type(exc).__name__} while handling the request: {exc}"),
            request=d.request,
            claimed_id=d.claimed_id,
        )
        d.stored = None
        try:
            await pipeline.persist(d)
            await pipeline.project(d)
            await pipeline.publish(d)
        except RetryLater:
            return Settlement.RETRY_LATER
        except Exception as again:
            log.error("the last resort failed too", error=f"{type(again).__name__}: {again}")
            if self._progress_hook is not None:
                await self._progress_hook.write_terminal(d.outcome)
            return Settlement.DEAD_LETTER
        return decide(d)  # an outcome stored earlier (completed, say) is acked, not dead-lettered

    async def _settle(self, d: Delivery, settlement: Settlement) -> None:
        """Ack, dead-letter or requeue ``d``'s current delivery (the only place that does)."""
        message = d.message
        if settlement is Settlement.ACK:
            result = d.result
            self.counters[result.status.value if result.status.value in self.counters else "failed"] += 1
            await _settle(message.ack())
        elif settlement is Settlement.DEAD_LETTER:
            self.counters["failed"] += 1
            await _settle(message.reject(requeue=False))
        else:
            self.counters["requeued"] += 1
            if settlement is Settlement.RETRY_LATER and await self._publish_retry(d):
                # The copy's header gives back a counted start; one nobody saw commit only we can.
                if not d.counted_start:
                    await self._give_back(d)
                await _settle(message.ack())
            else:  # requeued as it is: its start, if it made one, does not count
                await self._give_back(d)
                await _settle(message.nack(requeue=True))

    async def _publish_retry(self, d: Delivery) -> bool:
        """Publish a copy of ``d`` to the delay queue (confirmed); False when that failed."""
        channel, topology = self._channel, self._topology
        if channel is None or topology is None or channel.is_closed:
            return False
        m = d.message
        headers = dict(m.headers or {})
        headers[REQUEUES_HEADER] = _int_header(m, REQUEUES_HEADER) + 1
        headers[GIVEN_BACK_HEADER] = _int_header(m, GIVEN_BACK_HEADER) + int(d.counted_start)
        copy = aio_pika.Message(
            m.body,
            headers=headers,
            priority=m.priority,
            message_id=m.message_id,
            correlation_id=m.correlation_id,
            content_type=m.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # Back to the queue it came from, after the delay: an urgent request stays in its lane.
        retry = (
            topology.urgent_retry_queue if d.urgent and topology.urgent_retry_queue else topology.retry_queue
        )
        try:
            await asyncio.wait_for(
                channel.default_exchange.publish(copy, routing_key=retry.name),
                timeout=self.settings.rabbitmq.publish_timeout_s,
            )
        except _AMQP_ERRORS as exc:
            log.warning(
                "could not requeue with a delay: requeueing at once", error=f"{type(exc).__name__}: {exc}"
            )
            return False
        return True

    async def _give_back(self, d: Delivery) -> None:
        """Undo the start of a delivery the worker requeues (a shutdown; a start that may have
        committed unseen, its replies lost until the deadline): by its lease token, so a start that
        never committed, or a lease another worker took over, is left alone."""
        if not (d.counted_start or d.start_sent) or self._ledger is None or "postgres" not in self._started:
            return  # (a ledger never started took no start)
        try:
            async with asyncio.timeout(2.0):
                await self._ledger.give_back(d.request_id, lease=d.lease)
        except (SinkUnavailable, SinkRejected, TimeoutError) as exc:
            log.info("could not give back the start", error=str(exc) or "time-out")

    # ------------------------------------------------------------------ progress (best effort)
    async def _best_effort(
        self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> Any:
        """Call a Redis operation through its breaker; on failure record it and return None."""
        guard = self._guards["redis"]
        try:
            return await guard.call(fn, *args, **kwargs)
        except SinkUnavailable as exc:
            raise_if_cancelling(exc)
            self.metrics.sink_errors.labels(sink="redis").inc()
            log.debug("redis unavailable", operation=what, error=str(exc))
            return None
        finally:
            self.metrics.set_breaker("redis", guard.state)

    async def _ledger_best_effort(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """A ledger call that can wait for the next round (the terminal progress owed): through the
        PostgreSQL breaker, bounded by the command time-out; None when the ledger did not answer."""
        try:
            async with asyncio.timeout(self.settings.postgres.command_timeout_s):
                await self._prepare("postgres")
                return await self._guards["postgres"].call(fn, *args)
        except (SinkUnavailable, SinkRejected, TimeoutError) as exc:
            raise_if_cancelling(exc)
            log.info("ledger unavailable: will try again", operation=what, error=str(exc) or "time-out")
            return None

    def _pump_progress(self, loop: asyncio.AbstractEventLoop, queue: Any) -> None:
        """Thread: forward ``(request_id, fraction, stage)`` from pool processes to the loop."""
        while True:
            try:
                item = queue.get()
            except (EOFError, OSError, ValueError, TypeError):
                return  # the queue was closed at shutdown (TypeError: closed while reading)
            if item is None:
                return
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(self._on_progress, *item)

    def _on_progress(self, request_id: str, fraction: float, stage: str) -> None:
        """A pool process's report (on the loop): to Redis, and to the prefetch window (the end of
        the analysis it expects)."""
        if self._progress_hook is not None:
            self._progress_hook.forward(request_id, fraction, stage)
        if self._prefetch_hook is not None:
            self._prefetch_hook.report(request_id, fraction, stage)

    async def _repair_progress(self) -> None:
        """Write again the terminal progress Redis missed, once it answers."""
        while True:
            await asyncio.sleep(5.0)
            if self._progress_hook is not None:
                await self._progress_hook.repay()

    async def _heal_slots(self) -> None:
        """Every 5 s: make the free urgent slots ready (one may be free for hours)."""
        while True:
            await asyncio.sleep(5.0)
            if self._slots is not None:
                await self._slots.heal()

    async def _heartbeat(self) -> None:
        """Renew the leases of in-flight requests, and stop those whose cancellation was requested
        (through the job API)."""
        ledger = self._ledger
        assert ledger is not None
        while True:
            await asyncio.sleep(self.settings.worker.cancel_poll_s)
            leases = {rid: d.lease for rid, (d, _) in self._inflight.items() if d.request is not None}
            if not leases:
                continue
            try:
                async with asyncio.timeout(self.settings.postgres.command_timeout_s):
                    pending = await ledger.heartbeat(leases)
            except (SinkUnavailable, SinkRejected, TimeoutError, RuntimeError):
                continue  # the ledger is down: cancellations wait for it
            for rid in pending:
                entry = self._inflight.get(rid)
                if entry is not None:
                    entry[0].cancel.set()

    # ------------------------------------------------------------------ guards and probes
    def _log_consuming(self) -> None:
        """The line launchers wait for: at start-up, and whenever the memory guard resumes
        consumption (for a worker that started above its limits, that is when it begins)."""
        log.info("worker consuming", queue=self.settings.rabbitmq.request_queue, prefetch=self.slot_count)

    def _memory(self) -> _MemoryReading:
        """The worker's memory (its main and analysis processes) and the system's, against the limits."""
        w = self.settings.worker
        slot_pids = self._slots.pids() if self._slots is not None else []
        # The slots' processes by id, not a scan of the host's process table for children.
        rss = self._process.memory_info().rss + sum(_rss(self._slot_processes, pid) for pid in slot_pids)
        for gone in set(self._slot_processes) - set(slot_pids):
            del self._slot_processes[gone]
        system = memory_percent()
        limit = w.max_rss_mb * 2**20
        return _MemoryReading(
            rss_mb=round(rss / 2**20),
            system_percent=system,
            over=rss > limit or system > w.max_system_memory_percent,
            under=rss < 0.9 * limit and system < 0.9 * w.max_system_memory_percent,
        )

    async def _memory_guard(self) -> None:
        """Stop taking deliveries while memory is above its limits; resume below 90 % of them.

        ``_memory_paused`` says the guard holds consumption (also from start-up, see
        :meth:`_start_consuming_unless_over_memory`); a shutdown stops consuming for good and never
        sets it. A resume that fails on the broker is tried again a second later; any other failure
        ends the worker with ``EXIT_STARTUP_FAILED``, as a failed start-up step would.
        """
        while True:
            if self._slots is not None:
                self.metrics.slots_busy.set(self._slots.busy)
                self.metrics.urgent_slots_busy.set(self._slots.urgent_busy)
                self.metrics.semaphore_waiters.set(self._slots.waiting)
                self.metrics.host_cpu_waiters.set(self._slots.waiting_for_cpu)
            memory = self._memory()
            if memory.over and not self._memory_paused and self._consumer_tag is not None:
                log.warning(
                    "memory above limit: pausing consumption",
                    rss_mb=memory.rss_mb,
                    system_percent=memory.system_percent,
                )
                self._memory_paused = True
                await self._stop_consuming()
            elif self._memory_paused and memory.under and not self._stopping:
                log.info("memory below limit: resuming consumption", rss_mb=memory.rss_mb)
                try:
                    await self._start_consuming()
                except _AMQP_ERRORS as exc:  # the channel is down: the next round tries again
                    raise_if_cancelling(exc)
                    log.warning("could not resume consumption", error=f"{type(exc).__name__}: {exc}")
                except Exception as exc:  # not a broker blip: a worker that cannot consume exits
                    log.error(
                        "worker start-up failed", dependency="consumer", error=f"{type(exc).__name__}: {exc}"
                    )
                    self._exit_code = EXIT_STARTUP_FAILED
                    self._fatal.set()
                    return
                else:
                    self._memory_paused = False
                    if self._consumer_tag is not None:
                        self._log_consuming()
            await asyncio.sleep(1.0)

    async def _broker_watchdog(self) -> None:
        """Exit (non-zero) when the broker connection stays down longer than ``reconnect_grace_s``."""
        grace = self.settings.rabbitmq.reconnect_grace_s
        down_since: float | None = None
        while True:
            conn, channel, urgent = self._connection, self._channel, self._urgent_channel
            down = conn is None or conn.is_closed or channel is None or channel.is_closed
            down = down or (urgent is not None and urgent.is_closed)
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
        """Every 10 s: ready messages and consumers of the request queue, dead letters.

        The passive declarations run on a channel of their own: a failed one (a queue deleted by
        hand) closes its channel, and a cancelled one makes aiormq close it, which must never take
        down the channel that holds the deliveries and publishes the results.
        """
        r = self.settings.rabbitmq
        channel: AbstractChannel | None = None
        while True:
            connection = self._connection
            if connection is not None and not connection.is_closed:
                try:
                    if channel is None or channel.is_closed:
                        channel = await asyncio.wait_for(connection.channel(publisher_confirms=False), 5)
                    # On the raw channel: the robust one answers a passive declaration of a queue it
                    # knows from its cache, with the counts of the first declaration.
                    raw = await channel.get_underlay_channel()
                    for name in (r.request_queue, r.urgent_queue) if r.urgent_queue else (r.request_queue,):
                        ok = await asyncio.wait_for(raw.queue_declare(name, passive=True), timeout=5)
                        self.metrics.queue_depth.labels(queue=name).set(ok.message_count or 0)
                        self.metrics.queue_consumers.labels(queue=name).set(ok.consumer_count or 0)
                    ok = await asyncio.wait_for(
                        raw.queue_declare(r.dead_letter_queue, passive=True), timeout=5
                    )
                    self.metrics.dead_letter_depth.labels(queue=r.dead_letter_queue).set(
                        ok.message_count or 0
                    )
                except _AMQP_ERRORS as exc:
                    raise_if_cancelling(exc)  # aiormq turns a cancelled RPC into a channel error
                    log.debug("queue depth not sampled", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(10.0)

    def _ready_checks(self) -> dict[str, Callable[[], Awaitable[None]]]:
        async def rabbitmq() -> None:
            if self._channel is None or self._channel.is_closed:
                raise ConnectionError("no open channel to RabbitMQ")
            if self._urgent_channel is not None and self._urgent_channel.is_closed:
                raise ConnectionError("the urgent queue's channel to RabbitMQ is closed")
            if self._consumer_tag is None:
                raise RuntimeError("not consuming (starting, paused by the memory guard, or stopping)")

        async def redis() -> None:
            if self._progress is None:
                raise RuntimeError("not started")
            await self._progress.ping()

        def store(name: str) -> Callable[[], Awaitable[None]]:
            async def check() -> None:
                sink = {"postgres": self._ledger, "neo4j": self._graph}[name]
                if sink is None or name not in self._started:
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
def _channel_closed(message: AbstractIncomingMessage) -> bool:
    """Whether the channel ``message`` came on is gone (it can no longer be acked)."""
    try:
        channel = message.channel
    except aio_pika.exceptions.ChannelInvalidStateError:  # aio-pika's answer for a closed channel
        return True
    return bool(getattr(channel, "is_closed", False))


async def _cancel_consumer(queue: AbstractQueue, tag: str) -> None:
    with contextlib.suppress(
        aio_pika.exceptions.AMQPError,
        aio_pika.exceptions.ChannelInvalidStateError,
        asyncio.TimeoutError,
        RuntimeError,
    ):
        # The robust queue forgets the consumer before the RPC, so even a failed cancel (channel
        # gone) keeps it from being restored; the broker requeues the channel's deliveries itself.
        await asyncio.wait_for(queue.cancel(tag), timeout=5)


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


@dataclass(frozen=True)
class _MemoryReading:
    """What :meth:`Worker._memory` read: above the limits (``over``), below 90 % of them (``under``)."""

    rss_mb: int
    system_percent: float
    over: bool
    under: bool


def _rss(known: dict[int, psutil.Process], pid: int) -> int:
    """Resident memory of process ``pid`` (0 once it is gone); its handle is kept in ``known``."""
    try:
        proc = known.get(pid)
        if proc is None:
            proc = known[pid] = psutil.Process(pid)
        return int(proc.memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        known.pop(pid, None)
        return 0


#: Seconds cancelled tasks get to end before the shutdown goes on without them.
_CANCEL_WAIT_S = 10.0


async def _cancel_and_wait(tasks: set[asyncio.Task[None]], *, what: str) -> None:
    """Cancel ``tasks`` and wait for them, at most :data:`_CANCEL_WAIT_S`.

    A task that swallowed its cancellation (a client library that turns it into an error it then
    handles) is logged and left behind rather than holding the shutdown forever: the connection
    closes after it, and the broker requeues any delivery such a task still held.
    """
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, pending = await asyncio.wait(tasks, timeout=_CANCEL_WAIT_S)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed while stopping", kind=what, error=repr(task.exception()))
    if pending:
        log.error(
            "tasks did not stop when cancelled: shutting down without them",
            kind=what,
            tasks=sorted(t.get_name() for t in pending),
        )
