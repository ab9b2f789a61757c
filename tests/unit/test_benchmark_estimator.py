"""The throughput benchmark's estimator: a run is judged against the other kind at its own time."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"
    spec = importlib.util.spec_from_file_location("bench_throughput", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def run(throughput: ModuleType, mid: float, per_hour: float) -> Any:
    """A run of 101 tracks at ``per_hour`` whose steady span is centred on ``mid`` (wall clock)."""
    span = 100 * 3600.0 / per_hour
    return throughput.RunFigures(name="r", n=101, first_s=5.0, last_s=5.0 + span, t0=mid - 5.0 - span / 2)


def test_a_steady_drift_cancels(throughput: ModuleType) -> None:
    # The machine slows by 1 % a minute: the engine before and after a pipeline run that is
    # really 0.96 of the engine at its own time.
    def engine_rate(t: float) -> float:
        return 10_000.0 * (1 - 0.01 * t / 60)

    before = run(throughput, 30.0, engine_rate(30.0))
    after = run(throughput, 270.0, engine_rate(270.0))
    pipeline = run(throughput, 130.0, 0.96 * engine_rate(130.0))
    assert pipeline.mid == pytest.approx(130.0)
    ratio = pipeline.per_hour / throughput.rate_at(pipeline.mid, [after, before])
    assert ratio == pytest.approx(0.96, abs=1e-9)
    # The plain ratio to the run before would call it slower than it is.
    assert pipeline.per_hour / before.per_hour < 0.955


def test_outside_the_reference_runs_the_nearest_is_used(throughput: ModuleType) -> None:
    first = run(throughput, 0.0, 9_000.0)
    second = run(throughput, 100.0, 11_000.0)
    assert throughput.rate_at(-5.0, [first, second]) == pytest.approx(9_000.0)
    assert throughput.rate_at(500.0, [first, second]) == pytest.approx(11_000.0)
    assert throughput.rate_at(50.0, [first, second]) == pytest.approx(10_000.0)


@pytest.mark.parametrize("two", [True, False])
@pytest.mark.parametrize("rounds", [1, 2, 5])
def test_every_pipeline_run_has_its_reference_on_both_sides(
    throughput: ModuleType, rounds: int, *, two: bool
) -> None:
    schedule = throughput.run_schedule(rounds, two=two)
    reference = {"one": "engine", "two": "one"}
    for i, kind in enumerate(schedule):
        if kind in reference:
            assert reference[kind] in schedule[:i], (schedule, i)
            assert reference[kind] in schedule[i + 1 :], (schedule, i)
    assert schedule.count("one") == rounds + (1 if two else 0)
    assert schedule.count("two") == (rounds if two else 0)
    assert throughput.run_schedule(0, two=two) == []


def test_steady_cpu_is_read_between_the_first_and_the_last_completion(throughput: ModuleType) -> None:
    # Samples every second: a start-up burst of 3 s of analysis CPU before the first completion
    # (t = 2), then 1.5 s of analysis CPU and 0.1 s of main-process CPU per second.
    sampler = throughput.CpuSampler([7])
    sampler.timeline = [
        (100.0, {"slots 7": 0.0, "main 7": 0.0, "machine": 0.0}),
        (101.0, {"slots 7": 2.0, "main 7": 0.5, "machine": 2.0}),
        (102.0, {"slots 7": 3.0, "main 7": 0.6, "machine": 3.0}),
        *(
            (
                100.0 + t,
                {
                    "slots 7": 3.0 + 1.5 * (t - 2),
                    "main 7": 0.6 + 0.1 * (t - 2),
                    "machine": 3.0 + 1.6 * (t - 2),
                },
            )
            for t in range(3, 13)
        ),
    ]
    steady = throughput.steady_cpu(sampler, 100.0, 2.25, 10.6)
    assert steady["analysis processes"] == pytest.approx(1.5 * 8.35)
    assert steady["main process"] == pytest.approx(0.1 * 8.35)
    assert steady["machine"] == pytest.approx(1.6 * 8.35)
    # Inside the start-up burst (t = 1 .. 2: 1 s of analysis CPU a second) the interpolation holds.
    assert sampler.between(101.25, 101.75)["slots 7"] == pytest.approx(0.5)
    # Over the whole window the start-up burst would add 3 s to the analysis processes.
    assert sampler.between(100.0, 112.0)["slots 7"] == pytest.approx(18.0)


def test_cpu_before_a_process_was_found_is_spread_back_to_its_creation(throughput: ModuleType) -> None:
    # A slot process created at t = 101 is first found by the table walk at t = 104 with 3 s of
    # CPU: its work belongs to the seconds since its creation, not to the last interval.
    sampler = throughput.CpuSampler([7])
    sampler.timeline = [(100.0 + t, {"slots 7": 0.0}) for t in range(4)]
    sampler._backfill("slots 7", 3.0, 101.0, 104.0)
    sampler.timeline.append((104.0, {"slots 7": 3.0}))
    assert sampler.between(100.0, 101.0)["slots 7"] == pytest.approx(0.0)
    assert sampler.between(101.0, 103.0)["slots 7"] == pytest.approx(2.0)
    assert sampler.between(103.0, 104.0)["slots 7"] == pytest.approx(1.0)


def test_the_sampler_counts_a_real_process_tree(throughput: ModuleType) -> None:
    # A process that burns CPU, and a child of it found by a later table walk: the whole-window
    # figures and the timeline they are read from agree with what the processes spent.
    import subprocess

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    script = (  # the burning starts once the sampler runs (a line on stdin): all of it is inside
        f"import subprocess, sys, time\nsys.stdin.readline()\n{burn}"
        f"child = subprocess.Popen([sys.executable, '-c', {burn + 'time.sleep(0.8)'!r}])\n"
        "child.wait()\ntime.sleep(0.3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    with throughput.CpuSampler([proc.pid], interval=0.05) as sampler:
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.wait()
    # The kernel reports user and system time each in whole clock ticks (10 ms), truncated.
    tick = 2 * 0.01
    assert 0.3 - tick <= sampler.main_s(proc.pid) < 0.6
    assert 0.3 - tick <= sampler.children_s(proc.pid) < 0.6
    assert sampler.timeline[-1][1]["machine"] - sampler.timeline[0][1]["machine"] >= 0.6
