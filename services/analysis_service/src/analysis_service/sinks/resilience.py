"""Per-dependency protection: retries with backoff inside a circuit breaker.

A :class:`Guard` wraps every call to one dependency (one per sink, one for progress, ...):

* each attempt passes through a purgatory circuit breaker. ``threshold`` consecutive failed
  attempts open it; while open, calls fail at once with :class:`SinkUnavailable` (chained to
  purgatory's ``OpenedState``) without touching the dependency. ``ttl_s`` seconds after opening it
  is half-open: the next attempt goes through, and closes the breaker on success or reopens it on
  failure;
* failed attempts are retried by tenacity with exponential backoff and full jitter, up to
  ``attempts`` attempts in total and ``max_wait_s`` between two attempts. A call refused by an
  open breaker is not retried.

Only :class:`SinkUnavailable` counts as a failure and is retried: adapters translate their drivers'
transient errors to it. Any other exception (a bad query, a constraint violation, a bug) shows that
the dependency answered; it propagates at once, unretried, and counts as a success for the breaker.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Literal, ParamSpec, TypeVar

import structlog
from purgatory import AsyncCircuitBreakerFactory
from purgatory.domain.model import Context, OpenedState
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import WorkerSettings

BreakerState = Literal["closed", "open", "half-open"]

_log = structlog.get_logger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, SinkUnavailable) and not isinstance(exc.__cause__, OpenedState)


def _counts_as_success(exc: BaseException) -> bool:
    """purgatory exclusion predicate: every exception except SinkUnavailable is "not a failure"."""
    return not isinstance(exc, SinkUnavailable)


class Guard:
    """Circuit breaker plus retries for one dependency.

    Parameters
    ----------
    name : str
        The dependency, e.g. ``"postgres"``; used in messages and as the breaker's name.
    threshold : int
        Consecutive failed attempts that open the breaker.
    ttl_s : float
        Seconds the breaker stays open before letting a trial call through.
    attempts : int
        Attempts per call, the first included (1: no retry).
    max_wait_s : float
        Longest pause between two attempts (seconds).
    initial_wait_s : float, optional
        Scale of the backoff: the pause after the n-th failed attempt (n = 1, 2, ...) is uniform in
        ``[0, min(max_wait_s, initial_wait_s * 2**(n - 1))]`` seconds.

    Notes
    -----
    Build one per dependency with :meth:`from_settings` and keep it for the process lifetime. The
    breaker state lives in memory, per process.
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int,
        ttl_s: float,
        attempts: int,
        max_wait_s: float,
        initial_wait_s: float = 0.5,
    ) -> None:
        if threshold < 1 or attempts < 1 or ttl_s <= 0 or max_wait_s < 0 or initial_wait_s < 0:
            raise ValueError(
                f"invalid guard {name!r}: threshold={threshold} and attempts={attempts} must be >= 1, "
                f"ttl_s={ttl_s} > 0, max_wait_s={max_wait_s} and initial_wait_s={initial_wait_s} >= 0"
            )
        self.name = name
        self._threshold = threshold
        self._ttl_s = ttl_s
        self._attempts = attempts
        self._max_wait_s = max_wait_s
        self._initial_wait_s = initial_wait_s
        self._breakers = AsyncCircuitBreakerFactory(default_threshold=threshold, default_ttl=ttl_s)
        self._context: Context | None = None  # purgatory's breaker state, created on first call

    @classmethod
    def from_settings(cls, name: str, settings: WorkerSettings) -> Guard:
        """A guard configured by ``breaker_threshold``, ``breaker_ttl_s``, ``sink_retry_attempts`` and
        ``sink_retry_max_wait_s``."""
        return cls(
            name,
            threshold=settings.breaker_threshold,
            ttl_s=settings.breaker_ttl_s,
            attempts=settings.sink_retry_attempts,
            max_wait_s=settings.sink_retry_max_wait_s,
        )

    @property
    def state(self) -> BreakerState:
        """``"closed"``, ``"open"`` or ``"half-open"``, for metrics and health checks.

        An open breaker whose ``ttl_s`` has passed reports ``"half-open"``: the next call is a trial.
        """
        context = self._context
        if context is None or context.state == "closed":
            return "closed"
        if context.state == "half-opened":
            return "half-open"
        opened_at = context.opened_at or 0.0
        return "half-open" if time.time() > opened_at + context.ttl else "open"

    async def call(self, fn: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Await ``fn(*args, **kwargs)`` through the breaker, retrying on :class:`SinkUnavailable`.

        Raises
        ------
        SinkUnavailable
            When the breaker is open, or the last attempt failed with it.
        Exception
            Whatever else ``fn`` raised, unchanged and unretried.
        """
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(multiplier=self._initial_wait_s, max=self._max_wait_s),
            retry=retry_if_exception(_is_retryable),
            reraise=True,
            before_sleep=self._before_sleep,
        )
        async for attempt in retrying:
            with attempt:
                return await self._attempt(fn, *args, **kwargs)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def _attempt(self, fn: Callable[_P, Awaitable[_T]], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        breaker = await self._breakers.get_breaker(self.name, exclude=[(BaseException, _counts_as_success)])
        self._context = breaker.context
        try:
            async with breaker:
                return await fn(*args, **kwargs)
        except OpenedState as exc:
            raise SinkUnavailable(
                f"{self.name}: circuit breaker open after {self._threshold} consecutive failures; "
                f"next trial within {self._ttl_s:g} s"
            ) from exc

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        _log.warning(
            "dependency_retry",
            dependency=self.name,
            attempt=state.attempt_number,
            of=self._attempts,
            sleep_s=round(state.upcoming_sleep, 3),
            error=str(error),
        )
