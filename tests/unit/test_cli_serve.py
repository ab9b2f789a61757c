"""The event loop the long-lived commands (``worker``, ``api``) and the async tests run on."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from analysis_service.cli.main import _serve


async def _loop_kind() -> int:
    await asyncio.sleep(0)
    return 7 if isinstance(asyncio.get_running_loop(), uvloop.Loop) else 1


def test_services_run_on_uvloop_to_their_exit_status() -> None:
    assert _serve(_loop_kind()) == 7


def test_without_uvloop_services_run_on_asyncios_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # ``import uvloop`` raises ImportError
    assert _serve(_loop_kind()) == 1


async def test_async_tests_run_on_the_services_loop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
