"""The job API against real PostgreSQL, Redis and RabbitMQ; the worker's side is simulated by writing
ledger rows and Redis progress the way the worker does (see ``api_harness``)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from analysis_service.settings import RabbitSettings, RedisSettings
from analysis_service.sinks.postgres import fingerprint
from service_shared.messages import AnalysisRequest, RequestOptions
from tests.integration.api_harness import (
    AUTH,
    KEYS,
    Stack,
    api_stack,
    drain,
    make_media,
    rabbit_settings_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FILES = ["a.wav", "b.wav", "album/c.wav", "album/d.wav", "e.wav", "f.wav", "g.wav"]


@pytest.fixture
def rabbit(rabbit_url: str) -> RabbitSettings:
    return rabbit_settings_for(rabbit_url)


@pytest.fixture
async def stack(
    pg_dsn: str, redis_settings: RedisSettings, rabbit: RabbitSettings, tmp_path: Path
) -> AsyncIterator[Stack]:
    media = make_media(tmp_path / "media", FILES)
    (tmp_path / "outside.wav").write_bytes(b"x")
    async with api_stack(
        pg_dsn=pg_dsn, redis_settings=redis_settings, rabbit=rabbit, media_root=media, max_files=5
    ) as s:
        yield s


def error_of(response: Any) -> tuple[int, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return response.status_code, body["error"]["code"]


# ------------------------------------------------------------------------------------ submit


async def test_submit_records_queued_rows_then_publishes_each_request(stack: Stack) -> None:
    response = await stack.client.post(
        "/v1/jobs",
        json={
            "files": ["a.wav", "album/c.wav"],
            "priority": 7,
            "analyses": ["key", "bpm"],
            "options": {"timeline": True},
            "correlation_id": "import-42",
        },
        headers=AUTH,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    batch_id = body["batch_id"]
    assert response.headers["location"] == f"/v1/batches/{batch_id}" == body["url"]
    assert [j["file"] for j in body["jobs"]] == ["a.wav", "album/c.wav"]
    ids = [j["id"] for j in body["jobs"]]
    assert [j["url"] for j in body["jobs"]] == [f"/v1/jobs/{i}" for i in ids]

    rows = {r["request_id"]: r for r in await stack.pg.fetch("SELECT * FROM requests")}
    assert set(rows) == set(ids)
    messages = await drain(stack.queue, expect=2) if stack.queue else []
    assert sorted(m.message_id or "" for m in messages) == sorted(ids)
    for message in messages:
        request = AnalysisRequest.model_validate_json(message.body)
        row = rows[request.request_id]
        assert message.priority == 7
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        assert request.file == row["file"]
        assert request.priority == 7
        assert request.correlation_id == "import-42"
        assert [str(a) for a in request.analyses] == ["key", "bpm"]
        assert request.options.timeline is True
        # The ledger row is exactly what a worker delivering this message will compare against.
        assert row["status"] == "queued"
        assert row["batch_id"] == batch_id
        assert row["fingerprint"] == fingerprint(request)
        assert list(row["analyses"]) == ["key", "bpm"]
        assert row["priority"] == 7
        assert json.loads(row["options"]) == request.options.model_dump()
        assert message.routing_key == stack.settings.rabbitmq.request_routing_key


async def test_an_urgent_request_is_published_to_the_urgent_queue(stack: Stack) -> None:
    rabbit = stack.settings.rabbitmq
    response = await stack.client.post(
        "/v1/jobs", json={"files": ["a.wav", "album/c.wav"], "priority": rabbit.urgent_priority}, headers=AUTH
    )
    assert response.status_code == 202, response.text
    messages = await drain(stack.queue, expect=2) if stack.queue else []
    assert len(messages) == 2
    assert {m.routing_key for m in messages} == {rabbit.urgent_routing_key}
    assert {m.priority for m in messages} == {rabbit.urgent_priority}


def test_fingerprint_is_the_ledger_canonical_form() -> None:
    request = AnalysisRequest.model_validate(
        {"request_id": "r1", "file": "x.wav", "analyses": ["mood", "bpm"]}
    )
    canonical = '{"analyses":["bpm","mood"],"file":"x.wav","options":{"timeline":null,"use_cache":true}}'

    # Unchanged by options added later while they are unset (bpm_range): a request recorded before
    # them is still the same request.
    assert fingerprint(request) == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    ranged = request.model_copy(update={"options": RequestOptions(bpm_range=(88.0, 175.0))})
    canonical = (
        '{"analyses":["bpm","mood"],"file":"x.wav","options":'
        '{"bpm_range":[88.0,175.0],"timeline":null,"use_cache":true}}'
    )
    assert fingerprint(ranged) == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"files": ["../outside.wav"]}, 422, "path_outside_media_root"),
        ({"files": ["/etc/passwd"]}, 422, "path_outside_media_root"),
        ({"files": ["a.wav", "missing.wav"]}, 422, "file_not_found"),
        ({"files": ["a.wav"], "analyses": ["bpm", "loudness"]}, 422, "unknown_analyzer"),
        ({"files": ["a.wav"], "analyses": ["bpm", "bpm"]}, 422, "invalid_analyses"),
        ({"files": ["a.wav"], "analyses": []}, 422, "invalid_analyses"),
        ({"files": ["a.wav"], "options": {"bpm_range": [120, 130]}}, 422, "invalid_options"),
        ({"files": ["a.wav"], "analyses": ["Not A Name"]}, 422, "invalid_analyses"),
        ({"files": ["a.wav"], "priority": 10}, 422, "invalid_priority"),
        ({"files": ["a.wav"], "priority": -1}, 422, "invalid_priority"),
        ({"files": ["a.wav"], "priority": "high"}, 422, "invalid_priority"),
        ({"files": ["a.wav"], "priority": "5"}, 422, "invalid_priority"),  # a JSON integer only
        ({"files": ["a.wav"], "priority": True}, 422, "invalid_priority"),
        ({"files": ["a.wav"], "priority": 5.0}, 422, "invalid_priority"),
        ({"files": []}, 422, "invalid_file"),
        ({"files": FILES[:6]}, 422, "too_many_files"),
        # Refused by its length before its items are validated (they would each give an error).
        ({"files": [1] * 100_001}, 422, "too_many_files"),
        ({"files": ["x" * 300 + ".wav"]}, 422, "file_unreadable"),  # a name longer than the OS allows
        ({"files": ["."]}, 422, "invalid_file"),  # the media root itself: a folder, not a file
        ({"files": ["a\x00.wav"]}, 422, "invalid_file"),
        ({"files": ["a\n.wav"]}, 422, "invalid_file"),
        ({"files": ["x" * 4097]}, 422, "invalid_file"),
        ({"files": "a.wav"}, 422, "invalid_file"),
        ({"files": [42]}, 422, "invalid_file"),
        ({}, 422, "invalid_file"),
        ({"files": ["a.wav"], "options": {"colour": "red"}}, 422, "invalid_options"),
        ({"files": ["a.wav"], "correlation_id": "has space"}, 422, "invalid_correlation_id"),
        ({"files": ["a.wav"], "request_id": "mine"}, 422, "invalid_request"),
        ([1, 2], 400, "malformed_json"),
    ],
)
async def test_submit_refusals_have_specific_codes_and_publish_nothing(
    stack: Stack, body: Any, status: int, code: str
) -> None:
    response = await stack.client.post("/v1/jobs", json=body, headers=AUTH)
    assert error_of(response) == (status, code), response.text
    assert await stack.pg.fetchval("SELECT count(*) FROM requests") == 0
    assert stack.queue is not None
    assert await drain(stack.queue, expect=0, timeout_s=0.2) == []


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b'{"files": ["a.wav"', 400, "malformed_json"),
        (b"\xff\xfe not utf-8", 400, "malformed_json"),
        (b'{"files": ["' + b"a" * 9000 + b'"]}', 413, "request_too_large"),
    ],
)
async def test_submit_refuses_unparsable_and_oversized_bodies(
    pg_dsn: str,
    redis_settings: RedisSettings,
    rabbit: RabbitSettings,
    tmp_path: Path,
    content: bytes,
    status: int,
    code: str,
) -> None:
    media = make_media(tmp_path / "media", ["a.wav"])
    async with api_stack(
        pg_dsn=pg_dsn, redis_settings=redis_settings, rabbit=rabbit, media_root=media, max_body_bytes=4096
    ) as s:
        headers = {**AUTH, "Content-Type": "application/json"}
        response = await s.client.post("/v1/jobs", content=content, headers=headers)
        assert error_of(response) == (status, code)
        assert await s.pg.fetchval("SELECT count(*) FROM requests") == 0


async def test_unroutable_submission_is_withdrawn_and_answers_503(
    pg_dsn: str, redis_settings: RedisSettings, rabbit: RabbitSettings, tmp_path: Path
) -> None:
    media = make_media(tmp_path / "media", ["a.wav", "b.wav"])
    async with api_stack(
        pg_dsn=pg_dsn, redis_settings=redis_settings, rabbit=rabbit, media_root=media, bound=False
    ) as s:
        response = await s.client.post("/v1/jobs", json={"files": ["a.wav", "b.wav"]}, headers=AUTH)
        status, code = error_of(response)
        assert (status, code) == (503, "broker_unavailable")
        assert "unroutable" in response.json()["error"]["message"]
        assert await s.pg.fetchval("SELECT count(*) FROM requests") == 0


async def test_a_submission_whose_confirms_time_out_is_cancelled_not_forgotten(
    pg_dsn: str,
    redis_settings: RedisSettings,
    rabbit: RabbitSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A publish whose confirm never came (a timeout, a dropped connection) may have been enqueued.
    Its row must stay, with its cancellation requested, so that a worker receiving the message
    records ``cancelled`` instead of analysing a submission the client was told was refused."""
    media = make_media(tmp_path / "media", ["a.wav", "b.wav"])
    real_publish = aio_pika.Exchange.publish

    async def enqueued_then_timed_out(self: aio_pika.Exchange, *args: Any, **kwargs: Any) -> Any:
        await real_publish(self, *args, **kwargs)
        raise TimeoutError("no confirm within publish_timeout_s")

    async with api_stack(pg_dsn=pg_dsn, redis_settings=redis_settings, rabbit=rabbit, media_root=media) as s:
        monkeypatch.setattr(aio_pika.Exchange, "publish", enqueued_then_timed_out)
        response = await s.client.post("/v1/jobs", json={"files": ["a.wav", "b.wav"]}, headers=AUTH)
        assert error_of(response) == (503, "broker_unavailable")
        assert s.queue is not None
        assert (await s.queue.declare()).message_count == 2  # both were enqueued
        rows = await s.pg.fetch("SELECT status, cancel_requested_at FROM requests")
        assert len(rows) == 2
        assert all(r["status"] == "queued" and r["cancel_requested_at"] is not None for r in rows)


async def test_missing_request_exchange_answers_503_and_records_nothing(
    pg_dsn: str, redis_settings: RedisSettings, rabbit: RabbitSettings, tmp_path: Path
) -> None:
    media = make_media(tmp_path / "media", ["a.wav"])
    async with api_stack(
        pg_dsn=pg_dsn, redis_settings=redis_settings, rabbit=rabbit, media_root=media, declare=False
    ) as s:
        response = await s.client.post("/v1/jobs", json={"files": ["a.wav"]}, headers=AUTH)
        assert error_of(response) == (503, "broker_unavailable")
        assert "does not exist" in response.json()["error"]["message"]
        assert await s.pg.fetchval("SELECT count(*) FROM requests") == 0
        ready = await s.client.get("/ready")
        assert ready.status_code == 503
        checks = ready.json()["checks"]
        assert checks["rabbitmq"]["ok"] is False
        assert checks["postgres"]["ok"] is True


# ------------------------------------------------------------------------------------ auth


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "missing_api_key"),
        ({"Authorization": ""}, 401, "missing_api_key"),
        ({"Authorization": "Bearer"}, 401, "missing_api_key"),
        ({"Authorization": f"Basic {KEYS[0]}"}, 401, "missing_api_key"),
        ({"Authorization": "Bearer not-a-key"}, 403, "invalid_api_key"),
        ({"Authorization": f"Bearer {KEYS[0]}x"}, 403, "invalid_api_key"),
    ],
)
async def test_auth_missing_is_401_and_wrong_is_403(
    stack: Stack, headers: dict[str, str], status: int, code: str
) -> None:
    for method, path in (
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/x"),
        ("POST", "/v1/jobs"),
        ("DELETE", "/v1/batches/x"),
    ):
        response = await stack.client.request(method, path, headers=headers, json={"files": ["a.wav"]})
        assert error_of(response) == (status, code), (method, path)
        if status == 401:
            assert response.headers["www-authenticate"] == "Bearer"
    assert await stack.pg.fetchval("SELECT count(*) FROM requests") == 0


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [({}, 401, "missing_api_key"), ({"Authorization": "Bearer not-a-key"}, 403, "invalid_api_key")],
)
@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"files": 5, "priority": "high"}', b"[]", b"\xff\xfe"],
    ids=["malformed", "invalid", "wrong-shape", "not-utf8"],
)
async def test_a_client_without_a_valid_key_learns_nothing_about_its_body(
    stack: Stack, headers: dict[str, str], status: int, code: str, body: bytes
) -> None:
    """The key is checked before the body is read: an unauthenticated client gets 401/403, never a
    400/422 that would describe the contract to whoever holds no key."""
    response = await stack.client.post(
        "/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=body
    )
    assert error_of(response) == (status, code)
    assert await stack.pg.fetchval("SELECT count(*) FROM requests") == 0


async def test_every_configured_key_is_accepted_and_operations_need_none(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in KEYS:
        response = await stack.client.get("/v1/jobs", headers={"Authorization": f"bearer  {key} "})
        assert response.status_code == 200, response.text
    assert (await stack.client.get("/health")).json() == {"status": "ok"}
    ready = await stack.client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert {name for name, check in ready.json()["checks"].items() if check["ok"]} == {
        "postgres",
        "redis",
        "rabbitmq",
    }
    metrics = await stack.client.get("/metrics")
    assert metrics.status_code == 200
    assert 'analysis_api_requests_total{method="GET",route="/v1/jobs",status="200"} 2.0' in metrics.text
    await stack.client.get("/v1/jobs", headers={"Authorization": "Bearer leaked-secret-attempt"})
    captured = capsys.readouterr()
    for secret in (*KEYS, "leaked-secret-attempt"):
        assert secret not in captured.out + captured.err


# ------------------------------------------------------------------------------------ status


async def test_methods_a_client_invents_do_not_grow_the_metrics(stack: Stack) -> None:
    """Any token is a method to the HTTP parser: each one must not become a series of its own."""
    for method in ("FOO1", "FOO2", "BREW"):
        response = await stack.client.request(method, "/v1/jobs", headers=AUTH)
        assert response.status_code == 405
    text = (await stack.client.get("/metrics")).text
    assert "FOO1" not in text
    assert "BREW" not in text
    assert 'analysis_api_requests_total{method="other",route="/v1/jobs",status="405"} 3.0' in text


async def test_job_status_ledger_decides_status_redis_adds_progress(stack: Stack) -> None:
    (job,) = (await stack.submit(["a.wav"], correlation_id="c-1"))["jobs"]
    url = job["url"]

    body = (await stack.client.get(url, headers=AUTH)).json()
    assert (body["status"], body["percent"], body["stage"]) == ("queued", 0.0, "queued")
    assert body["file"] == "a.wav"
    assert body["correlation_id"] == "c-1"
    assert body["error"] is None
    assert body["result_url"] == f"{url}/result"
    assert body["started_at"] is None

    await stack.start(job["id"])
    await stack.report(job["id"], "running", 40.0, "features")
    body = (await stack.client.get(url, headers=AUTH)).json()
    assert (body["status"], body["percent"], body["stage"]) == ("running", 40.0, "features")
    assert body["attempts"] == 1
    assert body["started_at"] is not None

    # Redis ahead of the ledger does not make a job look finished...
    await stack.report(job["id"], "completed", 100.0, "done")
    body = (await stack.client.get(url, headers=AUTH)).json()
    assert body["status"] == "running"
    assert body["percent"] < 100

    # ...and a terminal ledger row is final whatever Redis says.
    await stack.report(job["id"], "running", 55.0, "store")
    await stack.finish(job["id"], "completed")
    body = (await stack.client.get(url, headers=AUTH)).json()
    assert (body["status"], body["percent"], body["stage"]) == ("completed", 100.0, "completed")
    assert body["finished_at"] is not None
    assert body["error"] is None


async def test_failed_and_cancelled_jobs_carry_their_error(stack: Stack) -> None:
    jobs = (await stack.submit(["a.wav", "b.wav"]))["jobs"]
    await stack.finish(jobs[0]["id"], "failed", code="not_audio", message="not an audio file")
    await stack.finish(jobs[1]["id"], "cancelled", code="cancelled", message="cancelled through the job API")
    first = (await stack.client.get(jobs[0]["url"], headers=AUTH)).json()
    assert first["status"] == "failed"
    assert first["error"] == {"code": "not_audio", "message": "not an audio file"}
    second = (await stack.client.get(jobs[1]["url"], headers=AUTH)).json()
    assert second["status"] == "cancelled"
    assert second["error"]["code"] == "cancelled"


async def test_unknown_and_malformed_job_ids_are_404(stack: Stack) -> None:
    for job_id in ("nope", "x" * 300, "a b", "%00"):
        for suffix in ("", "/result", "/events"):
            response = await stack.client.get(f"/v1/jobs/{job_id}{suffix}", headers=AUTH)
            assert error_of(response) == (404, "job_not_found"), (job_id, suffix)


async def test_status_falls_back_to_the_ledger_when_redis_is_down(
    pg_dsn: str, rabbit: RabbitSettings, tmp_path: Path, closed_port: int
) -> None:
    dead_redis = RedisSettings(url=f"redis://127.0.0.1:{closed_port}/0", key_prefix="x", socket_timeout_s=0.5)
    media = make_media(tmp_path / "media", ["a.wav", "b.wav"])
    async with api_stack(pg_dsn=pg_dsn, redis_settings=dead_redis, rabbit=rabbit, media_root=media) as s:
        jobs = (await s.submit(["a.wav", "b.wav"]))["jobs"]
        await s.start(jobs[0]["id"])
        await s.finish(jobs[1]["id"], "completed")
        running = (await s.client.get(jobs[0]["url"], headers=AUTH)).json()
        assert (running["status"], running["percent"], running["stage"]) == ("running", 0.0, "running")
        done = (await s.client.get(jobs[1]["url"], headers=AUTH)).json()
        assert (done["status"], done["percent"]) == ("completed", 100.0)
        batch = (await s.client.get(f"/v1/batches/{running['batch_id']}", headers=AUTH)).json()
        assert batch["counts"]["running"] == 1
        assert batch["counts"]["completed"] == 1
        ready = await s.client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"]["ok"] is False
        assert "analysis_api_progress_fallbacks_total 1.0" in (await s.client.get("/metrics")).text


async def test_result_is_the_stored_message_404_unknown_409_unfinished(stack: Stack) -> None:
    jobs = (await stack.submit(["a.wav", "b.wav"]))["jobs"]
    response = await stack.client.get(f"{jobs[0]['url']}/result", headers=AUTH)
    assert error_of(response) == (409, "job_not_finished")
    assert "queued" in response.json()["error"]["message"]
    await stack.start(jobs[0]["id"])
    assert error_of(await stack.client.get(f"{jobs[0]['url']}/result", headers=AUTH)) == (
        409,
        "job_not_finished",
    )
    stored = await stack.finish(jobs[0]["id"], "completed")
    response = await stack.client.get(f"{jobs[0]['url']}/result", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(stored.model_dump_json())
    failed = await stack.finish(jobs[1]["id"], "failed", code="too_long", message="longer than 4 h")
    body = (await stack.client.get(f"{jobs[1]['url']}/result", headers=AUTH)).json()
    assert body["status"] == "failed"
    assert failed.error is not None
    assert body["error"] == failed.error.model_dump()
    assert error_of(await stack.client.get("/v1/jobs/unknown/result", headers=AUTH)) == (404, "job_not_found")


# ------------------------------------------------------------------------------------ listing


async def test_list_pages_with_a_cursor_and_filters(stack: Stack) -> None:
    first = await stack.submit(FILES[:4])
    second = await stack.submit(FILES[4:])
    await stack.start(second["jobs"][0]["id"])
    all_ids = [j["id"] for j in first["jobs"]] + [j["id"] for j in second["jobs"]]

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await stack.client.get("/v1/jobs", params=params, headers=AUTH)).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 7
    # Oldest submission first; within one submission (one timestamp), by id.
    assert seen[:4] == sorted(all_ids[:4])
    assert seen[4:] == sorted(all_ids[4:])

    batch = (await stack.client.get("/v1/jobs", params={"batch": first["batch_id"]}, headers=AUTH)).json()
    assert sorted(j["id"] for j in batch["jobs"]) == sorted(all_ids[:4])
    assert batch["next_cursor"] is None
    running = (await stack.client.get("/v1/jobs", params={"status": "running"}, headers=AUTH)).json()
    assert [j["id"] for j in running["jobs"]] == [second["jobs"][0]["id"]]

    assert error_of(await stack.client.get("/v1/jobs", params={"status": "done"}, headers=AUTH)) == (
        422,
        "invalid_query",
    )
    misspelt = await stack.client.get("/v1/jobs", params={"stauts": "running"}, headers=AUTH)
    assert error_of(misspelt) == (422, "invalid_query")
    assert "stauts" in misspelt.json()["error"]["message"]
    assert error_of(await stack.client.get("/v1/jobs", params={"limit": 0}, headers=AUTH)) == (
        422,
        "invalid_query",
    )
    assert error_of(await stack.client.get("/v1/jobs", params={"cursor": "garbage!"}, headers=AUTH)) == (
        400,
        "invalid_cursor",
    )
    # Well-formed JSON that PostgreSQL would refuse is no cursor either (not a 503 ledger_unavailable).
    for forged in (
        ["2024-01-01T00:00:00+00:00", "a\u0000"],
        ["2024-01-01T00:00:00+00:00", "\ud800"],
        ["0001-01-01T00:00:00+01:00", "a"],
        ["9999-12-31T23:59:59-14:00", "a"],
    ):
        cursor = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
        response = await stack.client.get("/v1/jobs", params={"cursor": cursor}, headers=AUTH)
        assert error_of(response) == (400, "invalid_cursor"), (forged, response.text)


# ------------------------------------------------------------------------------------ batches


async def test_batch_counts_percent_eta_and_failures(stack: Stack) -> None:
    submitted = await stack.submit(FILES[:5])
    ids = [j["id"] for j in submitted["jobs"]]
    url = f"/v1/batches/{submitted['batch_id']}"
    body = (await stack.client.get(url, headers=AUTH)).json()
    assert body["total"] == 5
    assert body["counts"]["queued"] == 5
    assert (body["percent"], body["eta_s"], body["done"], body["finished"]) == (0.0, None, False, 0)

    for rid in ids[:4]:
        await stack.start(rid)
    await stack.finish(ids[0], "completed")
    await stack.finish(ids[1], "failed", code="not_audio")
    await stack.finish(ids[2], "failed", code="not_audio")
    await stack.report(ids[3], "running", 50.0, "features")
    body = (await stack.client.get(url, headers=AUTH)).json()
    assert body["counts"] == {"queued": 1, "running": 1, "completed": 1, "failed": 2, "cancelled": 0}
    assert body["finished"] == 3
    assert body["done"] is False
    assert body["percent"] == pytest.approx((300 + 50) / 5)
    assert body["failures_by_code"] == {"not_audio": 2}
    assert body["eta_s"] is not None
    assert body["eta_s"] >= 0
    assert body["jobs_url"] == f"/v1/jobs?batch={submitted['batch_id']}"

    await stack.finish(ids[3], "completed")
    await stack.finish(ids[4], "completed")
    body = (await stack.client.get(url, headers=AUTH)).json()
    assert (body["done"], body["percent"], body["eta_s"]) == (True, 100.0, None)
    assert body["finished_at"] is not None
    assert error_of(await stack.client.get("/v1/batches/nope", headers=AUTH)) == (404, "batch_not_found")


# ------------------------------------------------------------------------------------ cancel


async def test_cancel_job_marks_the_ledger_409_when_finished_404_when_unknown(stack: Stack) -> None:
    jobs = (await stack.submit(["a.wav", "b.wav", "e.wav"]))["jobs"]
    queued, running, done = (j["id"] for j in jobs)
    await stack.start(running)
    await stack.finish(done, "completed")

    response = await stack.client.delete(f"/v1/jobs/{queued}", headers=AUTH)
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    assert response.json()["status"] == "queued"
    first_at = await stack.pg.fetchval(
        "SELECT cancel_requested_at FROM requests WHERE request_id = $1", queued
    )
    assert first_at is not None
    again = await stack.client.delete(f"/v1/jobs/{queued}", headers=AUTH)
    assert again.status_code == 202
    assert (
        await stack.pg.fetchval("SELECT cancel_requested_at FROM requests WHERE request_id = $1", queued)
        == first_at
    ), "a repeated cancel keeps the first request time"

    response = await stack.client.delete(f"/v1/jobs/{running}", headers=AUTH)
    assert response.status_code == 202
    assert response.json()["status"] == "running"
    # What the worker polls for its in-flight ids:
    pending = await stack.pg.fetch(
        "SELECT request_id FROM requests "
        "WHERE cancel_requested_at IS NOT NULL AND status IN ('queued', 'running')"
    )
    assert {r["request_id"] for r in pending} == {queued, running}

    response = await stack.client.delete(f"/v1/jobs/{done}", headers=AUTH)
    assert error_of(response) == (409, "job_finished")
    assert "completed" in response.json()["error"]["message"]
    assert (
        await stack.pg.fetchval("SELECT cancel_requested_at FROM requests WHERE request_id = $1", done)
        is None
    ), "a terminal row is never touched"
    assert error_of(await stack.client.delete("/v1/jobs/unknown", headers=AUTH)) == (404, "job_not_found")

    # The worker makes the outcome; then the job is terminal like any other.
    await stack.finish(running, "cancelled", code="cancelled")
    body = (await stack.client.get(f"/v1/jobs/{running}", headers=AUTH)).json()
    assert (body["status"], body["cancel_requested"]) == ("cancelled", False)
    assert error_of(await stack.client.delete(f"/v1/jobs/{running}", headers=AUTH)) == (409, "job_finished")


async def test_cancel_batch_cancels_what_is_left(stack: Stack) -> None:
    submitted = await stack.submit(FILES[:4])
    ids = [j["id"] for j in submitted["jobs"]]
    await stack.finish(ids[0], "completed")
    await stack.start(ids[1])
    url = f"/v1/batches/{submitted['batch_id']}"
    response = await stack.client.delete(url, headers=AUTH)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["cancel_requested"] == 3
    assert body["batch"]["cancel_requested"] == 3
    assert (
        await stack.pg.fetchval(
            "SELECT count(*) FROM requests WHERE batch_id = $1 AND cancel_requested_at IS NOT NULL",
            submitted["batch_id"],
        )
        == 3
    )
    for rid in ids[1:]:
        await stack.finish(rid, "cancelled", code="cancelled")
    assert error_of(await stack.client.delete(url, headers=AUTH)) == (409, "batch_finished")
    assert error_of(await stack.client.delete("/v1/batches/nope", headers=AUTH)) == (404, "batch_not_found")
    done = (await stack.client.get(url, headers=AUTH)).json()
    assert done["counts"]["cancelled"] == 3
    assert done["done"] is True
