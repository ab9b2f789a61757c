"""Publishing a submission's requests to the request exchange, each confirmed by the broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika
import aio_pika.exceptions
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import AMQPConnectionError, ChannelInvalidStateError

from analysis_service.settings import RabbitSettings
from analysis_service.worker import topology
from service_shared.messages import AnalysisRequest

#: ``app_id`` of the messages the API publishes.
APP_ID = "analysis-service-api"
#: Publishes in flight at once (each waits for its own confirm).
PUBLISH_CONCURRENCY = 256

#: Errors meaning "the broker did not take the message".
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aio_pika.exceptions.AMQPError,
    AMQPConnectionError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
)

#: Errors opening a channel: also aiormq's ``RuntimeError("<Connection ...> closed")`` while the robust
#: connection is being re-established.
CHANNEL_OPEN_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, RuntimeError)


@dataclass
class PublishReport:
    """Which requests the broker confirmed, which it may hold unconfirmed, and the first failure
    (None when all were confirmed).

    ``uncertain`` are the requests sent whose confirm never came (a timeout, a connection or channel
    lost meanwhile): the broker may have enqueued them. The rest of a failed submission was never
    enqueued (not sent, or returned unroutable).
    """

    confirmed: list[str] = field(default_factory=list)
    uncertain: list[str] = field(default_factory=list)
    failure: str | None = None


def request_message(request: AnalysisRequest) -> aio_pika.Message:
    """The AMQP message of ``request`` (see :func:`~analysis_service.worker.topology.request_message`)."""
    return topology.request_message(request, app_id=APP_ID)


class RequestPublisher:
    """Publishes requests on ``settings.request_exchange`` with publisher confirms and ``mandatory``.

    Each submission gets its own channel (opened on the shared robust connection and closed after),
    so a channel error (a missing exchange, an unroutable message) never affects another
    submission.
    """

    def __init__(self, settings: RabbitSettings) -> None:
        self._settings = settings
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        """Connect (raises one of :data:`BROKER_ERRORS` when the broker cannot be reached)."""
        if self._connection is None:
            self._connection = await aio_pika.connect_robust(
                self._settings.url, timeout=self._settings.publish_timeout_s
            )

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def ping(self) -> None:
        """Raise unless the broker answers and the request exchange exists."""
        connection = self._require()
        channel = await asyncio.wait_for(connection.channel(), self._settings.publish_timeout_s)
        try:
            await channel.get_exchange(self._settings.request_exchange, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise RuntimeError(
                f"request exchange {self._settings.request_exchange!r} does not exist (no worker has "
                "declared the topology yet)"
            ) from exc
        finally:
            if not channel.is_closed:
                await channel.close()

    async def publish(self, requests: Sequence[AnalysisRequest]) -> PublishReport:
        """Publish ``requests``; never raises for broker trouble (see :class:`PublishReport`)."""
        report = PublishReport()
        settings = self._settings
        try:
            connection = self._require()
            channel = await asyncio.wait_for(
                connection.channel(publisher_confirms=True, on_return_raises=True),
                settings.publish_timeout_s,
            )
        except CHANNEL_OPEN_ERRORS as exc:
            report.failure = f"cannot open a channel: {_describe(exc)}"
            return report
        try:
            try:
                exchange = await channel.get_exchange(settings.request_exchange, ensure=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                report.failure = (
                    f"the request exchange {settings.request_exchange!r} does not exist: start a worker "
                    "first (it declares the topology)"
                )
                return report
            limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)

            async def one(request: AnalysisRequest) -> None:
                async with limit:
                    if report.failure is not None:
                        return
                    routing_key = topology.routing_key_for(request.priority, settings)
                    try:
                        await exchange.publish(
                            request_message(request),
                            routing_key,
                            mandatory=True,
                            timeout=settings.publish_timeout_s,
                        )
                    except aio_pika.exceptions.PublishError:
                        report.failure = report.failure or (
                            f"request {request.request_id} was returned unroutable: no queue is bound "
                            f"to {settings.request_exchange!r} with {routing_key!r}"
                        )
                    except BROKER_ERRORS as exc:
                        report.uncertain.append(request.request_id)
                        report.failure = report.failure or (
                            f"request {request.request_id} was not confirmed: {_describe(exc)}"
                        )
                    else:
                        report.confirmed.append(request.request_id)

            await asyncio.gather(*(one(r) for r in requests))
        except BROKER_ERRORS as exc:
            report.failure = report.failure or _describe(exc)
        finally:
            if not channel.is_closed:
                # A channel that cannot be closed is being torn down with its connection anyway.
                with contextlib.suppress(*BROKER_ERRORS):
                    await asyncio.wait_for(channel.close(), settings.publish_timeout_s)
        return report

    def _require(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("RequestPublisher used before start() (or after close())")
        return self._connection


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
