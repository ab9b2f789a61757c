"""The worker's guards and probes against real services: memory guard, broker watchdog, /ready."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from analysis_service.settings import Neo4jSettings, RedisSettings, Settings
from analysis_service.worker.worker import EXIT_BROKER_LOST, EXIT_OK, EXIT_STARTUP_FAILED, Worker
from service_shared.messages import ResultStatus
from tests.integration.worker_harness import Broker, make_settings, write_song

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

READY_CHECKS = {"rabbitmq", "redis", "postgres", "neo4j", "process_pool"}


@pytest.fixture
def settings(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> Settings:
    return make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )


class WorkerRun:
    """``Worker.run`` in a task of this loop, stopped (and awaited) on exit.

    Unlike ``running_worker`` it does not wait for the consumer, which the memory guard may
    never start; use :meth:`until` to wait for whatever state the test needs.
    """

    def __init__(self, settings: Settings, *, exits: tuple[int, ...] = (EXIT_OK, EXIT_BROKER_LOST)) -> None:
        self.worker = Worker(settings)
        self.stop = asyncio.Event()
        self.exits = exits
        self._task: asyncio.Task[int] | None = None

    @property
    def task(self) -> asyncio.Task[int]:
        assert self._task is not None, "not started"
        return self._task

    async def __aenter__(self) -> WorkerRun:
        self._task = asyncio.create_task(self.worker.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.task.done():
            self.stop.set()
        status = await asyncio.wait_for(self.task, timeout=60)
        if exc[0] is None:  # a failing test's own error matters more than its exit status
            assert status in self.exits, status

    async def until(self, what: str, condition: Callable[[Worker], bool], *, timeout_s: float = 60.0) -> None:
        """Poll ``condition(worker)`` every 50 ms until it holds; fail on timeout or early exit."""
        deadline = time.monotonic() + timeout_s
        while not condition(self.worker):
            if self.task.done():
                raise AssertionError(f"worker exited with status {self.task.result()} before: {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s} s: {what}")
            await asyncio.sleep(0.05)

    async def stopped(self) -> int:
        """Set the stop event and return the exit status."""
        self.stop.set()
        return await asyncio.wait_for(self.task, timeout=60)


def consuming(worker: Worker) -> bool:
    return worker._consumer_tag is not None and worker.metrics.consuming._value.get() == 1


def paused(worker: Worker) -> bool:
    """Paused by the memory guard (not merely not consuming yet: a worker starting has no consumer)."""
    return (
        worker._memory_paused
        and worker._consumer_tag is None
        and worker._urgent_tag is None
        and worker.metrics.consuming._value.get() == 0
    )


def connected(worker: Worker) -> bool:
    return worker._topology is not None


async def get_ready(worker: Worker) -> tuple[int, dict[str, Any]]:
    assert worker._http is not None
    url = f"http://127.0.0.1:{worker._http.port}/ready"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


def with_worker(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=changes)})


async def stays_queued(broker: Broker, settings: Settings, *, seconds: float) -> None:
    """The request queue holds exactly one message for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await broker.depth(settings.rabbitmq.request_queue) == 1
        await asyncio.sleep(0.25)


async def held_then_resumed(run: WorkerRun, broker: Broker, settings: Settings) -> None:
    """The paused worker leaves the queued request "held" alone; with the limit raised, the guard
    resumes consuming and the request completes."""
    await stays_queued(broker, settings, seconds=2.0)
    assert run.worker.counters == {"completed": 0, "failed": 0, "cancelled": 0, "requeued": 0}
    run.worker.settings.worker.max_rss_mb = 1e9  # the guard reads its settings every second
    await run.until("resumed", consuming, timeout_s=5.0)
    [result] = await broker.results(1, timeout_s=30)
    assert result.request_id == "held"
    assert result.status is ResultStatus.COMPLETED, result.error


# ---------------------------------------------------------------------- memory guard
async def test_memory_guard_above_limit_from_start_does_not_consume(settings: Settings) -> None:
    """Memory over the limit at start-up: no consumer starts, not even for the guard's first look;
    the guard starts consuming once memory is back under the limit, and says "worker consuming"
    then (the line launchers wait for)."""
    settings = with_worker(settings, max_rss_mb=1.0)
    write_song(settings.worker.media_root / "a.wav", seconds=4.0)
    saved = structlog.get_config()
    structlog.reset_defaults()  # capture_logs needs the default configuration
    try:
        with structlog.testing.capture_logs() as logs:
            async with Broker(settings) as broker:
                await broker.publish({"request_id": "held", "file": "a.wav"})  # waiting at start-up
                async with WorkerRun(settings) as run:
                    await run.until("connected to the broker", connected)
                    await run.until("paused by the memory guard", paused, timeout_s=5.0)
                    assert "worker consuming" not in [e["event"] for e in logs]
                    await held_then_resumed(run, broker, settings)
    finally:
        structlog.configure(**saved)
    events = [e["event"] for e in logs]
    assert events.index("memory above limit at start-up: not consuming") < events.index("worker consuming")


async def test_a_consumer_that_cannot_start_after_a_start_up_pause_ends_the_worker(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first start of the consumers, left to the memory guard, fails like a start-up step: the
    worker exits with EXIT_STARTUP_FAILED instead of idling with the guard gone."""
    settings = with_worker(settings, max_rss_mb=1.0)
    async with Broker(settings), WorkerRun(settings, exits=(EXIT_STARTUP_FAILED,)) as run:
        await run.until("connected to the broker", connected)  # start-up: the slots' imports, first
        await run.until("paused by the memory guard", paused, timeout_s=5.0)

        def broken() -> None:
            raise ValueError("the pipeline could not be built")

        monkeypatch.setattr(run.worker, "_build_pipeline", broken)
        run.worker.settings.worker.max_rss_mb = 1e9
        assert await asyncio.wait_for(run.task, timeout=10) == EXIT_STARTUP_FAILED


async def test_memory_guard_pauses_and_resumes_consumption(settings: Settings) -> None:
    """Memory over the limit while consuming: stop taking requests; back under it: resume."""
    write_song(settings.worker.media_root / "a.wav", seconds=4.0)
    async with Broker(settings) as broker, WorkerRun(settings) as run:
        worker = run.worker
        await run.until("consuming", consuming)
        worker.settings.worker.max_rss_mb = 1.0  # the guard reads its settings every second
        await run.until("paused by the memory guard", paused, timeout_s=5.0)

        status, body = await get_ready(worker)
        assert status == 503
        assert not body["checks"]["rabbitmq"]["ok"]
        assert "not consuming" in body["checks"]["rabbitmq"]["error"]

        await broker.publish({"request_id": "held", "file": "a.wav"})
        await held_then_resumed(run, broker, settings)
        assert await broker.depth(settings.rabbitmq.request_queue) == 0
        assert await run.stopped() == EXIT_OK


# ---------------------------------------------------------------------- broker watchdog
async def test_broker_watchdog_exits_when_the_connection_stays_closed(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"rabbitmq": settings.rabbitmq.model_copy(update={"reconnect_grace_s": 1.0})}
    )
    async with Broker(settings), WorkerRun(settings) as run:
        worker = run.worker
        await run.until("consuming", consuming)
        assert worker._connection is not None
        # An explicit close is final: the robust connection does not reconnect after it.
        await worker._connection.close()
        t0 = time.monotonic()
        await run.until("the watchdog gave up", lambda w: w._fatal.is_set(), timeout_s=4.0)
        detected_after = time.monotonic() - t0
        status = await asyncio.wait_for(asyncio.shield(run.task), timeout=15.0)
        exited_after = time.monotonic() - t0
        assert status == EXIT_BROKER_LOST
        assert not run.stop.is_set()
        assert 1.0 < detected_after < 4.0, detected_after  # grace 1 s, checked every second
        # The shutdown spends up to 5 s more: cancelling the consumer on the closed robust channel
        # waits for a reconnection until _stop_consuming's timeout.
        assert exited_after < 12.0, exited_after
        assert worker.metrics.consuming._value.get() == 0


# ---------------------------------------------------------------------- /ready
async def test_ready_reports_every_check_ok(settings: Settings) -> None:
    async with Broker(settings), WorkerRun(settings) as run:
        await run.until("consuming", consuming)
        status, body = await get_ready(run.worker)
        assert status == 200, body
        assert body["status"] == "ready"
        assert set(body["checks"]) == READY_CHECKS
        assert all(check == {"ok": True} for check in body["checks"].values()), body
        assert await run.stopped() == EXIT_OK


async def test_ready_names_redis_when_it_is_down_and_the_worker_keeps_working(
    settings: Settings, closed_port: int
) -> None:
    redis = settings.redis.model_copy(update={"url": f"redis://127.0.0.1:{closed_port}/0"})
    settings = settings.model_copy(update={"redis": redis})
    write_song(settings.worker.media_root / "a.wav", seconds=4.0)
    async with Broker(settings) as broker, WorkerRun(settings) as run:
        await run.until("consuming", consuming)
        status, body = await get_ready(run.worker)
        assert status == 503, body
        assert body["status"] == "not ready"
        assert set(body["checks"]) == READY_CHECKS
        failing = {name for name, check in body["checks"].items() if not check["ok"]}
        assert failing == {"redis"}, body
        assert body["checks"]["redis"]["error"]

        # Progress and cache are best effort: requests are still analysed and stored.
        await broker.publish({"request_id": "no-redis", "file": "a.wav"})
        [result] = await broker.results(1, timeout_s=30)
        assert result.status is ResultStatus.COMPLETED, result.error
        assert not run.task.done()
        assert consuming(run.worker)
        assert await run.stopped() == EXIT_OK
