"""Exactly one durable outcome per request, against the real services (issue 8, "Seen this week").

Each test states a guarantee and provokes the fault that broke it: a completed request delivered
again, a redelivery after a lost ack, a broker connection closed mid-analysis, a Bolt server that
stops answering, memory-guard pause cycles, cancellations, a quorum request queue, odd file names,
headers without a length, two replicas starting together.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from analysis_service.settings import EngineSettings, Neo4jSettings, RedisSettings, Settings
from analysis_service.sinks.graph import _falkordb_escaped
from analysis_service.sinks.postgres import fingerprint
from analysis_service.worker.slots import Phase
from analysis_service.worker.worker import EXIT_OK, Worker
from service_shared.messages import AnalysisRequest, AnalysisResultMessage, ResultStatus
from tests.integration.test_worker import graph_counts, pg_rows
from tests.integration.worker_harness import (
    Broker,
    make_settings,
    running_worker,
    write_long_song,
    write_song,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def settings(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> Settings:
    return make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )


def with_worker(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=changes)})


def with_rabbit(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"rabbitmq": settings.rabbitmq.model_copy(update=changes)})


def named_connection(settings: Settings) -> tuple[Settings, str]:
    """``settings`` whose broker connection carries a unique name (to close it with rabbitmqctl)."""
    name = f"worker-{uuid.uuid4().hex[:10]}"
    return with_rabbit(settings, url=f"{settings.rabbitmq.url}?name={name}"), name


async def close_broker_connection(name: str) -> None:
    """Close, on the broker's side, the connection named ``name`` (as an operator or a blip would)."""
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    )
    pids = [line.split("\t")[0] for line in listing.stdout.splitlines() if f'"{name}"' in line]
    assert pids, f"no broker connection named {name}"
    for conn in pids:
        await asyncio.to_thread(
            subprocess.run, ["rabbitmqctl", "-q", "close_connection", conn, "test: blip"], check=True
        )


async def until(what: str, condition: object, *, timeout_s: float = 30.0) -> None:
    """Poll an (async) predicate every 50 ms."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition() if callable(condition) else condition
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def ledger_status(dsn: str, request_id: str) -> str | None:
    rows = await pg_rows(dsn, "SELECT status FROM requests WHERE request_id = $1", request_id)
    return str(rows[0]["status"]) if rows else None


def analyses_run(worker: Worker) -> int:
    """Leases of the slots, one per request that reached a slot (its probe + hash and analysis). A
    replaced process's count starts again; each replacement adds one, which is right for these
    tests: none runs long enough to recycle, and a kill or a cancellation replaces the process of
    the lease it interrupts."""
    assert worker._slots is not None
    return sum(slot.jobs for slot in worker._slots._slots) + worker._slots.restarts


# ---------------------------------------------------------------------------------- the ledger
async def test_a_completed_request_delivered_again_is_republished_never_failed(settings: Settings) -> None:
    """Delivered 6 times (more than max_deliveries): one analysis, the same outcome every time."""
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    body = {"request_id": "again", "file": "a.wav", "correlation_id": "c-1"}
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish(body)
        [first] = await broker.results(1)
        again = []
        for _ in range(5):  # one at a time: concurrent deliveries of one id share one publish
            await broker.publish(body)
            again += await broker.results(1)
        [analyses] = await graph_counts(
            settings.neo4j, "MATCH (a:Analysis {request_id: 'again', status: 'completed'}) RETURN count(a)"
        )
        assert analyses_run(worker) == 1
        assert await broker.depth(settings.rabbitmq.dead_letter_queue) == 0
    assert first.status is ResultStatus.COMPLETED, first.error
    assert all(r == first for r in again)  # the stored outcome, re-announced unchanged
    [row] = await pg_rows(settings.postgres.dsn, "SELECT status, result FROM analysis_results")
    assert row["status"] == "completed"
    assert AnalysisResultMessage.model_validate_json(row["result"]) == first
    assert await ledger_status(settings.postgres.dsn, "again") == "completed"
    assert analyses == 1


async def test_a_redelivery_of_a_published_outcome_publishes_nothing(settings: Settings) -> None:
    """A lost ack: the broker redelivers (redelivered flag) a request whose result it confirmed."""
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    body = {"request_id": "lost-ack", "file": "a.wav"}
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish(body)
        [first] = await broker.results(1)
        assert first.status is ResultStatus.COMPLETED, first.error
        # Hold the worker (memory guard), take the next copy ourselves and drop its channel unacked:
        # the broker hands it out again with the redelivered flag.
        worker.settings.worker.max_rss_mb = 1.0
        await until("paused", lambda: worker._consumer_tag is None, timeout_s=5)
        await broker.publish(body)
        assert broker._connection is not None
        side = await broker._connection.channel()
        queue = await side.get_queue(settings.rabbitmq.request_queue)
        taken = await queue.get(timeout=5)
        assert not taken.redelivered
        await side.close()
        worker.settings.worker.max_rss_mb = 1e9
        await until("resumed", lambda: worker._consumer_tag is not None, timeout_s=5)
        await until(
            "the redelivery was settled",
            lambda: worker.counters["completed"] == 2 and not worker._tasks,  # acked as a replay
        )
        await until("queue empty", lambda: _empty(broker, settings), timeout_s=10)
        await asyncio.sleep(1.0)
        assert await broker.drain_now(settings.rabbitmq.results_queue) == []
        assert await broker.depth(settings.rabbitmq.dead_letter_queue) == 0
        assert analyses_run(worker) == 1


async def _empty(broker: Broker, settings: Settings) -> bool:
    return await broker.depth(settings.rabbitmq.request_queue) == 0


# ------------------------------------------------------------------------------ broker blips
async def test_a_connection_blip_during_analysis_gives_one_result_and_one_analysis(
    settings: Settings,
) -> None:
    worker_settings, name = named_connection(settings)
    write_song(settings.worker.media_root / "a.wav", seconds=150.0)
    async with Broker(settings) as broker, running_worker(worker_settings) as worker:
        await broker.publish({"request_id": "blip", "file": "a.wav"})
        await until("running", lambda: ledger_status(settings.postgres.dsn, "blip"), timeout_s=20)
        await until("analysing", lambda: analyses_run(worker) >= 1, timeout_s=20)
        await close_broker_connection(name)
        [result] = await broker.results(1, timeout_s=60)
        await asyncio.sleep(2.0)  # a second result would follow at once
        late = await broker.drain_now(settings.rabbitmq.results_queue)
        assert analyses_run(worker) == 1, "analysed twice"
        assert await broker.depth(settings.rabbitmq.request_queue) == 0
        assert await broker.depth(settings.rabbitmq.dead_letter_queue) == 0
    assert result.status is ResultStatus.COMPLETED, result.error
    assert late == []


async def test_memory_guard_cycles_never_hold_more_than_concurrency_deliveries(settings: Settings) -> None:
    settings = with_worker(settings, overlap_stores=False)  # a fixed window: prefetch = slots
    for i in range(4):
        write_song(settings.worker.media_root / f"s{i}.wav", seconds=40.0)
    async with Broker(settings) as broker, running_worker(settings) as worker:
        for i in range(4):
            await broker.publish({"request_id": f"m{i}", "file": f"s{i}.wav"})
        done = 0
        for _ in range(8):  # pause/resume cycles
            worker.settings.worker.max_rss_mb = 1.0
            await until("paused", lambda: worker._consumer_tag is None, timeout_s=5)
            worker.settings.worker.max_rss_mb = 1e9
            await until("resumed", lambda: worker._consumer_tag is not None, timeout_s=5)
            done += len(await broker.drain_now(settings.rabbitmq.results_queue))
            ready = await broker.depth(settings.rabbitmq.request_queue)
            unacked = 4 - done - ready
            assert unacked <= worker.concurrency, (unacked, ready, done)
        done += len(await broker.results(4 - done, timeout_s=90))
    assert done == 4


# ------------------------------------------------------------------------------ store faults
def _listener_pid(port: int) -> int:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return int(conn.pid)
    raise AssertionError(f"nothing listens on port {port}")


@asynccontextmanager
async def stopped_process(pid: int) -> AsyncIterator[None]:
    """SIGSTOP ``pid`` (a server that hangs without closing its sockets); SIGCONT on exit."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_persist_deadline_bounds_a_hung_graph_store_and_requeues_with_a_delay(
    settings: Settings,
) -> None:
    deadline_s = 3.0
    settings = with_worker(settings, persist_deadline_s=deadline_s)
    write_song(settings.worker.media_root / "a.wav", seconds=4.0)
    write_song(settings.worker.media_root / "warm.wav", seconds=4.0)
    bolt_pid = _listener_pid(int(settings.neo4j.uri.rsplit(":", 1)[1]))
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish({"request_id": "warm", "file": "warm.wav"})  # first analysis is slow
        await broker.results(1)
        async with stopped_process(bolt_pid):
            started = time.monotonic()
            await broker.publish({"request_id": "hung-graph", "file": "a.wav"})
            await until("requeued", lambda: worker.counters["requeued"] >= 1, timeout_s=30)
            requeued_after = time.monotonic() - started
            # Held in the delay queue, not redelivered in a hot loop.
            await asyncio.sleep(6.0)
            requeues = worker.counters["requeued"]
            assert await broker.depth(settings.rabbitmq.dead_letter_queue) == 0
        [result] = await broker.results(1, timeout_s=60)
        [nodes] = await graph_counts(
            settings.neo4j, "MATCH (a:Analysis {request_id: 'hung-graph'}) RETURN count(a)"
        )
    assert requeued_after < 2.0 + deadline_s + 3.0, requeued_after  # analysis + deadline + slack
    assert requeues <= 3, requeues  # each round: retry_delay_s + persist deadline
    assert result.status is ResultStatus.COMPLETED, result.error
    assert nodes == 1
    assert len(await pg_rows(settings.postgres.dsn, "SELECT 1 FROM analysis_results")) == 2


# ------------------------------------------------------------------------------ input guarantees
async def test_a_quote_in_a_file_name_works_end_to_end(settings: Settings) -> None:
    name = "it's a \"quoted\" song \\ 'x'.wav"
    write_song(settings.worker.media_root / name, seconds=6.0)
    async with Broker(settings) as broker, running_worker(settings):
        await broker.publish({"request_id": "quote", "file": name})
        [result] = await broker.results(1)
        [nodes, recordings] = await graph_counts(
            settings.neo4j,
            "MATCH (a:Analysis {request_id: 'quote', status: 'completed'}) WHERE a.file = $f RETURN count(a)",
            "MATCH (r:Recording) WHERE r.path = $f RETURN count(r)",
            f=_falkordb_escaped(name),  # the test backend inlines parameters (see GraphSink)
        )
    assert result.status is ResultStatus.COMPLETED, result.error
    assert result.file == name
    assert (nodes, recordings) == (1, 1)
    [row] = await pg_rows(settings.postgres.dsn, "SELECT file FROM analysis_results")
    assert row["file"] == name


def write_streamed_flac(path: Path, *, seconds: float) -> Path:
    """A FLAC written to a pipe: its STREAMINFO gives no total length."""
    wav = write_song(path.with_suffix(".src.wav"), seconds=seconds)
    with path.open("wb") as out:
        subprocess.run(
            ["ffmpeg", "-loglevel", "error", "-i", str(wav), "-f", "flac", "pipe:1"], stdout=out, check=True
        )
    wav.unlink()
    return path


async def test_a_file_without_a_length_gets_a_time_limit_from_its_size_and_max_duration(
    settings: Settings,
) -> None:
    # The base limit alone (what a file without a length used to get) is too short for 8 minutes.
    settings = with_worker(settings, time_limit_base_s=3.0, time_limit_per_audio_minute_s=30.0)
    settings = settings.model_copy(update={"engine": EngineSettings(max_duration_s=500.0)})
    write_streamed_flac(settings.worker.media_root / "stream.flac", seconds=480.0)
    write_streamed_flac(settings.worker.media_root / "too-long.flac", seconds=540.0)
    write_song(settings.worker.media_root / "warm.wav", seconds=4.0)
    async with Broker(settings) as broker, running_worker(settings):
        # The first analysis after start-up is slow (decoder imports): not what is measured here.
        await broker.publish({"request_id": "warm", "file": "warm.wav"})
        await broker.results(1, timeout_s=60)
        await broker.publish({"request_id": "stream", "file": "stream.flac"})
        await broker.publish({"request_id": "stream-long", "file": "too-long.flac"})
        results = {r.request_id: r for r in await broker.results(2, timeout_s=90)}
    assert results["stream"].status is ResultStatus.COMPLETED, results["stream"].error
    assert results["stream"].output is not None
    assert results["stream"].output.duration_s == pytest.approx(480.0, abs=0.5)
    long = results["stream-long"]
    assert long.error is not None
    assert long.error.code == "too_long", long.error


# ------------------------------------------------------------------------------ cancellation
async def test_a_request_cancelled_while_queued_is_never_analysed(settings: Settings) -> None:
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    body = {"request_id": "cancel-queued", "file": "a.wav"}
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await pg_rows(
            settings.postgres.dsn,
            "INSERT INTO requests (request_id, fingerprint, file, status, cancel_requested_at) "
            "VALUES ($1, $2, $3, 'queued', now())",
            "cancel-queued",
            fingerprint(AnalysisRequest.model_validate(body)),
            "a.wav",
        )
        await broker.publish(body)
        [result] = await broker.results(1)
        assert analyses_run(worker) == 0
    assert result.status is ResultStatus.CANCELLED
    assert result.error is not None
    assert result.error.code == "cancelled"
    assert await ledger_status(settings.postgres.dsn, "cancel-queued") == "cancelled"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        # A plugin analyzer the API knows but this worker lacks.
        (
            {"request_id": "api-job-plugin", "file": "a.wav", "analyses": ["bpm", "loudness"]},
            "unknown_analyzer",
        ),
        # A path that resolves outside this worker's media root (another mount, a changed symlink).
        ({"request_id": "api-job-outside", "file": "../elsewhere.wav"}, "path_outside_media_root"),
    ],
)
async def test_a_queued_job_this_worker_refuses_ends_under_its_own_id(
    settings: Settings, body: dict[str, Any], code: str
) -> None:
    """The job API records a queued row before it publishes. A request this worker refuses after
    reading it (a valid body it cannot run) must end that row, not a ``rejected-...`` one: the job,
    its batch and a client waiting on it would otherwise wait forever."""
    write_song(settings.worker.media_root / "a.wav", seconds=2.0)
    request = AnalysisRequest.model_validate(body)
    async with Broker(settings) as broker, running_worker(settings):
        await pg_rows(
            settings.postgres.dsn,
            "INSERT INTO requests (request_id, fingerprint, file, status) VALUES ($1, $2, $3, 'queued')",
            request.request_id,
            fingerprint(request),
            request.file,
        )
        await broker.publish(body)
        [result] = await broker.results(1)
    assert result.request_id == request.request_id
    assert result.error is not None
    assert result.error.code == code
    assert await ledger_status(settings.postgres.dsn, request.request_id) == "failed"


async def test_a_running_request_is_cancelled_and_its_slot_killed(settings: Settings) -> None:
    # Two hours: about 11 s of analysis on a fast machine, where 30 minutes (2 s) completed before
    # the cancellation (a 1 s pause, then the worker's cancellation poll) arrived.
    write_long_song(settings.worker.media_root / "long.flac", seconds=7200.0)
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish({"request_id": "cancel-running", "file": "long.flac"})
        assert worker._slots is not None
        slots = worker._slots
        await until("analysing", lambda: slots.busy >= 1, timeout_s=30)
        [slot] = [s for s in slots._slots if s.phase is Phase.ANALYSING]
        pids = list(getattr(slot.executor, "_processes", {}) or {})
        await asyncio.sleep(1.0)
        await pg_rows(
            settings.postgres.dsn,
            "UPDATE requests SET cancel_requested_at = now() WHERE request_id = 'cancel-running'",
        )
        asked = time.monotonic()
        [result] = await broker.results(1, timeout_s=30)
        took = time.monotonic() - asked
    assert result.status is ResultStatus.CANCELLED, result
    assert took < settings.worker.cancel_poll_s + 2.0, took
    assert pids
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)
    assert await ledger_status(settings.postgres.dsn, "cancel-running") == "cancelled"


# ------------------------------------------------------------------------------ topology
async def test_a_quorum_request_queue_works_and_fails_a_poison_request_by_delivery_count(
    settings: Settings,
) -> None:
    settings = with_rabbit(settings, queue_type="quorum")
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    async with Broker(settings) as broker:
        # Deliveries that ended without an outcome (as if each killed its worker).
        await broker.publish({"request_id": "poison", "file": "a.wav"})
        assert broker.channel is not None
        queue = await broker.channel.get_queue(settings.rabbitmq.request_queue)
        for _ in range(settings.worker.max_deliveries):
            message = await queue.get(timeout=5)
            await message.nack(requeue=True)
        async with running_worker(settings):
            [poison] = await broker.results(1)
            await broker.publish({"request_id": "good", "file": "a.wav"})
            [good] = await broker.results(1)
            dead = await broker.drain(settings.rabbitmq.dead_letter_queue, 1)
    assert poison.request_id == "poison"
    assert poison.error is not None
    assert poison.error.code == "worker_crashed", poison.error
    assert good.status is ResultStatus.COMPLETED, good.error
    assert len(dead) == 1


async def test_two_replicas_starting_together_on_empty_stores_both_start(settings: Settings) -> None:
    workers = [Worker(settings), Worker(settings)]
    stop = asyncio.Event()
    async with Broker(settings):
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        try:
            await until(
                "both consuming or one exited",
                lambda: all(w._consumer_tag is not None for w in workers) or any(t.done() for t in tasks),
                timeout_s=60,
            )
            both = all(w._consumer_tag is not None for w in workers)
        finally:
            stop.set()
            statuses = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert statuses == [EXIT_OK, EXIT_OK]
    assert both
    assert all(w._started == {"postgres", "neo4j"} for w in workers)


# ------------------------------------------------------------------------------ results publisher
async def test_a_late_publisher_confirm_is_not_published_again(settings: Settings) -> None:
    """The broker confirms the result after publish_timeout_s: the worker waits for that confirm
    instead of publishing a second copy."""
    settings = with_rabbit(settings, publish_timeout_s=0.5)
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    async with Broker(settings) as broker, running_worker(settings) as worker:
        publisher = worker._publisher
        assert publisher is not None
        exchange = publisher._exchange
        real_publish = exchange.publish
        calls = 0

        async def late_confirm(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            confirmation = await real_publish(*args, **kwargs)
            if calls == 1:
                await asyncio.sleep(1.0)  # the confirm of the first publish arrives late
            return confirmation

        exchange.publish = late_confirm  # type: ignore[method-assign]
        await broker.publish({"request_id": "late", "file": "a.wav"})
        [result] = await broker.results(1)
        await until("settled", lambda: worker.counters["completed"] == 1 and not worker._tasks)
        await asyncio.sleep(1.0)
        extra = await broker.drain_now(settings.rabbitmq.results_queue)
    assert result.status is ResultStatus.COMPLETED, result.error
    assert extra == []
    assert calls == 1


# ------------------------------------------------------------------------------ progress
@asynccontextmanager
async def private_redis(port: int, workdir: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A throw-away ``redis-server`` on ``port`` (the test stops and restarts it)."""
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(workdir),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await until("redis up", lambda: _accepts(port), timeout_s=10)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), timeout=10)


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


async def test_progress_missed_while_redis_was_down_is_repaired_when_it_returns(
    settings: Settings, tmp_path: Path
) -> None:
    from redis.asyncio import Redis

    from tests.integration.conftest import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": url, "socket_timeout_s": 0.5})}
    )
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    async with private_redis(port, tmp_path) as first, Broker(settings) as broker, running_worker(settings):
        first.terminate()  # Redis goes down while the request is analysed and stored
        await first.wait()
        await broker.publish({"request_id": "no-redis", "file": "a.wav"})
        [result] = await broker.results(1)
        assert result.status is ResultStatus.COMPLETED, result.error
        async with private_redis(port, tmp_path):
            client = Redis.from_url(url, decode_responses=True)
            key = f"{settings.redis.key_prefix}:progress:no-redis"
            try:
                await until("progress repaired", lambda: _status_is(client, key, "completed"), timeout_s=15)
            finally:
                await client.aclose()


async def _status_is(client: Any, key: str, status: str) -> bool:
    return bool(await client.hget(key, "status") == status)


async def test_copies_of_one_id_in_flight_leave_the_stores_agreeing(settings: Settings) -> None:
    """A valid request, an invalid body with its id and a reuse of its id for another file, all in
    flight together: the id's outcome is the valid request's, in PostgreSQL and in the graph."""
    settings = with_worker(settings, concurrency=2)
    write_song(settings.worker.media_root / "a.wav", seconds=30.0)
    write_song(settings.worker.media_root / "b.wav", seconds=6.0)
    async with Broker(settings) as broker, running_worker(settings):
        await broker.publish({"request_id": "shared", "file": "a.wav"})
        await broker.publish({"request_id": "shared", "file": "a.wav", "priority": 99})
        await broker.publish({"request_id": "shared", "file": "b.wav"})
        results = await broker.results(3, timeout_s=60)
        [completed, failed] = await graph_counts(
            settings.neo4j,
            "MATCH (a:Analysis {request_id: 'shared', status: 'completed'}) RETURN count(a)",
            "MATCH (a:Analysis {status: 'failed'}) RETURN count(a)",
        )
    by_id = {r.request_id: r for r in results}
    assert by_id["shared"].status is ResultStatus.COMPLETED, by_id["shared"].error
    others = [r for r in results if r.request_id != "shared"]
    assert len(others) == 2
    assert all(r.request_id.startswith("rejected-") and r.claimed_request_id == "shared" for r in others)
    assert sorted(r.error.code for r in others if r.error) == ["invalid_priority", "request_id_conflict"]
    assert (completed, failed) == (1, 2)
    assert await ledger_status(settings.postgres.dsn, "shared") == "completed"
    rows = await pg_rows(
        settings.postgres.dsn, "SELECT status FROM analysis_results WHERE request_id = 'shared'"
    )
    assert [r["status"] for r in rows] == ["completed"]


async def test_a_redis_refusing_writes_costs_progress_and_cache_only(
    settings: Settings, tmp_path: Path
) -> None:
    """Redis out of memory (``maxmemory`` with ``noeviction``: every write answers ``OOM``) or unable
    to persist (``MISCONF``) is a best-effort store refusing writes: the request still completes."""
    from redis.asyncio import Redis
    from redis.exceptions import OutOfMemoryError

    from tests.integration.conftest import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": url})})
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    async with private_redis(port, tmp_path), Broker(settings) as broker, running_worker(settings):
        client = Redis.from_url(url, decode_responses=True)
        try:
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", "1")  # below what the server already uses
            with pytest.raises(OutOfMemoryError):
                await client.set("probe", "x")
            await broker.publish({"request_id": "redis-oom", "file": "a.wav"})
            [result] = await broker.results(1)
        finally:
            await client.aclose()
    assert result.status is ResultStatus.COMPLETED, result.error


async def test_a_stored_outcome_is_what_progress_shows_when_the_last_resort_fails_too(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error after the outcome was stored (here: the graph write raising a bug's
    error every time) sends the delivery to the last resort, whose own attempt fails the same way.
    Progress must then show the stored outcome (completed), never the last resort's internal_error."""
    from redis.asyncio import Redis

    from analysis_service.sinks.graph import GraphSink

    async def broken_write(self: GraphSink, result: AnalysisResultMessage) -> None:
        raise RuntimeError("a bug in the graph projection")

    monkeypatch.setattr(GraphSink, "write", broken_write)
    write_song(settings.worker.media_root / "a.wav", seconds=2.0)
    client = Redis.from_url(settings.redis.url, decode_responses=True)
    key = f"{settings.redis.key_prefix}:progress:graph-bug"
    try:
        async with Broker(settings) as broker, running_worker(settings):
            await broker.publish({"request_id": "graph-bug", "file": "a.wav"})
            await until("settled", lambda: _ledger_terminal(settings.postgres.dsn, "graph-bug"), timeout_s=60)
            await until(
                "terminal progress", lambda: _status_in(client, key, {"completed", "failed"}), timeout_s=30
            )
        assert await ledger_status(settings.postgres.dsn, "graph-bug") == "completed"
        assert await client.hget(key, "status") == "completed"
        assert await client.hget(key, "error_code") is None
    finally:
        await client.aclose()


async def _ledger_terminal(dsn: str, request_id: str) -> bool:
    return await ledger_status(dsn, request_id) in {"completed", "failed", "cancelled"}


async def _status_in(client: Any, key: str, statuses: set[str]) -> bool:
    return bool(await client.hget(key, "status") in statuses)
