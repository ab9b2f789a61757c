"""A delivery whose channel the broker closed (a connection blip) is recognised as such.

The worker adopts a redelivery into the work still running for its first delivery only when it can
tell that the first delivery's channel is gone. aio-pika's ``IncomingMessage.channel`` raises
``ChannelInvalidStateError`` for a closed channel instead of returning it: that exception must mean
"closed", not escape from the consumer callback (which left the redelivery unacked and unhandled,
and with it the worker's whole prefetch window, until the next blip).
"""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from analysis_service.worker.worker import _channel_closed

pytestmark = pytest.mark.integration


async def test_message_of_a_closed_channel_counts_as_closed(rabbit_url: str) -> None:
    connection = await aio_pika.connect(rabbit_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"test.{uuid.uuid4().hex[:10]}.closed", exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue.name)
        message = await queue.get(timeout=5)
        assert _channel_closed(message) is False

        await channel.close()

        assert _channel_closed(message) is True
    finally:
        await connection.close()
