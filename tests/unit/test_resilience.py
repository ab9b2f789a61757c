"""Guard: retries on SinkUnavailable only, opens after N failures, half-opens after ttl, closes on success."""

from __future__ import annotations

import asyncio

import pytest
from purgatory.domain.model import OpenedState

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import WorkerSettings
from analysis_service.sinks.resilience import Guard

TTL_S = 0.2


class FlakyStore:
    """A fake dependency: fails with ``error`` while ``down``, counts the calls that reached it."""

    def __init__(self, error: Exception | None = None) -> None:
        self.down = True
        self.calls = 0
        self.error = error or SinkUnavailable("fake store: connection refused")

    async def write(self, value: str) -> str:
        self.calls += 1
        if self.down:
            raise self.error
        return f"stored {value}"


def state(guard: Guard) -> str:
    """The breaker state, read through a call so that mypy does not narrow the property."""
    return guard.state


def make_guard(*, threshold: int = 3, attempts: int = 1) -> Guard:
    return Guard(
        "fake", threshold=threshold, ttl_s=TTL_S, attempts=attempts, max_wait_s=0.01, initial_wait_s=0.001
    )


async def test_success_passes_the_value_through() -> None:
    guard, store = make_guard(), FlakyStore()
    store.down = False
    assert await guard.call(store.write, "x") == "stored x"
    assert state(guard) == "closed"


async def test_opens_after_threshold_failures_and_then_fails_fast() -> None:
    guard, store = make_guard(threshold=3), FlakyStore()
    for _ in range(3):
        with pytest.raises(SinkUnavailable, match="connection refused"):
            await guard.call(store.write, "x")
    assert state(guard) == "open"
    assert store.calls == 3

    with pytest.raises(SinkUnavailable, match="circuit breaker open") as caught:
        await guard.call(store.write, "x")
    assert isinstance(caught.value.__cause__, OpenedState)
    assert store.calls == 3  # refused without touching the store


async def test_half_open_after_ttl_then_closes_after_a_success() -> None:
    guard, store = make_guard(threshold=2), FlakyStore()
    for _ in range(2):
        with pytest.raises(SinkUnavailable):
            await guard.call(store.write, "x")
    assert state(guard) == "open"

    await asyncio.sleep(TTL_S + 0.05)
    assert state(guard) == "half-open"
    store.down = False
    assert await guard.call(store.write, "y") == "stored y"
    assert state(guard) == "closed"
    assert store.calls == 3


async def test_half_open_trial_failure_reopens() -> None:
    guard, store = make_guard(threshold=2), FlakyStore()
    for _ in range(2):
        with pytest.raises(SinkUnavailable):
            await guard.call(store.write, "x")
    await asyncio.sleep(TTL_S + 0.05)
    with pytest.raises(SinkUnavailable, match="connection refused"):
        await guard.call(store.write, "x")
    assert state(guard) == "open"


async def test_retries_sink_unavailable_until_success() -> None:
    guard, store = make_guard(threshold=10, attempts=4), FlakyStore()
    original = store.write

    async def recovers_on_third_call(value: str) -> str:
        if store.calls == 2:
            store.down = False
        return await original(value)

    assert await guard.call(recovers_on_third_call, "x") == "stored x"
    assert store.calls == 3
    assert state(guard) == "closed"


async def test_gives_up_after_attempts_and_reraises_the_last_error() -> None:
    guard, store = make_guard(threshold=10, attempts=3), FlakyStore()
    with pytest.raises(SinkUnavailable, match="connection refused"):
        await guard.call(store.write, "x")
    assert store.calls == 3


async def test_breaker_opening_mid_retry_stops_the_retries() -> None:
    guard, store = make_guard(threshold=2, attempts=5), FlakyStore()
    with pytest.raises(SinkUnavailable, match="circuit breaker open"):
        await guard.call(store.write, "x")
    assert store.calls == 2
    assert state(guard) == "open"


async def test_other_errors_propagate_unretried_and_do_not_open_the_breaker() -> None:
    guard, store = make_guard(threshold=1, attempts=5), FlakyStore(error=ValueError("bad row"))
    for _ in range(3):
        with pytest.raises(ValueError, match="bad row"):
            await guard.call(store.write, "x")
    assert store.calls == 3
    assert state(guard) == "closed"


def test_from_settings_uses_the_worker_settings() -> None:
    settings = WorkerSettings(breaker_threshold=7, breaker_ttl_s=12.0, sink_retry_attempts=2)
    guard = Guard.from_settings("postgres", settings)
    assert guard.name == "postgres"
    assert state(guard) == "closed"


def test_rejects_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="threshold=0"):
        Guard("bad", threshold=0, ttl_s=1.0, attempts=1, max_wait_s=1.0)
