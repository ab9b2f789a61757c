"""The progress hook's Redis writes per request: few for a short analysis (no Redis here)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from analysis_service.sinks.postgres import Finished
from analysis_service.sinks.progress import ProgressStore
from analysis_service.worker.hooks import ProgressHook
from analysis_service.worker.pipeline import Settlement
from service_shared.messages import AnalysisResultMessage, ResultStatus
from tests.unit.test_prefetch_window import analysing


def hook_and_writes() -> tuple[ProgressHook, list[dict[str, Any]]]:
    writes: list[dict[str, Any]] = []

    async def best_effort(what: str, fn: Any, request_id: str, **fields: Any) -> bool:
        writes.append({"request_id": request_id, **fields})
        return True

    return ProgressHook(cast(ProgressStore, None), best_effort), writes


async def test_the_first_report_of_an_analysis_is_not_written_again_after_its_start() -> None:
    """The slot's first report (decoding at 0 %) comes right after the 'started' write: one write
    less per request, the later reports still throttled to one per 0.5 s."""
    hook, writes = hook_and_writes()
    d = analysing("a")
    await hook.step_started("analyse", d)
    hook.forward("a", 0.0, "decode")
    hook.forward("a", 0.1, "decode")
    await asyncio.sleep(0.01)
    assert [(w["percent"], w["stage"]) for w in writes] == [(0.0, "started")]
    await asyncio.sleep(0.5)
    hook.forward("a", 0.6, "decode")
    hook.forward("a", 0.7, "decode")
    await asyncio.sleep(0.01)
    assert [(w["percent"], w["stage"]) for w in writes] == [(0.0, "started"), (60.0, "decode")]


async def test_a_completed_request_says_done_once_in_its_terminal_state() -> None:
    """The engine's end report (1.0, 'done') is not written: the terminal state, written as the
    request settles, says it. A short analysis costs two writes: its start and its outcome."""
    hook, writes = hook_and_writes()
    d = analysing("a")
    await hook.step_started("analyse", d)
    hook.forward("a", 0.0, "decode")
    await asyncio.sleep(0.5)
    hook.forward("a", 1.0, "done")  # past the throttle's interval: only its fraction keeps it out
    await asyncio.sleep(0.01)
    await hook.step_finished("analyse", d, 0.3)
    result = AnalysisResultMessage(request_id="a", status=ResultStatus.COMPLETED, file="a.mp3")
    d.stored = Finished(result, written=True, published=True)
    await hook.settled(d, Settlement.ACK)
    assert [(w["status"], w["percent"], w["stage"]) for w in writes] == [
        ("running", 0.0, "started"),
        ("completed", 100.0, "done"),
    ]
