"""The worker end to end, against the real RabbitMQ, PostgreSQL, Redis and a Bolt graph server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import neo4j
import pytest
from redis.asyncio import Redis

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import EngineSettings, Neo4jSettings, RedisSettings, Settings
from analysis_service.sinks.postgres import Known, PostgresLedger, Started, fingerprint
from analysis_service.sinks.progress import ProgressStore
from analysis_service.worker.slots import Phase
from analysis_service.worker.worker import Worker
from service_shared.messages import AnalysisRequest, ResultStatus
from tests.integration.worker_harness import (
    Broker,
    make_settings,
    running_worker,
    write_long_song,
    write_song,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> Settings:
    return make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server
    )


async def analysing(worker: Worker, *, urgent: bool, timeout_s: float = 30.0) -> None:
    """Wait until one of the worker's slots (an urgent one if ``urgent``) holds an analysis."""
    slots = worker._slots
    assert slots is not None
    async with asyncio.timeout(timeout_s):
        while (slots.urgent_busy if urgent else slots.busy) < 1:  # noqa: ASYNC110 (polls the worker)
            await asyncio.sleep(0.02)


def request(request_id: str, file: str, **extra: object) -> dict[str, object]:
    return {"request_id": request_id, "file": file, "correlation_id": f"corr-{request_id}", **extra}


async def pg_rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def graph_counts(graph: Neo4jSettings, *queries: str, **params: Any) -> list[int]:
    """``count`` results of Cypher queries, over one driver (FalkorDB may hang a second new one)."""
    driver = neo4j.AsyncGraphDatabase.driver(graph.uri, auth=(graph.user, graph.password))
    try:
        counts = []
        async with driver.session() as session:
            for cypher in queries:
                record = await (await session.run(cypher, **params)).single()
                assert record is not None
                counts.append(int(record[0]))
        return counts
    finally:
        await driver.close()


async def test_request_is_analysed_stored_everywhere_and_acked(settings: Settings, redis_url: str) -> None:
    write_song(settings.worker.media_root / "songs" / "a.wav", bpm=120, tonic=9, mode="minor")
    async with Broker(settings) as broker, running_worker(settings):
        await broker.publish(request("req-1", "songs/a.wav", priority=7), priority=7)
        [result] = await broker.results(1)
        assert await broker.depth(settings.rabbitmq.request_queue) == 0
        assert await broker.depth(settings.rabbitmq.dead_letter_queue) == 0
        # (FalkorDB: query while the worker's driver is still open; see the bolt_server fixture.)
        [in_key] = await graph_counts(
            settings.neo4j,
            "MATCH (r:Recording {content_hash: $h})-[:IN_KEY]->(k:Key {name: 'A minor'}) RETURN count(r)",
            h=result.content_hash,
        )
    assert in_key == 1

    assert result.status is ResultStatus.COMPLETED, result.error
    assert (result.request_id, result.correlation_id) == ("req-1", "corr-req-1")
    assert result.output is not None
    assert result.output.tempo
    assert result.output.key
    assert result.output.mood
    assert result.output.tempo.bpm == pytest.approx(120, rel=0.04)
    assert result.output.key.key == "A minor"
    assert set(result.output.analyzer_versions) == {"bpm", "key", "mood"}

    rows = await pg_rows(settings.postgres.dsn, "SELECT status, bpm, key, camelot FROM analysis_results")
    assert [(r["status"], r["key"], r["camelot"]) for r in rows] == [("completed", "A minor", "8A")]
    assert rows[0]["bpm"] == pytest.approx(120, rel=0.04)
    assert len(await pg_rows(settings.postgres.dsn, "SELECT 1 FROM recordings")) == 1

    redis = Redis.from_url(redis_url, decode_responses=True)
    progress = await redis.hgetall(f"{settings.redis.key_prefix}:progress:req-1")
    ttl = await redis.ttl(f"{settings.redis.key_prefix}:progress:req-1")
    await redis.aclose()
    assert progress["status"] == "completed"
    assert float(progress["percent"]) == 100.0
    assert (progress["key"], progress["camelot"]) == ("A minor", "8A")
    assert float(progress["bpm"]) == pytest.approx(120, rel=0.04)
    assert ttl > 0


async def test_a_bpm_range_reaches_the_analysis_and_the_cache_keeps_ranges_apart(settings: Settings) -> None:
    write_song(settings.worker.media_root / "a.wav", bpm=120, tonic=9, mode="minor")
    ranged = {"bpm_range": [125, 240]}
    results = {}
    async with Broker(settings) as broker:
        async with running_worker(settings):
            for rid, options in (("plain", {}), ("ranged", ranged), ("ranged-again", ranged)):
                await broker.publish(request(rid, "a.wav", options=options))
                [results[rid]] = await broker.results(1)  # one at a time: each may find the last cached
        # A worker whose default range is the same: a request without one runs with it.
        by_default = settings.model_copy(
            update={"engine": settings.engine.model_copy(update={"bpm_range": (125.0, 240.0)})}
        )
        async with running_worker(by_default):
            await broker.publish(request("default-range", "a.wav"))
            [results["default-range"]] = await broker.results(1)

    tempo = {rid: r.output.tempo.bpm for rid, r in results.items() if r.output and r.output.tempo}
    assert tempo["plain"] == pytest.approx(120, rel=0.04)
    assert tempo["ranged"] == tempo["ranged-again"] == tempo["default-range"] == pytest.approx(240, rel=0.04)
    assert {rid: r.cached for rid, r in results.items()} == {
        "plain": False,
        "ranged": False,  # not the plain request's cached output
        "ranged-again": True,
        "default-range": True,  # the ranged requests' output: the range it ran with is the key
    }
    rows = await pg_rows(settings.postgres.dsn, "SELECT request_id, bpm FROM analysis_results")
    assert sorted((r["request_id"], round(r["bpm"] / 120)) for r in rows) == [
        ("default-range", 2),
        ("plain", 1),
        ("ranged", 2),
        ("ranged-again", 2),
    ]


async def test_a_completed_request_is_reported_running_then_completed_once(
    settings: Settings, redis_url: str
) -> None:
    """The engine's own end report (its 'done' at 100 %) is not written: the terminal state that
    follows says it, once. Every update is one Redis write (hash + expiry + two publishes)."""
    write_song(settings.worker.media_root / "a.wav")
    redis = Redis.from_url(redis_url, decode_responses=True)
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{settings.redis.key_prefix}:progress:req-p")
    updates: list[dict[str, Any]] = []
    try:
        async with Broker(settings) as broker, running_worker(settings):
            await broker.publish(request("req-p", "a.wav"))
            [result] = await broker.results(1)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10.0
            while loop.time() < deadline and not (updates and updates[-1]["status"] != "running"):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if message is not None:
                    updates.append(json.loads(message["data"]))
            while (
                message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3)
            ) is not None:
                updates.append(json.loads(message["data"]))  # nothing may follow the terminal state
        progress = await redis.hgetall(f"{settings.redis.key_prefix}:progress:req-p")
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()
    assert result.status is ResultStatus.COMPLETED
    steps = [(u["status"], u["stage"]) for u in updates]
    assert steps[0] == ("running", "started")
    assert steps[-1] == ("completed", "done")
    assert all(status == "running" and stage != "done" for status, stage in steps[1:-1]), steps
    assert (progress["status"], float(progress["percent"]), progress["stage"]) == ("completed", 100.0, "done")


async def test_bad_inputs_fail_with_specific_codes_and_are_dead_lettered(settings: Settings) -> None:
    media = settings.worker.media_root
    (media / "notes.mp3").write_text("this is a text file, not an mp3\n" * 20)
    (media / "empty.wav").write_bytes(b"")
    write_song(media / "long.wav", seconds=12.0)
    settings = settings.model_copy(update={"engine": EngineSettings(max_duration_s=5.0)})
    cases: dict[str, tuple[bytes | dict[str, object], str]] = {
        "bad-json": (b"{not json", "malformed_json"),
        "bad-schema": (request("bad-schema", "x.wav", priority=12), "invalid_priority"),
        "outside": (request("outside", "../../etc/passwd"), "path_outside_media_root"),
        "missing": (request("missing", "nowhere/missing.flac"), "file_not_found"),
        "not-audio": (request("not-audio", "notes.mp3"), "not_audio"),
        "empty": (request("empty", "empty.wav"), "empty_file"),
        "too-long": (request("too-long", "long.wav"), "too_long"),
    }
    async with Broker(settings) as broker, running_worker(settings):
        for body, _ in cases.values():
            await broker.publish(body)
        results = await broker.results(len(cases))
        dead = await broker.drain(settings.rabbitmq.dead_letter_queue, len(cases))
    by_id = {r.request_id: r for r in results}
    for name, (_, code) in cases.items():
        # Unparseable JSON has no request id: the result is keyed by a digest of its body.
        result = by_id[name] if name != "bad-json" else next(r for r in results if r.request_id not in cases)
        assert result.status is ResultStatus.FAILED
        assert result.error is not None
        assert result.error.code == code, (name, result.error)
        assert result.error.message
    assert len(dead) == len(cases)
    codes = await pg_rows(
        settings.postgres.dsn, "SELECT error_code FROM analysis_results WHERE status = 'failed'"
    )
    assert sorted(r["error_code"] for r in codes) == sorted(code for _, code in cases.values())


async def test_redelivered_request_creates_no_duplicates(settings: Settings) -> None:
    write_song(settings.worker.media_root / "a.wav")
    async with Broker(settings) as broker, running_worker(settings):
        await broker.publish(request("same", "a.wav"))
        first = await broker.results(1)
        await broker.publish(request("same", "a.wav"))
        second = await broker.results(1)
        analyses, recordings = await graph_counts(
            settings.neo4j,
            "MATCH (a:Analysis {request_id: 'same'}) RETURN count(a)",
            "MATCH (r:Recording) RETURN count(r)",
        )
    assert first[0].status is ResultStatus.COMPLETED
    # The ledger's stored outcome is announced again, exactly as it was: nothing re-analysed.
    assert second[0] == first[0]
    assert len(await pg_rows(settings.postgres.dsn, "SELECT 1 FROM analysis_results")) == 1
    assert len(await pg_rows(settings.postgres.dsn, "SELECT 1 FROM recordings")) == 1
    assert (analyses, recordings) == (1, 1)


async def test_backlog_high_priority_first(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> None:
    """Without urgent slots, the urgent queue's requests take the slots ahead of the others."""
    settings = make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )
    settings.worker.urgent_slots = 0
    for i in range(8):
        write_song(settings.worker.media_root / f"s{i}.wav", bpm=100 + 5 * i, seconds=8.0)
    async with Broker(settings) as broker:
        for i in range(5):  # a backlog of routine work...
            await broker.publish(request(f"low-{i}", f"s{i}.wav", priority=1), priority=1)
        for i in range(5, 8):  # ...then urgent requests arrive
            await broker.publish(request(f"high-{i}", f"s{i}.wav", priority=9), priority=9)
        async with running_worker(settings):
            results = await broker.results(8)
    order = [r.request_id for r in results]
    assert all(r.status is ResultStatus.COMPLETED for r in results)
    assert {o.split("-")[0] for o in order[:3]} == {"high"}, order


async def test_an_urgent_request_starts_at_once_while_the_slot_is_busy(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> None:
    settings = make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )
    assert settings.worker.urgent_slots == 1
    media = settings.worker.media_root
    write_long_song(media / "long.flac", seconds=7200.0)  # ~11 s of analysis on a fast machine
    write_song(media / "routine.wav", bpm=100, seconds=8.0)
    write_song(media / "urgent.wav", bpm=140, seconds=8.0)
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish(request("long", "long.flac", priority=5), priority=5)
        await analysing(worker, urgent=False)
        await broker.publish(request("routine", "routine.wav", priority=8), priority=8)
        await broker.publish(request("urgent", "urgent.wav", priority=9), priority=9)
        results = await broker.results(3, timeout_s=120)
    order = [r.request_id for r in results]
    assert all(r.status is ResultStatus.COMPLETED for r in results), results
    # The urgent request did not wait for the long analysis; the routine one, one step lower, did.
    assert order == ["urgent", "long", "routine"], order


async def waiting_for_cpu(worker: Worker, *, timeout_s: float = 30.0) -> None:
    """Wait until a request holds a spare slot, read and hashed, and waits for a CPU."""
    slots = worker._slots
    assert slots is not None
    async with asyncio.timeout(timeout_s):
        while slots.waiting_for_cpu < 1:  # noqa: ASYNC110 (polls the worker)
            await asyncio.sleep(0.02)


async def test_a_spare_slot_reads_the_next_request_while_the_cpu_analyses_and_a_cancellation_frees_it(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> None:
    """One CPU and one spare slot: the next request is leased, read and hashed while the first is
    analysed, and waits for the CPU; cancelled there, it ends unanalysed without stopping the
    running analysis, and the next one takes the spare slot and then the CPU."""
    settings = make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )
    assert settings.worker.spare_slots == 1
    media = settings.worker.media_root
    # Two hours: about 11 s of analysis on a fast machine, longer than the steps below.
    write_long_song(media / "long.flac", seconds=7200.0)
    write_song(media / "cancelled.wav", bpm=100, seconds=8.0)
    write_song(media / "next.wav", bpm=140, seconds=8.0)
    async with Broker(settings) as broker, running_worker(settings) as worker:
        slots = worker._slots
        assert slots is not None
        await broker.publish(request("long", "long.flac"))
        await analysing(worker, urgent=False)
        await broker.publish(request("cancelled", "cancelled.wav"))
        await waiting_for_cpu(worker)
        assert (slots.leased, slots.busy) == (2, 1)
        [running] = [s for s in slots._slots if s.phase is Phase.ANALYSING]
        pids = list(getattr(running.executor, "_processes", {}) or {})
        cancel = "UPDATE requests SET cancel_requested_at = now() WHERE request_id = 'cancelled'"
        await pg_rows(pg_dsn, cancel)
        [cancelled] = await broker.results(1, timeout_s=30)
        assert (slots.leased, slots.busy) == (1, 1)  # the long analysis runs on, in the same process
        assert list(getattr(running.executor, "_processes", {}) or {}) == pids
        await broker.publish(request("next", "next.wav"))
        await waiting_for_cpu(worker)
        rest = await broker.results(2, timeout_s=120)
    assert cancelled.request_id == "cancelled"
    assert cancelled.status is ResultStatus.CANCELLED, cancelled
    assert cancelled.output is None
    assert cancelled.error is not None
    assert (cancelled.error.code, cancelled.error.message) == (
        "cancelled",
        "cancelled while waiting for a CPU; not analysed (cancelled.wav)",
    )
    assert [(r.request_id, r.status) for r in rest] == [
        ("long", ResultStatus.COMPLETED),
        ("next", ResultStatus.COMPLETED),
    ]
    assert slots.restarts == 0


async def test_redis_down_results_still_stored(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, bolt_server: Neo4jSettings, closed_port: int
) -> None:
    redis_down = RedisSettings(url=f"redis://127.0.0.1:{closed_port}/0", socket_timeout_s=0.5)
    settings = make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_down, graph=bolt_server
    )
    # Three failed Redis calls come before the result is published whatever the analysis' length
    # (the "started" progress write, the cache read, the cache write), so a threshold of three
    # has the breaker open by then; running reports and the terminal write depend on timing.
    settings = settings.model_copy(
        update={"worker": settings.worker.model_copy(update={"breaker_threshold": 3})}
    )
    write_song(settings.worker.media_root / "a.wav")
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish(request("no-redis", "a.wav"))
        [result] = await broker.results(1)
        assert worker.metrics.breaker_state.labels(dependency="redis")._value.get() > 0
    assert result.status is ResultStatus.COMPLETED
    rows = await pg_rows(
        settings.postgres.dsn, "SELECT status FROM analysis_results WHERE request_id = 'no-redis'"
    )
    assert [r["status"] for r in rows] == ["completed"]


async def test_terminal_progress_redis_missed_is_owed_in_the_ledger_and_written_by_another_worker(
    tmp_path: Path,
    rabbit_url: str,
    pg_dsn: str,
    redis_settings: RedisSettings,
    bolt_server: Neo4jSettings,
    closed_port: int,
) -> None:
    """A worker that ends a request while Redis is down owes its terminal progress. Kept only in
    that worker's memory, the debt died with it and the request's progress said "running" until
    it expired; kept in the ledger, any worker writes it once Redis answers."""
    redis_down = RedisSettings(url=f"redis://127.0.0.1:{closed_port}/0", socket_timeout_s=0.5)
    down = make_settings(tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_down, graph=bolt_server)
    up = down.model_copy(update={"redis": redis_settings})
    write_song(down.worker.media_root / "a.wav")
    async with Broker(down) as broker:
        async with running_worker(down):
            await broker.publish(request("owed", "a.wav"))
            [result] = await broker.results(1)
        assert result.status is ResultStatus.COMPLETED
        [row] = await pg_rows(pg_dsn, "SELECT progress_owed FROM requests WHERE request_id = $1", "owed")
        assert row["progress_owed"] is True
        progress = ProgressStore(redis_settings)
        try:
            assert await progress.get("owed") is None
            async with running_worker(up):  # another worker, Redis up: it pays the debt
                state = None
                for _ in range(150):
                    state = await progress.get("owed")
                    if state is not None:
                        break
                    await asyncio.sleep(0.1)
        finally:
            await progress.close()
    assert state is not None
    assert (state["status"], state["percent"]) == ("completed", 100.0)
    [row] = await pg_rows(pg_dsn, "SELECT progress_owed FROM requests WHERE request_id = $1", "owed")
    assert row["progress_owed"] is False


@pytest.mark.parametrize("priority", [5, 9], ids=["routine", "urgent"])
async def test_store_down_request_waits_then_requeues_not_lost(
    tmp_path: Path,
    rabbit_url: str,
    redis_settings: RedisSettings,
    bolt_server: Neo4jSettings,
    closed_port: int,
    priority: int,
) -> None:
    pg_down = f"postgresql://postgres@127.0.0.1:{closed_port}/test"
    settings = make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_down, redis=redis_settings, graph=bolt_server
    )
    r = settings.rabbitmq
    # Back to the queue it came from: an urgent request stays in the urgent lane.
    home = r.urgent_queue if priority >= r.urgent_priority else r.request_queue
    write_song(settings.worker.media_root / "a.wav")
    async with Broker(settings) as broker:
        async with running_worker(settings) as worker:
            await broker.publish(request("pg-down", "a.wav", priority=priority), priority=priority)
            while worker.counters["requeued"] == 0:  # noqa: ASYNC110 - polling the worker's counter
                await asyncio.sleep(0.1)
        # Never acked as done, never dead-lettered: requeued with a delay, then back in its queue.
        for _ in range(100):
            if await broker.depth(home) == 1:
                break
            await asyncio.sleep(0.1)
        assert await broker.depth(home) == 1
        others = (r.request_queue, r.urgent_queue, r.dead_letter_queue, r.retry_queue, r.urgent_retry_queue)
        assert [await broker.depth(q) for q in others if q != home] == [0, 0, 0, 0]


async def test_request_that_keeps_killing_workers_is_failed(settings: Settings) -> None:
    write_song(settings.worker.media_root / "a.wav")
    body = request("poison", "a.wav")
    async with Broker(settings) as broker, running_worker(settings):
        # Three earlier deliveries started and never finished (the worker process died each time).
        await pg_rows(
            settings.postgres.dsn,
            "INSERT INTO requests (request_id, fingerprint, file, status, attempts, started_at) "
            "VALUES ($1, $2, $3, 'running', $4, now())",
            "poison",
            fingerprint(AnalysisRequest.model_validate(body)),
            "a.wav",
            settings.worker.max_deliveries,
        )
        await broker.publish(body)
        [result] = await broker.results(1)
        dead = await broker.drain(settings.rabbitmq.dead_letter_queue, 1)
    assert result.status is ResultStatus.FAILED
    assert result.error is not None
    assert result.error.code == "worker_crashed"
    assert len(dead) == 1


@pytest.mark.parametrize("past_deadline", [False, True], ids=["first-reply", "every-reply-past-the-deadline"])
async def test_a_start_whose_reply_was_lost_is_counted_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, past_deadline: bool
) -> None:
    """The ledger commits the start, then the connection drops before the reply.

    * Only the first reply lost: the retry must find its own lease, not "running in another
      worker" (a requeue, the lease waited out and a start counted toward ``max_deliveries`` that
      never ran).
    * Every reply lost until the persist deadline passes: the delivery is requeued with a delay,
      not knowing whether its start committed. It must give that start back (by its token), or the
      copy waits out a lease nobody holds and counts a second start.
    """
    real_begin = PostgresLedger.begin
    loop = asyncio.get_running_loop()
    lose_until: float | None = None
    lost = 0

    async def begin_replies_lost(self: PostgresLedger, *args: Any, **kwargs: Any) -> Started | Known:
        nonlocal lost, lose_until
        if lose_until is None:  # from the first start on
            lose_until = loop.time() + (settings.worker.persist_deadline_s + 0.5 if past_deadline else 0.0)
        began = await real_begin(self, *args, **kwargs)
        if lost == 0 or loop.time() < lose_until:
            lost += 1
            raise SinkUnavailable("postgres: connection lost while reading the reply (test)")
        return began

    monkeypatch.setattr(PostgresLedger, "begin", begin_replies_lost)
    write_song(settings.worker.media_root / "a.wav")
    wait_s = settings.worker.lease_s / 2 + (settings.worker.persist_deadline_s if past_deadline else 0.0)
    async with Broker(settings) as broker, running_worker(settings):
        await broker.publish(request("req-lost", "a.wav"))
        [result] = await broker.results(1, timeout_s=wait_s)
    assert lost >= 1 if past_deadline else lost == 1
    assert result.status is ResultStatus.COMPLETED
    sql = "SELECT attempts FROM requests WHERE request_id = $1"
    [row] = await pg_rows(settings.postgres.dsn, sql, "req-lost")
    assert row["attempts"] == 1


async def test_tags_are_stored_with_how_they_compare_to_the_measurement(settings: Settings) -> None:
    import mutagen.flac
    import soundfile as sf

    from analysis_service.audio.synth import demo_song

    path = settings.worker.media_root / "tagged.flac"
    sf.write(path, demo_song(bpm=120.0, tonic=9, mode="minor", seconds=12.0, sample_rate=22050), 22050)
    tags = mutagen.flac.FLAC(path)  # type: ignore[no-untyped-call]
    tags.update({"TITLE": "It's a Test", "ARTIST": "Tester", "BPM": "60", "INITIALKEY": "Am"})  # type: ignore[no-untyped-call]
    tags.save()
    async with Broker(settings) as broker, running_worker(settings):
        await broker.publish(request("tagged", "tagged.flac"))
        [result] = await broker.results(1)
        [node] = await graph_rows(
            settings.neo4j,
            "MATCH (r:Recording) RETURN r.title AS title, r.tag_bpm AS bpm, r.tag_bpm_check AS bpm_check, "
            "r.tag_key_check AS key_check",
        )
    assert result.output is not None
    assert result.output.tags is not None
    assert result.output.tag_check is not None
    check = result.output.tag_check
    recording = (await pg_rows(settings.postgres.dsn, "SELECT * FROM recordings"))[0]
    assert (recording["title"], recording["artist"], recording["tag_bpm"]) == ("It's a Test", "Tester", 60.0)
    assert recording["tag_key"] == "Am"
    row = (await pg_rows(settings.postgres.dsn, "SELECT tag_bpm_check, tag_key_check FROM analysis_results"))[
        0
    ]
    assert (row["tag_bpm_check"], row["tag_key_check"]) == (check.bpm, check.key)
    assert check.bpm == "double"  # the song is at 120 BPM, twice what the tag says
    assert node == {"title": "It's a Test", "bpm": 60.0, "bpm_check": check.bpm, "key_check": check.key}


async def graph_rows(graph: Neo4jSettings, cypher: str) -> list[dict[str, Any]]:
    driver = neo4j.AsyncGraphDatabase.driver(graph.uri, auth=(graph.user, graph.password))
    try:
        async with driver.session() as session:
            return [record.data() async for record in await session.run(cypher)]
    finally:
        await driver.close()


async def test_a_worker_takes_only_the_urgent_requests_it_can_start(
    tmp_path: Path, rabbit_url: str, pg_dsn: str, redis_settings: RedisSettings, bolt_server: Neo4jSettings
) -> None:
    """One urgent slot: the next urgent requests stay in the broker (for another worker), instead of
    waiting here with a start counted against them."""
    settings = make_settings(
        tmp_path, rabbit_url=rabbit_url, pg_dsn=pg_dsn, redis=redis_settings, graph=bolt_server, concurrency=1
    )
    media = settings.worker.media_root
    write_long_song(media / "long.flac", seconds=7200.0)  # ~11 s of analysis on a fast machine
    write_song(media / "short.wav", seconds=8.0)
    urgent_queue = settings.rabbitmq.urgent_queue
    async with Broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish(request("first", "long.flac", priority=9), priority=9)
        await analysing(worker, urgent=True)
        for i in range(2):
            await broker.publish(request(f"next-{i}", "short.wav", priority=9), priority=9)
        await asyncio.sleep(1.0)
        assert await broker.depth(urgent_queue) == 2
        assert len(worker._tasks) == 1
        results = await broker.results(3, timeout_s=120)
    assert results[0].request_id == "first"
    assert all(r.status is ResultStatus.COMPLETED for r in results)
