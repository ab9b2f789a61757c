"""ProgressStore against a real Redis: hash fields, TTL, publishes, outages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import RedisSettings
from analysis_service.sinks.progress import ProgressStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def store(redis_settings: RedisSettings) -> AsyncIterator[ProgressStore]:
    progress = ProgressStore(redis_settings)
    yield progress
    await progress.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url, decode_responses=True)
    yield redis
    await redis.aclose()


@pytest.fixture
async def subscriber(client: Redis) -> AsyncIterator[PubSub]:
    pubsub = client.pubsub()
    yield pubsub
    await pubsub.aclose()  # type: ignore[no-untyped-call]


async def next_message(pubsub: PubSub, timeout_s: float = 5.0) -> dict[str, Any]:
    """The next published message (skipping subscribe confirmations)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message: dict[str, Any] | None = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            return message
    raise AssertionError(f"no message published within {timeout_s} s")


async def test_update_writes_fields_with_ttl(
    store: ProgressStore, client: Redis, redis_settings: RedisSettings
) -> None:
    await store.update(
        "req-1", status="running", percent=40, stage="features", correlation_id="corr-1", file="a/b.mp3"
    )
    key = f"{redis_settings.key_prefix}:progress:req-1"
    fields = await client.hgetall(key)
    assert fields["status"] == "running"
    assert fields["percent"] == "40"
    assert fields["stage"] == "features"
    assert fields["correlation_id"] == "corr-1"
    assert fields["file"] == "a/b.mp3"
    assert "started_at" in fields
    assert "updated_at" in fields
    assert "finished_at" not in fields
    assert 0 < await client.ttl(key) <= redis_settings.progress_ttl_s

    progress = await store.get("req-1")
    assert progress is not None
    assert progress["percent"] == 40.0
    assert progress["status"] == "running"


async def test_lifecycle_keeps_started_at_and_clears_stale_errors(store: ProgressStore) -> None:
    await store.update("req-1", status="queued", percent=0, stage="queued", correlation_id="corr-1")
    await store.update("req-1", status="running", percent=10, stage="decode")
    first = await store.get("req-1")
    await store.update("req-1", status="running", percent=60, stage="features")
    second = await store.get("req-1")
    assert first is not None
    assert second is not None
    assert second["started_at"] == first["started_at"]
    assert second["correlation_id"] == "corr-1"  # kept although not repeated

    await store.update("req-1", status="failed", percent=60, stage="features", error_code="e", error="boom")
    failed = await store.get("req-1")
    assert failed is not None
    assert (failed["status"], failed["error_code"], failed["error"]) == ("failed", "e", "boom")
    assert "finished_at" in failed

    await store.update("req-1", status="running", percent=5, stage="decode")  # redelivered
    retried = await store.get("req-1")
    assert retried is not None
    assert "error_code" not in retried
    assert "error" not in retried
    assert "finished_at" not in retried


async def test_update_is_published_on_both_channels(store: ProgressStore, subscriber: PubSub) -> None:
    await subscriber.subscribe(store.key("req-1"), store.channel)
    await store.update("req-1", status="completed", percent=100, stage="done", file="x.flac")
    received = {}
    for _ in range(2):
        message = await next_message(subscriber)
        received[message["channel"]] = json.loads(message["data"])
    assert set(received) == {store.key("req-1"), store.channel}
    payload = received[store.channel]
    assert payload == received[store.key("req-1")]
    assert payload["request_id"] == "req-1"
    assert payload["status"] == "completed"
    assert payload["percent"] == 100.0
    assert payload["file"] == "x.flac"
    assert "finished_at" in payload


async def test_get_unknown_is_none(store: ProgressStore) -> None:
    assert await store.get("never-seen") is None


async def test_invalid_updates_are_caller_bugs(store: ProgressStore) -> None:
    with pytest.raises(ValueError, match="percent"):
        await store.update("req-1", status="running", percent=101, stage="x")
    with pytest.raises(ValueError, match="status"):
        await store.update("req-1", status="paused", percent=1, stage="x")  # type: ignore[arg-type]


async def test_ping(store: ProgressStore) -> None:
    await store.ping()


async def test_redis_down_is_sink_unavailable_quickly(closed_port: int) -> None:
    store = ProgressStore(RedisSettings(url=f"redis://127.0.0.1:{closed_port}/0", socket_timeout_s=0.5))
    try:
        started = time.monotonic()
        with pytest.raises(SinkUnavailable, match="Redis"):
            await store.update("req-1", status="running", percent=1, stage="decode")
        with pytest.raises(SinkUnavailable):
            await store.get("req-1")
        with pytest.raises(SinkUnavailable):
            await store.ping()
        assert time.monotonic() - started < 3.0
    finally:
        await store.close()


async def test_unresponsive_redis_times_out_after_socket_timeout() -> None:
    # A listener that accepts and never answers: only the socket timeout ends the wait.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = ProgressStore(RedisSettings(url=f"redis://127.0.0.1:{port}/0", socket_timeout_s=0.3))
    try:
        started = time.monotonic()
        with pytest.raises(SinkUnavailable, match="TimeoutError"):
            await store.get("req-1")
        assert time.monotonic() - started < 3.0
    finally:
        await store.close()
        server.close()
        await server.wait_closed()
