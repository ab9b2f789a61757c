"""The job API with a real worker: a submission is analysed, a queued job and a running job are
cancelled through the API, and every outcome is read back through the API (ledger, result, batch)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from analysis_service.api.app import Resources, create_app
from analysis_service.settings import ApiSettings, Neo4jSettings, RedisSettings, Settings
from tests.integration.worker_harness import (
    Broker,
    make_settings,
    running_worker,
    write_long_song,
    write_song,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

KEY = "end-to-end-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
async def setup(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> AsyncIterator[tuple[Settings, httpx.AsyncClient]]:
    # One slot and no spare one: a second job waits in the queue while the first runs (with a spare
    # slot it would be read and hashed meanwhile, and might be analysed first: see test_worker.py).
    base = make_settings(
        tmp_path,
        rabbit_url=rabbit_url,
        pg_dsn=pg_dsn,
        redis=redis_settings,
        graph=bolt_server,
        concurrency=1,
        spare_slots=0,
    )
    settings = base.model_copy(update={"api": ApiSettings(keys=KEY, stream_poll_s=0.5)})
    media = settings.worker.media_root
    write_song(media / "short.wav", bpm=124.0, seconds=12.0)
    write_song(media / "queued.wav", bpm=100.0, seconds=12.0)
    # Long enough to be cancelled while it runs on a fast machine: 900 s was analysed in about a
    # second on one and completed before its cancellation arrived; 2 hours take about 11 s there.
    write_long_song(media / "long.flac", seconds=7200.0)
    async with Broker(settings):
        resources = await Resources.open(settings)
        try:
            app = create_app(settings, resources=resources)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://api"
            ) as client:
                yield settings, client
        finally:
            await resources.close()


async def wait_for(
    client: httpx.AsyncClient, job_id: str, statuses: set[str], timeout_s: float = 120.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers=AUTH)).json()
        if body["status"] in statuses:
            return body
        assert time.monotonic() < deadline, f"{job_id} still {body['status']} after {timeout_s} s"
        await asyncio.sleep(0.2)


async def test_submit_analyse_and_cancel_queued_and_running_jobs(
    setup: tuple[Settings, httpx.AsyncClient],
) -> None:
    settings, client = setup
    async with running_worker(settings):
        response = await client.post(
            "/v1/jobs", json={"files": ["long.flac", "queued.wav"], "priority": 5}, headers=AUTH
        )
        assert response.status_code == 202, response.text
        batch = response.json()
        long_id, queued_id = (job["id"] for job in batch["jobs"])

        # One slot: the long file runs, the other waits in the queue.
        running = await wait_for(client, long_id, {"running"} | TERMINAL, timeout_s=60)
        assert running["status"] == "running"
        assert (await client.delete(f"/v1/jobs/{queued_id}", headers=AUTH)).status_code == 202
        started = time.monotonic()
        assert (await client.delete(f"/v1/jobs/{long_id}", headers=AUTH)).status_code == 202

        stopped = await wait_for(client, long_id, TERMINAL, timeout_s=60)
        stop_s = time.monotonic() - started
        assert stopped["status"] == "cancelled", stopped
        assert stopped["error"]["code"] == "cancelled"
        assert stop_s < 30, f"the running analysis took {stop_s:.1f} s to stop"
        skipped = await wait_for(client, queued_id, TERMINAL, timeout_s=60)
        assert skipped["status"] == "cancelled", skipped

        # Queued in the broker, or held by the worker beyond its one slot (overlap_stores) and
        # waiting for it: either way it is never read, let alone analysed.
        result = (await client.get(f"/v1/jobs/{queued_id}/result", headers=AUTH)).json()
        assert (result["status"], result["output"], result["content_hash"], result["error"]["code"]) == (
            "cancelled",
            None,
            None,
            "cancelled",
        )
        assert (await client.delete(f"/v1/jobs/{long_id}", headers=AUTH)).status_code == 409

        # The worker goes on with the next submission.
        (job,) = (await client.post("/v1/jobs", json={"files": ["short.wav"]}, headers=AUTH)).json()["jobs"]
        done = await wait_for(client, job["id"], TERMINAL, timeout_s=120)
        assert done["status"] == "completed", done
        assert (done["percent"], done["error"]) == (100.0, None)
        output = (await client.get(f"/v1/jobs/{job['id']}/result", headers=AUTH)).json()["output"]
        assert output["tempo"]["bpm"] == pytest.approx(124.0, abs=2.0)

        summary = (await client.get(batch["url"], headers=AUTH)).json()
        assert summary["done"] is True
        assert summary["counts"]["cancelled"] == 2
        assert summary["percent"] == 100.0
