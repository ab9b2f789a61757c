"""AMQP topology of the service, declared idempotently at start-up.

::

    analysis.requests (direct exchange) --analysis.request--> analysis.requests (queue: classic with
        x-max-priority 10, or quorum with x-delivery-limit; dead-letters to analysis.dlx)
    analysis.requests --analysis.request.urgent--> analysis.requests.urgent (queue, the same
        arguments): requests of priority >= urgent_priority (see routing_key_for)
    analysis.dlx (fanout exchange) --> analysis.requests.dead (queue)
    (default exchange) --> analysis.requests.retry (queue, x-message-ttl retry_delay_s,
        dead-letters back to analysis.requests / analysis.request): requeue with a delay
    (default exchange) --> analysis.requests.urgent.retry (the same, back to
        analysis.requests / analysis.request.urgent): an urgent request's delay
    analysis.results (topic exchange) --analysis.#--> analysis.results.all (queue, optional,
        bounded by x-max-length and x-message-ttl)

All are durable; names come from :class:`~analysis_service.settings.RabbitSettings`. Declarations
are idempotent and safe when replicas start at the same moment (the broker serialises them; equal
arguments are no conflict).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from analysis_service.settings import RabbitSettings
from service_shared.messages import AnalysisRequest


@dataclass(frozen=True)
class Topology:
    """The declared exchanges and queues."""

    request_exchange: AbstractExchange
    request_queue: AbstractQueue
    dead_letter_exchange: AbstractExchange
    dead_letter_queue: AbstractQueue
    results_exchange: AbstractExchange
    results_queue: AbstractQueue | None
    retry_queue: AbstractQueue
    urgent_queue: AbstractQueue | None
    urgent_retry_queue: AbstractQueue | None


def request_queue_arguments(settings: RabbitSettings) -> dict[str, Any]:
    """Arguments of the request queue (they must match on every declaration)."""
    common = {
        "x-dead-letter-exchange": settings.dead_letter_exchange,
        "x-consumer-timeout": settings.consumer_timeout_ms,
    }
    if settings.queue_type == "quorum":
        return {"x-queue-type": "quorum", "x-delivery-limit": settings.quorum_delivery_limit, **common}
    return {"x-queue-type": "classic", "x-max-priority": settings.max_priority, **common}


def retry_queue_arguments(settings: RabbitSettings, *, urgent: bool = False) -> dict[str, Any]:
    """Arguments of a delay queue: hold for ``retry_delay_s``, then back to the request exchange,
    with the routing key of the request queue (``urgent``: the urgent queue's)."""
    return {
        "x-message-ttl": round(settings.retry_delay_s * 1000),
        "x-dead-letter-exchange": settings.request_exchange,
        "x-dead-letter-routing-key": settings.urgent_routing_key if urgent else settings.request_routing_key,
    }


def results_queue_arguments(settings: RabbitSettings) -> dict[str, Any]:
    """Bounds of the results queue, so that it cannot grow without a consumer."""
    return {
        "x-max-length": settings.results_queue_max_length,
        "x-overflow": "drop-head",
        "x-message-ttl": settings.results_queue_ttl_s * 1000,
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
    urgent = await declare_urgent_queue(channel, settings)
    retry = await channel.declare_queue(
        settings.retry_queue, durable=True, arguments=retry_queue_arguments(settings)
    )
    urgent_retry = None
    if settings.urgent_queue:
        urgent_retry = await channel.declare_queue(
            settings.urgent_retry_queue, durable=True, arguments=retry_queue_arguments(settings, urgent=True)
        )
    results = await channel.declare_exchange(
        settings.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    results_queue = None
    if settings.results_queue:
        results_queue = await channel.declare_queue(
            settings.results_queue, durable=True, arguments=results_queue_arguments(settings)
        )
        await results_queue.bind(results, routing_key="analysis.#")
    return Topology(requests, queue, dlx, dlq, results, results_queue, retry, urgent, urgent_retry)


async def declare_urgent_queue(channel: AbstractChannel, settings: RabbitSettings) -> AbstractQueue | None:
    """Declare and bind the urgent queue on ``channel`` (idempotent); None when there is none.

    The worker declares it again on the channel it consumes it from: a queue object consumes on the
    channel that declared it.
    """
    if not settings.urgent_queue:
        return None
    queue = await channel.declare_queue(
        settings.urgent_queue, durable=True, arguments=request_queue_arguments(settings)
    )
    await queue.bind(settings.request_exchange, routing_key=settings.urgent_routing_key)
    return queue


def routing_key_for(priority: int, settings: RabbitSettings) -> str:
    """The routing key a request of ``priority`` is published with: the urgent queue's for
    ``urgent_priority`` or higher (when there is an urgent queue), the request queue's otherwise."""
    if settings.urgent_queue and priority >= settings.urgent_priority:
        return settings.urgent_routing_key
    return settings.request_routing_key


def request_message(request: AnalysisRequest, *, app_id: str) -> aio_pika.Message:
    """The AMQP message of ``request`` as every producer should send it: persistent JSON,
    ``message_id`` = request id, AMQP priority = request priority, stamped (for the queue-wait
    metric) and named after its producer ``app_id``."""
    return aio_pika.Message(
        body=request.wire_json().encode(),
        content_type="application/json",
        content_encoding="utf-8",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=request.priority,
        message_id=request.request_id,
        correlation_id=request.correlation_id,
        timestamp=datetime.now(UTC),
        app_id=app_id,
    )
