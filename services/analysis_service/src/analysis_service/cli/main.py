"""The ``analysis-service`` command line."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperOption

from analysis_service.cli.output import OutputFormat
from analysis_service.settings import Settings, available_cpus

app = typer.Typer(
    name="analysis-service",
    help="Audio analysis (BPM, key, mood): locally with `analyze`, or as a RabbitMQ `worker`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Process exit statuses.
EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _serve(main: Coroutine[Any, Any, int]) -> int:
    """Run a long-lived service (``worker``, ``api``) to its exit status, on uvloop where installed.

    uvloop (libuv's loop) runs the callbacks, socket reads and timers of the broker, PostgreSQL,
    Redis and Bolt clients in C: the worker's main process spends a third of its CPU per request
    in the event loop itself on asyncio's loop (docs/tuning.md). Where uvloop is not installed
    (Windows), asyncio's own loop runs it the same way.
    """
    import asyncio
    import contextlib

    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    with contextlib.suppress(ImportError):  # a platform without uvloop keeps asyncio's loop
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)


def _version(value: bool) -> None:
    if value:
        from analysis_service.cli.cache import package_version

        typer.echo(f"analysis-service {package_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Audio analysis (BPM, key, mood): locally with `analyze`, or as a RabbitMQ `worker`."""


def _analyzer_names() -> list[str]:
    from analysis_service.audio.registry import build_registry

    return sorted(build_registry())


def _parse_analyses(value: str | None) -> str | None:
    """Check ``--analyses`` against the installed analyzers (a usage error, before any work)."""
    if value is None:
        return None
    names = [a.strip() for a in value.split(",") if a.strip()]
    known = _analyzer_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise typer.BadParameter(
            f"unknown analyzer(s) {', '.join(map(repr, unknown))}; choose from {', '.join(known)}"
        )
    if not names:
        raise typer.BadParameter(f"names no analyzer; choose from {', '.join(known)}")
    return ",".join(names)


def _parse_bpm_range(value: str | None) -> str | None:
    """Check ``--bpm-range LOW-HIGH`` by the request contract's rule (a usage error, before any work)."""
    if value is None:
        return None
    _bpm_range(value)
    return value


def _bpm_range(value: str | None) -> tuple[float, float] | None:
    """``"88-175"`` as ``(88.0, 175.0)``, checked as a request's ``options.bpm_range`` is."""
    from pydantic import ValidationError

    from service_shared.messages import RequestOptions, bpm_range_from_text

    if value is None:
        return None
    try:
        checked = RequestOptions(bpm_range=bpm_range_from_text(value)).bpm_range
    except ValueError as exc:  # pydantic's ValidationError is one
        problems = (
            (e["msg"].removeprefix("Value error, ") for e in exc.errors())
            if isinstance(exc, ValidationError)
            else (str(exc),)
        )
        raise typer.BadParameter("; ".join(problems)) from None
    return checked


def _names(value: str | None) -> list[str] | None:
    return None if value is None else value.split(",")


class _AnalyzeCommand(TyperCommand):
    """``analyze``, whose --help lists the installed analyzers (loaded only when help is shown)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        for param in self.params:
            if param.name == "analyses" and isinstance(param, TyperOption):
                param.help = f"Comma-separated analyzers: {', '.join(_analyzer_names())} (default: all)."
        super().format_help(ctx, formatter)


@app.command(cls=_AnalyzeCommand)
def analyze(
    paths: Annotated[list[Path], typer.Argument(help="Audio files or folders (searched recursively).")],
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format", "-f", help="stdout: a table at the end, or JSON lines, CSV or TSV as files finish."
        ),
    ] = OutputFormat.TABLE,
    as_json: Annotated[
        bool, typer.Option("--json", help="Same as --format json (one JSON object per file).")
    ] = False,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Files analysed at once (default: CPUs).")
    ] = None,
    analyses: Annotated[
        str | None,
        typer.Option(
            "--analyses", help="Comma-separated analyzers (default: all).", callback=_parse_analyses
        ),
    ] = None,
    timeline: Annotated[
        bool | None,
        typer.Option("--timeline/--no-timeline", help="Force or suppress the segment timeline."),
    ] = None,
    bpm_range: Annotated[
        str | None,
        typer.Option(
            "--bpm-range",
            metavar="LOW-HIGH",
            help="Report each tempo at the octave within this range, as DJ applications do "
            "(88-175: drum & bass at 170; 78-155: at 85). Default: ANALYSIS_ENGINE__BPM_RANGE, else "
            "the level a listener most likely taps.",
            callback=_parse_bpm_range,
        ),
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            envvar="ANALYSIS_CLI_CACHE",
            help="Result cache file (SQLite). Default: results.sqlite3 in the user cache folder.",
            show_default=False,
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither reuse nor store results: analyse every file.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress and no summary (unless something failed).")
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include", metavar="GLOB", help="In folders, take only files matching this (repeatable)."
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", metavar="GLOB", help="Skip files and folders matching this (repeatable)."),
    ] = None,
    hidden: Annotated[
        bool, typer.Option("--hidden", help="Also take dot-files and dot-folders found in folders.")
    ] = False,
    follow_symlinks: Annotated[
        bool,
        typer.Option(
            "--follow-symlinks/--no-follow-symlinks", help="Follow symbolic links found in folders."
        ),
    ] = True,
) -> None:
    """Analyse local audio files in killable processes; no broker or database needed.

    Results already in the local cache (same bytes, same analyzer versions and options) are reused.
    Ctrl-C stops the run and prints what finished (exit 130); a second Ctrl-C exits at once. Each
    file has a time limit scaled by its duration (ANALYSIS_WORKER__TIME_LIMIT_*).
    """
    from analysis_service.audio.registry import build_registry, resolve
    from analysis_service.cli.analyze import Options, run
    from analysis_service.cli.cache import default_cache_path
    from analysis_service.cli.discover import Selection

    settings = _service_settings()
    names = _names(analyses)
    options = Options(
        engine=settings.engine,
        worker=settings.worker,
        jobs=jobs or available_cpus(),
        analyses=names,
        timeline=timeline,
        bpm_range=_bpm_range(bpm_range) or settings.engine.bpm_range,
        analyzer_versions={a.name: a.version for a in resolve(build_registry(), names)},
        output_format=OutputFormat.JSON if as_json else output_format,
        cache_path=None if no_cache else (cache or default_cache_path()),
        quiet=quiet,
        selection=Selection(
            include=tuple(include or ()),
            exclude=tuple(exclude or ()),
            hidden=hidden,
            follow_symlinks=follow_symlinks,
        ),
    )
    raise typer.Exit(run(paths, options))


def _worker_epilog() -> str:
    """Every setting, as its environment variable and default (shown by ``worker --help``)."""
    from analysis_service.cli.settings_view import describe_settings

    head = (
        "Configured by these environment variables (`analysis-service config` prints the effective values):"
    )
    return "\n\n".join([head, *describe_settings(Settings)])


#: Exit status of a service that cannot start (as the worker's EXIT_STARTUP_FAILED).
EXIT_CONFIG = 4


def _service_settings() -> Settings:
    """The settings of a command; an invalid configuration is one line on stderr, exit 4 (not a traceback)."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            (
                f"ANALYSIS_{'__'.join(str(p).upper() for p in e['loc'] if isinstance(p, str))}: "
                if e["loc"]
                else ""
            )
            + e["msg"]
            for e in exc.errors(include_url=False)
        )
        typer.echo(f"analysis-service: invalid configuration: {problems}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command(epilog=_worker_epilog())
def worker() -> None:
    """Consume analysis requests from RabbitMQ until SIGTERM/SIGINT (configured by ANALYSIS_* env)."""
    import asyncio
    import signal

    from analysis_service.worker.worker import Worker
    from service_shared.logging import configure_logging
    from service_shared.settings import warn_unknown_settings

    settings = _service_settings()
    configure_logging(service=settings.service_name, level=settings.log_level, fmt=settings.log_format)
    warn_unknown_settings(Settings)

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await Worker(settings).run(stop)

    raise typer.Exit(_serve(serve()))


@app.command()
def config(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
) -> None:
    """Print the effective settings (environment and defaults); passwords and URL credentials redacted."""
    from analysis_service.cli.cache import default_cache_path
    from analysis_service.cli.settings_view import effective_settings

    values = effective_settings(_service_settings())
    values["ANALYSIS_CLI_CACHE"] = os.environ.get("ANALYSIS_CLI_CACHE") or str(default_cache_path())
    if as_json:
        typer.echo(json.dumps(values, indent=2, sort_keys=True))
        return
    for name in sorted(values):
        typer.echo(f"{name}={values[name]}")


@app.command()
def demo(
    out: Annotated[Path, typer.Argument(help="Output file (.wav or .flac).")],
    bpm: Annotated[float, typer.Option(help="Tempo in BPM.")] = 124.0,
    key: Annotated[str, typer.Option(help='Key, e.g. "A minor" or "F# major".')] = "A minor",
    seconds: Annotated[float, typer.Option(help="Duration in seconds.")] = 30.0,
) -> None:
    """Write a synthetic clip with a known tempo and key (to try `analyze` on)."""
    import soundfile as sf

    from analysis_service.audio.key import NOTE_NAMES
    from analysis_service.audio.synth import demo_song

    names = {n.lower(): i for i, n in enumerate(NOTE_NAMES)} | {"db": 1, "d#": 3, "gb": 6, "g#": 8, "a#": 10}
    parts = key.split()
    if len(parts) != 2 or parts[0].lower() not in names or parts[1].lower() not in ("major", "minor"):
        raise typer.BadParameter(f"expected e.g. 'A minor' or 'F# major', got {key!r}", param_hint="--key")
    y = demo_song(
        bpm=bpm, tonic=names[parts[0].lower()], mode=parts[1].lower(), seconds=seconds, sample_rate=44100
    )
    sf.write(out, y, 44100)
    typer.echo(f"wrote {out}: {seconds:.0f} s at {bpm:g} BPM in {parts[0]} {parts[1].lower()}")


@app.command()
def schema(
    out_dir: Annotated[Path, typer.Argument(help="Folder for the JSON Schema files.")] = Path("docs/schemas"),
) -> None:
    """Write the JSON Schemas of the request and result messages, and the AsyncAPI document beside them."""
    from analysis_service.asyncapi import write_asyncapi
    from service_shared.messages import AnalysisRequest, AnalysisResultMessage

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in (("analysis_request", AnalysisRequest), ("analysis_result", AnalysisResultMessage)):
        path = out_dir / f"{name}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        typer.echo(f"wrote {path}")
    asyncapi = out_dir.parent / "asyncapi.yaml"
    write_asyncapi(asyncapi)
    typer.echo(f"wrote {asyncapi}")


def main() -> None:  # pragma: no cover - console entry point
    app()


@app.command()
def submit(
    paths: Annotated[
        list[Path], typer.Argument(help="Audio files (or folders) inside the worker's media root.")
    ],
    priority: Annotated[int, typer.Option(min=0, max=9, help="0 (lowest) to 9 (highest).")] = 5,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the requests until they finish.")] = False,
    analyses: Annotated[
        str | None, typer.Option("--analyses", help="Comma-separated analyses, e.g. bpm,key (default: all).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Seconds --wait waits before giving up.")
    ] = 3600.0,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="stdout: one JSON object per request (published, or with --wait its final state).",
        ),
    ] = False,
) -> None:
    """Queue analysis requests for the worker over RabbitMQ (and with --wait, follow them).

    Each path is checked first (inside the media root, exists, readable); a rejected path is
    reported, never sent, and makes the exit status 1.
    """
    from analysis_service.cli.submit import run

    settings = _service_settings()
    status = run(
        paths,
        settings=settings,
        priority=priority,
        wait=wait,
        analyses=[a.strip() for a in analyses.split(",") if a.strip()] if analyses else None,
        timeout_s=timeout,
        as_json=as_json,
    )
    raise typer.Exit(status)


@app.command()
def api() -> None:
    """Serve the job API (HTTP + WebSocket) until SIGTERM/SIGINT (configured by ANALYSIS_* env)."""

    from analysis_service.api import serve
    from service_shared.logging import configure_logging
    from service_shared.settings import warn_unknown_settings

    settings = _service_settings()
    configure_logging(
        service=f"{settings.service_name}-api", level=settings.log_level, fmt=settings.log_format
    )
    warn_unknown_settings(Settings)
    raise typer.Exit(_serve(serve(settings)))
