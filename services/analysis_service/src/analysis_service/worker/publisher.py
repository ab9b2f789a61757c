"""The results exchange as a result sink: persistent, confirmed, mandatory publishes."""

from __future__ import annotations

import asyncio
from typing import Any

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
    a silent drop. A confirm that is late (past ``publish_timeout_s``) is still waited for: the
    next write of the same result awaits that publish instead of sending the message again.
    """

    name = "results-exchange"

    def __init__(
        self, exchange: AbstractExchange, channel: AbstractChannel, settings: RabbitSettings
    ) -> None:
        self._exchange = exchange
        self._channel = channel
        self._timeout_s = settings.publish_timeout_s
        #: Publishes whose confirm was late, by request id (awaited by the next write).
        self._pending: dict[str, asyncio.Future[Any]] = {}

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
        rid = result.request_id
        publish = self._pending.get(rid)
        if publish is None or (publish.done() and (publish.cancelled() or publish.exception())):
            publish = asyncio.ensure_future(
                self._exchange.publish(message, routing_key=routing_key(result), mandatory=True)
            )
            publish.add_done_callback(_retrieve)
            self._pending[rid] = publish
        try:
            await asyncio.wait_for(asyncio.shield(publish), timeout=self._timeout_s)
        except TimeoutError:
            if not publish.done():  # sent, but not confirmed yet: keep waiting for that confirm
                raise SinkUnavailable(
                    f"the broker did not confirm the result of {rid!r} within {self._timeout_s:g} s; "
                    "the next attempt waits for that confirm instead of publishing again"
                ) from None
            self._pending.pop(rid, None)
            raise SinkUnavailable(f"could not publish the result of {rid!r}: time-out") from None
        except (DeliveryError, PublishError) as exc:
            self._pending.pop(rid, None)
            raise SinkUnavailable(
                f"results exchange {self._exchange.name!r} did not accept the result of "
                f"{rid!r}: {exc} (is a queue bound to {routing_key(result)!r}?)"
            ) from exc
        except _TRANSIENT as exc:
            self._pending.pop(rid, None)
            raise SinkUnavailable(
                f"could not publish the result of {rid!r} to {self._exchange.name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._pending.pop(rid, None)

    async def ping(self) -> None:
        if self._channel.is_closed:
            raise SinkUnavailable(f"the channel of results exchange {self._exchange.name!r} is closed")

    async def close(self) -> None:
        self._pending.clear()


def _retrieve(publish: asyncio.Future[Any]) -> None:
    """Done callback: fetch the outcome of a publish nobody may await any more."""
    if not publish.cancelled():
        publish.exception()
