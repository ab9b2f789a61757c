"""``analysis-service analyze``: analyse local files, no broker or database.

The run is an asyncio loop over :class:`~analysis_service.worker.slots.SlotPool`: one process per
slot, so a file that runs past its time limit (scaled by its duration, as in the worker) has its own
process killed and is reported as ``analysis_timeout`` while the other files go on, and an
interruption stops the running files at once.

Flow per file: its ``stat`` identity is looked up in the local result cache (:mod:`.cache`); an
unknown or changed file is hashed and its header read in a separate scanner process (:mod:`.scan`);
a cached output for the same bytes and configuration is reused; otherwise the file is queued for a
slot. Outputs go to stdout as they finish (JSON lines, CSV, TSV) or as a table at the end; progress
goes to stderr.

Interruption (Ctrl-C, SIGTERM): the first stops handing out work, drops the queued files, kills the
running analyses, prints what finished and a summary line, and exits 130; a second exits at once
(:mod:`.interrupt`). A closed stdout (``| head``) stops the run the same way, silently (status 141,
as a process killed by SIGPIPE).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from rich.console import Console
from rich.markup import escape

from analysis_service.cli.cache import ResultCache, config_digest
from analysis_service.cli.discover import AUDIO_EXTENSIONS, Interrupted, Selection, expand_paths
from analysis_service.cli.interrupt import EXIT_INTERRUPTED, Interrupts
from analysis_service.cli.output import FileOutcome, OutputFormat, OutputSink
from analysis_service.cli.progress import (
    Display,
    InFlight,
    LiveDisplay,
    PlainDisplay,
    QuietDisplay,
    Stats,
    format_duration,
)
from analysis_service.cli.scan import ScanFailed, Scanner, ScanResult
from analysis_service.errors import AnalysisServiceError, WorkerCrashed
from analysis_service.media import FileIdentity
from analysis_service.pool import close_progress_queue
from analysis_service.settings import EngineSettings, WorkerSettings
from service_shared.messages import EngineOutput

__all__ = ["AUDIO_EXTENSIONS", "FileOutcome", "Options", "expand_paths", "run"]

EXIT_OK: Final = 0
EXIT_FAILURES: Final = 1
EXIT_USAGE: Final = 2
#: A closed stdout (the reader of a pipe went away), as for a process killed by SIGPIPE.
EXIT_BROKEN_PIPE: Final = 141
#: Longest a file's hash and header may take to read (a slow disk: 2 GB at 20 MB/s).
SCAN_TIME_LIMIT_S: Final = 120.0


@dataclass(frozen=True)
class Options:
    """Everything an ``analyze`` run needs besides the paths."""

    engine: EngineSettings
    worker: WorkerSettings
    jobs: int
    analyses: list[str] | None
    timeline: bool | None
    analyzer_versions: dict[str, str]
    output_format: OutputFormat = OutputFormat.TABLE
    bpm_range: tuple[float, float] | None = None
    cache_path: Path | None = None  # None: no cache
    quiet: bool = False
    selection: Selection | None = None


def time_limit_s(worker: WorkerSettings, duration_s: float | None) -> float:
    """A file's time limit as in the worker: base + per audio minute, capped (the cap when unknown)."""
    if duration_s is None:
        return worker.time_limit_max_s
    return min(
        worker.time_limit_max_s,
        worker.time_limit_base_s + worker.time_limit_per_audio_minute_s * duration_s / 60,
    )


@dataclass
class _Job:
    key: str
    path: Path
    duration_s: float | None
    content_hash: str | None


class _Stop(Exception):
    """Raised inside the run when it must end early (interrupted, or stdout closed)."""


class Runner:
    """One ``analyze`` run (see the module docstring)."""

    def __init__(
        self,
        files: list[Path],
        options: Options,
        *,
        sink: OutputSink,
        display: Display,
        stats: Stats,
        cache: ResultCache | None,
    ) -> None:
        self.files = files
        self.options = options
        self.sink = sink
        self.display = display
        self.stats = stats
        self.cache = cache
        self.config = config_digest(
            analyzer_versions=options.analyzer_versions,
            analyses=options.analyses,
            timeline=options.timeline,
            bpm_range=options.bpm_range,
            sample_rate=options.engine.sample_rate,
            timeline_threshold_s=options.engine.timeline_threshold_s,
        )
        self.broken_pipe = False
        self.fatal: str | None = None
        self.interrupted = False
        self.outcomes: list[FileOutcome] = []
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._pool: Any = None
        self._pool_started: asyncio.Task[Any] | None = None
        self._progress_queue: Any = None
        self._pump: threading.Thread | None = None
        self._scanner = Scanner(
            options.engine, time_limit_s=max(SCAN_TIME_LIMIT_S, options.worker.time_limit_base_s)
        )
        self._work: asyncio.Task[None] | None = None
        self._slots = max(1, min(options.jobs, len(files)))

    # ------------------------------------------------------------------ the run

    async def run(self, interrupts: Interrupts) -> None:
        """Analyse every file, or stop early at an interruption or a closed stdout."""
        loop = asyncio.get_running_loop()
        self._work = asyncio.create_task(self._run_all())
        interrupts.attach(loop, self._on_interrupt)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._work
        finally:
            interrupts.detach()
            await self._close()

    def _on_interrupt(self) -> None:
        self.interrupted = True
        if self._work is not None:
            self._work.cancel()

    async def _run_all(self) -> None:
        consumers = [asyncio.create_task(self._consume()) for _ in range(self._slots)]
        try:
            await self._prepare_all()
            for _ in consumers:
                self._queue.put_nowait(None)
            await asyncio.gather(*consumers)
        except _Stop:
            pass
        finally:
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)

    async def _close(self) -> None:
        self._scanner.close()
        if self._pool_started is not None:
            self._pool_started.cancel()
            await asyncio.gather(self._pool_started, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
        if self._progress_queue is not None:
            await close_progress_queue(self._progress_queue, self._pump)

    # ------------------------------------------------------------------ preparing files

    def _needs_analysis(self) -> bool:
        """Whether any file lacks a cached result (then the slots start at once, while files are read)."""
        if self.cache is None:
            return True
        for path in self.files:
            try:
                known = self.cache.known_file(FileIdentity.of(path))
            except OSError:
                continue  # reported as missing without a slot
            if known is None or self.cache.get(known.content_hash, self.config) is None:
                return True
        return False

    async def _prepare_all(self) -> None:
        if self._needs_analysis():
            self._ensure_pool()
        for index, path in enumerate(self.files):
            job = await self._prepare(str(index), path)
            self.display.refresh()
            if job is not None:
                self._ensure_pool()
                self._queue.put_nowait(job)

    async def _prepare(self, key: str, path: Path) -> _Job | None:
        """Hash and duration (from the cache or the scanner); emit a reused or refused file at once."""
        identity: FileIdentity | None = None
        known = None
        if self.cache is not None:
            with contextlib.suppress(OSError):  # a missing file: the scanner reports it precisely
                identity = FileIdentity.of(path)
                known = self.cache.known_file(identity)
        if known is not None:
            scan = ScanResult(content_hash=known.content_hash, duration_s=known.duration_s)
        else:
            try:
                scan = await self._scanner.scan(str(path), hash_content=self.cache is not None)
            except ScanFailed:
                # The analysis gets its chance (in a slot, with its own limit); nothing is cached.
                self.stats.scanned_file(None)
                return _Job(key, path, None, None)
            if self.cache is not None and identity is not None and scan.content_hash is not None:
                self.cache.remember_file(identity, scan.content_hash, scan.duration_s)
        self.stats.scanned_file(scan.duration_s)
        if scan.error_code is not None:
            self._emit(FileOutcome(str(path), error_code=scan.error_code, error=scan.error), None)
            return None
        if self.cache is not None and scan.content_hash is not None:
            cached = self.cache.get(scan.content_hash, self.config)
            if cached is not None:
                self._emit(FileOutcome(str(path), output=cached, cached=True), cached.duration_s)
                return None
        return _Job(key, path, scan.duration_s, scan.content_hash)

    # ------------------------------------------------------------------ analysing

    def _ensure_pool(self) -> None:
        if self._pool_started is None:
            self._pool_started = asyncio.create_task(self._start_pool())

    async def _start_pool(self) -> Any:
        from analysis_service.worker.slots import SlotPool

        ctx = multiprocessing.get_context("spawn")
        self._progress_queue = ctx.Queue()
        loop = asyncio.get_running_loop()
        self._pump = threading.Thread(
            target=_pump, args=(loop, self._progress_queue, self._on_progress), name="progress", daemon=True
        )
        self._pump.start()
        self._pool = SlotPool(
            self._slots,
            max_tasks_per_child=self.options.worker.max_tasks_per_child,
            progress_queue=self._progress_queue,
        )
        await self._pool.start()
        return self._pool

    def _on_progress(self, key: str, fraction: float, stage: str) -> None:
        f = self.stats.inflight.get(key)
        if f is not None:
            f.fraction, f.stage = min(fraction, 1.0), stage
            self.display.refresh()

    async def _consume(self) -> None:
        while (job := await self._queue.get()) is not None:
            assert self._pool_started is not None
            try:
                pool = await asyncio.shield(self._pool_started)
            except Exception as exc:  # e.g. an analyzer plugin that fails to import
                self.fatal = f"the analysis processes could not start: {type(exc).__name__}: {exc}"
                assert self._work is not None
                self._work.cancel()
                raise
            self.stats.inflight[job.key] = InFlight(job.path.name, job.duration_s)
            if self.stats.analysis_started is None:
                self.stats.analysis_started = time.monotonic()
            self.display.file_started(job.key)
            try:
                outcome = await self._analyse(pool, job)
            finally:
                self.stats.inflight.pop(job.key, None)
                self.display.file_finished(job.key)
            if outcome.output is not None:
                self.stats.analysed_audio_s += outcome.output.duration_s
                if self.cache is not None and job.content_hash is not None:
                    self.cache.put(job.content_hash, self.config, outcome.output)
            self._emit(outcome, outcome.output.duration_s if outcome.output else job.duration_s)

    async def _analyse(self, pool: Any, job: _Job) -> FileOutcome:
        """Analyse in a slot within the file's time limit; a crashed process gets one more try."""
        limit = time_limit_s(self.options.worker, job.duration_s)
        attempts = 1 + self.options.worker.crash_retries
        for attempt in range(1, attempts + 1):
            try:
                output: EngineOutput = await pool.analyze(
                    str(job.path),
                    settings=self.options.engine,
                    analyses=self.options.analyses,
                    timeline=self.options.timeline,
                    progress_key=job.key,
                    time_limit_s=limit,
                    bpm_range=self.options.bpm_range,
                )
            except WorkerCrashed as exc:
                if attempt < attempts:
                    continue
                return FileOutcome(
                    str(job.path),
                    error_code=exc.code,
                    error=f"{exc.message} (on each of {attempts} attempts, each in a fresh process)",
                )
            except AnalysisServiceError as exc:
                return FileOutcome(str(job.path), error_code=exc.code, error=exc.message)
            except Exception as exc:  # a bug or an unexpected library failure: this file fails, loudly
                return FileOutcome(
                    str(job.path), error_code="internal_error", error=f"{type(exc).__name__}: {exc}"
                )
            return FileOutcome(str(job.path), output=output)
        raise AssertionError("unreachable: the last attempt returns")

    # ------------------------------------------------------------------ results

    def _emit(self, outcome: FileOutcome, duration_s: float | None) -> None:
        self.outcomes.append(outcome)
        s = self.stats
        s.done += 1
        s.reused += outcome.cached
        s.failed += not outcome.ok
        s.done_audio_s += duration_s or 0.0
        try:
            self.sink.add(outcome)
        except BrokenPipeError:
            self.broken_pipe = True
            raise _Stop from None
        self.display.refresh()


def _pump(loop: asyncio.AbstractEventLoop, queue: Any, callback: Any) -> None:
    """Thread: forward ``(key, fraction, stage)`` from the analysis processes to the loop."""
    while (item := queue.get()) is not None:
        try:
            loop.call_soon_threadsafe(callback, *item)
        except RuntimeError:  # the loop closed: the run is over
            return


# ---------------------------------------------------------------------- entry


def _open_cache(path: Path | None, err: Console) -> ResultCache | None:
    if path is None:
        return None
    try:
        return ResultCache(path)
    except (sqlite3.Error, OSError) as exc:
        err.print(
            f"[yellow]warning:[/yellow] result cache {escape(str(path))} unusable ({escape(str(exc))}); "
            "analysing without it (--cache PATH picks another, --no-cache silences this)",
            highlight=False,
        )
        return None


def _summary(runner: Runner, stats: Stats, elapsed_s: float, cache: ResultCache | None) -> str:
    analysed = stats.done - stats.reused - stats.failed
    parts = [f"{analysed} analysed"]
    if cache is not None:
        parts.append(f"{stats.reused} reused from the cache")
    if stats.failed:
        parts.append(f"{stats.failed} failed")
    text = ", ".join(parts)
    if runner.interrupted:
        text = f"interrupted: {stats.done} of {stats.files_total} files done ({text}); " + (
            f"{stats.files_total - stats.done} not analysed"
        )
    else:
        text = f"{stats.files_total} file{'s' if stats.files_total != 1 else ''}: {text}"
    audio = stats.done_audio_s
    text += f"; {audio / 3600:.2f} h of audio in {format_duration(elapsed_s)}"
    speed = stats.analysed_audio_s / elapsed_s if elapsed_s > 0 else 0.0
    if stats.analysed_audio_s:
        text += f" ({speed:.0f}x real time)"
    return text


def _quiet_logs() -> None:
    """Library logs (e.g. the slot pool's "process replaced") only from errors up, and on stderr.

    stdout carries the results; what the logs would say (a timeout, a crash) is in the file's outcome.
    """
    import logging

    import structlog

    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
    )


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on a closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def run(paths: list[Path], options: Options, *, stdout: IO[str] | None = None) -> int:
    """Entry of the command; returns the exit status.

    Returns
    -------
    int
        0 all analysed, 1 any failed, 2 nothing to analyse, 130 interrupted, 141 stdout closed.
    """
    out = stdout or sys.stdout
    err = Console(stderr=True, highlight=False)
    _quiet_logs()
    with Interrupts() as interrupts:
        selection = dataclasses.replace(options.selection or Selection(), stop=interrupts.event)
        try:
            files = list(expand_paths(paths, selection))
        except Interrupted:
            err.print("interrupted while searching for files")
            return EXIT_INTERRUPTED
        for warning in selection.warnings:
            err.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        if not files:
            err.print("[red]no audio files found[/red] in: " + escape(", ".join(map(str, paths))))
            return EXIT_USAGE
        terminal = out.isatty()
        width = os.get_terminal_size(out.fileno()).columns if terminal else None
        sink = OutputSink(options.output_format, out, width=width, terminal=terminal)
        stats = Stats(files_total=len(files))
        display: Display
        if options.quiet:
            display = QuietDisplay(stats)
        elif err.is_terminal:
            display = LiveDisplay(stats, err)
        else:
            display = PlainDisplay(stats, err)
        cache = _open_cache(options.cache_path, err)
        runner = Runner(files, options, sink=sink, display=display, stats=stats, cache=cache)
        started = time.monotonic()
        display.start()
        try:
            asyncio.run(runner.run(interrupts))
        finally:
            display.stop()
            if cache is not None:
                cache.close()
        if runner.fatal is not None:
            err.print(f"[red]error:[/red] {escape(runner.fatal)}", soft_wrap=True)
            sink.finish()
            return EXIT_FAILURES
        if runner.broken_pipe:
            _quiet_stdout()
            return EXIT_BROKEN_PIPE
        try:
            sink.finish()
        except BrokenPipeError:
            _quiet_stdout()
            return EXIT_BROKEN_PIPE
        summary = _summary(runner, stats, time.monotonic() - started, cache)
        if not options.quiet or stats.failed or runner.interrupted:
            err.print(escape(summary), soft_wrap=True)
        if runner.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FAILURES if stats.failed else EXIT_OK
