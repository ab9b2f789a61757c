"""The prefetch window grows by one per analysed request still being stored, and shrinks at its ack."""

from __future__ import annotations

import asyncio
import contextlib
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


def window_hook(lead_s: float = 0.05) -> tuple[PrefetchHook, list[int]]:
    """A hook for 2 slots and the prefetch counts it sets, in order."""
    windows: list[int] = []

    async def set_window(n: int) -> None:
        windows.append(n)

    return PrefetchHook(2, set_window, lead_s=lead_s), windows


async def test_window_follows_the_requests_in_their_store_phase() -> None:
    hook, windows = window_hook()
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
    hook, windows = window_hook()
    stuck = [delivery(f"s{i}", used_slot=True) for i in range(6)]
    for d in stuck:
        await hook.step_finished("analyse", d, 1.0)
    assert windows == [3, 4]
    for d in stuck:
        await hook.settled(d, Settlement.RETRY_LATER)
    assert windows == [3, 4, 3, 2]


def analysing(request_id: str) -> Delivery:
    """A delivery in its analyse step (its request is what the slot's reports name)."""
    from service_shared.messages import AnalysisRequest

    d = delivery(request_id, used_slot=False)
    d.request = AnalysisRequest(request_id=request_id, file="a.mp3")
    return d


async def test_window_widens_a_lead_before_the_analysis_is_expected_to_end() -> None:
    """The next delivery is fetched shortly before the slot frees, not when it frees, and counted
    once: when the analysis then ends, the window does not grow again."""
    hook, windows = window_hook()
    a = analysing("a")
    await hook.step_started("analyse", a)
    hook.report("a", 0.0, "decode")  # the analysis started
    await asyncio.sleep(0.1)
    hook.report("a", 0.5, "decode")  # half-way after 0.1 s: ends in about 0.1 s
    await asyncio.sleep(0.01)
    assert windows == []  # not yet: 0.05 s before the expected end
    await asyncio.sleep(0.1)
    assert windows == [3]
    a.used_slot = True
    await hook.step_finished("analyse", a, 0.2)
    assert windows == [3]
    await hook.step_finished("publish", a, 0.01)
    assert windows == [3, 2]


async def test_window_widens_at_once_when_the_analyzers_run() -> None:
    """Past decoding only the analyzers are left: a few per cent of an analysis."""
    hook, windows = window_hook()
    a = analysing("a")
    await hook.step_started("analyse", a)
    hook.report("a", 0.0, "decode")
    hook.report("a", 0.85, "bpm")
    await asyncio.sleep(0.01)
    assert windows == [3]
    hook.report("b", 0.85, "bpm")  # not a request analysed here: ignored
    await asyncio.sleep(0.01)
    assert windows == [3]


async def test_a_lead_of_zero_widens_when_the_analysis_ends() -> None:
    hook, windows = window_hook(lead_s=0.0)
    a = analysing("a")
    await hook.step_started("analyse", a)
    hook.report("a", 0.0, "decode")
    hook.report("a", 0.9, "key")
    await asyncio.sleep(0.01)
    assert windows == []
    a.used_slot = True
    await hook.step_finished("analyse", a, 0.2)
    assert windows == [3]


async def test_a_request_that_ends_early_does_not_widen_the_window_later() -> None:
    hook, windows = window_hook()
    a = analysing("a")
    await hook.step_started("analyse", a)
    hook.report("a", 0.0, "decode")
    await asyncio.sleep(0.05)
    hook.report("a", 0.25, "decode")  # would widen in about 0.1 s
    await hook.settled(a, Settlement.REQUEUE)  # shutdown: requeued in its analysis
    await asyncio.sleep(0.2)
    assert windows == []


async def test_window_stays_within_twice_the_slots_with_early_widening() -> None:
    hook, windows = window_hook()
    running = [analysing(f"r{i}") for i in range(4)]
    for d in running:
        await hook.step_started("analyse", d)
        hook.report(d.request_id, 0.0, "decode")
        hook.report(d.request_id, 0.9, "key")
    await asyncio.sleep(0.01)
    assert windows[-1] == 4
    for d in running:
        await hook.settled(d, Settlement.RETRY_LATER)
    assert windows[-2:] == [3, 2]
    assert max(windows) == 4


async def test_the_expected_end_is_learnt_from_the_analyses_that_ended() -> None:
    """Decoding reports its fraction linearly but ends before the fraction reaches 1 (the analyzers'
    share of it is a small share of the time): the estimate learns how much earlier the end comes."""
    widened = asyncio.Event()

    async def set_window(n: int) -> None:
        if n == 3:
            widened.set()

    hook = PrefetchHook(2, set_window, lead_s=0.05)

    async def analysis(name: str) -> float:
        """Report 0, then 50 % after 0.2 s (a linear estimate: the end at 0.4 s), then end at 0.3 s;
        return how long after the 50 % report the window widened (0.1 s: at the end)."""
        d = analysing(name)
        await hook.step_started("analyse", d)
        hook.report(name, 0.0, "decode")
        await asyncio.sleep(0.2)
        hook.report(name, 0.5, "decode")
        loop = asyncio.get_running_loop()
        reported = loop.time()
        widened.clear()
        with contextlib.suppress(TimeoutError):  # the analysis ends at 0.3 s: widened then at the latest
            await asyncio.wait_for(widened.wait(), timeout=0.1)
        after = loop.time() - reported
        d.used_slot = True
        await hook.step_finished("analyse", d, 0.0)
        await hook.step_finished("publish", d, 0.0)
        return after

    # Before any ended, the estimate is late (widened 0.15 s after the report: after the end);
    # once learnt, the window widens 0.05 s before the end (about 0.06 s after the report).
    first = await analysis("a0")
    for i in range(1, 12):
        last = await analysis(f"a{i}")
    assert first >= 0.1
    assert last < 0.085
