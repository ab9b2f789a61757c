"""Helpers for the job API tests: a stack of real services, and the worker's side simulated.

The worker's side is what the ledger's rules say a worker does: move a row to ``running``, write
progress to Redis (with the worker's own :class:`ProgressStore`, which also publishes it), and
store a terminal outcome (``analysis_results`` row with the full result message, then the
``requests`` row, guarded by ``status IN ('queued', 'running')``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import uvicorn
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from fastapi import FastAPI

from analysis_service.api.app import Resources, create_app
from analysis_service.settings import (
    ApiSettings,
    PostgresSettings,
    RabbitSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)
from analysis_service.sinks.progress import ProgressStatus, ProgressStore
from service_shared.messages import AnalysisResultMessage, EngineOutput, ErrorInfo, ResultStatus, TempoResult
from tests.integration.broker_names import unique_settings

KEYS = ("key-one-" + secrets.token_hex(8), "key-two-" + secrets.token_hex(8))
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


def rabbit_settings_for(url: str) -> RabbitSettings:
    """Uniquely named exchanges and queues on the shared broker."""
    return unique_settings(url, results_queue="", publish_timeout_s=5.0)


async def declare_requests(
    channel: AbstractChannel, settings: RabbitSettings, *, bound: bool
) -> AbstractQueue | None:
    """The request exchange, and (``bound``) a priority queue bound like the worker's."""
    exchange = await channel.declare_exchange(
        settings.request_exchange, aio_pika.ExchangeType.DIRECT, durable=True
    )
    if not bound:
        return None
    queue = await channel.declare_queue(
        settings.request_queue, durable=True, arguments={"x-max-priority": settings.max_priority}
    )
    await queue.bind(exchange, routing_key=settings.request_routing_key)
    # Urgent requests too, so that every request the API publishes is read from one queue here
    # (the worker consumes them from a queue of their own).
    await queue.bind(exchange, routing_key=settings.urgent_routing_key)
    return queue


async def drain(
    queue: AbstractQueue, *, expect: int, timeout_s: float = 5.0
) -> list[AbstractIncomingMessage]:
    """The messages of ``queue`` (acked), waiting up to ``timeout_s`` for ``expect`` of them."""
    messages: list[AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            if len(messages) >= expect:
                break
            await asyncio.sleep(0.05)
            continue
        messages.append(message)
    return messages


@dataclass
class Stack:
    """The API application on real services, with an HTTP client and the worker's side."""

    settings: Settings
    app: FastAPI
    resources: Resources
    client: httpx.AsyncClient
    pg: Any  # asyncpg.Connection
    progress: ProgressStore
    queue: AbstractQueue | None
    media_root: Path

    # ---------------------------------------------------------------- the worker's side
    async def start(self, request_id: str) -> None:
        await self.pg.execute(
            "UPDATE requests SET status = 'running', attempts = attempts + 1, "
            "started_at = COALESCE(started_at, now()), updated_at = now() "
            "WHERE request_id = $1 AND status IN ('queued', 'running')",
            request_id,
        )

    async def report(self, request_id: str, status: ProgressStatus, percent: float, stage: str) -> None:
        await self.progress.update(request_id, status=status, percent=percent, stage=stage)

    async def finish(
        self, request_id: str, status: str, *, code: str | None = None, message: str = ""
    ) -> AnalysisResultMessage:
        """Store a terminal outcome as the worker's ledger does (one transaction)."""
        row = await self.pg.fetchrow(
            "SELECT file, correlation_id FROM requests WHERE request_id = $1", request_id
        )
        output = None
        error = None
        if status == "completed":
            output = EngineOutput(
                duration_s=180.0,
                source_sample_rate=44100,
                source_channels=2,
                format="wav",
                tempo=TempoResult(bpm=124.0, confidence=0.9),
                analyzer_versions={"bpm": "1.1.0"},
                timings_s={"total": 1.5},
            )
        else:
            error = ErrorInfo(code=code or "file_not_found", message=message or "gone")
        result = AnalysisResultMessage(
            request_id=request_id,
            correlation_id=row["correlation_id"],
            status=ResultStatus(status),
            file=row["file"],
            output=output,
            error=error,
            finished_at=datetime.now(UTC),
        )
        body = result.model_dump_json()
        async with self.pg.transaction():
            changed = await self.pg.execute(
                "UPDATE requests SET status = $2, error_code = $3, finished_at = now(), updated_at = now() "
                "WHERE request_id = $1 AND status IN ('queued', 'running')",
                request_id,
                status,
                None if status == "completed" else error.code if error else None,
            )
            assert changed == "UPDATE 1", f"{request_id} was already terminal"
            await self.pg.execute(
                "INSERT INTO analysis_results (request_id, correlation_id, status, file, error_code, "
                "error_message, output, finished_at, result) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, "
                "$9::jsonb)",
                request_id,
                row["correlation_id"],
                status,
                row["file"],
                error.code if error else None,
                error.message if error else None,
                output.model_dump_json() if output else None,
                result.finished_at,
                body,
            )
        return result

    async def submit(self, files: list[str], **extra: Any) -> dict[str, Any]:
        response = await self.client.post("/v1/jobs", json={"files": files, **extra}, headers=AUTH)
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body


def make_media(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF....WAVE")  # only existence is checked by the API
    return root


@contextlib.asynccontextmanager
async def api_stack(
    *,
    pg_dsn: str,
    redis_settings: RedisSettings,
    rabbit: RabbitSettings,
    media_root: Path,
    bound: bool = True,
    declare: bool = True,
    **api: Any,
) -> AsyncIterator[Stack]:
    """Declare the request exchange (and queue), open the API's resources, yield a :class:`Stack`."""
    settings = Settings(
        _env_file=None,
        rabbitmq=rabbit,
        redis=redis_settings,
        postgres=PostgresSettings(dsn=pg_dsn, command_timeout_s=10.0),
        worker=WorkerSettings(media_root=media_root),
        api=ApiSettings(keys=",".join(KEYS), **api),
    )
    connection = await aio_pika.connect_robust(rabbit.url)
    async with connection:
        channel = await connection.channel()
        queue = await declare_requests(channel, rabbit, bound=bound) if declare else None
        try:
            resources = await Resources.open(settings)
            app = create_app(settings, resources=resources)
            pg = await asyncpg.connect(pg_dsn)
            progress = ProgressStore(redis_settings)
            transport = httpx.ASGITransport(app=app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                    yield Stack(settings, app, resources, client, pg, progress, queue, media_root)
            finally:
                await progress.close()
                await pg.close()
                await resources.close()
        finally:
            # A fresh connection: the broker may have closed the first one meanwhile.
            async with await aio_pika.connect(rabbit.url) as cleanup_connection:
                cleanup = await cleanup_connection.channel()
                if queue is not None:
                    await cleanup.queue_delete(rabbit.request_queue)
                if declare:
                    await cleanup.exchange_delete(rabbit.request_exchange)


@contextlib.asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free local port; yields ``host:port``."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_config=None,
        access_log=False,
        lifespan="off",
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=None))
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.025)
        assert server.started, "uvicorn did not start"
        (sock,) = [s for srv in server.servers for s in srv.sockets]
        port = sock.getsockname()[1]
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
