"""Cancellation in the delivery pipeline and the worker's shutdown, without any service.

A shutdown cancels the deliveries still running past their grace. Client libraries sometimes absorb
a cancellation (aiormq closes the channel of a cancelled RPC and raises a channel error; a driver may
retry the command), so the pipeline must not depend on one cancel arriving as ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from analysis_service import cancellation
from analysis_service.worker import pipeline as pipeline_module
from analysis_service.worker import worker as worker_module


async def test_checkpoint_raises_a_cancellation_that_was_swallowed() -> None:
    reached_next_step = asyncio.Event()

    async def delivery() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # what a client library may do
            await asyncio.sleep(60)
        cancellation.checkpoint()
        reached_next_step.set()

    task = asyncio.create_task(delivery())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not reached_next_step.is_set()


async def test_checkpoint_lets_an_uncancelled_task_go_on() -> None:
    cancellation.checkpoint()  # no exception


async def test_a_cancelled_delivery_cancels_the_slot_work_it_waits_for() -> None:
    work_cancelled = asyncio.Event()

    async def slot_work() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            work_cancelled.set()  # SlotPool.call kills the slot's process here
            raise
        return "output"

    class _Delivery:
        cancel = asyncio.Event()

    runner = pipeline_module.Pipeline.__new__(pipeline_module.Pipeline)
    task = asyncio.create_task(runner._cancellable(_Delivery(), slot_work()))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert work_cancelled.is_set(), "the slot's work ran on after its delivery was cancelled"


async def test_shutdown_does_not_wait_forever_for_a_task_that_ignores_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_module, "_CANCEL_WAIT_S", 0.2)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                continue

    obedient = asyncio.create_task(asyncio.sleep(60))
    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await worker_module._cancel_and_wait({task, obedient}, what="test")
    assert obedient.cancelled()
    assert not task.done(), "the stubborn task was expected to be left behind"
    release.set()
    await task
