"""Host CPU tokens: workers of one host share its cores (lock files, real processes, no services)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import pytest_asyncio

from analysis_service.worker import slots
from analysis_service.worker.host_cpus import HostCpuTokens, token_dir
from analysis_service.worker.slots import SlotPool

#: A short poll, so that the tests wait little; jitter still applies.
POLL_S = 0.005

#: Holds ``argv[1]``'s exclusive flock until killed (a worker holding a token).
HOLDER = (
    "import fcntl, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def tokens(directory: Path, count: int = 1, waits: list[float] | None = None) -> HostCpuTokens:
    return HostCpuTokens(directory, count, on_wait=None if waits is None else waits.append)


async def eventually_free(path: Path, within_s: float = 2.0) -> None:
    """Wait until ``path`` can be locked exclusively (and unlock it)."""
    deadline = time.monotonic() + within_s
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AssertionError(f"{path.name} is still locked after {within_s} s") from None
        finally:
            os.close(fd)
        await asyncio.sleep(0.01)


async def test_a_release_wakes_a_waiting_worker_at_once_without_polling(tmp_path: Path) -> None:
    # Waiting must cost no CPU: the waiter sleeps in the kernel on the token files and a release
    # wakes it (a poll would have to run often to be this quick).
    holder = tokens(tmp_path)
    waiter = tokens(tmp_path)
    held = await holder.acquire()
    waiting = asyncio.create_task(waiter.acquire())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    released_at = time.monotonic()
    holder.release(held)
    async with asyncio.timeout(2):
        token = await waiting
    assert time.monotonic() - released_at < 0.5
    waiter.release(token)


async def test_a_waiter_takes_whichever_token_frees(tmp_path: Path) -> None:
    holder = tokens(tmp_path, count=2)
    a, b = await holder.acquire(), await holder.acquire()
    waiter = tokens(tmp_path, count=2)
    waiting = asyncio.create_task(waiter.acquire())
    await asyncio.sleep(10 * POLL_S)
    holder.release(b)
    async with asyncio.timeout(2):
        token = await waiting
    assert token.index == b.index
    holder.release(a)
    waiter.release(token)
    assert holder.held == waiter.held == 0


async def test_within_a_worker_a_freed_token_goes_to_the_highest_priority_first(tmp_path: Path) -> None:
    other = tokens(tmp_path)
    held = await other.acquire()
    worker = tokens(tmp_path)
    order: list[int] = []

    async def lease(priority: int) -> None:
        token = await worker.acquire(priority)
        order.append(priority)
        await asyncio.sleep(POLL_S)
        worker.release(token)

    waits = [asyncio.create_task(lease(p)) for p in (0, 1)]
    await asyncio.sleep(5 * POLL_S)
    waits.append(asyncio.create_task(lease(9)))  # arrives last
    await asyncio.sleep(5 * POLL_S)
    other.release(held)
    async with asyncio.timeout(5):
        await asyncio.gather(*waits)
    assert order == [9, 1, 0]
    worker.close()


async def test_a_token_handed_over_as_its_wait_is_cancelled_is_given_back(tmp_path: Path) -> None:
    # The sleeper hands the lock to the wait (its future gets the token) and, before the waiting
    # task resumes, the task is cancelled (a request cancelled at that instant): the task ends
    # with CancelledError and the lock must not stay held by nobody.
    holder = tokens(tmp_path)
    held = await holder.acquire()
    waiter = tokens(tmp_path)
    waiting = asyncio.create_task(waiter.acquire())
    await asyncio.sleep(10 * POLL_S)  # offered to the sleeper, which blocks in flock
    holder.release(held)
    time.sleep(0.2)  # noqa: ASYNC251 - the loop must be held: the sleeper takes the lock and queues its hand-over
    asyncio.get_running_loop().call_soon(waiting.cancel)  # after the hand-over, before the task runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await eventually_free(waiter.paths[0])
    assert waiter.held == 0
    waiter.close()


async def test_cancelled_waits_against_a_held_token_leave_no_threads_or_locks_behind(tmp_path: Path) -> None:
    # A stopped worker keeps its token; every lease that waits for it and is then cancelled (or
    # served otherwise) must not leave a thread and a descriptor behind.
    stopped = tokens(tmp_path)
    held = await stopped.acquire()
    waiter = tokens(tmp_path)
    before = threading.active_count()
    for _ in range(80):
        waiting = asyncio.create_task(waiter.acquire())
        await asyncio.sleep(0)
        await asyncio.sleep(POLL_S)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert threading.active_count() - before <= waiter.count
    assert all(len(sleeper._waits) <= 65 for sleeper in waiter._sleepers.values())  # waits over are dropped
    stopped.release(held)
    await eventually_free(waiter.paths[0])  # the sleeper took it and gave it straight back
    assert waiter.held == 0
    waiter.close()


async def test_a_second_worker_waits_until_the_first_releases(tmp_path: Path) -> None:
    first, second = tokens(tmp_path), tokens(tmp_path)
    held = await first.acquire()
    assert not os.get_inheritable(held.fd)  # analysis processes must not inherit the lock
    got_it = asyncio.Event()
    acquired_at: list[float] = []

    async def take() -> None:
        token = await second.acquire()
        acquired_at.append(time.monotonic())
        got_it.set()
        second.release(token)

    waiter = asyncio.create_task(take())
    for _ in range(20):  # many polls while the token is held: none may succeed
        await asyncio.sleep(POLL_S)
        assert not got_it.is_set()
    released_at = time.monotonic()
    first.release(held)
    async with asyncio.timeout(2):
        await waiter
    assert acquired_at[0] >= released_at
    assert first.held == second.held == 0


async def test_a_token_of_a_killed_process_is_free_again(tmp_path: Path) -> None:
    pool = tokens(tmp_path)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(pool.paths[0]), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"locked\n"
        assert pool.try_acquire() is None
        waiting = asyncio.create_task(pool.acquire())
        await asyncio.sleep(10 * POLL_S)
        assert not waiting.done()
        holder.send_signal(signal.SIGKILL)  # no clean-up of any kind: the kernel drops the lock
        await holder.wait()
        async with asyncio.timeout(2):
            token = await waiting
        assert pool.held == 1
        pool.release(token)
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


async def test_cancelling_a_waiting_acquire_leaves_nothing_held(tmp_path: Path) -> None:
    holder, cancelled, third = tokens(tmp_path), tokens(tmp_path), tokens(tmp_path)
    held = await holder.acquire()
    waiting = asyncio.create_task(cancelled.acquire())
    await asyncio.sleep(10 * POLL_S)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    holder.release(held)
    await eventually_free(cancelled.paths[0])
    # Nobody is left announced as waiting: the probe's exclusive lock on waiting.lock succeeds.
    fd = os.open(tmp_path / "waiting.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    # The cancelled worker's sleeper may still take the lock for an instant after the release (a
    # blocking flock cannot be interrupted) and gives it back: a third worker gets it soon.
    token = None
    deadline = time.monotonic() + 2.0
    while token is None and time.monotonic() < deadline:
        token = third.try_acquire()
        if token is None:
            await asyncio.sleep(0.01)
    assert token is not None
    third.release(token)


async def test_a_worker_that_takes_its_token_back_at_once_does_not_starve_a_waiting_one(
    tmp_path: Path,
) -> None:
    # A worker with a backlog releases a token and its next lease asks for one in the same
    # instant. The waiter sleeps in the kernel on the file, so the release wakes it and it usually
    # takes the lock first; the 2 ms yield of an acquirer that finds waiters covers the instant
    # before the woken thread runs (a race this test cannot force: it guards the outcome).
    busy, other = tokens(tmp_path), tokens(tmp_path)

    async def wait_for_a_token() -> None:
        other.release(await other.acquire())

    token = await busy.acquire()
    waiting = asyncio.create_task(wait_for_a_token())
    await asyncio.sleep(3 * POLL_S)  # other now sleeps on the file
    turns = 0
    while turns < 50:
        turns += 1
        busy.release(token)
        token = await busy.acquire()  # in the same instant
        if waiting.done():
            break
        await asyncio.sleep(4 * POLL_S)  # holds it for an "analysis"
    busy.release(token)
    assert waiting.done(), "the waiting worker never got the token"
    assert turns <= 3, turns


async def test_every_acquire_reports_its_wait(tmp_path: Path) -> None:
    waits: list[float] = []
    pool = tokens(tmp_path, count=2, waits=waits)
    a, b = await pool.acquire(), await pool.acquire()
    assert {a.index, b.index} == {0, 1}
    assert pool.held == 2
    started = time.monotonic()
    third = asyncio.create_task(pool.acquire())
    await asyncio.sleep(10 * POLL_S)
    # The wait is measured on the monotonic clock; the sleep runs on the loop's, which uvloop
    # keeps in milliseconds, read once per turn: the sleep may end a millisecond early on the
    # monotonic clock (a clean-clone CI run measured a wait of 0.049994 s for a 0.05 s sleep).
    slept = time.monotonic() - started
    pool.release(a)
    c = await third
    assert c.index == a.index
    assert len(waits) == 3
    assert max(waits[:2]) < waits[2]
    assert waits[2] >= slept - 0.005  # the third acquire starts on the loop's next turn
    assert slept >= 10 * POLL_S - 0.002
    for token in (b, c):
        pool.release(token)
    assert pool.held == 0


def test_different_cpu_sets_use_different_folders(tmp_path: Path) -> None:
    assert token_dir(tmp_path, [1, 0]) == token_dir(tmp_path, {0, 1}) == tmp_path / "cpus-0-1"
    assert token_dir(tmp_path, {2, 3}) != token_dir(tmp_path, {0, 1})
    big = token_dir(tmp_path, range(64))
    assert big.parent == tmp_path
    assert big.name.startswith("cpus-")
    assert len(big.name) < 40
    assert big != token_dir(tmp_path, range(1, 65))
    pool = HostCpuTokens.for_cpus(tmp_path, {4, 5, 6})
    assert (pool.directory, pool.count) == (tmp_path / "cpus-4-5-6", 3)
    assert [p.name for p in pool.paths] == ["cpu-0.lock", "cpu-1.lock", "cpu-2.lock"]


# ---------------------------------------------------------------------------- with analysis slots


def warm_up() -> None:
    """Runs in a slot's process at start-up, instead of a whole analysis: imports this module."""


def timed_sleep(seconds: float) -> tuple[float, float]:
    """Runs in a slot's process: sleep, return when it started and ended (the host's monotonic clock)."""
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def deepest_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant (an end at the instant of a start closes first)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    depth = deepest = 0
    for _, step in events:
        depth += step
        deepest = max(deepest, depth)
    return deepest


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def two_workers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[SlotPool]]:
    """Two slot pools of 2 slots (two workers on one host) sharing 2 host CPU tokens; started once
    for the module (4 spawned processes take seconds)."""
    directory = tmp_path_factory.mktemp("cpus")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(slots, "warm_up", warm_up)
        async with AsyncExitStack() as stack:
            pools = []
            for _ in range(2):
                pool = SlotPool(2, max_tasks_per_child=50, cpu_tokens=tokens(directory, count=2))
                stack.push_async_callback(pool.close)
                pools.append(pool)
            await asyncio.gather(*(pool.start() for pool in pools))
            yield pools


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(60)
async def test_two_workers_sharing_two_tokens_never_run_more_than_two_analyses_at_once(
    two_workers: list[SlotPool],
) -> None:
    async def lease(pool: SlotPool) -> tuple[float, float]:
        async with pool.lease() as slot:
            return await pool.call(slot, timed_sleep, 0.3, time_limit_s=10.0, path="-", cpu_priority=0)

    intervals = await asyncio.gather(*(lease(pool) for pool in two_workers for _ in range(3)))
    assert deepest_overlap(list(intervals)) == 2, intervals
    assert all(pool.busy == 0 for pool in two_workers)
    assert all(pool._tokens is not None and pool._tokens.held == 0 for pool in two_workers)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.timeout(60)
async def test_the_wait_for_a_token_does_not_count_against_the_time_limit(
    two_workers: list[SlotPool],
) -> None:
    first, second = two_workers
    leased, done = asyncio.Event(), asyncio.Event()
    holding: list[int] = []

    async def hold(pool: SlotPool) -> None:
        async with pool.lease() as slot:
            holding.append(slot.index)
            if len(holding) == 2:
                leased.set()
            await pool.call(slot, timed_sleep, 0.6, time_limit_s=10.0, path="-", cpu_priority=0)
            done.set()

    holders = [asyncio.create_task(hold(first)) for _ in range(2)]  # both tokens, for 0.6 s
    await leased.wait()
    waited_from = time.monotonic()
    async with second.lease() as slot:  # a slot at once: the analysis waits for a token
        _, end = await second.call(slot, timed_sleep, 0.2, time_limit_s=0.5, path="-", cpu_priority=0)
        assert done.is_set()
    assert end - waited_from > 0.5  # more than the limit in all, yet no time-out
    await asyncio.gather(*holders)
    assert second.restarts == 0
