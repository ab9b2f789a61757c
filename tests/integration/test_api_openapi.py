"""Schemathesis against the OpenAPI document the running API serves: every response the server sends
(status code, content type, body schema, headers) must be one the document declares.

A real ``analysis-service api`` process is started on a free port against the real services (its own
database, Redis key prefix and request exchange/queue). Two kinds of cases:

* generated: schemathesis builds requests (valid and invalid) for every operation from the document
  (bounded by ``MAX_EXAMPLES`` per operation);
* seeded: every operation with a path parameter is also called with ids of jobs and batches that
  exist, in every status, so the success responses are checked too, not only the 404s.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from redis import Redis
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from analysis_service.api import create_app
from analysis_service.settings import ApiSettings, Settings
from tests.conftest import require_service
from tests.integration.conftest import (
    PG_HOST,
    PG_MAINTENANCE_DB,
    PG_PORT,
    PG_USER,
    RABBIT_URL,
    REDIS_URL,
    free_port,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

#: Generated examples per operation (x 12 operations: about a minute on 2 cores).
MAX_EXAMPLES = 20
KEY = "schemathesis-" + secrets.token_hex(8)
AUTH = {"Authorization": f"Bearer {KEY}"}
API_COMMAND = [sys.executable, "-m", "analysis_service.cli", "api"]
FILES = ["one.wav", "two.wav", "three.wav", "four.wav", "five.wav"]


@dataclass(frozen=True)
class Served:
    url: str
    jobs: dict[str, str]  # status -> job id
    batch_id: str


async def _setup(db: str, suffix: str) -> None:
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_MAINTENANCE_DB)
    try:
        await admin.execute(f'CREATE DATABASE "{db}"')
    finally:
        await admin.close()
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"test.oas.{suffix}", aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            f"test.oas.{suffix}", durable=True, arguments={"x-max-priority": 10}
        )
        await queue.bind(exchange, routing_key="analysis.request")
        await queue.bind(exchange, routing_key="analysis.request.urgent")  # priority 9


async def _teardown(db: str, suffix: str) -> None:
    admin = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_MAINTENANCE_DB)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    finally:
        await admin.close()
    connection = await aio_pika.connect(RABBIT_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"test.oas.{suffix}")
        await channel.exchange_delete(f"test.oas.{suffix}")


async def _simulate_worker(dsn: str, jobs: list[str]) -> None:
    """Move the seeded jobs to running / completed / failed / cancelled as a worker would."""
    pg = await asyncpg.connect(dsn)
    try:
        await pg.execute(
            "UPDATE requests SET status = 'running', attempts = 1, started_at = now() "
            "WHERE request_id = ANY($1)",
            jobs[1:],
        )
        for rid, status, code in (
            (jobs[2], "completed", None),
            (jobs[3], "failed", "not_audio"),
            (jobs[4], "cancelled", "cancelled"),
        ):
            file = await pg.fetchval("SELECT file FROM requests WHERE request_id = $1", rid)
            error = None if code is None else {"code": code, "message": f"{code} (seeded)"}
            output = (
                {
                    "duration_s": 60.0,
                    "source_sample_rate": 44100,
                    "source_channels": 2,
                    "format": "wav",
                    "tempo": {"bpm": 120.0, "confidence": 0.8},
                    "analyzer_versions": {"bpm": "1.1.0"},
                    "timings_s": {"total": 1.0},
                }
                if code is None
                else None
            )
            result = {
                "schema_version": 1,
                "request_id": rid,
                "status": "completed" if code is None else "failed",
                "file": file,
                "output": output,
                "error": error,
                "cached": False,
                "finished_at": "2026-01-01T00:00:00Z",
            }
            async with pg.transaction():
                await pg.execute(
                    "UPDATE requests SET status = $2, error_code = $3, finished_at = now() "
                    "WHERE request_id = $1",
                    rid,
                    status,
                    code,
                )
                await pg.execute(
                    "INSERT INTO analysis_results (request_id, status, file, error_code, error_message, "
                    "finished_at, result) VALUES ($1, $2, $3, $4, $5, now(), $6::jsonb)",
                    rid,
                    status,
                    file,
                    code,
                    error["message"] if error else None,
                    json.dumps(result),
                )
    finally:
        await pg.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    require_service("Redis", "127.0.0.1", 6379)
    require_service("RabbitMQ", "127.0.0.1", 5672)
    suffix = secrets.token_hex(6)
    db = f"analysis_test_{suffix}"
    dsn = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{db}"
    prefix = f"test-{suffix}"
    media = tmp_path_factory.mktemp("media")
    for name in FILES:
        (media / name).write_bytes(b"RIFF")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANALYSIS_")}
    env.update(
        {
            "ANALYSIS_POSTGRES__DSN": dsn,
            "ANALYSIS_REDIS__URL": REDIS_URL,
            "ANALYSIS_REDIS__KEY_PREFIX": prefix,
            "ANALYSIS_RABBITMQ__URL": RABBIT_URL,
            "ANALYSIS_RABBITMQ__REQUEST_EXCHANGE": f"test.oas.{suffix}",
            "ANALYSIS_RABBITMQ__REQUEST_QUEUE": f"test.oas.{suffix}",
            "ANALYSIS_WORKER__MEDIA_ROOT": str(media),
            "ANALYSIS_API__KEYS": f"{KEY},second-{suffix}",
            "ANALYSIS_API__HOST": "127.0.0.1",
            "ANALYSIS_API__PORT": str(port),
            "ANALYSIS_API__MAX_FILES": "20",
            "ANALYSIS_API__STREAM_POLL_S": "0.2",
            "ANALYSIS_LOG_FORMAT": "json",
        }
    )
    asyncio.run(_setup(db, suffix))
    log_path = tmp_path_factory.mktemp("api") / "api.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(API_COMMAND, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the API did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        submitted = httpx.post(f"{url}/v1/jobs", json={"files": FILES}, headers=AUTH, timeout=10)
        assert submitted.status_code == 202, submitted.text
        ids = [job["id"] for job in submitted.json()["jobs"]]
        asyncio.run(_simulate_worker(dsn, ids))
        redis = Redis.from_url(REDIS_URL)
        progress: dict[Any, Any] = {"status": "running", "percent": "42", "stage": "features"}
        redis.hset(f"{prefix}:progress:{ids[1]}", mapping=progress)
        redis.close()
        statuses = ("queued", "running", "completed", "failed", "cancelled")
        yield Served(url, dict(zip(statuses, ids, strict=True)), submitted.json()["batch_id"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        asyncio.run(_teardown(db, suffix))
        redis = Redis.from_url(REDIS_URL)
        keys = list(redis.scan_iter(match=f"{prefix}:*"))
        if keys:
            redis.delete(*keys)
        redis.close()
    log_text = log_path.read_text(errors="replace")
    assert KEY not in log_text, "an API key was logged"
    assert process.returncode == 0, log_text[-2000:]
    assert '"event": "api stopped"' in log_text


@pytest.fixture(scope="module")
def api_schema(served: Served) -> Any:
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json")


def _cases() -> list[tuple[str, str, GenerationMode]]:
    """``(METHOD, path, mode)`` for every documented operation (from the application, no I/O):
    valid requests for all, invalid ones for those that take parameters or a body."""
    app = create_app(Settings(_env_file=None, api=ApiSettings(keys="collect-only")))
    cases = []
    for path, item in app.openapi()["paths"].items():
        for method, operation in item.items():
            cases.append((method.upper(), path, GenerationMode.POSITIVE))
            if operation.get("parameters") or operation.get("requestBody"):
                cases.append((method.upper(), path, GenerationMode.NEGATIVE))
    return cases


#: Operations whose schema-valid requests may be refused by design (the document cannot say it):
#: a submission naming a file that does not exist or lies outside the media root (422), a list
#: request with a cursor the server never handed out (400).
MAY_REFUSE_VALID = {("POST", "/v1/jobs"), ("GET", "/v1/jobs")}


@pytest.mark.parametrize(("method", "path", "mode"), _cases())
def test_generated_requests_get_documented_responses(
    api_schema: Any, method: str, path: str, mode: GenerationMode
) -> None:
    """Schemathesis' checks (status code, content type, body schema and headers are documented; no
    5xx; invalid data refused; auth enforced) on generated requests, valid and invalid."""
    operation = api_schema[path][method]

    # The examples are the same at every run (derandomize): schemathesis' negative mode also makes
    # mutations that do not change what is sent, and then reports the 200 as accepted invalid data
    # (seen once at random: a nullable query string "made an array" of one item, which is sent as
    # the same string, with the Authorization header "removed" and put back by ``headers=AUTH``).
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
        database=None,
        derandomize=True,
    )
    def check(case: Any) -> None:
        case.call_and_validate(headers=AUTH, timeout=10, excluded_checks=excluded)

    excluded = [positive_data_acceptance] if (method, path) in MAY_REFUSE_VALID else []

    check()


def test_seeded_ids_get_documented_responses(api_schema: Any, served: Served) -> None:
    """Every operation with a path parameter, called with real ids in every status."""
    checked = 0
    for operation in api_schema.get_all_operations():
        op = operation.ok()
        params = [p.name for p in op.path_parameters]
        if not params:
            continue
        if "job_id" in params:
            values = [{"job_id": job_id} for job_id in served.jobs.values()]
        else:
            values = [{"batch_id": served.batch_id}]
        for path_parameters in values:
            if op.path.endswith("/events") and path_parameters.get("job_id") in (
                served.jobs["queued"],
                served.jobs["running"],
            ):
                continue  # a live job's stream only ends with its outcome
            case = op.Case(path_parameters=path_parameters, headers=AUTH)
            response = case.call_and_validate(headers=AUTH, timeout=10)
            assert response.status_code < 500
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ANALYSIS_API__KEYS": ""}, "no API key configured"),
        (
            {"ANALYSIS_API__KEYS": "k", "ANALYSIS_POSTGRES__DSN": "postgresql://postgres@127.0.0.1:{port}/x"},
            "PostgreSQL",
        ),
    ],
)
def test_start_up_failure_is_one_log_line_and_exit_1(env: dict[str, str], expected: str) -> None:
    closed = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANALYSIS_")}
    environment |= {k: v.format(port=closed) for k, v in env.items()}
    environment["ANALYSIS_LOG_FORMAT"] = "json"
    done = subprocess.run(
        API_COMMAND, env=environment, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    (failure,) = [line for line in lines if line["level"] == "error"]
    assert failure["event"] == "api cannot start"
    assert expected in json.dumps(failure)
    assert "Traceback" not in done.stderr
