"""Cancellations that a client library swallowed, raised again where the service can act on them.

Client libraries sometimes absorb a cancellation: a driver turns it into a connection error and
retries the command, or CPython 3.11's ``asyncio.wait_for`` (which redis-py wraps around its socket
writes) drops one that lands as the write completes. The task then runs on although its cancel was
requested (``Task.cancelling()`` stays above zero). These helpers turn that state back into a
``CancelledError``.
"""

from __future__ import annotations

import asyncio


def checkpoint() -> None:
    """Raise the cancellation of the current task if one is pending but was swallowed.

    The delivery pipeline calls this between steps, so that a shutdown's cancel stops a delivery
    at the next step at the latest; the API's progress listener calls it before each read.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def raise_if_cancelling(exc: BaseException) -> None:
    """Re-raise a cancellation that a client library turned into ``exc`` (a connection error)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from exc
