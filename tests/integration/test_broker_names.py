"""The session's clean-up of the test topology (``broker_names``) against the real broker."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from analysis_service.settings import RabbitSettings
from analysis_service.worker.topology import declare_topology
from tests.integration import broker_names

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_only_test_names_are_tracked() -> None:
    uid = uuid.uuid4().hex[:10]
    settings = RabbitSettings(request_queue=f"test.{uid}.requests", request_exchange=f"test.{uid}.requests")
    assert broker_names.track(settings) is settings
    queues, exchanges = broker_names.tracked()
    assert f"test.{uid}.requests" in queues
    assert f"test.{uid}.requests" in exchanges
    # Names left at their defaults are the production topology's: never deleted by the tests.
    assert settings.retry_queue not in queues
    assert settings.dead_letter_exchange not in exchanges


def test_unique_settings_name_every_queue_and_exchange_apart() -> None:
    a = broker_names.unique_settings("amqp://x/")
    b = broker_names.unique_settings("amqp://x/", retry_delay_s=1.0)
    queues, exchanges = broker_names.tracked()
    for settings in (a, b):
        own_queues, own_exchanges = broker_names.names(settings)
        assert len(set(own_queues)) == 6
        assert set(own_queues) <= queues
        assert len(set(own_exchanges)) == 3
        assert set(own_exchanges) <= exchanges
    assert not set(broker_names.names(a)[0]) & set(broker_names.names(b)[0])
    assert b.retry_delay_s == 1.0


async def test_delete_removes_what_a_worker_declared(rabbit_url: str) -> None:
    settings = broker_names.unique_settings(rabbit_url)
    queues, exchanges = broker_names.names(settings)
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, settings)
        await channel.declare_queue(settings.request_queue, passive=True)  # it is there
    # Names that were never declared are no error (a test may track more than it declares).
    never = f"{settings.request_queue}.never-declared"
    await broker_names.delete(rabbit_url, {*queues, never}, {*exchanges, never})
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue, passive=True)
        for exchange in exchanges:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.get_exchange(exchange, ensure=True)
