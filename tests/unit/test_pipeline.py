"""The pipeline's analyse step with its slot jobs run in process: what one request costs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage

import analysis_service.audio.decode
import analysis_service.audio.engine
from analysis_service.audio.registry import build_registry
from analysis_service.settings import Settings, WorkerSettings
from analysis_service.worker import pipeline as pipeline_module
from analysis_service.worker.pipeline import Pipeline, parse
from analysis_service.worker.slots import SlotPool
from service_shared.messages import ResultStatus
from tests.unit.test_pool import write


class InProcessSlots:
    """A :class:`SlotPool` stand-in that runs each slot job in this process (one slot)."""

    async def acquire(self, priority: int = 0, *, urgent: bool = False) -> object:
        return self

    async def call(
        self,
        slot: object,
        fn: Callable[..., Any],
        *args: Any,
        time_limit_s: float,
        path: str,
        cpu_priority: int | None = None,
    ) -> Any:
        return fn(*args)

    def release(self, slot: object) -> None:
        return None


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, *more: Any) -> list[str]:
    """Patch ``module.name`` (and the same name in ``more`` modules) to record its first argument."""
    calls: list[str] = []
    real: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(os.fspath(args[-1] if name == "resolve_media_path" else args[0]))
        return real(*args, **kwargs)

    for target in (module, *more):
        monkeypatch.setattr(target, name, wrapper)
    return calls


async def test_a_request_resolves_its_path_once_and_probes_its_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "a.wav")
    settings = Settings(worker=WorkerSettings(media_root=tmp_path))
    registry = build_registry()
    resolved = counting(monkeypatch, pipeline_module, "resolve_media_path")
    probed = counting(monkeypatch, analysis_service.audio.decode, "probe", analysis_service.audio.engine)
    body = json.dumps({"request_id": "req-1", "file": "a.wav", "analyses": ["bpm"]}).encode()
    message = cast(AbstractIncomingMessage, SimpleNamespace(body=body, headers=None, redelivered=False))
    pipeline = Pipeline(
        settings=settings,
        registry=registry,
        ledger=cast(Any, None),
        graph=cast(Any, None),
        publisher=cast(Any, None),
        slots=cast(SlotPool, InProcessSlots()),
        cache=None,
        guards={},
    )

    delivery = parse(message, settings=settings, registry=registry)
    await pipeline.analyse(delivery)

    assert delivery.outcome is not None
    assert delivery.outcome.status is ResultStatus.COMPLETED, delivery.outcome.error
    assert resolved == ["a.wav"]
    assert probed == [str((tmp_path / "a.wav").resolve())]
