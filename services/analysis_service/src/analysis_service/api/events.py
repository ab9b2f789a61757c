"""Live progress for stream clients, fed from the worker's Redis pub/sub.

One :class:`ProgressHub` per API process holds ONE subscription to ``{prefix}:progress`` (every
progress update of every request, see :mod:`analysis_service.sinks.progress`) and hands each update
to the clients following that request, directly or through its batch.

Memory is bounded whatever the clients do: each client has a queue of at most
``api.stream_queue_size`` updates; when a client reads slower than updates arrive, the OLDEST
queued update is dropped (every update is a full snapshot of its job, so the newest is what
matters) and the count of dropped updates is reported with the next event. The hub itself never
waits for a client.

When the subscription breaks (Redis down), the hub re-subscribes with a backoff; clients do not
depend on it for the end of a job: each stream also re-reads the ledger every
``api.stream_poll_s`` seconds, so a terminal outcome is always delivered and ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable
from typing import Any

import structlog
from redis.asyncio import Redis

from analysis_service.cancellation import checkpoint
from analysis_service.sinks._util import REDIS_TRANSIENT_ERRORS

log = structlog.get_logger(__name__)

#: Seconds between re-subscription attempts while Redis is unreachable (doubling up to the max).
RESUBSCRIBE_MIN_S = 0.5
RESUBSCRIBE_MAX_S = 10.0
#: How long :meth:`ProgressHub.close` waits for the listener before cancelling it again.
CANCEL_REPEAT_S = 0.1


class Subscription:
    """A client's bounded queue of progress updates (dicts as the worker published them)."""

    def __init__(self, request_ids: Iterable[str], size: int) -> None:
        self.request_ids = frozenset(request_ids)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=size)
        self.dropped = 0

    def offer(self, update: dict[str, Any]) -> bool:
        """Queue ``update``, dropping the oldest when full. Returns False when one was dropped."""
        dropped = False
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            dropped = True
        self._queue.put_nowait(update)
        return not dropped

    async def next(self, wait_s: float) -> dict[str, Any] | None:
        """The next update, or None after ``wait_s`` seconds without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), wait_s)
        except TimeoutError:
            return None

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    @property
    def pending(self) -> int:
        return self._queue.qsize()


class ProgressHub:
    """Fans the worker's progress updates out to stream clients.

    Parameters
    ----------
    client : redis.asyncio.Redis
        The API's Redis client (its connection pool provides the pub/sub connection).
    channel : str
        ``{prefix}:progress``.
    queue_size : int
        Updates buffered per client (``api.stream_queue_size``).
    on_drop : callable, optional
        Called once per dropped update (a metric).
    """

    def __init__(self, client: Redis, channel: str, queue_size: int, on_drop: Any = None) -> None:
        self._client = client
        self._channel = channel
        self._queue_size = queue_size
        self._on_drop = on_drop
        self._by_id: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    @property
    def clients(self) -> int:
        return len({sub for subs in self._by_id.values() for sub in subs})

    def subscribe(self, request_ids: Iterable[str]) -> Subscription:
        sub = Subscription(request_ids, self._queue_size)
        for rid in sub.request_ids:
            self._by_id.setdefault(rid, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        for rid in sub.request_ids:
            subs = self._by_id.get(rid)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_id[rid]

    def dispatch(self, update: dict[str, Any]) -> None:
        """Hand ``update`` to every client following its request."""
        rid = update.get("request_id")
        if not isinstance(rid, str):
            return
        for sub in tuple(self._by_id.get(rid, ())):
            if not sub.offer(update) and self._on_drop is not None:
                self._on_drop()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="progress-hub")

    async def close(self) -> None:
        """Stop the listener and wait for it.

        A cancellation can be lost inside the Redis client: one that lands as a socket write
        completes is swallowed by CPython 3.11's ``asyncio.wait_for`` (which redis-py wraps around
        its writes), and the listener then blocks in its next read. So the listener checks for a
        pending cancellation before each read, and the cancel is repeated until it has ended.
        """
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_REPEAT_S)
        if not task.cancelled() and task.exception() is not None:
            log.error("progress subscription failed", error=repr(task.exception()))

    async def _listen(self) -> None:
        delay = RESUBSCRIBE_MIN_S
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.connected.set()
                delay = RESUBSCRIBE_MIN_S
                log.info("progress subscription open", channel=self._channel)
                while True:
                    checkpoint()
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message.get("type") != "message":
                        continue
                    self.dispatch(_decode(message.get("data")))
            except REDIS_TRANSIENT_ERRORS as exc:
                if self.connected.is_set():
                    log.warning("progress subscription lost", error=f"{type(exc).__name__}: {exc}")
                self.connected.clear()
            finally:
                with contextlib.suppress(*REDIS_TRANSIENT_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESUBSCRIBE_MAX_S)


def _decode(data: Any) -> dict[str, Any]:
    try:
        update = json.loads(data)
    except (TypeError, ValueError):
        return {}
    return update if isinstance(update, dict) else {}
