"""The results exchange as a result sink: persistent, confirmed, mandatory publishes."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError
from aiormq.exceptions import AMQPConnectionError, ChannelInvalidStateError

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import RabbitSettings
from service_shared.messages import AnalysisResultMessage

#: Errors that mean "the broker did not take the message now; try again".
_TRANSIENT = (AMQPError, AMQPConnectionError, ChannelInvalidStateError, ConnectionError, asyncio.TimeoutError)


def routing_key(result: AnalysisResultMessage) -> str:
    """``analysis.completed`` or ``analysis.failed``."""
    return f"analysis.{result.status.value}"


class ResultsPublisher:
    """Publishes outcomes on the results exchange (implements ``ResultSink``).

    A publish counts as written only when the broker confirmed it; ``mandatory`` with
    ``on_return_raises`` (set on the channel) turns an unroutable result into an error instead of
    a silent drop.
    """

    name = "results-exchange"

    def __init__(
        self, exchange: AbstractExchange, channel: AbstractChannel, settings: RabbitSettings
    ) -> None:
        self._exchange = exchange
        self._channel = channel
        self._timeout_s = settings.publish_timeout_s

    async def start(self) -> None:
        return None

    async def write(self, result: AnalysisResultMessage) -> None:
        message = aio_pika.Message(
            body=result.model_dump_json().encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=result.request_id,
            correlation_id=result.correlation_id,
            type=routing_key(result),
        )
        try:
            await asyncio.wait_for(
                self._exchange.publish(message, routing_key=routing_key(result), mandatory=True),
                timeout=self._timeout_s,
            )
        except (DeliveryError, PublishError) as exc:
            raise SinkUnavailable(
                f"results exchange {self._exchange.name!r} did not accept the result of "
                f"{result.request_id!r}: {exc} (is a queue bound to {routing_key(result)!r}?)"
            ) from exc
        except _TRANSIENT as exc:
            raise SinkUnavailable(
                f"could not publish the result of {result.request_id!r} to {self._exchange.name!r} within "
                f"{self._timeout_s:.0f} s: {type(exc).__name__}: {exc}"
            ) from exc

    async def ping(self) -> None:
        if self._channel.is_closed:
            raise SinkUnavailable(f"the channel of results exchange {self._exchange.name!r} is closed")

    async def close(self) -> None:
        return None
