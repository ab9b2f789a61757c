"""The pool's jobs in process: a slot probes a file once per request (inspection, then analysis)."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

import analysis_service.audio.decode
import analysis_service.audio.engine
from analysis_service.audio.synth import demo_song
from analysis_service.pool import (
    create_pool,
    inspect_file,
    keep_freed_memory,
    run_analysis,
    run_analysis_job,
    warm_up,
)
from analysis_service.settings import EngineSettings

SETTINGS = EngineSettings()


def write(path: Path, *, rate: int = 22050, bpm: float = 120.0, seconds: float = 4.0) -> Path:
    sf.write(path, demo_song(bpm=bpm, tonic=9, mode="minor", seconds=seconds, sample_rate=rate), rate)
    return path


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``probe`` is called with, wherever it is called from."""
    calls: list[str] = []
    real: Callable[..., Any] = analysis_service.audio.decode.probe

    def counting(path: Any, **kwargs: Any) -> Any:
        calls.append(os.fspath(path))
        return real(path, **kwargs)

    monkeypatch.setattr(analysis_service.audio.decode, "probe", counting)
    monkeypatch.setattr(analysis_service.audio.engine, "probe", counting)
    return calls


def analyse(path: Path, settings: EngineSettings = SETTINGS) -> Any:
    """What a worker's slot runs after :func:`inspect_file` (the same function, in process)."""
    return run_analysis_job(str(path), settings, ["bpm"], None, "req-1")


def test_a_request_probes_its_file_once(tmp_path: Path, probes: list[str]) -> None:
    path = str(write(tmp_path / "a.wav"))
    facts = inspect_file(path, SETTINGS)
    out = analyse(Path(path))
    assert probes == [path]
    assert out.duration_s == pytest.approx(facts.duration_s, abs=0.01)
    assert out.source_sample_rate == 22050
    # The inspection's header is used once: a second analysis of the file probes it again.
    analyse(Path(path))
    assert probes == [path, path]


def test_a_file_replaced_after_its_inspection_is_probed_again(tmp_path: Path, probes: list[str]) -> None:
    path = write(tmp_path / "a.wav")
    inspect_file(str(path), SETTINGS)
    os.replace(write(tmp_path / "b.wav", rate=44100), path)
    out = analyse(path)
    assert probes == [str(path), str(path)]
    assert out.source_sample_rate == 44100


def test_a_file_rewritten_in_place_is_probed_again(tmp_path: Path, probes: list[str]) -> None:
    """Same inode, same size, new content: its modification time tells."""
    path = write(tmp_path / "a.wav", bpm=120.0)
    inspect_file(str(path), SETTINGS)
    before = path.stat()
    with path.open("r+b") as fh:  # in place: keeps the inode
        fh.write(write(tmp_path / "b.wav", bpm=90.0).read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    after = path.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    analyse(path)
    assert probes == [str(path), str(path)]


def test_other_settings_or_another_file_are_probed(tmp_path: Path, probes: list[str]) -> None:
    a, b = str(write(tmp_path / "a.wav")), str(write(tmp_path / "b.wav"))
    inspect_file(a, SETTINGS)
    analyse(Path(a), EngineSettings(max_duration_s=600.0))  # the header was checked against others
    inspect_file(a, SETTINGS)
    analyse(Path(b))
    assert probes == [a, a, a, b]


def test_the_command_line_path_probes_as_before(tmp_path: Path, probes: list[str]) -> None:
    """``analyze`` inspects files in another process: its slot's analysis probes the file itself."""
    path = str(write(tmp_path / "a.wav"))
    run_analysis(path, settings=SETTINGS, analyses=["bpm"])
    assert probes == [path]


def test_a_slot_process_runs_the_worker_s_jobs_without_importing_the_worker(tmp_path: Path) -> None:
    """The jobs a worker sends its slots are found in modules a slot process imported at start.

    A job is pickled by reference: a job defined in the worker's pipeline made each fresh process
    import the pipeline (the broker and store clients, ~0.5 s of CPU) inside its first analysis,
    which a request then waited for (an urgent slot's first request among them).
    """
    path = str(write(tmp_path / "a.wav"))
    executor = create_pool(1)
    try:
        executor.submit(warm_up).result()
        executor.submit(inspect_file, path, SETTINGS).result()
        executor.submit(run_analysis_job, path, SETTINGS, ["bpm"], None, "req-1").result()
        imported = executor.submit(
            eval, "sorted(set(__import__('sys').modules) & {'aio_pika', 'asyncpg', 'neo4j'})"
        )
        assert imported.result() == []
    finally:
        executor.shutdown()


_EMBEDDING_SCRIPT = """
import numpy  # loaded first, as a user's own script may: spawn runs this file again in each slot

from analysis_service.pool import create_pool


def blas_threads():
    import threadpoolctl

    return sorted({pool["num_threads"] for pool in threadpoolctl.threadpool_info()})


if __name__ == "__main__":
    executor = create_pool(1)
    try:
        print(executor.submit(blas_threads).result())
    finally:
        executor.shutdown()
"""


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1) < 2,
    reason="OpenBLAS never starts more threads than the CPUs it may use: with one, it cannot fail",
)
def test_a_slot_is_single_threaded_even_when_numpy_loaded_before_its_initializer(tmp_path: Path) -> None:
    """A script that imports numpy and starts the pool: each spawned slot runs the script again
    before the pool's initializer, so numpy's BLAS starts its threads before the initializer's
    environment can say one. With one BLAS thread per core in every slot, slots on a busy host
    spin against each other (a traced benchmark worker paid 1.7 s of CPU per analysis instead of
    0.35). The environment asks for 4 threads (OpenBLAS takes at most one per CPU), so on any
    machine with two CPUs or more the test fails if the limit is not applied."""
    script = tmp_path / "embedding.py"
    script.write_text(_EMBEDDING_SCRIPT)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "4", "OMP_NUM_THREADS": "4"}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1]"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's malloc's")
def test_a_slot_reuses_the_memory_its_analyses_free(tmp_path: Path) -> None:
    """An analysis allocates and frees arrays of up to tens of MB. With glibc's defaults a slot
    gave much of that back to the kernel after each analysis (a freed block above the adaptive mmap
    threshold is unmapped, the heap's free top is trimmed), and faulted it in again, zeroed, in
    the next: 6,200-12,800 page faults and 12-24 ms of kernel CPU per 3-minute track. A slot keeps
    it: once its heap has grown to an analysis's size, the same analysis again faults in next to
    nothing (about 4,500 pages for this 60 s file with the defaults, about 20 now)."""
    path = str(write(tmp_path / "a.wav", seconds=60.0))
    executor = create_pool(1)
    try:

        def page_faults() -> int:
            return int(executor.submit(resource.getrusage, resource.RUSAGE_SELF).result().ru_minflt)

        executor.submit(run_analysis_job, path, SETTINGS, None, None, "req-1").result()
        before = page_faults()
        for _ in range(3):
            executor.submit(run_analysis_job, path, SETTINGS, None, None, "req-1").result()
        per_analysis = (page_faults() - before) / 3
    finally:
        executor.shutdown()
    assert per_analysis < 500, per_analysis


def test_an_operator_s_own_malloc_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds set through glibc's environment variables or tunables are the operator's choice."""
    for name, value in (
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("MALLOC_TRIM_THRESHOLD_", "131072"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
    ):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert keep_freed_memory() is False
