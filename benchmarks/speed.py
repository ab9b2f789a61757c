#!/usr/bin/env python3
"""Speed benchmark: CPU per file, CPU per minute of audio, peak memory and cold start of the engine.

Generates its inputs once into the work folder (reused when present):

* ``song-3min.mp3``: :func:`analysis_service.audio.synth.demo_song`, 3 minutes at 44.1 kHz, stereo,
  encoded with PyAV's bundled LAME (192 kbit/s); the same song as FLAC, 16-bit WAV and AAC M4A
  (128 kbit/s) for the decoding figures;
* ``mix-2h.flac``: a 2-hour 44.1 kHz stereo "DJ mix" of twelve 10-minute demo songs at different
  tempi and keys, written in chunks with soundfile (never more than about a minute of audio in memory).

Then measures, with all three analyzers (bpm, key, mood), decoding included:

1. CPU seconds per 3-minute MP3 after warm-up: in process (median of ``--repeat`` runs) and through
   a fresh single-process spawn pool (the path of ``analyze`` and the worker), the latter with its
   kernel time and minor page faults (memory mapped and zeroed for the analysis);
2. CPU seconds for the 2-hour file, with its segment timeline (in a fresh process);
3. peak RSS (``VmHWM``) of a fresh process analysing the 3-minute file vs the 2-hour file;
4. cold start: fresh ``create_pool(1)`` to the first result, and ``warm_up`` alone;
5. decoding alone (``probe`` + ``iter_mono_blocks`` to 22.05 kHz mono) of the 3-minute song as
   MP3, FLAC, WAV and M4A: CPU seconds, median of ``--repeat``, the CPU of any child process
   included (``--decode-only`` runs just this).

    uv run python benchmarks/speed.py [--work .bench/speed] [--skip-long] [--repeat 5]
                                      [--profile] [--profile-long] [--profile-top 25] [--decode-only]

Numeric libraries run single-threaded (as in the pool), so CPU seconds are one core's seconds.
Nothing but the project's Python packages is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analysis_service.pool import SINGLE_THREADED_ENV

if TYPE_CHECKING:  # numpy and the engine are imported after the thread limits are set
    import numpy as np
    import numpy.typing as npt

    from analysis_service.settings import EngineSettings
    from service_shared.messages import EngineOutput

REPO = Path(__file__).resolve().parents[1]
SOURCE_RATE = 44100
SHORT_S = 180.0
LONG_SEGMENT_S = 600.0
#: (bpm, tonic pitch class, mode) of each 10-minute segment of the 2-hour mix.
LONG_PLAN: tuple[tuple[float, int, str], ...] = (
    (120.0, 0, "major"),
    (126.0, 9, "minor"),
    (100.0, 7, "major"),
    (140.0, 2, "minor"),
    (112.0, 5, "major"),
    (128.0, 4, "minor"),
    (96.0, 10, "major"),
    (134.0, 11, "minor"),
    (118.0, 3, "major"),
    (124.0, 6, "minor"),
    (105.0, 8, "major"),
    (130.0, 1, "minor"),
)
#: Each segment repeats a loop of a whole number of 4-bar phrases, about this long (seconds).
LOOP_TARGET_S = 60.0

_NOTES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")

TARGET_SHORT_CPU_S = 1.2
TARGET_LONG_CPU_S = 50.0
TARGET_RSS_DELTA_MB = 100.0
TARGET_COLD_START_S = 10.0

#: Run in a fresh interpreter: analyse ``argv[1]``; print CPU, wall, peak RSS and the output summary.
_CHILD = """
import json, resource, sys, time

def hwm_kb():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

from analysis_service.audio.engine import analyze_file
from analysis_service.settings import EngineSettings

settings = EngineSettings()
imports_kb = hwm_kb()
c0, t0 = time.process_time(), time.perf_counter()
out = analyze_file(sys.argv[1], settings=settings)
cpu, wall = time.process_time() - c0, time.perf_counter() - t0
print(json.dumps({
    "cpu_s": cpu, "wall_s": wall, "imports_kb": imports_kb, "peak_kb": hwm_kb(),
    "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "duration_s": out.duration_s, "segments": len(out.timeline or []),
    "timeline": [s.model_dump() for s in out.timeline or []], "timings_s": out.timings_s,
}))
"""


@dataclass(frozen=True)
class Figure:
    """One line of the summary: a measured value and, when it has one, its target."""

    name: str
    value: float
    unit: str
    target: float | None = None
    digits: int = 3

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.value < self.target else "FAIL"


# --------------------------------------------------------------------------------------------------
# Inputs


def _stereo(y: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A stereo pair from a mono signal (the right channel slightly quieter, so the channels differ)."""
    import numpy as np

    return np.stack([y, np.float32(0.9) * y], axis=1)


#: The 3-minute song in each format of the decoding figures: file name and encoder recipe
#: (:data:`analysis_service.audio.encode.RECIPES`).
SHORT_FORMATS = {"mp3": ("song-3min.mp3", "mp3"), "flac": ("song-3min.flac", "flac"),
                 "wav": ("song-3min.wav", "wav"), "m4a": ("song-3min.m4a", "m4a")}  # fmt: skip


def ensure_short(work: Path, fmt: str = "mp3") -> Path:
    """The 3-minute 44.1 kHz stereo song as ``fmt`` (made once)."""
    from analysis_service.audio.encode import write_audio
    from analysis_service.audio.synth import demo_song

    name, recipe = SHORT_FORMATS[fmt]
    target = work / name
    if target.exists():
        return target
    print(f"generating {target} ...", file=sys.stderr, flush=True)
    y = demo_song(bpm=124.0, tonic=9, mode="minor", seconds=SHORT_S, sample_rate=SOURCE_RATE)
    partial = target.with_name(f"part-{name}")
    write_audio(partial, _stereo(y), SOURCE_RATE, recipe)
    partial.replace(target)
    return target


def _loop_seconds(bpm: float) -> float:
    """A whole number of 4-bar phrases (16 beats) close to ``LOOP_TARGET_S``."""
    phrase_s = 16 * 60.0 / bpm
    return max(1, round(LOOP_TARGET_S / phrase_s)) * phrase_s


def _mix_chunks() -> Iterator[npt.NDArray[np.float32]]:
    """The 2-hour mix as consecutive stereo chunks of at most one loop (about a minute)."""
    from analysis_service.audio.synth import demo_song

    segment_n = int(LONG_SEGMENT_S * SOURCE_RATE)
    for i, (bpm, tonic, mode) in enumerate(LONG_PLAN):
        loop = demo_song(
            bpm=bpm,
            tonic=tonic,
            mode=mode,
            seconds=_loop_seconds(bpm),
            sample_rate=SOURCE_RATE,
            brightness=0.7 + 0.1 * (i % 5),
            seed=i,
        )
        left = segment_n
        while left > 0:
            chunk = loop[:left]
            left -= len(chunk)
            yield _stereo(chunk)


def ensure_long_flac(work: Path) -> Path:
    """The 2-hour 44.1 kHz stereo FLAC mix (made once, streamed to disk)."""
    flac = work / "mix-2h.flac"
    if flac.exists():
        return flac
    import soundfile as sf

    print(f"generating {flac} (2 hours, streamed) ...", file=sys.stderr, flush=True)
    partial = work / "mix-2h.part.flac"
    with sf.SoundFile(partial, "w", samplerate=SOURCE_RATE, channels=2, format="FLAC", subtype="PCM_16") as f:
        for chunk in _mix_chunks():
            f.write(chunk)
    partial.replace(flac)
    return flac


# --------------------------------------------------------------------------------------------------
# Measurements


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its reaped children (an ffmpeg subprocess, say)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def decode_cpu(path: Path, *, settings: EngineSettings, repeat: int) -> tuple[float, str]:
    """Median CPU seconds of ``probe`` + ``iter_mono_blocks`` over all of ``path``; the decoder used."""
    from analysis_service.audio.decode import iter_mono_blocks, probe

    def once() -> float:
        c0 = _cpu_with_children()
        info = probe(path, settings=settings)
        for _block in iter_mono_blocks(info, target_rate=settings.sample_rate):
            pass
        return _cpu_with_children() - c0

    once()
    runs = [once() for _ in range(repeat)]
    return statistics.median(runs), probe(path, settings=settings).decoder


def _median_runs(run: Callable[[], tuple[float, float]], repeat: int) -> tuple[float, float]:
    """Median CPU and wall seconds of ``repeat`` calls of ``run`` (each returns ``(cpu, wall)``)."""
    runs = [run() for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def in_process(path: Path, *, settings: EngineSettings, repeat: int) -> tuple[float, float, dict[str, float]]:
    """Median CPU and wall seconds of ``analyze_file`` in this process after a warm-up run.

    Also returns the median of each stage's wall time as the engine reports it (``timings_s``).
    """
    from analysis_service.audio.engine import analyze_file
    from analysis_service.pool import warm_up

    warm_up()
    analyze_file(path, settings=settings)
    stages: dict[str, list[float]] = {}

    def once() -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        out = analyze_file(path, settings=settings)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        for stage, seconds in out.timings_s.items():
            stages.setdefault(stage, []).append(seconds)
        return cpu, wall

    cpu, wall = _median_runs(once, repeat)
    return cpu, wall, {stage: statistics.median(v) for stage, v in stages.items()}


@dataclass(frozen=True)
class PoolCost:
    """What one analysis cost the pool process: CPU seconds, of which kernel (system) seconds, and
    minor page faults (memory the kernel mapped and zeroed for it)."""

    cpu_s: float
    system_s: float
    page_faults: int


def timed_analysis(path: str, *, settings: EngineSettings) -> tuple[PoolCost, EngineOutput]:
    """Pool-side: :func:`analysis_service.pool.run_analysis` and what it cost this process."""
    from analysis_service.pool import run_analysis

    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    out = run_analysis(path, settings=settings)
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    return PoolCost(c1 - c0, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt), out


def timed_warm_up() -> float:
    """Pool-side: wall seconds of :func:`analysis_service.pool.warm_up`."""
    from analysis_service.pool import warm_up

    t0 = time.perf_counter()
    warm_up()
    return time.perf_counter() - t0


def in_pool(path: Path, *, settings: EngineSettings, repeat: int) -> tuple[float, float, PoolCost]:
    """Median CPU seconds (in the pool process) and wall seconds (seen by the caller) per analysis
    in a fresh single-process spawn pool, after one discarded warm-up analysis; and the median of
    each part of :class:`PoolCost`."""
    from analysis_service.pool import create_pool

    costs: list[PoolCost] = []
    with create_pool(1) as pool:
        pool.submit(timed_analysis, str(path), settings=settings).result()

        def once() -> tuple[float, float]:
            t0 = time.perf_counter()
            cost, _ = pool.submit(timed_analysis, str(path), settings=settings).result()
            costs.append(cost)
            return cost.cpu_s, time.perf_counter() - t0

        cpu, wall = _median_runs(once, repeat)
    median = PoolCost(
        cpu,
        statistics.median(c.system_s for c in costs),
        round(statistics.median(c.page_faults for c in costs)),
    )
    return cpu, wall, median


@dataclass(frozen=True)
class ColdStart:
    first_result_s: float
    warm_up_s: float
    warmed_pool_s: float
    warmed_first_result_s: float


def cold_start(path: Path, *, settings: EngineSettings) -> ColdStart:
    """Fresh pools: creation to the first result (as ``analyze`` does it), and the worker's way
    (creation, ``warm_up``, then the first result)."""
    from analysis_service.pool import create_pool, run_analysis

    t0 = time.perf_counter()
    with create_pool(1) as pool:
        pool.submit(run_analysis, str(path), settings=settings).result()
        first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with create_pool(1) as pool:
        warm = pool.submit(timed_warm_up).result()
        warmed = time.perf_counter() - t0
        pool.submit(run_analysis, str(path), settings=settings).result()
        warmed_first = time.perf_counter() - t0 - warmed
    return ColdStart(first, warm, warmed, warmed_first)


def fresh_process(path: Path) -> dict[str, Any]:
    """Analyse ``path`` in a new interpreter (single-threaded numerics); its figures as a dict."""
    env = {**os.environ, **SINGLE_THREADED_ENV}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"speed.py: analysing {path} in a fresh process failed:\n{proc.stderr.strip()[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------------
# Profile


#: Hotspots reported by ``--profile``, indented under what includes them: a label, then
#: (file part, function) for the function's cumulative time (the largest, when several functions
#: share the name), or (file part, function, caller) for its calls from that caller only.
_HOTSPOTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("analyze_file (total)", ("engine.py", "analyze_file")),
    ("  probe (header, tags' counts, 1.5 s decode check)", ("decode.py", "probe")),
    ("  decode (all, rebuffered 10 s blocks)", ("decode.py", "_rebuffer")),
    ("    resample 44.1 -> 22.05 kHz + below", ("decode.py", "_resampled")),
    ("      PyAV decode + downmix", ("decode.py", "_decoded")),
    ("      libsndfile decode + downmix (PCM)", ("decode.py", "_soundfile_decoded")),
    ("  tags (mutagen)", ("tags.py", "read_tags")),
    ("  features (FeatureExtractor.push)", ("features.py", "push")),
    ("    framing + window (_Framer.push)", ("features.py", "push", "push")),
    ("    rhythm STFT 1024/256 (_rhythm_frames)", ("features.py", "_rhythm_frames")),
    ("      rfft", ("fft", "rfft", "_rhythm_frames")),
    ("    pitch STFT 8192/2048 (_pitch_frames)", ("features.py", "_pitch_frames")),
    ("      rfft", ("fft", "rfft", "_pitch_frames")),
    ("      harmonic peaks (_harmonic_peaks)", ("features.py", "_harmonic_peaks")),
    ("        median filter (3 frames)", ("ndimage", "median_filter", "_harmonic_peaks")),
    ("        uniform filter (15 bins)", ("ndimage", "uniform_filter1d", "_harmonic_peaks")),
    ("  tempo (estimate_tempo)", ("tempo.py", "estimate_tempo")),
    ("  key (estimate_key)", ("key.py", "estimate_key")),
    ("  mood (estimate_mood)", ("mood.py", "estimate_mood")),
    ("  timeline (estimate_timeline)", ("timeline.py", "estimate_timeline")),
    ("  output model (_output)", ("engine.py", "_output")),
)


def profile(path: Path, *, warm_path: Path, settings: EngineSettings, timeline: bool, top: int) -> None:
    """cProfile one in-process analysis of ``path`` (after one of ``warm_path``); print the
    hotspots and the top functions by cumulative time."""
    import cProfile
    import pstats

    from analysis_service.audio.engine import analyze_file
    from analysis_service.pool import warm_up

    warm_up()
    analyze_file(warm_path, settings=settings, timeline=timeline)
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    analyze_file(path, settings=settings, timeline=timeline)
    profiler.disable()
    stats = pstats.Stats(profiler)
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]

    def cumulative(spec: tuple[str, ...]) -> float | None:
        found = None
        for (file, _line, func), (_cc, _nc, _tt, ct, callers) in raw.items():
            if func != spec[1] or spec[0] not in file:
                continue
            if len(spec) == 2:
                found = max(found or 0.0, ct)
            else:
                for (_cfile, _cline, cfunc), edge in callers.items():
                    if cfunc == spec[2]:
                        found = (found or 0.0) + edge[3]
        return found

    print(f"\n== profile: one analysis of {path.name} (cProfile, CPU clock; timeline={timeline}) ==")
    for label, spec in _HOTSPOTS:
        seconds = cumulative(spec)
        if seconds is not None:
            print(f"  {label:<42} {seconds:7.3f} s")
    print(f"\n-- top {top} functions by cumulative time --")
    stats.sort_stats("cumulative").print_stats(top)


# --------------------------------------------------------------------------------------------------
# Report


def print_summary(figures: list[Figure]) -> None:
    width = max(len(f.name) for f in figures)
    print("\n== summary ==")
    print(f"{'figure':<{width}}  {'value':>10}  {'unit':<16} {'target':>10}  result")
    print("-" * (width + 50))
    for f in figures:
        target = f"< {f.target:g}" if f.target is not None else ""
        print(f"{f.name:<{width}}  {f.value:>10.{f.digits}f}  {f.unit:<16} {target:>10}  {f.verdict}")


def _mb(kb: float) -> float:
    return kb / 1024.0


def _rss_line(label: str, run: dict[str, Any]) -> str:
    return (
        f"{label} {_mb(run['peak_kb']):.1f} MB (after imports {_mb(run['imports_kb']):.1f} MB; "
        f"ru_maxrss {_mb(run['ru_maxrss_kb']):.1f} MB)"
    )


def decoding(work: Path, *, settings: EngineSettings, repeat: int) -> list[Figure]:
    """Section 5: CPU seconds to decode the 3-minute song in each format."""
    print(f"\n== 5. decoding alone: probe + iter_mono_blocks to {settings.sample_rate} Hz mono "
          f"(median of {repeat}) ==")  # fmt: skip
    figures = []
    for fmt in SHORT_FORMATS:
        cpu, decoder = decode_cpu(ensure_short(work, fmt), settings=settings, repeat=repeat)
        print(f"{fmt:<5} {cpu:.3f} s CPU ({decoder}), {SHORT_S / cpu:.0f}x real time")
        figures.append(Figure(f"decode 3-min {fmt.upper()}: CPU", cpu, f"CPU s ({decoder})"))
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".bench" / "speed", help="inputs are kept here")
    ap.add_argument("--skip-long", action="store_true", help="skip the 2-hour file (and its memory test)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one 3-minute analysis")
    ap.add_argument("--profile-long", action="store_true", help="also cProfile the 2-hour analysis")
    ap.add_argument("--profile-top", type=int, default=25, help="functions listed by --profile")
    ap.add_argument("--decode-only", action="store_true", help="only the decoding figures (section 5)")
    args = ap.parse_args()

    os.environ.update(SINGLE_THREADED_ENV)  # before numpy loads its BLAS: CPU seconds of one core
    args.work.mkdir(parents=True, exist_ok=True)
    from analysis_service.settings import EngineSettings

    settings = EngineSettings()
    if args.decode_only:
        print_summary(decoding(args.work, settings=settings, repeat=args.repeat))
        return
    short = ensure_short(args.work)
    long = None if args.skip_long else ensure_long_flac(args.work)
    nproc = os.cpu_count() or 1
    print(f"machine: {nproc} CPUs; inputs in {args.work}")
    figures: list[Figure] = []

    short_min = SHORT_S / 60.0
    cpu, wall, stages = in_process(short, settings=settings, repeat=args.repeat)
    print(f"\n== 1. 3-minute MP3, in process (median of {args.repeat} after warm-up) ==")
    print(f"CPU {cpu:.3f} s, wall {wall:.3f} s, {SHORT_S / cpu:.0f}x real time per core")
    print("stage wall times (s): " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
    figures += [
        Figure("3-min MP3: CPU per file (in process)", cpu, "CPU s", TARGET_SHORT_CPU_S),
        Figure("3-min MP3: CPU per audio minute per core", cpu / short_min, "CPU s / min"),
    ]
    pool_cpu, pool_wall, cost = in_pool(short, settings=settings, repeat=args.repeat)
    print(f"\n== 1b. 3-minute MP3, fresh 1-process spawn pool (median of {args.repeat} after warm-up) ==")
    print(
        f"CPU {pool_cpu:.3f} s in the pool process ({cost.system_s:.3f} s of it in the kernel, "
        f"{cost.page_faults} page faults), wall {pool_wall:.3f} s seen by the caller"
    )
    figures += [
        Figure("3-min MP3: CPU per file (pool)", pool_cpu, "CPU s", TARGET_SHORT_CPU_S),
        Figure("3-min MP3: kernel CPU per file (pool)", cost.system_s, "CPU s"),
        Figure("3-min MP3: page faults per file (pool)", cost.page_faults, "faults", digits=0),
        Figure("3-min MP3: wall per file (pool)", pool_wall, "s"),
    ]

    short_run = fresh_process(short)
    if long is not None:
        long_run = fresh_process(long)
        long_min = long_run["duration_s"] / 60.0
        print("\n== 2. 2-hour FLAC, fresh process, timeline included ==")
        print(
            f"CPU {long_run['cpu_s']:.2f} s, wall {long_run['wall_s']:.2f} s, "
            f"{long_run['duration_s'] / long_run['cpu_s']:.0f}x real time per core"
        )
        print("stage wall times (s): " + ", ".join(f"{k} {v:.3f}" for k, v in long_run["timings_s"].items()))
        print(f"timeline: {long_run['segments']} segments ({len(LONG_PLAN)} planned: bpm, key)")
        for start, (bpm, tonic, mode) in enumerate(LONG_PLAN):
            print(f"  planned {start * LONG_SEGMENT_S:7.1f} s  {bpm:6.1f} BPM  {_NOTES[tonic]} {mode}")
        for seg in long_run["timeline"]:
            print(
                f"  found   {seg['start_s']:7.1f}-{seg['end_s']:7.1f} s  {seg['bpm']:6.1f} BPM  {seg['key']}"
            )
        figures += [
            Figure("2-hour FLAC: CPU per file", long_run["cpu_s"], "CPU s", TARGET_LONG_CPU_S),
            Figure("2-hour FLAC: CPU per audio minute per core", long_run["cpu_s"] / long_min, "CPU s / min"),
            Figure(
                "2-hour FLAC: timeline segments",
                long_run["segments"],
                f"of {len(LONG_PLAN)} planned",
                digits=0,
            ),
        ]

    print("\n== 3. peak RSS (VmHWM) of a fresh process ==")
    print(_rss_line("3-minute MP3:", short_run))
    figures.append(Figure("peak RSS: 3-min MP3", _mb(short_run["peak_kb"]), "MB", digits=1))
    if long is not None:
        print(_rss_line("2-hour FLAC: ", long_run))
        delta = _mb(long_run["peak_kb"] - short_run["peak_kb"])
        print(f"difference:   {delta:+.1f} MB")
        figures += [
            Figure("peak RSS: 2-hour FLAC", _mb(long_run["peak_kb"]), "MB", digits=1),
            Figure("peak RSS: 2-hour minus 3-min", delta, "MB", TARGET_RSS_DELTA_MB, digits=1),
        ]

    cold = cold_start(short, settings=settings)
    print("\n== 4. cold start (fresh spawn pool) ==")
    print(f"create_pool(1) -> first result of the 3-minute MP3: {cold.first_result_s:.2f} s")
    print(
        f"worker's way: create_pool(1) -> warm_up done {cold.warmed_pool_s:.2f} s "
        f"(warm_up itself {cold.warm_up_s:.2f} s), then first result {cold.warmed_first_result_s:.2f} s"
    )
    figures += [
        Figure("cold start: create_pool -> first result", cold.first_result_s, "s", TARGET_COLD_START_S),
        Figure("cold start: warm_up alone (in the pool)", cold.warm_up_s, "s"),
        Figure("cold start: create_pool -> warmed", cold.warmed_pool_s, "s"),
    ]

    figures += decoding(args.work, settings=settings, repeat=args.repeat)
    if args.profile:
        profile(short, warm_path=short, settings=settings, timeline=False, top=args.profile_top)
    if args.profile_long and long is not None:
        profile(long, warm_path=short, settings=settings, timeline=True, top=args.profile_top)
    print_summary(figures)


if __name__ == "__main__":
    main()
