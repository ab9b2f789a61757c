"""What ``analyze`` prints on stdout: JSON lines, CSV, TSV (streamed as files finish) or a table.

File names and error texts are printed verbatim: nothing here goes through rich markup, so a file
named ``[red] x.wav`` appears as it is.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # importing the message models costs ~1 s; the command line imports this module
    from service_shared.messages import EngineOutput


class OutputFormat(StrEnum):
    """``--format`` values."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"
    TSV = "tsv"


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file."""

    path: str
    output: EngineOutput | None = None
    error_code: str | None = None
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.output is not None

    def to_json(self) -> str:
        if self.output is not None:
            return json.dumps(
                {
                    "path": self.path,
                    "status": "completed",
                    "cached": self.cached,
                    "output": self.output.model_dump(mode="json"),
                },
                ensure_ascii=False,
            )
        return json.dumps(
            {
                "path": self.path,
                "status": "failed",
                "error": {"code": self.error_code, "message": self.error},
            },
            ensure_ascii=False,
        )


#: Columns of the CSV and TSV output.
CSV_COLUMNS: Final = (
    "path",
    "status",
    "duration_s",
    "bpm",
    "key",
    "camelot",
    "mood",
    "energy",
    "valence",
    "danceability",
    "cached",
    "error_code",
    "error",
)


def csv_row(outcome: FileOutcome) -> list[str]:
    """One CSV/TSV row (see :data:`CSV_COLUMNS`)."""
    out = outcome.output
    if out is None:
        return [
            outcome.path,
            "failed",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            outcome.error_code or "",
            outcome.error or "",
        ]
    mood = out.mood
    return [
        outcome.path,
        "completed",
        f"{out.duration_s:.2f}",
        f"{out.tempo.bpm:.2f}" if out.tempo else "",
        out.key.key if out.key else "",
        out.key.camelot if out.key else "",
        mood.label if mood else "",
        f"{mood.energy:.3f}" if mood else "",
        f"{mood.valence:.3f}" if mood else "",
        f"{mood.danceability:.3f}" if mood else "",
        "true" if outcome.cached else "false",
        "",
        "",
    ]


class OutputSink:
    """Writes outcomes to ``stream`` in one format; streamed formats write each outcome at once.

    ``BrokenPipeError`` from the stream (the reader went away, e.g. ``| head``) is left to the caller.
    """

    def __init__(self, fmt: OutputFormat, stream: IO[str], *, width: int | None, terminal: bool) -> None:
        self.format = fmt
        self._stream = stream
        self._width = width
        self._terminal = terminal
        self._outcomes: list[FileOutcome] = []
        self._writer: csv.writer | None = None  # type: ignore[valid-type]
        if fmt in (OutputFormat.CSV, OutputFormat.TSV):
            self._writer = csv.writer(
                stream, dialect="excel-tab" if fmt == OutputFormat.TSV else "excel", lineterminator="\n"
            )

    def add(self, outcome: FileOutcome) -> None:
        """Record one outcome (and write it now unless the format is a table)."""
        self._outcomes.append(outcome)
        if self.format == OutputFormat.JSON:
            self._stream.write(outcome.to_json() + "\n")
        elif self._writer is not None:
            if len(self._outcomes) == 1:
                self._writer.writerow(CSV_COLUMNS)
            self._writer.writerow(csv_row(outcome))
        else:
            return
        self._stream.flush()

    def finish(self) -> None:
        """Print the table (for the table format) of what was recorded, sorted by path."""
        if self.format != OutputFormat.TABLE or not self._outcomes:
            return
        rows = table_rows(self._outcomes)
        if self._terminal:
            console = Console(file=self._stream, width=self._width, force_terminal=True, highlight=False)
            console.print(rich_table(rows))
        else:
            self._stream.write(plain_table(rows))
        self._stream.flush()


TABLE_COLUMNS: Final = ("file", "duration", "bpm", "key", "camelot", "mood", "E/V/D", "time (s)", "error")


def _display_path(path: str) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return path


def table_rows(outcomes: list[FileOutcome]) -> list[tuple[list[str], bool]]:
    """Table cells per row (and whether the row is an error), sorted by path; timeline rows indented."""
    rows: list[tuple[list[str], bool]] = []
    for o in sorted(outcomes, key=lambda o: o.path):
        out = o.output
        name = _display_path(o.path)
        if out is None:
            rows.append(([name, "", "", "", "", "", "", "", f"{o.error_code}: {o.error}"], True))
            continue
        mood = out.mood
        rows.append(
            (
                [
                    name,
                    f"{out.duration_s:.1f} s",
                    f"{out.tempo.bpm:.1f}" if out.tempo else "",
                    out.key.key if out.key else "",
                    out.key.camelot if out.key else "",
                    mood.label if mood else "",
                    f"{mood.energy:.2f}/{mood.valence:.2f}/{mood.danceability:.2f}" if mood else "",
                    "cached" if o.cached else f"{out.timings_s.get('total', 0.0):.2f}",
                    "",
                ],
                False,
            )
        )
        for seg in out.timeline or []:
            cells = [f"  {seg.start_s:7.1f}-{seg.end_s:7.1f} s", "", f"{seg.bpm or 0:.1f}", seg.key or ""]
            rows.append(([*cells, "", "", "", "", ""], False))
    return rows


def rich_table(rows: list[tuple[list[str], bool]]) -> Table:
    """A table for a terminal (sized by rich to its width); cells are plain text, never markup."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for col in TABLE_COLUMNS:
        table.add_column(col, overflow="fold")
    for cells, failed in rows:
        table.add_row(
            *(Text(c, style="red" if failed and i == len(cells) - 1 else "") for i, c in enumerate(cells))
        )
    return table


def plain_table(rows: list[tuple[list[str], bool]]) -> str:
    """Columns padded with spaces, no box drawing and no wrapping (for files and pipes)."""
    used = [i for i in range(len(TABLE_COLUMNS)) if i == 0 or any(cells[i] for cells, _ in rows)]
    widths = {i: max(len(TABLE_COLUMNS[i]), *(len(cells[i]) for cells, _ in rows)) for i in used}
    buffer = io.StringIO()
    lines = [[TABLE_COLUMNS[i] for i in used], *([cells[i] for i in used] for cells, _ in rows)]
    for line in lines:
        text = "  ".join(cell.ljust(widths[i]) for i, cell in zip(used, line, strict=True))
        buffer.write(text.rstrip() + "\n")
    return buffer.getvalue()
