"""Progress of an ``analyze`` run on stderr: live bars on a terminal, plain lines otherwise, or nothing.

The overall line counts files and audio: files done of all, hours of audio done of the (estimated)
total, throughput in multiples of real time and an ETA from the audio still to analyse. Each file in
flight gets its own bar with the engine's percent and stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn

#: Seconds between two plain progress lines (stderr not a terminal).
PLAIN_INTERVAL_S: Final = 10.0
#: Characters of a file name shown in its progress bar.
NAME_CHARS: Final = 40


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def short_name(name: str, chars: int = NAME_CHARS) -> str:
    """``name`` cut to ``chars`` characters, keeping its end (the extension and the distinctive part)."""
    return name if len(name) <= chars else "…" + name[-(chars - 1) :]


@dataclass
class InFlight:
    name: str
    duration_s: float | None
    fraction: float = 0.0
    stage: str = "queued"


@dataclass
class Stats:
    """Counters of a run, shared by the runner and the displays."""

    files_total: int
    done: int = 0
    reused: int = 0
    failed: int = 0
    scanned: int = 0  # files whose header was read (or known from the cache)
    known_audio_s: float = 0.0  # summed duration of the files whose duration is known
    known_files: int = 0
    done_audio_s: float = 0.0  # audio of finished files (analysed or reused)
    analysed_audio_s: float = 0.0  # audio of finished analyses (not reused)
    analysis_started: float | None = None  # monotonic time of the first analysis
    inflight: dict[str, InFlight] = field(default_factory=dict)

    def scanned_file(self, duration_s: float | None) -> None:
        self.scanned += 1
        if duration_s:
            self.known_files += 1
            self.known_audio_s += duration_s

    def total_audio_s(self) -> float:
        """Known audio plus, for files not read yet, the mean known duration each."""
        if not self.known_files:
            return 0.0
        unread = max(0, self.files_total - self.scanned)
        return self.known_audio_s + unread * self.known_audio_s / self.known_files

    def inflight_audio_s(self) -> float:
        return sum(f.fraction * (f.duration_s or 0.0) for f in self.inflight.values())

    def speed(self) -> float | None:
        """Audio seconds analysed per wall-clock second since the first analysis started."""
        if self.analysis_started is None:
            return None
        elapsed = time.monotonic() - self.analysis_started
        analysed = self.analysed_audio_s + self.inflight_audio_s()
        return analysed / elapsed if elapsed > 1.0 and analysed > 0 else None

    def eta_s(self) -> float | None:
        speed = self.speed()
        total = self.total_audio_s()
        if speed is None or not total:
            return None
        return max(0.0, total - self.done_audio_s - self.inflight_audio_s()) / speed

    def line(self) -> str:
        """``12/40 files (3 reused, 1 failed) · 0.52/2.10 h audio · 35x real time · ETA 3m12s``."""
        parts = [f"{self.done}/{self.files_total} files"]
        extra = [f"{self.reused} reused"] if self.reused else []
        extra += [f"{self.failed} failed"] if self.failed else []
        if extra:
            parts[0] += f" ({', '.join(extra)})"
        total = self.total_audio_s()
        if total:
            done = self.done_audio_s + self.inflight_audio_s()
            parts.append(f"{done / 3600:.2f}/{total / 3600:.2f} h audio")
        speed = self.speed()
        if speed is not None:
            parts.append(f"{speed:.0f}x real time")
        eta = self.eta_s()
        if eta is not None and self.done < self.files_total:
            parts.append(f"ETA {format_duration(eta)}")
        return " · ".join(parts)


class Display(Protocol):
    def start(self) -> None: ...
    def refresh(self) -> None: ...
    def file_started(self, key: str) -> None: ...
    def file_finished(self, key: str) -> None: ...
    def stop(self) -> None: ...


class QuietDisplay:
    """No progress (``--quiet``)."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def start(self) -> None:
        return None

    def refresh(self) -> None:
        return None

    def file_started(self, key: str) -> None:
        return None

    def file_finished(self, key: str) -> None:
        return None

    def stop(self) -> None:
        return None


class PlainDisplay(QuietDisplay):
    """A progress line every :data:`PLAIN_INTERVAL_S` seconds (stderr is a file or a pipe)."""

    def __init__(self, stats: Stats, console: Console) -> None:
        super().__init__(stats)
        self._console = console
        self._last = 0.0

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._last >= PLAIN_INTERVAL_S:
            self._last = now
            self._console.file.write(f"analyze: {self.stats.line()}\n")
            self._console.file.flush()

    def file_finished(self, key: str) -> None:
        self.refresh()


class LiveDisplay(QuietDisplay):
    """An overall bar and one bar per file in flight (stderr is a terminal)."""

    def __init__(self, stats: Stats, console: Console) -> None:
        super().__init__(stats)
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=24),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[info]}", markup=False),
            console=console,
            transient=True,
            refresh_per_second=4,
        )
        self._overall: TaskID | None = None
        self._tasks: dict[str, TaskID] = {}

    def start(self) -> None:
        self._progress.start()
        self._overall = self._progress.add_task("analyze", total=1.0, info=self.stats.line())

    def refresh(self) -> None:
        if self._overall is None:
            return
        s = self.stats
        total = s.total_audio_s()
        if total:
            fraction = (s.done_audio_s + s.inflight_audio_s()) / total
        else:
            fraction = s.done / max(1, s.files_total)
        self._progress.update(self._overall, completed=min(fraction, 1.0), info=s.line())
        for key, task in self._tasks.items():
            f = s.inflight.get(key)
            if f is not None:
                length = f" of {format_duration(f.duration_s)}" if f.duration_s else ""
                self._progress.update(task, completed=f.fraction, info=f"{f.stage}{length}")

    def file_started(self, key: str) -> None:
        f = self.stats.inflight[key]
        self._tasks[key] = self._progress.add_task(short_name(f.name), total=1.0, info=f.stage)
        self.refresh()

    def file_finished(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            self._progress.remove_task(task)
        self.refresh()

    def stop(self) -> None:
        self._progress.stop()
