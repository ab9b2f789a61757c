"""The exchanges and queues integration tests name on the shared broker, deleted when the session ends.

A test that starts a worker without the harness's ``Broker`` context leaves the topology the worker
declared (empty, uniquely named queues) on the local RabbitMQ, and the CI machine's broker keeps them
from run to run. :func:`unique_settings` names a test's topology and records it (:func:`track`);
:func:`delete_tracked` deletes everything recorded. Only names under ``test.`` are recorded, so a
default (production) name in a test's settings is never deleted.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import aio_pika

from analysis_service.settings import RabbitSettings

PREFIX = "test."
_queues: set[str] = set()
_exchanges: set[str] = set()


def names(settings: RabbitSettings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(queues, exchanges)`` of the topology ``settings`` names (empty names included)."""
    s = settings
    queues = (
        s.request_queue,
        s.urgent_queue,
        s.dead_letter_queue,
        s.retry_queue,
        s.urgent_retry_queue,
        s.results_queue,
    )
    return queues, (s.request_exchange, s.dead_letter_exchange, s.results_exchange)


def track(settings: RabbitSettings) -> RabbitSettings:
    """Record ``settings``' test-named queues and exchanges for :func:`delete_tracked`; return it."""
    queues, exchanges = names(settings)
    _queues.update(q for q in queues if q.startswith(PREFIX))
    _exchanges.update(e for e in exchanges if e.startswith(PREFIX))
    return settings


def unique_settings(url: str, **overrides: Any) -> RabbitSettings:
    """Settings whose every exchange and queue has a name of its own (``test.<id>.<role>``),
    recorded for :func:`delete_tracked`; ``overrides`` set other fields (or replace a name)."""
    uid = uuid.uuid4().hex[:10]
    fields: dict[str, Any] = {
        "url": url,
        "request_exchange": f"test.{uid}.requests",
        "request_queue": f"test.{uid}.requests",
        "dead_letter_exchange": f"test.{uid}.dlx",
        "dead_letter_queue": f"test.{uid}.dead",
        "retry_queue": f"test.{uid}.retry",
        "urgent_queue": f"test.{uid}.urgent",
        "urgent_retry_queue": f"test.{uid}.urgent.retry",
        "results_exchange": f"test.{uid}.results",
        "results_queue": f"test.{uid}.results.all",
    }
    return track(RabbitSettings(**(fields | overrides)))


def tracked() -> tuple[frozenset[str], frozenset[str]]:
    """``(queues, exchanges)`` recorded so far."""
    return frozenset(_queues), frozenset(_exchanges)


async def delete(url: str, queues: Iterable[str], exchanges: Iterable[str]) -> None:
    """Delete these queues and exchanges (a missing one is no error: RabbitMQ's deletes are idempotent)."""
    connection = await aio_pika.connect(url, timeout=10.0)
    async with connection:
        channel = await connection.channel()
        for queue in sorted(queues):
            await channel.queue_delete(queue)
        for exchange in sorted(exchanges):
            await channel.exchange_delete(exchange)


async def delete_tracked(url: str) -> None:
    """Delete every queue and exchange :func:`track` recorded, and forget them."""
    queues, exchanges = tracked()
    await delete(url, queues, exchanges)
    _queues.difference_update(queues)
    _exchanges.difference_update(exchanges)
