"""PostgresSink against a real PostgreSQL: migrations, idempotent writes, failures, outages."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import PostgresSettings
from analysis_service.sinks.base import ResultSink
from analysis_service.sinks.postgres import PostgresSink, load_migrations
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

SinkFactory = Callable[..., Awaitable[PostgresSink]]


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
    sinks: list[PostgresSink] = []

    async def factory(dsn: str = pg_dsn, start: bool = True) -> PostgresSink:
        sink = PostgresSink(PostgresSettings(dsn=dsn, command_timeout_s=5.0))
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
    assert {"recordings", "analysis_results", "timeline_segments", "schema_migrations"} <= tables


async def test_concurrent_starts_do_not_race(make_sink: SinkFactory, db: asyncpg.Connection) -> None:
    sinks = [await make_sink(start=False) for _ in range(4)]
    await asyncio.gather(*(sink.start() for sink in sinks))
    count = await db.fetchval("SELECT count(*) FROM schema_migrations")
    assert count == len(load_migrations())


async def test_write_is_idempotent_and_replaces_segments(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    sink = await make_sink()
    await sink.write(completed(segments=3))
    await sink.write(completed(segments=3))
    assert await db.fetchval("SELECT count(*) FROM analysis_results") == 1
    assert await db.fetchval("SELECT count(*) FROM recordings") == 1
    assert await db.fetchval("SELECT count(*) FROM timeline_segments") == 3

    await sink.write(completed(segments=2, bpm=128.0))  # a redelivery with a different timeline
    segments = await db.fetch("SELECT idx, start_s, end_s, bpm, key FROM timeline_segments ORDER BY idx")
    assert [(s["idx"], s["end_s"], s["bpm"]) for s in segments] == [(0, 10.0, 128.0), (1, 20.0, 128.0)]

    row = await db.fetchrow("SELECT * FROM analysis_results WHERE request_id = 'req-1'")
    assert row["status"] == "completed"
    assert row["bpm"] == 128.0
    assert (row["key"], row["key_tonic"], row["key_mode"], row["camelot"]) == ("A minor", "A", "minor", "8A")
    assert (row["mood_label"], row["energy"], row["danceability"]) == ("energetic", 0.7, 0.8)
    assert json.loads(row["analyzer_versions"]) == {"tempo": "1.0", "key": "1.1", "mood": "0.9"}
    assert json.loads(row["timings"]) == {"decode": 0.5, "features": 1.25}
    assert EngineOutput.model_validate_json(row["output"]) == completed(segments=2, bpm=128.0).output
    assert row["finished_at"] == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert row["created_at"] <= row["updated_at"]
    recording = await db.fetchrow("SELECT * FROM recordings WHERE content_hash = 'c0ffee'")
    assert (recording["path"], recording["duration_s"], recording["format"]) == (
        "library/track one.flac",
        700.0,
        "flac",
    )
    assert (recording["sample_rate"], recording["channels"]) == (44100, 2)


async def test_failed_result_is_stored_with_its_error(make_sink: SinkFactory, db: asyncpg.Connection) -> None:
    sink = await make_sink()
    failed = AnalysisResultMessage(
        request_id="req-missing",
        status=ResultStatus.FAILED,
        file="library/gone.mp3",
        error=ErrorInfo(code="file_not_found", message="no such file: library/gone.mp3"),
    )
    await sink.write(failed)
    await sink.write(failed)
    row = await db.fetchrow("SELECT * FROM analysis_results WHERE request_id = 'req-missing'")
    assert (row["status"], row["error_code"]) == ("failed", "file_not_found")
    assert row["error_message"] == "no such file: library/gone.mp3"
    assert (row["content_hash"], row["output"], row["bpm"]) == (None, None, None)
    assert await db.fetchval("SELECT count(*) FROM recordings") == 0


async def test_failed_result_with_content_hash_keeps_known_recording_data(
    make_sink: SinkFactory, db: asyncpg.Connection
) -> None:
    sink = await make_sink()
    await sink.write(completed("req-ok"))
    await sink.write(
        AnalysisResultMessage(
            request_id="req-timeout",
            status=ResultStatus.FAILED,
            file="library/track one.flac",
            content_hash="c0ffee",
            error=ErrorInfo(code="analysis_timeout", message="ran past 60 s"),
        )
    )
    recording = await db.fetchrow("SELECT duration_s, format FROM recordings WHERE content_hash = 'c0ffee'")
    assert (recording["duration_s"], recording["format"]) == (700.0, "flac")
    assert await db.fetchval("SELECT count(*) FROM analysis_results WHERE content_hash = 'c0ffee'") == 2


async def test_closed_port_is_sink_unavailable(make_sink: SinkFactory, closed_port: int) -> None:
    sink = await make_sink(dsn=f"postgresql://postgres@127.0.0.1:{closed_port}/test", start=False)
    started = time.monotonic()
    with pytest.raises(SinkUnavailable, match="PostgreSQL unavailable while starting") as caught:
        await sink.start()
    assert isinstance(caught.value.__cause__, OSError)
    assert time.monotonic() - started < 5.0


async def test_programming_errors_are_not_masked(make_sink: SinkFactory, db: asyncpg.Connection) -> None:
    sink = await make_sink()
    await db.execute("ALTER TABLE analysis_results ADD CONSTRAINT bpm_sane CHECK (bpm < 100)")
    with pytest.raises(asyncpg.exceptions.CheckViolationError):
        await sink.write(completed(bpm=124.0))
    assert await db.fetchval("SELECT count(*) FROM recordings") == 0  # the transaction rolled back


async def test_use_before_start_is_a_bug() -> None:
    sink: ResultSink = PostgresSink(PostgresSettings())  # also checks, statically, that it is a ResultSink
    with pytest.raises(RuntimeError, match="before start"):
        await sink.write(completed())
