"""The progress hook's Redis writes per request: few for a short analysis (no Redis here)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from analysis_service.sinks.progress import ProgressStore
from analysis_service.worker.hooks import ProgressHook
from tests.unit.test_prefetch_window import analysing


def hook_and_writes() -> tuple[ProgressHook, list[dict[str, Any]]]:
    writes: list[dict[str, Any]] = []

    async def best_effort(what: str, fn: Any, request_id: str, **fields: Any) -> bool:
        writes.append({"request_id": request_id, **fields})
        return True

    return ProgressHook(cast(ProgressStore, None), best_effort), writes


async def test_the_first_report_of_an_analysis_is_not_written_again_after_its_start() -> None:
    """The slot's first report (decoding at 0 %) comes right after the 'started' write: one write
    less per request, the later reports still throttled to one per 0.5 s, the last one written."""
    hook, writes = hook_and_writes()
    d = analysing("a")
    await hook.step_started("analyse", d)
    hook.forward("a", 0.0, "decode")
    hook.forward("a", 0.1, "decode")
    await asyncio.sleep(0.01)
    assert [(w["percent"], w["stage"]) for w in writes] == [(0.0, "started")]
    await asyncio.sleep(0.5)
    hook.forward("a", 0.6, "decode")
    hook.forward("a", 1.0, "done")
    await asyncio.sleep(0.01)
    assert [(w["percent"], w["stage"]) for w in writes] == [
        (0.0, "started"),
        (60.0, "decode"),
        (99.0, "done"),
    ]
