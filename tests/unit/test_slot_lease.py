"""The slot pool hands a freed slot to the waiting lease of the highest priority (no processes)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import cast

import pytest

from analysis_service.errors import WorkerCrashed
from analysis_service.worker import slots as slots_module
from analysis_service.worker.host_cpus import HostCpuTokens
from analysis_service.worker.slots import Slot, SlotPool


def lease_only_pool(
    monkeypatch: pytest.MonkeyPatch,
    *,
    spare: int = 0,
    urgent: int = 0,
    cpu_tokens: HostCpuTokens | None = None,
) -> SlotPool:
    """One slot (one CPU), ``spare`` spare and ``urgent`` urgent slots, with no process behind them
    (the tests only lease and hold CPUs)."""
    monkeypatch.setattr(slots_module, "_broken", lambda executor: False)
    pool = SlotPool(1, spare=spare, urgent=urgent, max_tasks_per_child=1000, cpu_tokens=cpu_tokens)
    routine = 1 + spare
    for i in range(routine + urgent):
        slot = Slot(i, cast(ProcessPoolExecutor, None), warm=True, urgent=i >= routine)
        pool._slots.append(slot)
        pool._lane_of(slot.urgent).idle.append(slot)
    return pool


def one_slot_pool(monkeypatch: pytest.MonkeyPatch, cpu_tokens: HostCpuTokens | None = None) -> SlotPool:
    return lease_only_pool(monkeypatch, cpu_tokens=cpu_tokens)


async def test_a_freed_slot_goes_to_the_highest_priority_then_to_the_longest_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = one_slot_pool(monkeypatch)
    order: list[str] = []
    release_first = asyncio.Event()

    async def holder() -> None:
        async with pool.lease(0):
            await release_first.wait()

    async def waiter(name: str, priority: int) -> None:
        async with pool.lease(priority):
            order.append(name)

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    tasks = [
        asyncio.create_task(waiter(name, priority))
        for name, priority in (("low-a", 1), ("high", 9), ("low-b", 1), ("mid", 5))
    ]
    await asyncio.sleep(0.01)
    assert pool.waiting == 4
    release_first.set()
    await asyncio.gather(first, *tasks)
    assert order == ["high", "mid", "low-a", "low-b"]
    assert pool.waiting == 0
    assert pool._lane.idle == pool._slots


async def test_a_cancelled_waiter_does_not_take_the_slot_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = one_slot_pool(monkeypatch)
    release = asyncio.Event()

    async def holder() -> None:
        async with pool.lease(0):
            await release.wait()

    async def waiter() -> None:
        async with pool.lease(9):
            raise AssertionError("a cancelled lease ran")

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    release.set()
    await first
    await asyncio.gather(cancelled, return_exceptions=True)
    async with asyncio.timeout(1):
        async with pool.lease(0) as slot:
            assert slot is pool._slots[0]


async def test_a_process_dying_while_it_warms_up_is_replaced_not_charged_to_the_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A recycled slot's fresh process killed during warm-up (seen in the fault benchmark) failed the
    request as worker_crashed; the slot is the one to retry."""
    pool = one_slot_pool(monkeypatch)
    pool._slots[0].warm = False
    deaths = [WorkerCrashed("the analysis process died while starting")]

    async def warm(slot: Slot) -> None:
        if deaths:
            raise deaths.pop()
        slot.warm = True

    monkeypatch.setattr(pool, "_warm", warm)
    monkeypatch.setattr(pool, "_new_executor", lambda **_: cast(ProcessPoolExecutor, None))
    monkeypatch.setattr(slots_module, "_kill", lambda executor: None)
    slot = await pool.acquire(5)
    assert slot.warm
    assert slot.busy
    assert pool.restarts == 1
    pool.release(slot)
    assert pool._lane.idle == [slot]


async def test_acquire_gives_the_slot_back_when_the_process_keeps_dying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = one_slot_pool(monkeypatch)
    pool._slots[0].warm = False

    async def warm(slot: Slot) -> None:
        raise WorkerCrashed("the analysis process died while starting")

    monkeypatch.setattr(pool, "_warm", warm)
    monkeypatch.setattr(pool, "_new_executor", lambda **_: cast(ProcessPoolExecutor, None))
    monkeypatch.setattr(slots_module, "_kill", lambda executor: None)
    with pytest.raises(WorkerCrashed):
        await pool.acquire(5)
    assert pool._lane.idle == pool._slots
    assert not pool._slots[0].busy


async def test_an_analysis_cancelled_while_waiting_for_a_host_cpu_token_holds_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other_worker = HostCpuTokens(tmp_path, 1)
    mine = HostCpuTokens(tmp_path, 1)
    pool = one_slot_pool(monkeypatch, mine)
    token = await other_worker.acquire()

    async def analyse() -> None:
        async with pool.lease(0) as slot, pool.cpu(slot, 0):
            raise AssertionError("ran without a host CPU token")

    waiting = asyncio.create_task(analyse())
    await asyncio.sleep(0.05)
    assert (pool.leased, pool.busy, pool.waiting_for_cpu) == (1, 0, 1)  # its slot, waiting for a token
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()
    assert (pool.leased, pool.waiting_for_cpu, mine.held, pool._lane.idle) == (0, 0, 0, pool._slots)
    assert pool._cpus_held == 0
    other_worker.release(token)
    async with asyncio.timeout(1), pool.lease(0) as slot, pool.cpu(slot, 0):
        assert mine.held == 1
        assert (slot, pool.busy) == (pool._slots[0], 1)
    assert (pool.busy, mine.held) == (0, 0)
    # The cancelled wait's sleeper thread may still be blocked in flock and take the lock as it
    # frees; it hands it back on the loop's next turn, since no wait of its own is open.
    for _ in range(100):
        again = other_worker.try_acquire()
        if again is not None:
            break
        await asyncio.sleep(0.01)
    assert again is not None, "the token stayed held for a second after the last wait ended"
    other_worker.release(again)


async def test_a_spare_slot_is_leased_at_once_and_its_analysis_waits_for_a_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One CPU, two spare slots: later requests get their slots (to read and hash their files)
    while the first analyses; analyses take the CPU one at a time, the highest priority first."""
    pool = lease_only_pool(monkeypatch, spare=2)
    order: list[str] = []
    first_done = asyncio.Event()

    async def analyse(name: str, priority: int, *, hold: asyncio.Event | None = None) -> None:
        async with pool.lease(priority) as slot:
            order.append(f"{name} leased")
            async with pool.cpu(slot, priority):
                order.append(f"{name} analyses")
                assert pool.busy == 1
                if hold is not None:
                    await hold.wait()

    first = asyncio.create_task(analyse("first", 1, hold=first_done))
    await asyncio.sleep(0.01)
    later = [asyncio.create_task(analyse("low", 1)), asyncio.create_task(analyse("high", 9))]
    await asyncio.sleep(0.01)
    assert order == ["first leased", "first analyses", "low leased", "high leased"]
    assert (pool.leased, pool.busy, pool.waiting_for_cpu) == (3, 1, 2)
    first_done.set()
    await asyncio.gather(first, *later)
    assert order[4:] == ["high analyses", "low analyses"]
    assert (pool.leased, pool.busy, pool.waiting_for_cpu, pool._cpus_held) == (0, 0, 0, 0)


async def test_a_freed_cpu_waits_for_a_more_urgent_lease_still_on_its_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One CPU, one spare slot. A low-priority request holds the spare slot and waits for the CPU
    when a high-priority one arrives with no slot free: the CPU that frees goes to the high one
    (once it has the slot that freed with it and has read its file), not to the low one, which
    got there first. A high one that ends without analysing (a cached result) leaves it to them."""
    pool = lease_only_pool(monkeypatch, spare=1)
    order: list[str] = []

    async def request(
        name: str, priority: int, *, analyse: bool = True, hold: asyncio.Event | None = None
    ) -> None:
        async with pool.lease(priority) as slot:
            await asyncio.sleep(0.01)  # reads its file
            if not analyse:
                order.append(f"{name} cached")
                return
            async with pool.cpu(slot, priority):
                order.append(name)
                if hold is not None:
                    await hold.wait()

    for cached in (False, True):
        order.clear()
        first_done = asyncio.Event()
        first = asyncio.create_task(request("first", 1, hold=first_done))
        await asyncio.sleep(0.02)
        low = asyncio.create_task(request("low", 1))
        await asyncio.sleep(0.02)
        assert pool.waiting_for_cpu == 1
        high = asyncio.create_task(request("high", 9, analyse=not cached))
        await asyncio.sleep(0.01)
        assert pool.waiting == 1  # no slot for it yet
        first_done.set()
        async with asyncio.timeout(1):
            await asyncio.gather(first, low, high)
        assert order == (["first", "high cached", "low"] if cached else ["first", "high", "low"]), order
        assert (pool.leased, pool.busy, pool.waiting_for_cpu, pool._cpus_held) == (0, 0, 0, 0)


async def test_no_cpu_is_kept_for_a_more_urgent_lease_that_only_an_analysis_can_give_a_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One CPU, one spare slot, both leased by routine requests waiting for the CPU, and an urgent
    request (no urgent slots) waiting for a slot: only an analysis frees a slot, so the CPU goes to
    a routine request at once; the urgent one then takes the slot it frees, and the CPU next."""
    pool = lease_only_pool(monkeypatch, spare=1)
    order: list[str] = []
    gate = asyncio.Event()

    async def request(name: str, priority: int) -> None:
        async with pool.lease(priority) as slot:
            await gate.wait()  # reads its file
            async with pool.cpu(slot, priority):
                order.append(name)
                await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(request("a", 0)), asyncio.create_task(request("b", 0))]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(request("urgent", 9)))
    await asyncio.sleep(0.01)
    assert (pool.leased, pool.waiting) == (2, 1)
    gate.set()
    async with asyncio.timeout(1):
        await asyncio.gather(*tasks)
    assert order == ["a", "urgent", "b"]


async def test_only_as_many_cpus_are_kept_as_more_urgent_leases_are_on_their_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two CPUs: two routine requests wait for a CPU while a more urgent one reads its file. One
    CPU is kept for it, the other analyses a routine request meanwhile."""
    monkeypatch.setattr(slots_module, "_broken", lambda executor: False)
    pool = SlotPool(2, spare=1, max_tasks_per_child=1000)
    for i in range(3):
        slot = Slot(i, cast(ProcessPoolExecutor, None), warm=True)
        pool._slots.append(slot)
        pool._lane.idle.append(slot)
    order: list[str] = []
    read, done = asyncio.Event(), asyncio.Event()

    async def request(name: str, priority: int, reading: asyncio.Event | None = None) -> None:
        async with pool.lease(priority) as slot:
            if reading is not None:
                await reading.wait()
            async with pool.cpu(slot, priority):
                order.append(name)
                await done.wait()

    urgent = asyncio.create_task(request("urgent", 3, reading=read))
    routine = [asyncio.create_task(request(name, 0)) for name in ("a", "b")]
    await asyncio.sleep(0.01)
    assert (order, pool.busy, pool.waiting_for_cpu) == (["a"], 1, 1)
    read.set()
    await asyncio.sleep(0.01)
    assert (order, pool.busy) == (["a", "urgent"], 2)
    done.set()
    async with asyncio.timeout(1):
        await asyncio.gather(urgent, *routine)
    assert order == ["a", "urgent", "b"]
    assert (pool.leased, pool.busy, pool._cpus_held) == (0, 0, 0)


def pool_with_urgent_slot(
    monkeypatch: pytest.MonkeyPatch, cpu_tokens: HostCpuTokens | None = None
) -> SlotPool:
    return lease_only_pool(monkeypatch, urgent=1, cpu_tokens=cpu_tokens)


async def test_an_urgent_lease_runs_in_the_urgent_slot_and_only_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = pool_with_urgent_slot(monkeypatch)
    slot, urgent = pool._slots
    async with asyncio.timeout(1), pool.lease(9, urgent=True) as express:
        assert express is urgent  # its lane, although the slot is free
    async with pool.lease(5) as running:
        assert running is slot
        async with asyncio.timeout(1), pool.lease(9, urgent=True) as express:
            assert express is urgent  # at once, beside the busy slot
            assert (pool.leased, pool.urgent_busy) == (1, 1)
        # Any other lease, whatever its priority, waits for the slot.
        waiting = asyncio.create_task(pool.acquire(9))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert pool.waiting == 1
    assert await waiting is slot
    pool.release(slot)
    assert (pool._lane.idle, pool._urgent_lane.idle, pool.busy, pool.urgent_busy) == ([slot], [urgent], 0, 0)


async def test_each_kind_of_slot_goes_to_its_own_waiting_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = pool_with_urgent_slot(monkeypatch)
    slot, urgent = pool._slots
    order: list[tuple[str, int]] = []
    held = [await pool.acquire(5), await pool.acquire(9, urgent=True)]
    assert held == [slot, urgent]

    async def waiter(name: str, priority: int, *, is_urgent: bool) -> None:
        async with pool.lease(priority, urgent=is_urgent) as got:
            order.append((name, got.index))
            await asyncio.sleep(0.01)

    tasks = [
        asyncio.create_task(waiter("low", 3, is_urgent=False)),
        asyncio.create_task(waiter("urgent-a", 9, is_urgent=True)),
        asyncio.create_task(waiter("urgent-b", 9, is_urgent=True)),
    ]
    await asyncio.sleep(0.01)
    pool.release(slot)  # to the routine lease: urgent leases wait for the urgent slot
    await asyncio.sleep(0.005)
    assert order == [("low", 0)]
    pool.release(urgent)
    await asyncio.gather(*tasks)
    assert order == [("low", 0), ("urgent-a", 1), ("urgent-b", 1)]
    assert (pool._lane.idle, pool._urgent_lane.idle) == ([slot], [urgent])


async def test_without_urgent_slots_an_urgent_lease_takes_a_slot_first_by_priority(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pool = one_slot_pool(monkeypatch)
    order: list[str] = []
    held = await pool.acquire(5)

    async def waiter(name: str, priority: int, *, is_urgent: bool) -> None:
        async with pool.lease(priority, urgent=is_urgent):
            order.append(name)

    tasks = [
        asyncio.create_task(waiter("routine", 5, is_urgent=False)),
        asyncio.create_task(waiter("urgent", 9, is_urgent=True)),
    ]
    await asyncio.sleep(0.01)
    pool.release(held)
    await asyncio.gather(*tasks)
    assert order == ["urgent", "routine"]


async def test_an_urgent_slot_takes_no_host_cpu_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Two workers of a host with one CPU; the other one holds its token.
    other_worker, mine = HostCpuTokens(tmp_path, 1), HostCpuTokens(tmp_path, 1)
    token = await other_worker.acquire()
    pool = pool_with_urgent_slot(monkeypatch, mine)
    slot, urgent = pool._slots
    held = asyncio.Event()

    async def analyse() -> None:
        async with pool.lease(5) as leased, pool.cpu(leased, 5):
            assert leased.cpu_token is not None
            held.set()

    try:
        waiting = asyncio.create_task(analyse())
        await asyncio.sleep(0.01)
        assert (pool.leased, pool.waiting_for_cpu) == (1, 1)  # the slot waits for a token
        async with asyncio.timeout(1), pool.lease(9, urgent=True) as express, pool.cpu(express, 9):
            assert express is urgent
            assert express.cpu_token is None
            assert (mine.held, pool.urgent_busy) == (0, 1)
    finally:
        other_worker.release(token)
    await waiting
    assert held.is_set()
    assert (slot.cpu_token, mine.held) == (None, 0)
    mine.close()
    other_worker.close()
