"""SIGTERM on the real ``analysis-service worker`` process: nothing is lost, exit status 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from analysis_service.settings import Neo4jSettings, RedisSettings, Settings, WorkerSettings
from service_shared.messages import AnalysisRequest, AnalysisResultMessage, ResultStatus
from tests.integration.worker_harness import Broker, make_settings, settings_env, write_long_song, write_song

pytestmark = pytest.mark.integration


async def start_worker_process(settings: Settings) -> asyncio.subprocess.Process:
    env = {**os.environ, **settings_env(settings), "ANALYSIS_LOG_FORMAT": "json"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "analysis_service.cli", "worker", env=env, stderr=asyncio.subprocess.PIPE
    )


async def wait_for_log(proc: asyncio.subprocess.Process, text: str, *, timeout_s: float = 60.0) -> list[str]:
    """Read the worker's log lines until one contains ``text``."""
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                raw = await proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"worker exited before logging {text!r}:\n" + "\n".join(lines[-30:]))
                lines.append(raw.decode(errors="replace").rstrip())
                if text in lines[-1]:
                    return lines
    except TimeoutError:
        tail = "\n".join(lines[-30:])
        raise AssertionError(f"no {text!r} in {timeout_s} s; last lines:\n{tail}") from None


def with_worker(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"worker": settings.worker.model_copy(update=changes)})


@pytest.fixture
def settings(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> Settings:
    s = make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )
    assert isinstance(s.worker, WorkerSettings)
    return s


async def test_sigterm_mid_batch_accounts_for_every_request(settings: Settings) -> None:
    ids = [f"batch-{i}" for i in range(8)]
    for i, rid in enumerate(ids):
        write_song(settings.worker.media_root / f"{rid}.wav", bpm=100 + 4 * i, seconds=20.0)
    async with Broker(settings) as broker:
        for rid in ids:
            await broker.publish({"request_id": rid, "file": f"{rid}.wav"})
        proc = await start_worker_process(settings)
        await wait_for_log(proc, "request completed")
        proc.send_signal(signal.SIGTERM)
        lines = await wait_for_log(proc, "worker stopped")
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0, "\n".join(lines[-20:])

        done = [
            AnalysisResultMessage.model_validate_json(m.body)
            for m in await broker.drain_now(settings.rabbitmq.results_queue)
        ]
        left = await broker.drain_now(settings.rabbitmq.request_queue)
        dead = await broker.depth(settings.rabbitmq.dead_letter_queue)

    completed = {r.request_id for r in done if r.status is ResultStatus.COMPLETED}
    waiting = {AnalysisRequest.model_validate_json(m.body).request_id for m in left}
    assert dead == 0
    assert len(done) == len(completed), "a request failed"
    assert completed | waiting == set(ids), (sorted(completed), sorted(waiting))
    assert not completed & waiting, "a completed request was also left in the queue"
    assert 1 <= len(completed) < len(ids), "SIGTERM was not mid-batch"


async def test_sigterm_past_grace_requeues_the_running_request(settings: Settings) -> None:
    settings = with_worker(settings, shutdown_grace_s=0.0)
    write_long_song(settings.worker.media_root / "long.flac", seconds=3600.0)
    async with Broker(settings) as broker:
        await broker.publish({"request_id": "long-one", "file": "long.flac"})
        proc = await start_worker_process(settings)
        await wait_for_log(proc, "request received")
        proc.send_signal(signal.SIGTERM)
        lines = await wait_for_log(proc, "worker stopped")
        assert await asyncio.wait_for(proc.wait(), timeout=60) == 0, "\n".join(lines[-20:])
        left = await broker.drain_now(settings.rabbitmq.request_queue)
        published = [m.body.decode() for m in await broker.drain_now(settings.rabbitmq.results_queue)]
        assert published == [], (published, lines[-15:])
        assert await broker.depth(settings.rabbitmq.dead_letter_queue) == 0
    assert [AnalysisRequest.model_validate_json(m.body).request_id for m in left] == ["long-one"]
    assert any("requeue" in line for line in lines)
