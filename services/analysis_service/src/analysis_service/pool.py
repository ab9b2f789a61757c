"""The process pool that runs the engine, shared by the ``analyze`` command and the worker.

Only a path and small options cross into the pool; the engine's output (a pydantic model) or an
:class:`~analysis_service.errors.AnalysisServiceError` comes back. Pool processes are started with
the ``spawn`` method (no inherited sockets, locks or event loop), run single-threaded BLAS/OpenMP
(one analysis per core is the unit of parallelism) and are warmed up by their initializer so the
first request does not pay for imports.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parent process never needs numpy to submit work
    from analysis_service.settings import EngineSettings
    from service_shared.messages import EngineOutput

#: Environment for pool processes: one thread each for every numeric library.
SINGLE_THREADED_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}

#: A progress sink that pickles into the pool: ``put((request_key, fraction, stage))``.
ProgressQueue = Any


def _initialize(progress_queue: ProgressQueue | None) -> None:
    """Pool process start-up: single-threaded numerics, analyzers loaded once, progress queue kept."""
    os.environ.update(SINGLE_THREADED_ENV)
    from analysis_service.audio.registry import build_registry

    global _PROGRESS_QUEUE, _REGISTRY
    _PROGRESS_QUEUE = progress_queue
    _REGISTRY = build_registry()


# Per pool process (set by the initializer): where progress goes, and the analyzers, whose
# entry-point scan costs ~20 ms and need not be repeated per file.
_PROGRESS_QUEUE: ProgressQueue | None = None
_REGISTRY: Any = None


def run_analysis(
    path: str,
    *,
    settings: EngineSettings,
    analyses: list[str] | None = None,
    timeline: bool | None = None,
    progress_key: str | None = None,
) -> EngineOutput:
    """Analyse one file inside a pool process (module-level so it pickles by reference).

    When the pool was created with a progress queue and ``progress_key`` is given, progress is
    reported as ``(progress_key, fraction, stage)`` tuples at most about four times a second.
    """
    from analysis_service.audio.engine import analyze_file

    report: Callable[[float, str], None] | None = None
    queue = _PROGRESS_QUEUE
    if queue is not None and progress_key is not None:
        report = _throttled(queue, progress_key)
    return analyze_file(
        path, settings=settings, analyses=analyses, timeline=timeline, progress=report, registry=_REGISTRY
    )


def warm_up() -> None:
    """Run the whole analysis once on a short synthetic song (imports, FFT plans, caches)."""
    from analysis_service.audio.features import compute_features
    from analysis_service.audio.registry import build_registry, resolve
    from analysis_service.audio.synth import demo_song

    y = demo_song(bpm=120.0, tonic=0, mode="major", seconds=6.0)
    features = compute_features([y], sample_rate=22050)
    results: dict[str, Any] = {}
    for analyzer in resolve(build_registry(), None):
        results[analyzer.name] = analyzer.run(features, results)


def _throttled(queue: ProgressQueue, key: str, min_interval_s: float = 0.25) -> Callable[[float, str], None]:
    import time

    last_time = 0.0
    last_stage = ""

    def report(fraction: float, stage: str) -> None:
        nonlocal last_time, last_stage
        now = time.monotonic()
        if stage != last_stage or now - last_time >= min_interval_s or fraction >= 1.0:
            last_time, last_stage = now, stage
            queue.put((key, fraction, stage))

    return report


def create_pool(
    workers: int, *, max_tasks_per_child: int | None = None, progress_queue: ProgressQueue | None = None
) -> ProcessPoolExecutor:
    """A spawn-started pool of ``workers`` warmed, single-threaded analysis processes."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_initialize,
        initargs=(progress_queue,),
        max_tasks_per_child=max_tasks_per_child,
    )
