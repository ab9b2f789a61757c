"""What ProgressStore really publishes on Redis is a ProgressMessage and fits docs/asyncapi.yaml.

The AsyncAPI document's ``Progress`` payload is generated from
:class:`service_shared.messages.ProgressMessage`; this test pins that model to the payloads of the
real store (every field it publishes is a field of the model, and each payload validates against
both the model and the committed schema).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from analysis_service.settings import RedisSettings
from analysis_service.sinks.progress import ProgressStore
from service_shared.messages import ProgressMessage, ProgressStatus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


@pytest.fixture
async def store(redis_settings: RedisSettings) -> AsyncIterator[ProgressStore]:
    progress = ProgressStore(redis_settings)
    yield progress
    await progress.close()


@pytest.fixture
async def subscriber(redis_url: str) -> AsyncIterator[PubSub]:
    client = Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub()
    yield pubsub
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()


async def published(pubsub: PubSub, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """The next ``count`` payloads published on the subscribed channel."""
    payloads: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(payloads) < count and time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            payloads.append(json.loads(message["data"]))
    assert len(payloads) == count, f"{len(payloads)} of {count} updates published within {timeout_s} s"
    return payloads


async def test_published_updates_are_progress_messages(store: ProgressStore, subscriber: PubSub) -> None:
    await subscriber.subscribe(store.key("req-1"))
    await store.update(
        "req-1", status="queued", percent=0, stage="queued", correlation_id="c-1", file="a.flac"
    )
    await store.update("req-1", status="running", percent=42.5, stage="features")
    await store.update(
        "req-1",
        status="completed",
        percent=100,
        stage="done",
        summary={"duration_s": "183.4", "bpm": "124.0", "key": "A minor", "camelot": "8A", "mood": "calm"},
    )
    await store.update("req-2", status="failed", percent=3, stage="failed", error_code="not_audio", error="x")
    await subscriber.subscribe(store.key("req-3"))
    await store.update("req-3", status="failed", percent=0, stage="failed", error_code="not_audio", error="x")
    payloads = await published(subscriber, 4)

    document = yaml.safe_load(DOCUMENT.read_text())
    schema = {
        **document["components"]["messages"]["Progress"]["payload"],
        "components": document["components"],
    }
    validator = jsonschema.Draft202012Validator(schema)
    fields = set(ProgressMessage.model_fields)
    for payload in payloads:
        assert set(payload) <= fields, (
            f"published fields missing from ProgressMessage: {set(payload) - fields}"
        )
        validator.validate(payload)
        ProgressMessage.model_validate(payload)

    statuses = [ProgressMessage.model_validate(p).status for p in payloads]
    assert statuses == [
        ProgressStatus.QUEUED,
        ProgressStatus.RUNNING,
        ProgressStatus.COMPLETED,
        ProgressStatus.FAILED,
    ]
    completed = ProgressMessage.model_validate(payloads[2])
    assert (completed.bpm, completed.camelot, completed.finished_at is not None) == ("124.0", "8A", True)
    assert ProgressMessage.model_validate(payloads[3]).error_code == "not_audio"
