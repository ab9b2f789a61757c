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
from service_shared.messages import AnalysisResultMessage

from analysis_service.audio.synth import demo_song
from analysis_service.settings import Settings
from analysis_service.worker.topology import declare_topology
from analysis_service.worker.worker import Worker


def write_song(path: Path, *, bpm: float = 120.0, tonic: int = 9, mode: str = "minor", seconds: float = 12.0) -> Path:
    """A WAV file with a known tempo and key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, demo_song(bpm=bpm, tonic=tonic, mode=mode, seconds=seconds, sample_rate=22050), 22050)
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
        r = self.settings.rabbitmq
        assert self.channel is not None and self._connection is not None
        for queue in (r.request_queue, r.dead_letter_queue, r.results_queue):
            await self.channel.queue_delete(queue)
        for exchange in (r.request_exchange, r.dead_letter_exchange, r.results_exchange):
            await self.channel.exchange_delete(exchange)
        await self._connection.close()

    async def publish(self, body: dict[str, Any] | bytes, *, priority: int = 5) -> None:
        assert self.channel is not None
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        exchange = await self.channel.get_exchange(self.settings.rabbitmq.request_exchange)
        await exchange.publish(
            aio_pika.Message(raw, priority=priority, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=self.settings.rabbitmq.request_routing_key,
        )

    async def drain(self, queue_name: str, count: int, *, timeout_s: float = 60.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Get ``count`` messages from ``queue_name`` (acked), failing after ``timeout_s``."""
        assert self.channel is not None
        queue = await self.channel.get_queue(queue_name)
        got: list[aio_pika.abc.AbstractIncomingMessage] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count:
            message = await queue.get(fail=False)
            if message is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"only {len(got)} of {count} messages arrived on {queue_name} in {timeout_s} s")
                await asyncio.sleep(0.1)
                continue
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
