"""The real ``analysis-service worker`` process under kills, bad credentials and shutdown faults."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from analysis_service.settings import Neo4jSettings, RedisSettings, Settings
from analysis_service.worker.worker import EXIT_OK, Worker
from tests.integration.test_reliability import close_broker_connection, named_connection
from tests.integration.test_worker_shutdown import start_worker_process, wait_for_log
from tests.integration.worker_harness import Broker, make_settings, write_song

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def settings(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> Settings:
    return make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )


async def test_kill_9_of_the_main_process_leaves_no_process_behind(settings: Settings) -> None:
    proc = await start_worker_process(settings)
    await wait_for_log(proc, "worker consuming")
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the worker has no pool processes"
    proc.kill()
    await proc.wait()
    deadline = time.monotonic() + 5.0
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        await asyncio.sleep(0.1)
    assert not alive, [(c.pid, c.cmdline()[-3:]) for c in alive]


async def test_wrong_neo4j_credentials_at_start_up_are_one_clear_log_line(settings: Settings) -> None:
    bad = settings.model_copy(update={"neo4j": settings.neo4j.model_copy(update={"password": "wrong"})})
    proc = await start_worker_process(bad)
    lines = await wait_for_log(proc, "worker consuming", timeout_s=90)
    proc.send_signal(signal.SIGTERM)
    lines += await wait_for_log(proc, "worker stopped")
    status = await asyncio.wait_for(proc.wait(), timeout=30)
    assert proc.stderr is not None
    lines += (await proc.stderr.read()).decode(errors="replace").splitlines()
    text = "\n".join(lines)
    assert "Traceback" not in text, text[-3000:]
    neo4j_lines = [json.loads(line) for line in lines if line.startswith("{") and "neo4j" in line.lower()]
    assert len([e for e in neo4j_lines if e.get("level") in ("warning", "error")]) == 1, neo4j_lines
    last = json.loads([line for line in lines if line.startswith("{")][-1])
    assert last["event"] == "worker stopped"
    assert last["exit_code"] == status == EXIT_OK


async def test_sigterm_while_the_broker_connection_is_down_dead_letters_nothing(settings: Settings) -> None:
    worker_settings, name = named_connection(settings)
    ids = [f"down-{i}" for i in range(4)]
    for rid in ids:
        write_song(settings.worker.media_root / f"{rid}.wav", seconds=6.0)
    async with Broker(settings) as broker:
        for rid in ids:
            await broker.publish({"request_id": rid, "file": f"{rid}.wav"})
        proc = await start_worker_process(worker_settings)
        await wait_for_log(proc, "request completed", timeout_s=90)
        await close_broker_connection(name)
        proc.send_signal(signal.SIGTERM)  # in the window before the robust connection is back
        lines = await wait_for_log(proc, "worker stopped", timeout_s=90)
        status = await asyncio.wait_for(proc.wait(), timeout=30)
        await asyncio.sleep(1.0)
        dead = await broker.depth(settings.rabbitmq.dead_letter_queue)
        done = len(await broker.drain_now(settings.rabbitmq.results_queue))
        left = await broker.depth(settings.rabbitmq.request_queue)
    assert status == EXIT_OK, lines[-10:]
    assert dead == 0, lines[-20:]
    assert done + left == len(ids), (done, left)


async def test_shutdown_leaves_no_thread_or_child_process_behind(settings: Settings) -> None:
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    before = {t.ident for t in threading.enumerate()}
    others = {c.pid for c in psutil.Process().children(recursive=True)}  # e.g. the Bolt server
    worker = Worker(settings)
    stop = asyncio.Event()
    errors: list[BaseException | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    try:
        async with Broker(settings) as broker:
            task = asyncio.create_task(worker.run(stop))
            while worker._consumer_tag is None:
                assert not task.done()
                await asyncio.sleep(0.05)
            await broker.publish({"request_id": "one", "file": "a.wav"})
            await broker.results(1)
            stop.set()
            assert await asyncio.wait_for(task, timeout=60) == EXIT_OK
        await asyncio.sleep(0.5)
    finally:
        threading.excepthook = previous
    # asyncio_N / uvloop_N: the event loop's own executor (name resolution), shut down when the
    # loop closes (asyncio.Runner in `analysis-service worker`).
    left = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and t.is_alive() and not t.name.startswith(("asyncio_", "uvloop_"))
    ]
    assert left == []
    assert errors == []
    children = [
        c
        for c in psutil.Process().children(recursive=True)
        if c.pid not in others
        and c.status() != psutil.STATUS_ZOMBIE
        # multiprocessing's resource tracker: one per Python process, ends with it (see kill -9 test)
        and "resource_tracker" not in " ".join(c.cmdline())
    ]
    assert children == [], [c.cmdline()[:3] for c in children]
