"""``analysis-service analyze``: analyse local files in a process pool, no broker or database."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, as_completed, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from analysis_service.errors import AnalysisServiceError, WorkerCrashed
from analysis_service.pool import create_pool, run_analysis
from analysis_service.settings import EngineSettings
from service_shared.messages import EngineOutput

#: Extensions picked up when a folder is given (explicit files are analysed whatever their name).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff", ".wma", ".mp4"}
)


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file."""

    path: str
    output: EngineOutput | None = None
    error_code: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.output is not None

    def to_json(self) -> str:
        if self.output is not None:
            return json.dumps(
                {"path": self.path, "status": "completed", "output": self.output.model_dump(mode="json")}
            )
        return json.dumps(
            {"path": self.path, "status": "failed", "error": {"code": self.error_code, "message": self.error}}
        )


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files as given, and audio files (by extension) found recursively under folders, sorted."""
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
        else:
            yield p


def analyze_paths(
    files: list[Path],
    *,
    settings: EngineSettings,
    jobs: int,
    analyses: list[str] | None,
    timeline: bool | None,
    console: Console,
) -> Iterator[FileOutcome]:
    """Analyse ``files`` in a pool of ``jobs`` processes; yield outcomes as they finish.

    When a pool process dies (a codec crash, the OOM killer), every file still pending in that pool
    fails with it. Those files are analysed again, each in a fresh process of its own, so only the
    file that really kills its process is reported (``worker_crashed``).
    """
    with Progress(
        TextColumn("[bold]analyze"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("", total=len(files))
        crashed: list[Path] = []
        with create_pool(min(jobs, max(1, len(files)))) as pool:
            futures: dict[Future[EngineOutput], Path] = {
                pool.submit(run_analysis, str(f), settings=settings, analyses=analyses, timeline=timeline): f
                for f in files
            }
            for fut in as_completed(futures):
                if isinstance(fut.exception(), BrokenProcessPool):
                    crashed.append(futures[fut])
                    continue
                bar.update(task, advance=1, description=futures[fut].name)
                yield _outcome(str(futures[fut]), fut)
        for path in crashed:  # one fresh process per file: a crash takes down only its own file
            with create_pool(1) as pool:
                fut = pool.submit(
                    run_analysis, str(path), settings=settings, analyses=analyses, timeline=timeline
                )
                wait([fut])
            bar.update(task, advance=1, description=path.name)
            yield _outcome(str(path), fut)


def _outcome(path: str, fut: Future[EngineOutput]) -> FileOutcome:
    exc = fut.exception()
    if exc is None:
        return FileOutcome(path=path, output=fut.result())
    if isinstance(exc, AnalysisServiceError):
        return FileOutcome(path=path, error_code=exc.code, error=exc.message)
    if isinstance(exc, BrokenProcessPool):
        return FileOutcome(
            path=path,
            error_code=WorkerCrashed.code,
            error=f"the analysis process died while analysing this file (again, in a fresh process): {exc}",
        )
    # A bug or an unexpected library failure: report it for this file, keep going, and make the
    # run fail (exit status) so it is not mistaken for success.
    return FileOutcome(path=path, error_code="internal_error", error=f"{type(exc).__name__}: {exc}")


def _display_path(path: str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def render_table(outcomes: list[FileOutcome], console: Console) -> None:
    """Print a readable summary table of the outcomes."""
    table = Table(show_lines=False)
    for col in ("file", "duration", "bpm", "key", "camelot", "mood", "E/V/D", "time (s)", "error"):
        table.add_column(col, overflow="fold")
    for o in sorted(outcomes, key=lambda o: o.path):
        out = o.output
        name = _display_path(o.path)
        if out is None:
            table.add_row(name, "", "", "", "", "", "", "", f"[red]{o.error_code}[/red]: {o.error}")
            continue
        mood = out.mood
        table.add_row(
            name,
            f"{out.duration_s:.1f} s",
            f"{out.tempo.bpm:.1f}" if out.tempo else "",
            out.key.key if out.key else "",
            out.key.camelot if out.key else "",
            mood.label if mood else "",
            f"{mood.energy:.2f}/{mood.valence:.2f}/{mood.danceability:.2f}" if mood else "",
            f"{out.timings_s.get('total', 0.0):.2f}",
            "",
        )
        for seg in out.timeline or []:
            table.add_row(
                f"  {seg.start_s:7.1f}-{seg.end_s:7.1f} s",
                "",
                f"{seg.bpm or 0:.1f}",
                seg.key or "",
                "",
                "",
                "",
                "",
                "",
            )
    console.print(table)


def run(
    paths: list[Path],
    *,
    settings: EngineSettings,
    jobs: int,
    as_json: bool,
    analyses: list[str] | None,
    timeline: bool | None,
) -> int:
    """Entry of the command; returns the process exit status (0 all analysed, 1 any failed)."""
    err = Console(stderr=True)
    files = list(expand_paths(paths))
    if not files:
        err.print("[red]no audio files found[/red] in: " + ", ".join(map(str, paths)))
        return 2
    outcomes: list[FileOutcome] = []
    for outcome in analyze_paths(
        files, settings=settings, jobs=jobs, analyses=analyses, timeline=timeline, console=err
    ):
        outcomes.append(outcome)
        if as_json:
            sys.stdout.write(outcome.to_json() + "\n")
            sys.stdout.flush()
    if not as_json:
        render_table(outcomes, Console(width=None if sys.stdout.isatty() else 200))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        err.print(f"[red]{len(failed)} of {len(outcomes)} file(s) failed[/red]")
    return 1 if failed else 0
