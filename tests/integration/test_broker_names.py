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


async def test_delete_removes_what_a_worker_declared(rabbit_url: str) -> None:
    uid = uuid.uuid4().hex[:10]
    names = {
        f: f"test.{uid}.{f}" for f in ("requests", "urgent", "dead", "retry", "urgent.retry", "results.all")
    }
    settings = RabbitSettings(
        url=rabbit_url,
        request_exchange=f"test.{uid}.requests",
        request_queue=names["requests"],
        urgent_queue=names["urgent"],
        dead_letter_exchange=f"test.{uid}.dlx",
        dead_letter_queue=names["dead"],
        retry_queue=names["retry"],
        urgent_retry_queue=names["urgent.retry"],
        results_exchange=f"test.{uid}.results",
        results_queue=names["results.all"],
    )
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, settings)
        await channel.declare_queue(names["requests"], passive=True)  # it is there
    exchanges = {settings.request_exchange, settings.dead_letter_exchange, settings.results_exchange}
    # Names that were never declared are no error (a test may track more than it declares).
    never = f"test.{uid}.never-declared"
    await broker_names.delete(rabbit_url, set(names.values()) | {never}, exchanges | {never})
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        for queue in names.values():
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue, passive=True)
        for exchange in exchanges:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.get_exchange(exchange, ensure=True)
