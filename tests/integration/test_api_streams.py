"""Live streams of the job API (WebSocket and Server-Sent Events) on a real uvicorn server, fed by the
worker's real Redis pub/sub (``ProgressStore.update``) and ended by the ledger."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from analysis_service.settings import RabbitSettings, RedisSettings
from tests.integration.api_harness import (
    AUTH,
    KEYS,
    Stack,
    api_stack,
    make_media,
    rabbit_settings_for,
    served,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FILES = ["a.wav", "b.wav", "c.wav"]


@pytest.fixture
def rabbit(rabbit_url: str) -> RabbitSettings:
    return rabbit_settings_for(rabbit_url)


@pytest.fixture
async def stack(
    pg_dsn: str, redis_settings: RedisSettings, rabbit: RabbitSettings, tmp_path: Path
) -> AsyncIterator[Stack]:
    media = make_media(tmp_path / "media", FILES)
    async with api_stack(
        pg_dsn=pg_dsn, redis_settings=redis_settings, rabbit=rabbit, media_root=media, stream_poll_s=0.3
    ) as s:
        await asyncio.wait_for(s.resources.hub.connected.wait(), 5)
        yield s


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), 5)
    event: dict[str, Any] = json.loads(message)
    return event


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """``(event, data)`` of each SSE event (comments skipped)."""
    kind, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            data += line[len("data: ") :]
        elif line == "" and data:
            yield kind, json.loads(data)
            kind, data = "message", ""


async def test_websocket_job_stream_late_client_gets_state_then_progress_then_outcome(stack: Stack) -> None:
    (job,) = (await stack.submit(["a.wav"]))["jobs"]
    await stack.start(job["id"])
    await stack.report(job["id"], "running", 30.0, "decode")  # before the client connects
    async with (
        served(stack.app) as address,
        websockets.connect(f"ws://{address}/v1/jobs/{job['id']}/events", additional_headers=AUTH) as ws,
    ):
        first = await next_event(ws)
        assert first["type"] == "state"
        assert (first["job"]["status"], first["job"]["percent"], first["job"]["stage"]) == (
            "running",
            30.0,
            "decode",
        )
        await stack.report(job["id"], "running", 60.0, "features")
        update = await next_event(ws)
        assert update["type"] == "progress"
        assert (update["job"]["percent"], update["job"]["stage"]) == (60.0, "features")
        await stack.finish(job["id"], "completed")
        await stack.report(job["id"], "completed", 100.0, "done")
        last = await next_event(ws)
        assert last["type"] == "state"
        assert (last["job"]["status"], last["job"]["percent"]) == ("completed", 100.0)
        with pytest.raises(websockets.ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 1000


async def test_sse_job_stream_ends_from_the_ledger_even_without_a_redis_message(stack: Stack) -> None:
    (job,) = (await stack.submit(["a.wav"]))["jobs"]
    async with (
        served(stack.app) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client,
        client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=AUTH) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
        kind, first = await anext(events)
        assert (kind, first["job"]["status"]) == ("state", "queued")
        await stack.start(job["id"])
        await stack.report(job["id"], "running", 10.0, "decode")
        kind, update = await anext(events)  # a new status: a state event, with the progress
        assert (kind, update["job"]["status"], update["job"]["stage"]) == ("state", "running", "decode")
        await stack.report(job["id"], "running", 20.0, "features")
        kind, update = await anext(events)
        assert (kind, update["job"]["percent"], update["job"]["stage"]) == ("progress", 20.0, "features")
        await stack.finish(job["id"], "failed", code="not_audio", message="not audio")  # no Redis update
        kind, last = await anext(events)
        assert (kind, last["job"]["status"], last["job"]["error"]["code"]) == ("state", "failed", "not_audio")
        with pytest.raises(StopAsyncIteration):
            await anext(events)


async def test_a_job_stream_shows_a_cancel_request_while_progress_keeps_arriving(stack: Stack) -> None:
    """Progress more often than the stream's poll must not hide the ledger's own changes: the
    client that cancelled sees ``cancel_requested`` before the worker ends the job."""
    (job,) = (await stack.submit(["a.wav"]))["jobs"]
    await stack.start(job["id"])
    await stack.report(job["id"], "running", 1.0, "decode")

    async def keep_reporting() -> None:
        for step in range(2, 100):
            await stack.report(job["id"], "running", float(step), "features")
            await asyncio.sleep(0.05)

    async with (
        served(stack.app) as address,
        websockets.connect(f"ws://{address}/v1/jobs/{job['id']}/events", additional_headers=AUTH) as ws,
    ):
        assert (await next_event(ws))["job"]["cancel_requested"] is False
        reporter = asyncio.create_task(keep_reporting())
        try:
            await next_event(ws)  # progress is flowing
            cancelled = await stack.client.delete(f"/v1/jobs/{job['id']}", headers=AUTH)
            assert cancelled.status_code == 202, cancelled.text
            seen = False
            for _ in range(40):  # 2 s of progress at 50 ms; the poll is 0.3 s
                event = await next_event(ws)
                if event["job"]["cancel_requested"]:
                    seen = True
                    break
            assert seen, "the stream never showed the cancel request"
            assert event["type"] == "state"
            assert event["job"]["status"] == "running"
        finally:
            reporter.cancel()


async def test_stream_of_a_finished_job_is_its_state_then_the_end(stack: Stack) -> None:
    (job,) = (await stack.submit(["a.wav"]))["jobs"]
    await stack.finish(job["id"], "completed")
    async with served(stack.app) as address:
        async with websockets.connect(
            f"ws://{address}/v1/jobs/{job['id']}/events", additional_headers=AUTH
        ) as ws:
            only = await next_event(ws)
            assert only["job"]["status"] == "completed"
            with pytest.raises(websockets.ConnectionClosedOK):
                await asyncio.wait_for(ws.recv(), 5)
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client:
            response = await client.get(f"/v1/jobs/{job['id']}/events", headers=AUTH)
            assert response.text.count("event: state") == 1


@pytest.mark.parametrize(
    ("headers", "path", "status", "code"),
    [
        ({}, "/v1/jobs/{id}/events", 401, "missing_api_key"),
        ({"Authorization": "Bearer wrong"}, "/v1/jobs/{id}/events", 403, "invalid_api_key"),
        (AUTH, "/v1/jobs/nope/events", 404, "job_not_found"),
        (AUTH, "/v1/batches/nope/events", 404, "batch_not_found"),
    ],
)
async def test_websocket_handshake_refusals_are_http_errors(
    stack: Stack, headers: dict[str, str], path: str, status: int, code: str
) -> None:
    (job,) = (await stack.submit(["a.wav"]))["jobs"]
    async with served(stack.app) as address:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(
                f"ws://{address}{path.format(id=job['id'])}", additional_headers=headers
            ):
                pass
        response = refused.value.response
        assert response.status_code == status
        assert json.loads(response.body or b"{}")["error"]["code"] == code


async def test_websocket_batch_stream_aggregates_and_ends_when_every_job_is_terminal(stack: Stack) -> None:
    submitted = await stack.submit(FILES)
    ids = [j["id"] for j in submitted["jobs"]]
    await stack.finish(ids[0], "completed")
    async with (
        served(stack.app) as address,
        websockets.connect(
            f"ws://{address}/v1/batches/{submitted['batch_id']}/events",
            additional_headers={"Authorization": f"Bearer {KEYS[1]}"},
        ) as ws,
    ):
        first = await next_event(ws)
        assert first["type"] == "batch"
        assert first["batch"]["counts"]["completed"] == 1
        assert first["batch"]["total"] == 3
        await stack.start(ids[1])
        await stack.report(ids[1], "running", 50.0, "features")
        job_event = await next_event(ws)
        assert job_event["type"] == "job"
        assert (job_event["update"]["request_id"], job_event["update"]["percent"]) == (ids[1], 50.0)
        await stack.finish(ids[1], "completed")
        await stack.report(ids[1], "completed", 100.0, "done")
        await stack.finish(ids[2], "cancelled", code="cancelled")
        seen: list[dict[str, Any]] = []

        async def read_to_the_end() -> None:
            while True:
                seen.append(await next_event(ws))

        with pytest.raises(websockets.ConnectionClosedOK):
            await read_to_the_end()
        batches = [e["batch"] for e in seen if e["type"] == "batch"]
        assert batches, seen
        assert batches[-1]["done"] is True
        assert batches[-1]["counts"] == {
            "queued": 0,
            "running": 0,
            "completed": 2,
            "failed": 0,
            "cancelled": 1,
        }


async def test_sse_batch_stream(stack: Stack) -> None:
    submitted = await stack.submit(FILES[:2])
    ids = [j["id"] for j in submitted["jobs"]]
    async with (
        served(stack.app) as address,
        httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client,
        client.stream("GET", f"/v1/batches/{submitted['batch_id']}/events", headers=AUTH) as response,
    ):
        events = sse_events(response)
        kind, first = await anext(events)
        assert (kind, first["batch"]["counts"]["queued"]) == ("batch", 2)
        for rid in ids:
            await stack.finish(rid, "completed")
        kinds = [kind async for kind, _ in events]
        assert kinds[-1] == "batch"


async def test_streams_unsubscribe_when_clients_leave(stack: Stack) -> None:
    (job,) = (await stack.submit(["a.wav"]))["jobs"]
    hub = stack.resources.hub
    async with served(stack.app) as address:
        async with websockets.connect(
            f"ws://{address}/v1/jobs/{job['id']}/events", additional_headers=AUTH
        ) as ws:
            await next_event(ws)
            assert hub.clients == 1
        async with (
            httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client,
            client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=AUTH) as response,
        ):
            await anext(sse_events(response))
            assert hub.clients == 1
        for _ in range(100):
            if hub.clients == 0:
                break
            await asyncio.sleep(0.05)
        assert hub.clients == 0
        metrics = (await stack.client.get("/metrics")).text
        assert 'analysis_api_stream_clients{transport="websocket"} 0.0' in metrics
        assert 'analysis_api_stream_clients{transport="sse"} 0.0' in metrics


async def test_slow_websocket_client_memory_is_bounded(
    pg_dsn: str, redis_settings: RedisSettings, rabbit: RabbitSettings, tmp_path: Path
) -> None:
    """A client that does not read: the hub keeps at most ``stream_queue_size`` updates for it and
    reports how many it dropped; the newest update is the one kept."""
    media = make_media(tmp_path / "media", ["a.wav"])
    async with api_stack(
        pg_dsn=pg_dsn,
        redis_settings=redis_settings,
        rabbit=rabbit,
        media_root=media,
        stream_queue_size=4,
        stream_poll_s=30.0,
    ) as s:
        await asyncio.wait_for(s.resources.hub.connected.wait(), 5)
        (job,) = (await s.submit(["a.wav"]))["jobs"]
        await s.start(job["id"])
        hub = s.resources.hub
        # A subscriber that never reads, as a stuck client's queue is.
        stuck = hub.subscribe([job["id"]])
        for i in range(50):
            await s.report(job["id"], "running", float(i), f"stage-{i}")
        for _ in range(100):
            if stuck.dropped >= 46:
                break
            await asyncio.sleep(0.05)
        assert stuck.pending == 4
        assert stuck.dropped == 46
        kept = [await stuck.next(1) for _ in range(4)]
        assert [u["stage"] for u in kept if u] == ["stage-46", "stage-47", "stage-48", "stage-49"]
        assert "analysis_api_stream_events_dropped_total 46.0" in (await s.client.get("/metrics")).text
        hub.unsubscribe(stuck)


@pytest.mark.timeout(60)
async def test_the_progress_hub_stops_however_its_cancel_lands(redis_settings: RedisSettings) -> None:
    """Closing the hub ends its listener wherever the cancellation lands. One that lands as a socket
    write completes is lost inside the Redis client (CPython 3.11's ``asyncio.wait_for``); the
    listener then blocked in its next read and the API's shutdown waited for it forever (about one
    close in twenty did, closed within the hub's first 20 ms)."""
    import random

    from analysis_service.api.events import ProgressHub
    from analysis_service.sinks._util import redis_client

    rng = random.Random(7)
    for _ in range(120):
        client = redis_client(redis_settings)
        hub = ProgressHub(client, channel=f"{redis_settings.key_prefix}:progress", queue_size=4)
        try:
            await hub.start()
            await asyncio.sleep(rng.random() * 0.02)
            closing = asyncio.create_task(hub.close())
            done, _ = await asyncio.wait({closing}, timeout=5)
            assert closing in done, "the hub's listener did not stop when closed"
        finally:
            await client.aclose()


async def test_a_websocket_client_leaving_during_the_handshake_leaves_no_subscription(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream subscribes before it accepts the WebSocket (so that no update is missed); a client
    that leaves before the accept must not leave that subscription behind (each one would keep
    taking updates for as long as the server runs)."""
    (job,) = (await stack.submit(["a.wav"]))["jobs"]
    ledger = stack.resources.ledger
    read_job = ledger.job

    async def slow_job(request_id: str) -> Any:
        await asyncio.sleep(0.5)  # the client leaves meanwhile
        return await read_job(request_id)

    monkeypatch.setattr(ledger, "job", slow_job)
    async with served(stack.app) as address:
        host, port = address.rsplit(":", 1)
        for _ in range(3):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                (
                    f"GET /v1/jobs/{job['id']}/events HTTP/1.1\r\nHost: {address}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    f"Authorization: {AUTH['Authorization']}\r\n\r\n"
                ).encode()
            )
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(1.0)  # every handshake has ended
        assert stack.resources.hub.clients == 0
