"""The prefetch window grows by one per analysed request still being stored, and shrinks at its ack."""

from __future__ import annotations

from typing import cast

from aio_pika.abc import AbstractIncomingMessage

from analysis_service.sinks.postgres import RequestFields
from analysis_service.worker.hooks import PrefetchHook
from analysis_service.worker.pipeline import Delivery, Settlement


def delivery(request_id: str, *, used_slot: bool) -> Delivery:
    d = Delivery(
        message=cast(AbstractIncomingMessage, None),
        received=0.0,
        request_id=request_id,
        fields=RequestFields(fingerprint="x"),
    )
    d.used_slot = used_slot
    return d


async def test_window_follows_the_requests_in_their_store_phase() -> None:
    windows: list[int] = []

    async def set_window(n: int) -> None:
        windows.append(n)

    hook = PrefetchHook(2, set_window)
    a, b = delivery("a", used_slot=True), delivery("b", used_slot=True)
    cached = delivery("c", used_slot=False)  # answered without a slot: nothing to overlap

    for d in (a, b, cached):
        await hook.step_started("analyse", d)
        await hook.step_finished("check", d, 0.0)
    assert windows == []
    await hook.step_finished("analyse", a, 1.0)
    await hook.step_finished("analyse", b, 1.0)
    await hook.step_finished("analyse", cached, 0.0)
    assert windows == [3, 4]
    # Shrunk when the last step is done, before the ack: the ack must not open room for one more.
    await hook.step_finished("publish", a, 0.1)
    assert windows == [3, 4, 3]
    await hook.settled(a, Settlement.ACK)
    await hook.settled(cached, Settlement.ACK)
    assert windows == [3, 4, 3]
    await hook.settled(b, Settlement.RETRY_LATER)  # ended before publishing: shrunk at settle
    assert windows == [3, 4, 3, 2]


async def test_window_grows_by_at_most_one_delivery_per_slot() -> None:
    """A store outage keeps requests in their store phase: the window must not grow with them."""
    windows: list[int] = []

    async def set_window(n: int) -> None:
        windows.append(n)

    hook = PrefetchHook(2, set_window)
    stuck = [delivery(f"s{i}", used_slot=True) for i in range(6)]
    for d in stuck:
        await hook.step_finished("analyse", d, 1.0)
    assert windows == [3, 4]
    for d in stuck:
        await hook.settled(d, Settlement.RETRY_LATER)
    assert windows == [3, 4, 3, 2]
