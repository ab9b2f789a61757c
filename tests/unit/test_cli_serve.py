"""The event loop the long-lived commands (``worker``, ``api``) run on."""

from __future__ import annotations

import asyncio

import uvloop

from analysis_service.cli.main import _serve


def test_services_run_on_uvloop_to_their_exit_status() -> None:
    async def service() -> int:
        await asyncio.sleep(0)
        return 7 if isinstance(asyncio.get_running_loop(), uvloop.Loop) else 1

    assert _serve(service()) == 7
