"""Reading what ``analyze`` needs before analysing a file: its content hash and duration.

The hash keys the result cache; the duration gives the file's time limit and the ETA. Both are read
in a separate, killable process (:class:`Scanner`), never in the command's own process: reading a
header means parsing the file (libsndfile, ffprobe), and a file that crashes or hangs a parser must
cost only that file, not the run. A file whose header is refused (not audio, too long, ...) fails
here with the same error the engine would give, without occupying an analysis process.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from analysis_service.errors import AnalysisServiceError
from analysis_service.settings import EngineSettings


@dataclass(frozen=True)
class ScanResult:
    """A file's content hash and header duration, or why its header was refused."""

    content_hash: str | None = None
    duration_s: float | None = None
    error_code: str | None = None
    error: str | None = None


def scan_file(path: str, *, settings: EngineSettings, hash_content: bool) -> ScanResult:
    """Hash ``path`` (when ``hash_content``) and read its header (runs in the scanner process).

    Parameters
    ----------
    path : str
        The file.
    settings : EngineSettings
        The limits the header is checked against (as in the engine).
    hash_content : bool
        Compute the SHA-256 of the bytes (for the result cache).

    Returns
    -------
    ScanResult
        The hash and duration (s), or the error code and message of a refused file.
    """
    from analysis_service.audio.decode import content_hash, probe

    digest: str | None = None
    try:
        if hash_content:
            digest = content_hash(path)
        info = probe(path, settings=settings)
    except AnalysisServiceError as exc:
        return ScanResult(content_hash=digest, error_code=exc.code, error=exc.message)
    return ScanResult(content_hash=digest, duration_s=info.duration_s or None)


class ScanFailed(Exception):
    """The scanner process died or ran past its time limit on a file (it was killed and replaced)."""


class Scanner:
    """One spawn-started process that runs :func:`scan_file`, killed and replaced when it misbehaves.

    Parameters
    ----------
    settings : EngineSettings
        Passed to :func:`scan_file`.
    time_limit_s : float
        Longest a file's scan may take.
    """

    def __init__(self, settings: EngineSettings, *, time_limit_s: float) -> None:
        self._settings = settings
        self._time_limit_s = time_limit_s
        self._executor: ProcessPoolExecutor | None = None

    async def _pool(self) -> ProcessPoolExecutor:
        """The scanner process, started (and its imports done) outside any file's time limit."""
        if self._executor is None:
            executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            try:
                await asyncio.get_running_loop().run_in_executor(executor, _ready)
            except BaseException:
                kill_executor(executor)
                raise
            self._executor = executor
        return self._executor

    async def scan(self, path: str, *, hash_content: bool) -> ScanResult:
        """Scan ``path`` in the scanner process.

        Raises
        ------
        ScanFailed
            The process died or the scan ran past the time limit; the process was killed.
        """
        loop = asyncio.get_running_loop()
        try:
            pool = await self._pool()
        except BrokenProcessPool as exc:
            raise ScanFailed(f"the process reading file headers did not start: {exc}") from exc
        future = loop.run_in_executor(pool, _call, path, self._settings, hash_content)
        try:
            return await asyncio.wait_for(future, timeout=self._time_limit_s)
        except TimeoutError:
            self.close()
            raise ScanFailed(f"reading the file's header took over {self._time_limit_s:g} s") from None
        except BrokenProcessPool as exc:
            self.close()
            raise ScanFailed(f"the process reading the file's header died: {exc}") from exc
        except asyncio.CancelledError:
            self.close()
            raise

    def close(self) -> None:
        """Kill the scanner process (a new one starts on the next scan). Idempotent."""
        executor, self._executor = self._executor, None
        if executor is not None:
            kill_executor(executor)


def _ready() -> None:
    import analysis_service.audio.decode  # noqa: F401  (the import is the point: done before any limit)


def _call(path: str, settings: EngineSettings, hash_content: bool) -> ScanResult:
    return scan_file(path, settings=settings, hash_content=hash_content)


def kill_executor(executor: ProcessPoolExecutor) -> None:
    """Kill a process pool's processes at once and drop it (its pending futures fail)."""
    processes = dict(getattr(executor, "_processes", None) or {})
    for process in processes.values():
        if process.is_alive():
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes.values():
        process.join(timeout=5)
