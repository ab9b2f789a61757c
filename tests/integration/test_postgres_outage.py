"""PostgreSQL stopped while a worker commits an outcome: the request is not lost, nor stored twice.

Uses a private PostgreSQL (``initdb`` + ``pg_ctl`` on a free port in a temporary directory), never
the shared one: the test stops and restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from analysis_service.settings import Neo4jSettings, PostgresSettings, RedisSettings, Settings
from service_shared.messages import ResultStatus
from tests.integration.conftest import free_port
from tests.integration.test_worker import pg_rows
from tests.integration.worker_harness import Broker, make_settings, running_worker, write_song

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class PrivatePostgres:
    """A throw-away PostgreSQL cluster that the test may stop and start."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        found = found or ([p] if (p := shutil.which("pg_ctl")) else [])
        if not found:
            if os.environ.get("CI"):
                pytest.fail("pg_ctl (PostgreSQL server binaries) is not installed; CI requires it")
            pytest.skip("pg_ctl (PostgreSQL server binaries) is not installed")
        self.bin = Path(found[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="private-pg-"))
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust", "-N")
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.dir / "data"), "-o", options, "-l", str(self.dir / "log"), "-w", "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.remove()


_SLOW_COMMIT = """
CREATE FUNCTION slow_insert() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NEW; END $$
LANGUAGE plpgsql;
CREATE TRIGGER slow_insert BEFORE INSERT ON analysis_results FOR EACH ROW EXECUTE FUNCTION slow_insert();
"""

#: The slow trigger is sleeping: the statement that stores the outcome is under way.
_COMMITTING = """
SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND wait_event = 'PgSleep'
"""


async def test_postgres_stopped_during_the_commit_loses_nothing(
    tmp_path: Path,
    rabbit_url: str,
    redis_settings: RedisSettings,
    bolt_server: Neo4jSettings,
    private_pg: PrivatePostgres,
) -> None:
    settings: Settings = make_settings(
        tmp_path,
        rabbit_url=rabbit_url,
        pg_dsn=private_pg.dsn,
        redis=redis_settings,
        graph=bolt_server,
        concurrency=1,
    )
    settings = settings.model_copy(
        update={
            "postgres": PostgresSettings(dsn=private_pg.dsn, command_timeout_s=5.0),
            "worker": settings.worker.model_copy(update={"persist_deadline_s": 4.0}),
        }
    )
    write_song(settings.worker.media_root / "a.wav", seconds=6.0)
    async with Broker(settings) as broker, running_worker(settings) as worker:
        setup = await asyncpg.connect(private_pg.dsn)  # the worker has migrated: the table exists
        await setup.execute(_SLOW_COMMIT)
        await setup.close()
        await broker.publish({"request_id": "pg-stop", "file": "a.wav"})
        conn = await asyncpg.connect(private_pg.dsn)
        try:
            deadline = time.monotonic() + 30
            while await conn.fetchval(_COMMITTING) == 0:
                assert time.monotonic() < deadline, "the outcome was never being committed"
                await asyncio.sleep(0.05)
        finally:
            await conn.close(timeout=2)
        await asyncio.to_thread(private_pg.stop)  # fast: the committing transaction is cut off
        await asyncio.sleep(2.0)
        await asyncio.to_thread(private_pg.start)
        [result] = await broker.results(1, timeout_s=60)
        await asyncio.sleep(1.5)
        extra = await broker.drain_now(settings.rabbitmq.results_queue)
        dead = await broker.depth(settings.rabbitmq.dead_letter_queue)
        requeued = worker.counters["requeued"]
    assert result.status is ResultStatus.COMPLETED, result.error
    assert extra == []
    assert dead == 0
    assert requeued >= 1
    rows = await pg_rows(private_pg.dsn, "SELECT status FROM analysis_results WHERE request_id = 'pg-stop'")
    assert [r["status"] for r in rows] == ["completed"]
    ledger = await pg_rows(private_pg.dsn, "SELECT status FROM requests WHERE request_id = 'pg-stop'")
    assert [r["status"] for r in ledger] == ["completed"]
