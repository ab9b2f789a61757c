"""The ``analysis-service`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

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


@app.command()
def analyze(
    paths: Annotated[list[Path], typer.Argument(help="Audio files or folders (searched recursively).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per file.")] = False,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Processes (default: CPUs).")
    ] = None,
    analyses: Annotated[
        str | None, typer.Option("--analyses", help="Comma-separated analyzers (default: all).")
    ] = None,
    timeline: Annotated[
        bool | None,
        typer.Option("--timeline/--no-timeline", help="Force or suppress the segment timeline."),
    ] = None,
) -> None:
    """Analyse local audio files in a process pool; no broker or database needed."""
    from analysis_service.cli.analyze import run

    settings = Settings()
    status = run(
        paths,
        settings=settings.engine,
        jobs=jobs or available_cpus(),
        as_json=as_json,
        analyses=[a.strip() for a in analyses.split(",") if a.strip()] if analyses else None,
        timeline=timeline,
    )
    raise typer.Exit(status)


@app.command()
def worker() -> None:
    """Consume analysis requests from RabbitMQ until SIGTERM/SIGINT (configured by ANALYSIS_* env)."""
    import asyncio
    import signal

    from analysis_service.worker.worker import Worker
    from service_shared.logging import configure_logging

    settings = Settings()
    configure_logging(service=settings.service_name, level=settings.log_level, fmt=settings.log_format)

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await Worker(settings).run(stop)

    raise typer.Exit(asyncio.run(serve()))


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
    """Write the JSON Schemas of the request and result messages."""
    from service_shared.messages import AnalysisRequest, AnalysisResultMessage

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, model in (("analysis_request", AnalysisRequest), ("analysis_result", AnalysisResultMessage)):
        path = out_dir / f"{name}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        typer.echo(f"wrote {path}")


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
) -> None:
    """Queue analysis requests for the worker over RabbitMQ (and with --wait, follow them)."""
    from analysis_service.cli.submit import run

    settings = Settings()
    status = run(
        paths,
        settings=settings,
        priority=priority,
        wait=wait,
        analyses=[a.strip() for a in analyses.split(",") if a.strip()] if analyses else None,
        timeout_s=timeout,
    )
    raise typer.Exit(status)


@app.command()
def api() -> None:
    """Serve the job API (HTTP + WebSocket) until SIGTERM/SIGINT (configured by ANALYSIS_* env)."""
    import asyncio

    from analysis_service.api import serve
    from service_shared.logging import configure_logging

    settings = Settings()
    configure_logging(
        service=f"{settings.service_name}-api", level=settings.log_level, fmt=settings.log_format
    )
    raise typer.Exit(asyncio.run(serve(settings)))
