"""Job API costs: submitting batches, reading statuses and batch aggregates (prints the figures).

Runs the API in this process (uvicorn on a free local port) against the local PostgreSQL, Redis and
RabbitMQ, in its own database, Redis key prefix and request exchange/queue (all removed at the end),
with no worker: it measures the API's own work (validation, media-root checks, ledger inserts,
confirmed publishes, reads), not the analysis.

    uv run python benchmarks/api_submit.py                 # batches of 1, 100, 1000, 10000 files
    uv run python benchmarks/api_submit.py --sizes 1 1000 --reads 500
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import uvicorn

from analysis_service.api.app import Resources, create_app
from analysis_service.settings import (
    ApiSettings,
    PostgresSettings,
    RabbitSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)

PG = "postgresql://postgres@127.0.0.1:5432/"
RABBIT = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379/0"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(sizes: list[int], reads: int) -> None:
    suffix = secrets.token_hex(6)
    database = f"analysis_bench_{suffix}"
    admin = await asyncpg.connect(PG + "test")
    await admin.execute(f'CREATE DATABASE "{database}"')
    names = f"bench.api.{suffix}"
    connection = await aio_pika.connect(RABBIT)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(names, aio_pika.ExchangeType.DIRECT, durable=True)
    queue = await channel.declare_queue(names, durable=True, arguments={"x-max-priority": 10})
    await queue.bind(exchange, routing_key="analysis.request")
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as media_dir:
        media = Path(media_dir)
        largest = max(sizes)
        for i in range(largest):
            (media / f"track-{i:05d}.mp3").write_bytes(b"ID3")
        settings = Settings(
            _env_file=None,
            postgres=PostgresSettings(dsn=PG + database),
            redis=RedisSettings(url=REDIS, key_prefix=f"bench-{suffix}"),
            rabbitmq=RabbitSettings(url=RABBIT, request_exchange=names, request_queue=names),
            worker=WorkerSettings(media_root=media),
            api=ApiSettings(keys=key, max_files=largest, max_body_bytes=64 * 1024 * 1024),
        )
        resources = await Resources.open(settings)
        app = create_app(settings, resources=resources)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
            await asyncio.sleep(0.02)
        port = next(s.getsockname()[1] for srv in server.servers for s in srv.sockets)
        auth = {"Authorization": f"Bearer {key}"}
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                print(f"{'files':>7} {'POST s':>8} {'jobs/s':>9} {'GET batch ms':>13}")
                batches: list[tuple[str, list[str]]] = []
                for size in sizes:
                    files = [f"track-{i:05d}.mp3" for i in range(size)]
                    started = time.perf_counter()
                    response = await client.post("/v1/jobs", json={"files": files}, headers=auth)
                    elapsed = time.perf_counter() - started
                    assert response.status_code == 202, response.text
                    body = response.json()
                    batches.append((body["batch_id"], [j["id"] for j in body["jobs"]]))
                    started = time.perf_counter()
                    assert (await client.get(body["url"], headers=auth)).status_code == 200
                    batch_ms = 1000 * (time.perf_counter() - started)
                    print(f"{size:>7} {elapsed:>8.2f} {size / elapsed:>9.0f} {batch_ms:>13.1f}")
                ids = [rid for _, batch_ids in batches for rid in batch_ids]
                latencies = []
                for i in range(reads):
                    started = time.perf_counter()
                    response = await client.get(f"/v1/jobs/{ids[(i * 7919) % len(ids)]}", headers=auth)
                    latencies.append(1000 * (time.perf_counter() - started))
                    assert response.status_code == 200
                print(
                    f"GET /v1/jobs/{{id}} x{reads} (one client, sequential): "
                    f"p50 {statistics.median(latencies):.1f} ms, p95 {percentile(latencies, 0.95):.1f} ms"
                )
                started = time.perf_counter()
                pages, cursor = 0, None
                while True:
                    params = {"limit": 500} | ({"cursor": cursor} if cursor else {})
                    page = (await client.get("/v1/jobs", params=params, headers=auth)).json()
                    pages += 1
                    cursor = page["next_cursor"]
                    if cursor is None:
                        break
                elapsed = time.perf_counter() - started
                print(f"GET /v1/jobs, all {len(ids)} jobs in {pages} pages of 500: {elapsed:.2f} s")
                queued = (await queue.declare()).message_count
                print(f"messages on the request queue: {queued} (expected {len(ids)})")
        finally:
            server.should_exit = True
            await task
            await resources.close()
            await channel.queue_delete(names)
            await channel.exchange_delete(names)
            await connection.close()
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000, 10000])
    parser.add_argument("--reads", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.sizes, args.reads))
