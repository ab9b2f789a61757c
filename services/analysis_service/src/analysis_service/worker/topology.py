"""AMQP topology of the service, declared idempotently at start-up.

::

    analysis.requests (direct exchange) --analysis.request--> analysis.requests (queue,
        x-max-priority 10, dead-letters to analysis.dlx)
    analysis.dlx (fanout exchange) --> analysis.requests.dead (queue)
    analysis.results (topic exchange) --analysis.#--> analysis.results.all (queue, optional)

All are durable; names come from :class:`~analysis_service.settings.RabbitSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from analysis_service.settings import RabbitSettings


@dataclass(frozen=True)
class Topology:
    """The declared exchanges and queues."""

    request_exchange: AbstractExchange
    request_queue: AbstractQueue
    dead_letter_exchange: AbstractExchange
    dead_letter_queue: AbstractQueue
    results_exchange: AbstractExchange
    results_queue: AbstractQueue | None


def request_queue_arguments(settings: RabbitSettings) -> dict[str, Any]:
    """Arguments of the request queue (they must match on every declaration)."""
    return {
        "x-queue-type": "classic",
        "x-max-priority": settings.max_priority,
        "x-dead-letter-exchange": settings.dead_letter_exchange,
        "x-consumer-timeout": settings.consumer_timeout_ms,
    }


async def declare_topology(channel: AbstractChannel, settings: RabbitSettings) -> Topology:
    """Declare every exchange, queue and binding of the service (idempotent)."""
    dlx = await channel.declare_exchange(
        settings.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dlq = await channel.declare_queue(settings.dead_letter_queue, durable=True)
    await dlq.bind(dlx)
    requests = await channel.declare_exchange(
        settings.request_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        settings.request_queue, durable=True, arguments=request_queue_arguments(settings)
    )
    await queue.bind(requests, routing_key=settings.request_routing_key)
    results = await channel.declare_exchange(
        settings.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    results_queue = None
    if settings.results_queue:
        results_queue = await channel.declare_queue(settings.results_queue, durable=True)
        await results_queue.bind(results, routing_key="analysis.#")
    return Topology(requests, queue, dlx, dlq, results, results_queue)
