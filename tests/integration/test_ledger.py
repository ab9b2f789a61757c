"""The outcome ledger against a real PostgreSQL: migrations, the terminal-once rule, id reuse, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from analysis_service.errors import SinkRejected, SinkUnavailable
from analysis_service.settings import PostgresSettings
from analysis_service.sinks.postgres import (
    Finished,
    IdConflict,
    Known,
    PostgresLedger,
    RequestFields,
    Started,
    load_migrations,
)
from service_shared.messages import (
    AnalysisResultMessage,
    EngineOutput,
    ErrorInfo,
    KeyResult,
    MoodResult,
    ResultStatus,
    Segment,
    TempoResult,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SinkFactory = Callable[..., Awaitable[PostgresLedger]]

FIELDS = RequestFields(fingerprint="fp-1", file="library/track one.flac", analyses=["bpm", "key"], priority=5)
OTHER = RequestFields(fingerprint="fp-2", file="library/another.flac")


def completed(request_id: str = "req-1", *, segments: int = 3, bpm: float = 124.0) -> AnalysisResultMessage:
    output = EngineOutput(
        duration_s=700.0,
        source_sample_rate=44100,
        source_channels=2,
        format="flac",
        tempo=TempoResult(bpm=bpm, confidence=0.9),
        key=KeyResult(key="A minor", tonic="A", mode="minor", camelot="8A", confidence=0.8),
        mood=MoodResult(energy=0.7, valence=0.4, danceability=0.8, label="energetic", confidence=0.6),
        timeline=[
            Segment(start_s=i * 10.0, end_s=(i + 1) * 10.0, bpm=bpm, key="A minor") for i in range(segments)
        ],
        analyzer_versions={"tempo": "1.0", "key": "1.1", "mood": "0.9"},
        timings_s={"decode": 0.5, "features": 1.25},
    )
    return AnalysisResultMessage(
        request_id=request_id,
        correlation_id="corr-1",
        status=ResultStatus.COMPLETED,
        file="library/track one.flac",
        content_hash="c0ffee",
        output=output,
        finished_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    )


@pytest.fixture
async def make_sink(pg_dsn: str) -> AsyncIterator[SinkFactory]:
    """Factory of started sinks on the test database; closes them all afterwards."""
    sinks: list[PostgresLedger] = []

    async def factory(dsn: str = pg_dsn, start: bool = True) -> PostgresLedger:
        sink = PostgresLedger(PostgresSettings(dsn=dsn, command_timeout_s=5.0))
        sinks.append(sink)
        if start:
            await sink.start()
        return sink

    yield factory
    for sink in sinks:
        await sink.close()


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_dsn)
    yield connection
    await connection.close()


async def test_migrations_apply_once_and_are_recorded(make_sink: SinkFactory, db: asyncpg.Connection) -> None:
    await make_sink()
    await make_sink()  # a second start finds everything applied
    rows = await db.fetch("SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in load_migrations()]
    assert rows[0]["name"] == "initial"
    tables = {
        r["tablename"] for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert {"requests", "recordings", "analysis_results", "timeline_segments", "schema_migrations"} <= tables


async def test_concurrent_starts_do_not_race(make_sink: SinkFactory, db: asyncpg.Connection) -> None:
    sinks = [await make_sink(start=False) for _ in range(4)]
    await asyncio.gather(*(sink.start() for sink in sinks))
    count = await db.fetchval("SELECT count(*) FROM schema_migrations")
    assert count == len(load_migrations())


async def test_finish_stores_the_outcome_once_with_typed_columns(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    sink = await make_sink()
    first = await sink.finish(completed(segments=3), FIELDS)
    again = await sink.finish(completed(segments=2, bpm=128.0), FIELDS)  # a second delivery
    assert first == Finished(completed(segments=3), written=True, published=False)
    assert again.written is False
    assert again.result == completed(segments=3)  # the stored outcome, not the second one
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 1
    assert await db.fetchval("SELECT count(*) FROM recordings") == 1
    assert await db.fetchval("SELECT count(*) FROM timeline_segments") == 3
    row = await db.fetchrow("SELECT * FROM analysis_results WHERE request_id = 'req-1'")
    assert (row["status"], row["bpm"]) == ("completed", 124.0)
    assert (row["key"], row["key_tonic"], row["key_mode"], row["camelot"]) == ("A minor", "A", "minor", "8A")
    assert (row["mood_label"], row["energy"], row["danceability"]) == ("energetic", 0.7, 0.8)
    assert json.loads(row["analyzer_versions"]) == {"tempo": "1.0", "key": "1.1", "mood": "0.9"}
    assert json.loads(row["timings"]) == {"decode": 0.5, "features": 1.25}
    assert EngineOutput.model_validate_json(row["output"]) == completed(segments=3).output
    assert AnalysisResultMessage.model_validate_json(row["result"]) == completed(segments=3)
    assert row["finished_at"] == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    ledger = await db.fetchrow("SELECT * FROM requests WHERE request_id = 'req-1'")
    assert (ledger["status"], ledger["fingerprint"], ledger["file"]) == (
        "completed",
        "fp-1",
        "library/track one.flac",
    )
    assert ledger["finished_at"] == row["finished_at"]
    recording = await db.fetchrow("SELECT * FROM recordings WHERE content_hash = 'c0ffee'")
    assert (recording["path"], recording["duration_s"], recording["format"]) == (
        "library/track one.flac",
        700.0,
        "flac",
    )
    assert (recording["sample_rate"], recording["channels"]) == (44100, 2)


async def test_concurrent_finishes_store_one_outcome_and_all_return_it(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    """Six deliveries of one running request finish at once, each on its own connection, queued
    behind a lock on the request's row: one outcome is stored, and every other delivery is told that
    outcome (committed after their statements' snapshot was taken, so only a statement of its own
    can read it)."""
    sinks = [await make_sink() for _ in range(6)]
    assert isinstance(await sinks[0].begin("req-1", FIELDS, count_attempt=True), Started)
    outcomes = [completed(segments=1 + i, bpm=120.0 + i) for i in range(len(sinks))]
    async with db.transaction():
        await db.execute("SELECT 1 FROM requests WHERE request_id = 'req-1' FOR UPDATE")
        finishing = asyncio.gather(*(s.finish(o, FIELDS) for s, o in zip(sinks, outcomes, strict=True)))
        for _ in range(200):
            if await db.fetchval(_LOCK_WAITS) == len(sinks):
                break
            await asyncio.sleep(0.025)
        assert await db.fetchval(_LOCK_WAITS) == len(sinks), "the finishes did not all wait for the row"
    finished = await finishing
    [winner] = [f.result for f in finished if f.written]
    assert all(f.result == winner for f in finished)
    assert winner.output is not None
    assert winner.output.tempo is not None
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 1
    assert await db.fetchval("SELECT bpm FROM analysis_results") == winner.output.tempo.bpm
    segments = winner.output.timeline or []
    assert await db.fetchval("SELECT count(*) FROM timeline_segments") == len(segments)
    assert await db.fetchval("SELECT status FROM requests WHERE request_id = 'req-1'") == "completed"


_LOCK_WAITS = """
SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
"""


def failure(request_id: str = "req-1", code: str = "worker_crashed") -> AnalysisResultMessage:
    return AnalysisResultMessage(
        request_id=request_id,
        status=ResultStatus.FAILED,
        file="library/track one.flac",
        error=ErrorInfo(code=code, message=f"failed: {code}"),
    )


async def test_a_failed_outcome_never_replaces_a_completed_one(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    sink = await make_sink()
    await sink.finish(completed(), FIELDS)
    late = await sink.finish(failure(), FIELDS)  # e.g. a 4th delivery failed as worker_crashed
    assert (late.written, late.result.status) == (False, ResultStatus.COMPLETED)
    assert await db.fetchval("SELECT status FROM analysis_results WHERE request_id = 'req-1'") == "completed"
    assert await db.fetchval("SELECT status FROM requests WHERE request_id = 'req-1'") == "completed"


async def test_begin_counts_starts_and_reports_terminal_requests(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    sink = await make_sink()
    expire = "UPDATE requests SET heartbeat_at = now() - interval '1 hour'"
    assert await sink.begin("req-1", FIELDS, count_attempt=True) == Started(1)
    leased = await sink.begin("req-1", FIELDS, count_attempt=True)  # running elsewhere: not counted
    assert isinstance(leased, Known)
    assert (leased.record.leased, leased.record.attempts) == (True, 1)
    await db.execute(expire)  # that worker died: its lease ran out
    assert await sink.begin("req-1", FIELDS, count_attempt=True) == Started(2)
    await db.execute(expire)
    assert await sink.begin("req-1", FIELDS, count_attempt=True, given_back=2) == Started(1)
    await sink.give_back("req-1")  # an orderly requeue releases the lease at once
    assert await sink.begin("req-1", FIELDS, count_attempt=False) == Started(0)
    await sink.finish(completed(), FIELDS)
    known = await sink.begin("req-1", FIELDS, count_attempt=True)
    assert isinstance(known, Known)
    assert known.record.terminal
    assert known.record.result == completed()
    assert known.record.attempts == 0  # a terminal request is never counted again


async def test_a_give_back_carried_by_a_copy_counts_once_however_often_it_is_delivered(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    """A copy requeued with a delay carries the starts to give back (``x-analysis-given-back``, a
    running total). When that copy kills worker after worker, the broker redelivers it with the
    same header: its give-back must count once, or the starts never add up to ``max_deliveries``."""
    sink = await make_sink()
    expire = "UPDATE requests SET heartbeat_at = now() - interval '1 hour'"
    assert await sink.begin("req-1", FIELDS, count_attempt=True) == Started(1)  # stores down: requeued
    await db.execute(expire)
    assert await sink.begin("req-1", FIELDS, count_attempt=True, given_back=1) == Started(1)  # the copy
    for attempts in (2, 3, 4):  # the copy's analysis kills the worker; the broker delivers it again
        await db.execute(expire)
        assert await sink.begin("req-1", FIELDS, count_attempt=True, given_back=1) == Started(attempts)
    await sink.give_back("req-1")  # then a shutdown requeues it in order: that start is given back
    assert await sink.begin("req-1", FIELDS, count_attempt=True, given_back=1) == Started(4)
    await db.execute(expire)
    assert await sink.begin("req-1", FIELDS, count_attempt=True, given_back=2) == Started(4)  # a later copy


async def test_a_start_retried_after_its_reply_was_lost_counts_once(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    """A ``begin`` that committed but whose reply was lost (the connection dropped) is retried with
    the same lease token: it is the same start, so it is neither counted again nor taken for a
    lease held elsewhere. Another delivery (another token) still meets the live lease."""
    sink = await make_sink()
    assert await sink.begin("req-1", FIELDS, count_attempt=True, lease="delivery-a") == Started(1)
    assert await sink.begin("req-1", FIELDS, count_attempt=True, lease="delivery-a") == Started(1)
    other = await sink.begin("req-1", FIELDS, count_attempt=True, lease="delivery-b")
    assert isinstance(other, Known)
    assert (other.record.leased, other.record.attempts) == (True, 1)
    await db.execute("UPDATE requests SET heartbeat_at = now() - interval '1 hour'")
    assert await sink.begin("req-1", FIELDS, count_attempt=True, lease="delivery-b") == Started(2)
    await sink.give_back("req-1")  # an orderly requeue: the token goes with the lease
    assert await sink.begin("req-1", FIELDS, count_attempt=True, lease="delivery-b") == Started(2)


async def test_a_worker_whose_lease_was_taken_neither_renews_nor_gives_back_the_new_one(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    """Worker A's heartbeat stalled past the lease and worker B took the request over. A's late
    heartbeat must not renew B's lease, and A's orderly requeue must not give back B's start nor
    release B's lease (a third worker would then start beside B)."""
    sink = await make_sink()
    expire = "UPDATE requests SET heartbeat_at = now() - interval '1 hour'"
    assert await sink.begin("req-1", FIELDS, count_attempt=True, lease="worker-a") == Started(1)
    await db.execute(expire)
    assert await sink.begin("req-1", FIELDS, count_attempt=True, lease="worker-b") == Started(2)
    await db.execute("UPDATE requests SET heartbeat_at = now() - interval '10 seconds'")
    before = await db.fetchval("SELECT heartbeat_at FROM requests WHERE request_id = 'req-1'")
    assert await sink.heartbeat({"req-1": "worker-a"}) == set()
    assert await db.fetchval("SELECT heartbeat_at FROM requests WHERE request_id = 'req-1'") == before
    await sink.give_back("req-1", lease="worker-a")
    row = await db.fetchrow(
        "SELECT attempts, heartbeat_at, lease_token FROM requests WHERE request_id = 'req-1'"
    )
    assert row is not None
    assert (row["attempts"], row["heartbeat_at"], row["lease_token"]) == (2, before, "worker-b")
    assert await sink.heartbeat({"req-1": "worker-b"}) == set()
    assert await db.fetchval("SELECT heartbeat_at FROM requests WHERE request_id = 'req-1'") > before
    await sink.give_back("req-1", lease="worker-b")
    assert await sink.begin("req-1", FIELDS, count_attempt=True, lease="worker-c") == Started(2)


async def test_progress_owed_is_taken_by_one_payer_and_can_be_owed_again(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    """Terminal progress Redis missed is owed in the ledger; workers paying it take disjoint debts
    (not every worker the same ones), and what Redis refuses again is owed again."""
    sink = await make_sink()
    ids = [f"req-{n}" for n in range(5)]
    for rid in ids:
        await sink.begin(rid, FIELDS, count_attempt=True)
        await sink.finish(completed(rid), FIELDS)
    await sink.owe_progress(ids)
    first, second = await asyncio.gather(sink.claim_owed_progress(3), sink.claim_owed_progress(3))
    taken = [r.request_id for r in first + second]
    assert sorted(taken) == ids  # every debt taken once
    assert await sink.claim_owed_progress(10) == []
    await sink.owe_progress(["req-1"])  # Redis refused it again
    assert [r.request_id for r in await sink.claim_owed_progress(10)] == ["req-1"]
    await sink.owe_progress(["req-2"])
    await sink.progress_paid(["req-2"])  # the worker that owed it wrote it after all
    assert await sink.claim_owed_progress(10) == []
    assert await db.fetchval("SELECT count(*) FROM requests WHERE progress_owed") == 0


async def test_an_id_of_another_request_is_never_touched(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    sink = await make_sink()
    await sink.begin("req-1", FIELDS, count_attempt=True)
    known = await sink.begin("req-1", OTHER, count_attempt=True)
    assert isinstance(known, Known)
    assert known.record.fingerprint == "fp-1"
    with pytest.raises(IdConflict):
        await sink.finish(failure(code="invalid_request"), OTHER)
    assert await db.fetchval("SELECT status FROM requests WHERE request_id = 'req-1'") == "running"
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 0


async def test_published_and_cancellations(make_sink: SinkFactory, db: asyncpg.Connection) -> None:
    sink = await make_sink()
    await sink.begin("req-1", FIELDS, count_attempt=True)
    await sink.begin("req-2", OTHER, count_attempt=True)
    await db.execute("UPDATE requests SET cancel_requested_at = now() WHERE request_id = 'req-2'")
    assert await sink.heartbeat({"req-1": None, "req-2": None, "unknown": None}) == {"req-2"}
    known = await sink.begin("req-2", OTHER, count_attempt=True)
    assert isinstance(known, Known)
    assert known.record.cancel_requested
    await sink.finish(completed(), FIELDS)
    await sink.mark_published("req-1")
    again = await sink.finish(completed(), FIELDS)
    assert (again.written, again.published) == (False, True)


async def test_data_the_database_refuses_is_rejected_not_unavailable(make_sink: SinkFactory) -> None:
    sink = await make_sink()
    bad = completed().model_copy(update={"file": "nul\x00byte.flac"})
    with pytest.raises(SinkRejected, match="refused the data"):
        await sink.finish(bad, FIELDS)


async def test_closed_port_is_sink_unavailable(make_sink: SinkFactory, closed_port: int) -> None:
    sink = await make_sink(dsn=f"postgresql://postgres@127.0.0.1:{closed_port}/test", start=False)
    started = time.monotonic()
    with pytest.raises(SinkUnavailable, match="PostgreSQL unavailable while starting") as caught:
        await sink.start()
    assert isinstance(caught.value.__cause__, OSError)
    assert time.monotonic() - started < 5.0


async def test_a_refused_write_rolls_back(make_sink: SinkFactory, db: asyncpg.Connection) -> None:
    sink = await make_sink()
    await db.execute("ALTER TABLE analysis_results ADD CONSTRAINT bpm_sane CHECK (bpm < 100)")
    with pytest.raises(SinkRejected):
        await sink.finish(completed(bpm=124.0), FIELDS)
    assert await db.fetchval("SELECT count(*) FROM recordings") == 0  # the transaction rolled back
    assert await db.fetchval("SELECT status FROM requests WHERE request_id = 'req-1'") is None


async def test_use_before_start_is_a_bug() -> None:
    sink = PostgresLedger(PostgresSettings())
    with pytest.raises(RuntimeError, match="before start"):
        await sink.finish(completed(), FIELDS)
