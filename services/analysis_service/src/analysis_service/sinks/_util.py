"""Helpers shared by the store adapters: driver-error translation, the Redis client, timestamps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Final

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import RedisSettings


@contextmanager
def translate_unavailable(
    transient: tuple[type[BaseException], ...], *, store: str, action: str
) -> Iterator[None]:
    """Re-raise the driver's transient errors as :class:`SinkUnavailable`, chained to the original.

    Parameters
    ----------
    transient : tuple of exception types
        The adapter's one tuple of errors that mean "the store is unreachable or overloaded right
        now". Anything else (a bad query, a constraint violation, a bug) propagates unchanged.
    store : str
        Human name of the store, e.g. ``"PostgreSQL"``, used in the message.
    action : str
        What was being done, e.g. ``"writing result 'r-1'"``, used in the message.

    Raises
    ------
    SinkUnavailable
        When the block raised one of ``transient``.
    """
    try:
        yield
    except transient as exc:
        raise SinkUnavailable(f"{store} unavailable while {action}: {type(exc).__name__}: {exc}") from exc


def utc_now_iso() -> str:
    """Current UTC time as an ISO 8601 string with offset, e.g. ``2025-01-01T12:00:00.123456+00:00``."""
    return datetime.now(UTC).isoformat()


#: Errors meaning "Redis cannot be reached or is not serving writes right now": unreachable,
#: timed out, a replica during failover (``READONLY``), still loading its data (``LOADING``), out of
#: memory under ``noeviction`` (``OOM``), a cluster or its master down (``CLUSTERDOWN``,
#: ``MASTERDOWN``, ``TRYAGAIN``). Other ``ResponseError``s (wrong type, bad command) are bugs and
#: propagate, except the refusals :func:`translate_redis` also recognises by their reply.
REDIS_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError, MaxConnectionsError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterDownError,  # MASTERDOWN (MasterDownError) too
    redis.exceptions.TryAgainError,
    OSError,
)

#: Replies of a Redis refusing writes that redis-py raises as a plain ``ResponseError``: ``MISCONF``
#: (it cannot save its snapshot and stops accepting writes) and ``BUSY`` (a script runs too long).
_REDIS_REFUSALS: Final = ("MISCONF ", "BUSY ")


@contextmanager
def translate_redis(*, store: str, action: str) -> Iterator[None]:
    """:func:`translate_unavailable` for Redis: :data:`REDIS_TRANSIENT_ERRORS` and the refusals
    redis-py reports only by their reply (``MISCONF``, ``BUSY``) become :class:`SinkUnavailable`.

    Raises
    ------
    SinkUnavailable
        When Redis cannot be reached or refuses the command for now.
    """
    try:
        with translate_unavailable(REDIS_TRANSIENT_ERRORS, store=store, action=action):
            yield
    except redis.exceptions.ResponseError as exc:
        if not str(exc).startswith(_REDIS_REFUSALS):
            raise
        raise SinkUnavailable(f"{store} unavailable while {action}: {type(exc).__name__}: {exc}") from exc


def redis_client(settings: RedisSettings) -> Redis:
    """A ``redis.asyncio`` client for ``settings`` (no I/O until the first command).

    Replies are decoded as UTF-8 strings. Connecting and every command are bounded by
    ``socket_timeout_s``. The client retries a failed command once, at once, so that a connection
    the server dropped while idle does not surface as an outage; longer retries belong to the
    caller's :class:`~analysis_service.sinks.resilience.Guard`.
    """
    return Redis.from_url(
        settings.url,
        decode_responses=True,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        retry=Retry(NoBackoff(), retries=1),
    )
