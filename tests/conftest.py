"""Test-wide helpers: service gating (skip locally when a service is absent, fail in CI)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

import pytest
import uvloop


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test when ``host:port`` does not accept connections — or fail under CI.

    CI sets ``CI``; there a missing service is a broken environment, never a reason to skip.
    """
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        reason = f"{name} is not reachable at {host}:{port} ({exc})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it", pytrace=False)
        pytest.skip(reason)


# The service reads ./.env (README: `cp .env.example .env`); a developer's copy must not change
# what the tests see. Tests of the .env file itself set or clear ANALYSIS_ENV_FILE explicitly.
os.environ.setdefault("ANALYSIS_ENV_FILE", "")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests run on uvloop: the loop ``worker`` and ``api`` run on (``cli.main._serve``), so the
    workers and APIs the integration tests start in-process behave as the deployed ones do."""
    return {"uvloop": uvloop.new_event_loop}
