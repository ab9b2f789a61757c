"""A running Worker against real services, and helpers to publish requests and collect results."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import soundfile as sf

from analysis_service.audio.synth import demo_song
from analysis_service.settings import (
    EngineSettings,
    HttpSettings,
    Neo4jSettings,
    PostgresSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)
from analysis_service.worker.topology import declare_topology, routing_key_for
from analysis_service.worker.worker import Worker
from service_shared.messages import AnalysisResultMessage
from tests.integration.broker_names import names, unique_settings


def make_settings(
    tmp_path: Path,
    *,
    rabbit_url: str,
    pg_dsn: str,
    redis: RedisSettings,
    graph: Neo4jSettings,
    concurrency: int = 2,
    spare_slots: int = 1,
    **engine: float,
) -> Settings:
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    return Settings(
        rabbitmq=unique_settings(rabbit_url, retry_delay_s=1.0),
        redis=redis,
        postgres=PostgresSettings(dsn=pg_dsn),
        neo4j=graph,
        engine=EngineSettings(**engine),
        worker=WorkerSettings(
            media_root=media,
            concurrency=concurrency,
            spare_slots=spare_slots,
            sink_retry_attempts=2,
            sink_retry_max_wait_s=0.5,
            persist_deadline_s=3.0,
            shutdown_grace_s=20.0,
            breaker_ttl_s=1.0,
        ),
        http=HttpSettings(host="127.0.0.1", port=0),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """``ANALYSIS_*`` environment variables that rebuild ``settings`` in another process."""
    env: dict[str, str] = {}
    for section, value in settings.model_dump(mode="json").items():
        if isinstance(value, dict):
            for field, v in value.items():
                if v is not None:
                    env[f"ANALYSIS_{section.upper()}__{field.upper()}"] = str(v)
        else:
            env[f"ANALYSIS_{section.upper()}"] = str(value)
    return env


def write_song(
    path: Path, *, bpm: float = 120.0, tonic: int = 9, mode: str = "minor", seconds: float = 12.0
) -> Path:
    """A WAV file with a known tempo and key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, demo_song(bpm=bpm, tonic=tonic, mode=mode, seconds=seconds, sample_rate=22050), 22050)
    return path


def write_long_song(path: Path, *, seconds: float, chunk_s: float = 30.0) -> Path:
    """A long FLAC made by repeating a short song, written in chunks (flat memory)."""
    chunk = demo_song(bpm=124.0, tonic=2, mode="major", seconds=chunk_s, sample_rate=22050)
    with sf.SoundFile(path, "w", samplerate=22050, channels=1, format="FLAC") as fh:
        for _ in range(int(seconds // chunk_s)):
            fh.write(chunk)
    return path


class Broker:
    """Publishes requests to, and reads results and dead letters from, the test's topology."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Broker:
        self._connection = await aio_pika.connect(self.settings.rabbitmq.url)
        self.channel = await self._connection.channel(publisher_confirms=True)
        await declare_topology(self.channel, self.settings.rabbitmq)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.channel is not None
        assert self._connection is not None
        queues, exchanges = names(self.settings.rabbitmq)
        for queue in queues:
            await self.channel.queue_delete(queue)
        for exchange in exchanges:
            await self.channel.exchange_delete(exchange)
        await self._connection.close()

    async def publish(self, body: dict[str, Any] | bytes, *, priority: int = 5) -> None:
        """Publish like a producer: to the urgent queue from ``urgent_priority`` up."""
        assert self.channel is not None
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        exchange = await self.channel.get_exchange(self.settings.rabbitmq.request_exchange)
        await exchange.publish(
            aio_pika.Message(raw, priority=priority, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=routing_key_for(priority, self.settings.rabbitmq),
        )

    async def drain(
        self, queue_name: str, count: int, *, timeout_s: float = 60.0
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Get ``count`` messages from ``queue_name`` (acked), failing after ``timeout_s``."""
        assert self.channel is not None
        queue = await self.channel.get_queue(queue_name)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count:
            message = await queue.get(fail=False)
            if message is None:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"only {len(got)} of {count} messages arrived on {queue_name} in {timeout_s} s"
                    )
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            got.append(message)
        return got

    async def drain_now(self, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Every message waiting in ``queue_name`` now (acked)."""
        assert self.channel is not None
        queue = await self.channel.get_queue(queue_name)
        got = []
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            got.append(message)
        return got

    async def results(self, count: int, *, timeout_s: float = 60.0) -> list[AnalysisResultMessage]:
        messages = await self.drain(self.settings.rabbitmq.results_queue, count, timeout_s=timeout_s)
        return [AnalysisResultMessage.model_validate_json(m.body) for m in messages]

    async def depth(self, queue_name: str) -> int:
        assert self.channel is not None
        q = await self.channel.declare_queue(queue_name, passive=True)
        return int(q.declaration_result.message_count or 0)


@asynccontextmanager
async def running_worker(settings: Settings, *, ready_timeout_s: float = 60.0) -> AsyncIterator[Worker]:
    """Start a Worker in this event loop; stop it (SIGTERM path) on exit and check its exit status."""
    worker = Worker(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    deadline = time.monotonic() + ready_timeout_s
    while worker._consumer_tag is None:
        if task.done():
            raise AssertionError(f"worker exited during start-up with status {task.result()}")
        if time.monotonic() > deadline:
            raise AssertionError("worker did not start consuming in time")
        await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=60) == 0
