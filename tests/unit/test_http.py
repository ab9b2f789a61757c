"""HttpServer on a real socket (port 0): /health, /ready (passing, failing, hanging checks), /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest

from analysis_service.http.server import HttpServer
from analysis_service.metrics import Metrics
from analysis_service.settings import HttpSettings

pytestmark = pytest.mark.timeout(30)

CHECK_TIMEOUT_S = 0.3

Check = Callable[[], Awaitable[None]]
ServerFactory = Callable[[Mapping[str, Check]], Awaitable[HttpServer]]


async def passing() -> None:
    return None


async def refused() -> None:
    raise ConnectionRefusedError("connection refused by 127.0.0.1:5432")


async def hanging() -> None:
    await asyncio.sleep(60)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(time_limit_s=60.0)


@pytest.fixture
async def make_server(metrics: Metrics) -> AsyncIterator[ServerFactory]:
    """Start servers on free ports; every one started is stopped afterwards."""
    servers: list[HttpServer] = []

    async def make(checks: Mapping[str, Check]) -> HttpServer:
        server = HttpServer(
            HttpSettings(host="127.0.0.1", port=0), metrics, checks, check_timeout_s=CHECK_TIMEOUT_S
        )
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def get_json(session: aiohttp.ClientSession, server: HttpServer, path: str) -> tuple[int, Any]:
    async with session.get(f"http://127.0.0.1:{server.port}{path}") as response:
        return response.status, await response.json()


async def test_constructor_binds_nothing(metrics: Metrics) -> None:
    server = HttpServer(HttpSettings(host="127.0.0.1", port=0), metrics, {})
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.port
    await server.stop()  # stopping a server that never started is harmless


async def test_health(make_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    server = await make_server({"broken": refused})
    assert server.port > 0
    assert await get_json(session, server, "/health") == (200, {"status": "ok"})


async def test_ready_when_every_check_passes(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    server = await make_server({"rabbitmq": passing, "postgres": passing})
    status, body = await get_json(session, server, "/ready")
    assert status == 200
    assert body == {"status": "ready", "checks": {"rabbitmq": {"ok": True}, "postgres": {"ok": True}}}


async def test_ready_without_checks(make_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    server = await make_server({})
    assert await get_json(session, server, "/ready") == (200, {"status": "ready", "checks": {}})


async def test_not_ready_names_the_failing_check(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    server = await make_server({"rabbitmq": passing, "postgres": refused})
    status, body = await get_json(session, server, "/ready")
    assert status == 503
    assert body["status"] == "not ready"
    assert body["checks"]["rabbitmq"] == {"ok": True}
    assert body["checks"]["postgres"] == {
        "ok": False,
        "error": "ConnectionRefusedError: connection refused by 127.0.0.1:5432",
    }


async def test_a_hanging_check_times_out(make_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    server = await make_server({"neo4j": hanging, "redis": hanging, "rabbitmq": passing})
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await get_json(session, server, "/ready")
    elapsed = loop.time() - started
    assert status == 503
    assert body["checks"]["neo4j"] == {
        "ok": False,
        "error": f"TimeoutError: no answer within {CHECK_TIMEOUT_S:g} s",
    }
    assert body["checks"]["redis"]["ok"] is False
    assert body["checks"]["rabbitmq"] == {"ok": True}
    assert elapsed < 2 * CHECK_TIMEOUT_S + 0.5, "checks must run concurrently"


async def test_an_exception_without_message_reports_its_type(
    make_server: ServerFactory, session: aiohttp.ClientSession
) -> None:
    async def bare() -> None:
        raise RuntimeError

    server = await make_server({"pool": bare})
    status, body = await get_json(session, server, "/ready")
    assert (status, body["checks"]["pool"]) == (503, {"ok": False, "error": "RuntimeError"})


async def test_readiness_recovers(make_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    up = asyncio.Event()

    async def flaky() -> None:
        if not up.is_set():
            raise ConnectionError("down")

    server = await make_server({"redis": flaky})
    assert (await get_json(session, server, "/ready"))[0] == 503
    up.set()
    assert (await get_json(session, server, "/ready"))[0] == 200


async def test_metrics(make_server: ServerFactory, session: aiohttp.ClientSession, metrics: Metrics) -> None:
    metrics.in_flight.set(3)
    server = await make_server({})
    async with session.get(f"http://127.0.0.1:{server.port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == metrics.content_type
        text = await response.text()
    assert "analysis_in_flight 3.0" in text
    assert 'analysis_process_resident_memory_bytes{process="worker"}' in text


async def test_port_in_use_is_reported(make_server: ServerFactory, metrics: Metrics) -> None:
    first = await make_server({})
    second = HttpServer(HttpSettings(host="127.0.0.1", port=first.port), metrics, {})
    with pytest.raises(OSError, match=f"HTTP server cannot listen on 127.0.0.1:{first.port}"):
        await second.start()
    with pytest.raises(RuntimeError, match="not running"):
        _ = second.port


async def test_stop_releases_the_port(make_server: ServerFactory, session: aiohttp.ClientSession) -> None:
    server = await make_server({})
    port = server.port
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(f"http://127.0.0.1:{port}/health"):
            pass
