"""Which redelivery the work already running for a request id may adopt (``Worker._on_message``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from analysis_service.settings import Settings, WorkerSettings
from analysis_service.worker.pipeline import parse
from analysis_service.worker.worker import Worker


def _message(body: dict[str, Any], *, closed: bool) -> AbstractIncomingMessage:
    channel = SimpleNamespace(is_closed=closed)
    return cast(
        AbstractIncomingMessage,
        SimpleNamespace(body=json.dumps(body).encode(), headers=None, redelivered=True, channel=channel),
    )


async def _after_blip(tmp_path: Path, second: dict[str, Any]) -> tuple[Any, list[Any]]:
    """A worker whose delivery of ``x`` (a.wav) lost its channel, then ``second`` arriving."""
    worker = Worker(Settings(worker=WorkerSettings(media_root=tmp_path)))
    worker._pipeline = cast(Any, object())  # consuming (the pipeline itself is not reached)
    handled: list[Any] = []

    async def handle(d: Any, *, after: Any) -> None:
        handled.append(d)

    worker._handle = handle  # type: ignore[method-assign]
    first = parse(_message({"request_id": "x", "file": "a.wav"}, closed=True), settings=worker.settings,
                  registry=worker.registry)  # fmt: skip
    running = asyncio.create_task(asyncio.sleep(3600))
    worker._inflight["x"] = (first, running)
    await worker._on_message(_message(second, closed=False))
    await asyncio.sleep(0)
    running.cancel()
    return first, handled


async def test_a_redelivery_of_the_same_request_is_adopted(tmp_path: Path) -> None:
    first, handled = await _after_blip(tmp_path, {"request_id": "x", "file": "a.wav"})
    assert handled == []
    assert json.loads(first.message.body)["file"] == "a.wav"
    assert first.message.channel.is_closed is False  # the running work now settles the new delivery


async def test_another_message_reusing_the_id_is_not_adopted(tmp_path: Path) -> None:
    """Adopted, it would be acked with the running request's outcome, and its own outcome (a
    request_id_conflict) would be neither stored nor announced."""
    first, handled = await _after_blip(tmp_path, {"request_id": "x", "file": "b.wav"})
    assert first.message.channel.is_closed is True  # the running work kept its own delivery
    assert len(handled) == 1  # it runs after the running work, and gets its own outcome
    assert handled[0].fields.fingerprint != first.fields.fingerprint


async def test_copies_of_one_request_run_one_after_another_each_with_its_lease_renewed(
    tmp_path: Path,
) -> None:
    """Three deliveries of one request in one worker (a blip redelivered it twice while its first
    copy ran, on a live channel): each copy runs only after the one before, and the running copy is
    the one whose lease the heartbeat renews. The third copy used to wait for the first only, then
    run beside the second and take its place in the heartbeat."""
    worker = Worker(Settings(worker=WorkerSettings(media_root=tmp_path)))
    worker._pipeline = cast(Any, SimpleNamespace(hooks=[]))
    release = {n: asyncio.Event() for n in range(3)}
    order: list[int] = []
    renewed_while_running: list[bool] = []
    copies: list[Any] = []

    async def run(_pipeline: Any, d: Any) -> Any:
        n = copies.index(d)
        order.append(n)
        renewed_while_running.append(worker._inflight["x"][0] is d)
        await release[n].wait()
        renewed_while_running.append(worker._inflight["x"][0] is d)
        return SimpleNamespace()

    async def settle(d: Any, settlement: Any) -> None:
        return None

    worker._run_counted = run  # type: ignore[method-assign,assignment]
    worker._settle = settle  # type: ignore[method-assign]
    for _ in range(3):
        await worker._on_message(_message({"request_id": "x", "file": "a.wav"}, closed=False))
        copies.append(list(worker._tasks.values())[-1])
    for n in range(3):
        await asyncio.sleep(0.01)
        assert order == list(range(n + 1)), order
        release[n].set()
    await asyncio.wait(set(worker._tasks), timeout=5)
    assert order == [0, 1, 2]
    assert all(renewed_while_running), renewed_while_running
    assert worker._inflight == {}
