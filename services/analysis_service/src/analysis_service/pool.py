"""The process pool that runs the engine, shared by the ``analyze`` command and the worker.

Only a path and small options cross into the pool; the engine's output (a pydantic model) or an
:class:`~analysis_service.errors.AnalysisServiceError` comes back. Pool processes are started with
the ``spawn`` method (no inherited sockets, locks or event loop), run single-threaded BLAS/OpenMP
(one analysis per core is the unit of parallelism) and are warmed up by their initializer so the
first request does not pay for imports.

Everything that reads an untrusted file (its header, its hash, its audio) runs here, in a process
that can be killed, never in the parent. Pool processes die with the process that started them
(Linux ``PR_SET_PDEATHSIG``): a parent killed with SIGKILL leaves no analysis process behind.

A worker's slot inspects a file (:func:`inspect_file`), then analyses it (:func:`run_analysis`)
in the same process; the header read by the first is kept for the second, which probes the file
again only if it changed in between.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from analysis_service.media import FileIdentity

if TYPE_CHECKING:  # the parent process never needs numpy to submit work
    from analysis_service.audio.decode import AudioInfo
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


#: Linux prctl option: the signal this process gets when the thread that started it ends.
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux; a no-op elsewhere).

    Exits at once when the parent is already gone (it died before the request took effect).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


#: glibc ``mallopt`` parameters, and the values a pool process sets (:func:`keep_freed_memory`).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Make this process reuse the memory it frees rather than give it back to the kernel (glibc).

    glibc serves an allocation at or above its mmap threshold with a mapping of its own, unmapped
    when freed, and gives back the top of the heap when more than its trim threshold is free
    there. The mmap threshold starts at 128 KiB and rises as such blocks are freed, up to 32 MiB,
    so where it stands depends on the process's history. An analysis allocates and frees arrays
    of 0.1-30 MB (a 3-minute track's samples are 16 MB): with those defaults each analysis faulted
    its working memory in again, each page zeroed by the kernel: 6,200-12,800 minor page faults
    and 12-24 ms of kernel CPU per 3-minute MP3, a few per cent of its CPU, and a different count
    from one process to the next (docs/tuning.md). Here both thresholds are fixed, which also
    stops glibc adapting them: the mmap threshold at ``MMAP_THRESHOLD_BYTES`` (only the larger
    blocks of long files are mapped apart and given back) and the trim threshold at
    ``TRIM_THRESHOLD_BYTES``. The same analysis again then faults in next to nothing, another file
    of the same length about 200 pages. The peak RSS does not change; between analyses a slot
    holds 10-35 MB more after files of a few minutes, and no more after a 2-hour file.

    An operator's own malloc settings win: nothing is changed when the environment sets
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or a ``glibc.malloc`` tunable.

    Returns True when the thresholds were set; False where the C library has no ``mallopt`` (not
    glibc), refuses the values, or the environment configures malloc.
    """
    if not sys.platform.startswith("linux") or _malloc_configured():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(mapped and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def _malloc_configured() -> bool:
    """True when the environment configures glibc's malloc (its threshold variables or tunables)."""
    named = any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    return named or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def _initialize(progress_queue: ProgressQueue | None, parent_pid: int | None = None, nice: int = 0) -> None:
    """Pool process start-up: die with the parent, niceness raised by ``nice``, freed memory kept
    for reuse, single-threaded numerics, analyzers loaded once, progress queue kept."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    keep_freed_memory()
    if nice:
        os.nice(nice)
    # A terminal's Ctrl-C reaches the whole process group; the parent decides what stops (and
    # kills this process when it must), so the signal must not kill an analysis half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(SINGLE_THREADED_ENV)
    if "numpy" in sys.modules:
        # Loaded before this initializer: spawn ran the parent's script again first (a script that
        # imports numpy and starts a pool), and the BLAS thread pools exist already, sized by the
        # environment of that moment. Limit them where they are (threadpoolctl, scikit-learn's).
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)
    from analysis_service.audio.registry import build_registry

    global _PROGRESS_QUEUE, _REGISTRY
    _PROGRESS_QUEUE = progress_queue
    _REGISTRY = build_registry()


# Per pool process (set by the initializer): where progress goes, and the analyzers, whose
# entry-point scan costs ~20 ms and need not be repeated per file.
_PROGRESS_QUEUE: ProgressQueue | None = None
_REGISTRY: Any = None


@dataclass(frozen=True)
class _Probed:
    """The header :func:`inspect_file` read, kept for the analysis of the same file."""

    identity: FileIdentity
    settings: EngineSettings
    info: AudioInfo


# Per pool process: the last inspection's header, taken (and dropped) by the next analysis. One
# entry: a ~4 ms probe (container open, first-second decode) saved per request, no growth.
_PROBED: _Probed | None = None


def _identity(path: str) -> FileIdentity | None:
    """What identifies the file at ``path`` now (None: it cannot be stat'ed)."""
    try:
        return FileIdentity.of(path)
    except OSError:
        return None


def _take_probed(path: str, settings: EngineSettings) -> AudioInfo | None:
    """The header :func:`inspect_file` last read in this process, if it is of ``path``, checked
    against ``settings``, and the file is unchanged since; else None. Dropped either way."""
    global _PROBED
    probed, _PROBED = _PROBED, None
    if probed is None or probed.settings != settings:
        return None
    identity = _identity(path)
    return probed.info if identity is not None and identity == probed.identity else None


def run_analysis(
    path: str,
    *,
    settings: EngineSettings,
    analyses: list[str] | None = None,
    timeline: bool | None = None,
    progress_key: str | None = None,
    bpm_range: tuple[float, float] | None = None,
) -> EngineOutput:
    """Analyse one file inside a pool process (module-level so it pickles by reference).

    When the pool was created with a progress queue and ``progress_key`` is given, progress is
    reported as ``(progress_key, fraction, stage)`` tuples at most about four times a second.
    When this process's last :func:`inspect_file` read this file, unchanged since, with the same
    ``settings``, its header is used instead of probing the file again.
    """
    from analysis_service.audio.engine import analyze_file

    report: Callable[[float, str], None] | None = None
    queue = _PROGRESS_QUEUE
    if queue is not None and progress_key is not None:
        report = _throttled(queue, progress_key)
    return analyze_file(
        path,
        settings=settings,
        analyses=analyses,
        timeline=timeline,
        progress=report,
        registry=_REGISTRY,
        info=_take_probed(path, settings),
        bpm_range=bpm_range,
    )


def run_analysis_job(
    path: str,
    settings: EngineSettings,
    analyses: list[str] | None,
    timeline: bool | None,
    progress_key: str,
    bpm_range: tuple[float, float] | None = None,
) -> EngineOutput:
    """:func:`run_analysis` with positional arguments, as an executor submits a slot's job.

    Defined here, in the module every pool process imports at start: a job is pickled by
    reference, and one defined in the worker's modules would make each fresh process import the
    worker (its broker and store clients, ~0.5 s) inside its first analysis.
    """
    return run_analysis(
        path,
        settings=settings,
        analyses=analyses,
        timeline=timeline,
        progress_key=progress_key,
        bpm_range=bpm_range,
    )


@dataclass(frozen=True)
class FileFacts:
    """What :func:`inspect_file` learnt about a file, for the time limit and the result cache.

    Attributes
    ----------
    content_hash : str
        ``"sha256:<hex>"`` of the file's bytes.
    size_bytes : int
        File size.
    duration_s : float
        Duration according to the header (0.0 when it does not say).
    """

    content_hash: str
    size_bytes: int
    duration_s: float

    def duration_bound_s(self, *, max_duration_s: float, min_bytes_per_s: float = 1000.0) -> float:
        """Longest the audio can plausibly be: the header's duration, else what the file size
        allows at ``min_bytes_per_s`` (8 kbit/s), never more than ``max_duration_s`` (the decoder
        stops there)."""
        if self.duration_s > 0:
            return min(self.duration_s, max_duration_s)
        return min(self.size_bytes / min_bytes_per_s, max_duration_s)


def inspect_file(path: str, settings: EngineSettings) -> FileFacts:
    """Read and check a file's header and hash its bytes (in a pool process: the file is untrusted).

    Raises
    ------
    analysis_service.errors.AudioInputError
        What :func:`~analysis_service.audio.decode.probe` raises for a file that is not usable audio.

    Notes
    -----
    The header is kept in this process for the next :func:`run_analysis` (when the file did not
    change while it was read and hashed).
    """
    from analysis_service.audio.decode import content_hash, probe

    global _PROBED
    _PROBED = None
    before = _identity(path)
    info = probe(path, settings=settings)
    digest = content_hash(path)
    after = FileIdentity.of(path)  # raises OSError as os.stat did (the file went away meanwhile)
    if before is not None and before == after:
        _PROBED = _Probed(before, settings, info)
    return FileFacts(content_hash=digest, size_bytes=after.size, duration_s=info.duration_s)


def warm_up() -> None:
    """Run the whole analysis once on a short synthetic song (imports, FFT plans, caches), and import
    the decoders and the tag reader (PyAV, mutagen: about a second of imports a first request
    should not pay, nor have counted against its time limit)."""
    import analysis_service.audio.decode
    import analysis_service.audio.tags  # noqa: F401
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
    workers: int,
    *,
    max_tasks_per_child: int | None = None,
    progress_queue: ProgressQueue | None = None,
    nice: int = 0,
) -> ProcessPoolExecutor:
    """A spawn-started pool of ``workers`` warmed, single-threaded analysis processes, their
    niceness raised by ``nice`` (a lower CPU share than the processes at this one's)."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_initialize,
        initargs=(progress_queue, os.getpid(), nice),
        max_tasks_per_child=max_tasks_per_child,
    )


async def close_progress_queue(
    queue: ProgressQueue, pump: threading.Thread | None, *, wait_s: float = 2.0
) -> None:
    """Stop the thread that reads ``queue`` (it ends at a ``None``) and close the queue.

    An analysis process killed while it was writing to the queue (a time limit, Ctrl-C, the OOM
    killer) leaves the queue's shared write lock held for good. Then this process's own ``None``
    never leaves its feeder thread, the reader never ends, and the interpreter's exit would wait
    for that feeder forever. So the reader gets ``wait_s`` seconds, and if it is still running the
    queue is closed without waiting for its feeder (the ``None`` and any progress still buffered
    are dropped: only progress is lost).
    """
    queue.put(None)
    if pump is not None:
        await asyncio.to_thread(pump.join, wait_s)
    queue.close()
    if pump is not None and pump.is_alive():
        queue.cancel_join_thread()
    else:
        await asyncio.to_thread(queue.join_thread)
