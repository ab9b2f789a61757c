"""GraphSink against a real Bolt server (a fresh FalkorDB per test): schema, MERGE idempotency, queries."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import neo4j
import pytest

from analysis_service.errors import SinkUnavailable
from analysis_service.settings import Neo4jSettings
from analysis_service.sinks.base import ResultSink
from analysis_service.sinks.graph import GraphSink, camelot_keys, camelot_neighbours, tempo_range
from service_shared.messages import (
    AnalysisResultMessage,
    EngineOutput,
    ErrorInfo,
    KeyResult,
    MoodResult,
    ResultStatus,
    TempoResult,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def result(
    request_id: str,
    content_hash: str,
    *,
    bpm: float = 124.0,
    camelot: str = "8A",
    key: str = "A minor",
    mood: str = "energetic",
) -> AnalysisResultMessage:
    tonic, mode = key.split()
    assert mode in ("major", "minor")
    return AnalysisResultMessage(
        request_id=request_id,
        status=ResultStatus.COMPLETED,
        file=f"library/{content_hash}.flac",
        content_hash=content_hash,
        output=EngineOutput(
            duration_s=200.0,
            source_sample_rate=44100,
            source_channels=2,
            format="flac",
            tempo=TempoResult(bpm=bpm, confidence=0.9),
            key=KeyResult(key=key, tonic=tonic, mode=mode, camelot=camelot, confidence=0.8),
            mood=MoodResult(energy=0.7, valence=0.4, danceability=0.8, label=mood, confidence=0.6),
            analyzer_versions={"tempo": "1.0"},
            timings_s={"decode": 0.5},
        ),
    )


class Graph:
    """Read-only access to the test server for assertions (a second driver, closed after the sink)."""

    def __init__(self, driver: neo4j.AsyncDriver) -> None:
        self._driver = driver

    async def rows(self, query: str, **parameters: Any) -> list[dict[str, Any]]:
        async with self._driver.session() as session:
            tx = await session.begin_transaction()
            async with tx:
                result = await tx.run(query, parameters)
                rows = [record.data() async for record in result]
                await tx.commit()
        return rows

    async def count(self, query: str, **parameters: Any) -> int:
        rows = await self.rows(query, **parameters)
        return int(rows[0]["n"])

    async def labels(self) -> dict[str, int]:
        rows = await self.rows("MATCH (n) RETURN labels(n)[0] AS label, count(n) AS n")
        return {row["label"]: int(row["n"]) for row in rows}

    async def edges(self) -> dict[str, int]:
        rows = await self.rows("MATCH ()-[e]->() RETURN type(e) AS type, count(e) AS n")
        return {row["type"]: int(row["n"]) for row in rows}


@pytest.fixture
async def sink(bolt_server: Neo4jSettings) -> AsyncIterator[GraphSink]:
    graph_sink = GraphSink(bolt_server, connection_timeout_s=5.0)
    await graph_sink.start()
    yield graph_sink
    await graph_sink.close()


@pytest.fixture
async def graph(bolt_server: Neo4jSettings, sink: GraphSink) -> AsyncIterator[Graph]:
    # Depends on ``sink`` so that it is torn down first: FalkorDB may hang the first connection
    # opened after a driver closed, and the sink's close opens none.
    driver = neo4j.AsyncGraphDatabase.driver(bolt_server.uri, auth=(bolt_server.user, bolt_server.password))
    yield Graph(driver)
    await driver.close()


def test_camelot_tables() -> None:
    keys = camelot_keys()
    assert len({k["camelot"] for k in keys}) == 24
    assert {"camelot": "8A", "name": "A minor", "tonic": "A", "mode": "minor"} in keys
    assert {"camelot": "8B", "name": "C major", "tonic": "C", "mode": "major"} in keys
    assert camelot_neighbours("8A") == ["8B", "7A", "9A"]
    assert camelot_neighbours("12B") == ["12A", "11B", "1B"]
    assert camelot_neighbours("1A") == ["1B", "12A", "2A"]
    with pytest.raises(ValueError, match="not a Camelot code"):
        camelot_neighbours("13A")
    assert tempo_range(124.6) == {"name": "120-129", "min_bpm": 120, "max_bpm": 130}
    assert tempo_range(99.99)["name"] == "90-99"


async def test_start_creates_keys_mixes_with_edges_and_indexes(sink: GraphSink, graph: Graph) -> None:
    assert sink.dialect == "falkordb"
    await sink.start()  # idempotent, indexes included
    assert await graph.labels() == {"Key": 24}
    assert await graph.edges() == {"MIXES_WITH": 72}
    neighbours = await graph.rows(
        "MATCH (:Key {camelot: $c})-[:MIXES_WITH]->(k:Key) RETURN k.camelot AS c ORDER BY c", c="8A"
    )
    assert [row["c"] for row in neighbours] == ["7A", "8B", "9A"]
    a_minor = await graph.rows("MATCH (k:Key {camelot: '8A'}) RETURN k.name AS name")
    assert a_minor == [{"name": "A minor"}]
    indexes = await graph.rows("CALL db.indexes() YIELD label, properties RETURN label, properties")
    assert {(row["label"], row["properties"][0]) for row in indexes} == {
        ("Recording", "content_hash"),
        ("Analysis", "request_id"),
        ("Key", "camelot"),
        ("Mood", "label"),
        ("TempoRange", "name"),
    }


async def test_write_creates_nodes_and_edges(sink: GraphSink, graph: Graph) -> None:
    await sink.write(result("req-1", "hash-1", bpm=124.6))
    assert await graph.labels() == {"Key": 24, "Analysis": 1, "Recording": 1, "Mood": 1, "TempoRange": 1}
    rows = await graph.rows(
        """
        MATCH (a:Analysis {request_id: 'req-1'})-[:OF]->(r:Recording {content_hash: 'hash-1'})
        MATCH (r)-[:IN_KEY]->(k:Key), (r)-[:HAS_MOOD]->(m:Mood), (r)-[:IN_TEMPO_RANGE]->(t:TempoRange)
        RETURN a.status AS status, a.bpm AS bpm, r.path AS path, r.duration_s AS duration_s,
               r.format AS format, k.name AS key, m.label AS mood, t.name AS tempo,
               t.min_bpm AS min_bpm, t.max_bpm AS max_bpm
        """
    )
    assert rows == [
        {
            "status": "completed",
            "bpm": 124.6,
            "path": "library/hash-1.flac",
            "duration_s": 200.0,
            "format": "flac",
            "key": "A minor",
            "mood": "energetic",
            "tempo": "120-129",
            "min_bpm": 120,
            "max_bpm": 130,
        }
    ]


async def test_double_write_creates_no_duplicates(sink: GraphSink, graph: Graph) -> None:
    await sink.write(result("req-1", "hash-1"))
    first = (await graph.labels(), await graph.edges())
    await sink.write(result("req-1", "hash-1"))
    await sink.write(result("req-2", "hash-1"))  # another request for the same audio
    labels, edges = await graph.labels(), await graph.edges()
    assert labels == {**first[0], "Analysis": 2}
    assert edges == {**first[1], "OF": 2}
    assert first[1] == {"MIXES_WITH": 72, "OF": 1, "IN_KEY": 1, "HAS_MOOD": 1, "IN_TEMPO_RANGE": 1}


async def test_a_new_key_replaces_the_old_edge(sink: GraphSink, graph: Graph) -> None:
    await sink.write(result("req-1", "hash-1", camelot="8A", key="A minor", bpm=124.0))
    await sink.write(result("req-2", "hash-1", camelot="8B", key="C major", bpm=133.0, mood="calm"))
    rows = await graph.rows(
        """
        MATCH (r:Recording {content_hash: 'hash-1'})
        MATCH (r)-[:IN_KEY]->(k:Key)
        MATCH (r)-[:HAS_MOOD]->(m:Mood)
        MATCH (r)-[:IN_TEMPO_RANGE]->(t:TempoRange)
        RETURN k.camelot AS camelot, m.label AS mood, t.name AS tempo
        """
    )
    assert rows == [{"camelot": "8B", "mood": "calm", "tempo": "130-139"}]


async def test_failed_result_without_hash_creates_only_the_analysis(sink: GraphSink, graph: Graph) -> None:
    failed = AnalysisResultMessage(
        request_id="req-missing",
        status=ResultStatus.FAILED,
        file="library/gone.mp3",
        error=ErrorInfo(code="file_not_found", message="no such file"),
    )
    await sink.write(failed)
    await sink.write(failed)
    assert await graph.labels() == {"Key": 24, "Analysis": 1}
    assert await graph.edges() == {"MIXES_WITH": 72}
    rows = await graph.rows(
        "MATCH (a:Analysis {request_id: 'req-missing'}) RETURN a.status AS status, a.error_code AS code"
    )
    assert rows == [{"status": "failed", "code": "file_not_found"}]


async def test_failed_result_with_hash_links_the_recording_only(sink: GraphSink, graph: Graph) -> None:
    await sink.write(result("req-ok", "hash-1", bpm=124.0))
    await sink.write(
        AnalysisResultMessage(
            request_id="req-timeout",
            status=ResultStatus.FAILED,
            file="library/hash-1.flac",
            content_hash="hash-1",
            error=ErrorInfo(code="analysis_timeout", message="ran past 60 s"),
        )
    )
    assert (
        await graph.count(
            "MATCH (:Analysis)-[:OF]->(r:Recording {content_hash: 'hash-1'}) RETURN count(r) AS n"
        )
        == 2
    )
    rows = await graph.rows(
        "MATCH (r:Recording {content_hash: 'hash-1'}) RETURN r.bpm AS bpm, r.format AS format"
    )
    assert rows == [{"bpm": 124.0, "format": "flac"}]  # what the earlier analysis found is kept


async def test_a_terminal_status_is_never_replaced_but_the_recording_is_still_linked(
    sink: GraphSink, graph: Graph
) -> None:
    await sink.write(
        AnalysisResultMessage(
            request_id="req-1",
            status=ResultStatus.FAILED,
            file="library/gone.mp3",
            error=ErrorInfo(code="file_not_found", message="no such file"),
        )
    )
    await sink.write(result("req-1", "hash-1", bpm=124.0))  # another outcome for the same id
    rows = await graph.rows(
        "MATCH (a:Analysis {request_id: 'req-1'}) RETURN a.status AS status, a.error_code AS code"
    )
    assert rows == [{"status": "failed", "code": "file_not_found"}]
    assert await graph.count("MATCH (:Analysis)-[:OF]->(r:Recording) RETURN count(r) AS n") == 1


async def test_an_analysis_written_for_other_content_leaves_its_old_recording(
    sink: GraphSink, graph: Graph
) -> None:
    await sink.write(result("req-1", "hash-1"))
    await sink.write(result("req-1", "hash-2"))  # the same request, re-analysed content
    rows = await graph.rows(
        "MATCH (:Analysis {request_id: 'req-1'})-[:OF]->(r:Recording) RETURN r.content_hash AS hash"
    )
    assert rows == [{"hash": "hash-2"}]
    assert (await graph.labels())["Recording"] == 2  # the old recording stays, unlinked


async def test_compatible_recordings(sink: GraphSink) -> None:
    await sink.write(result("r-seed", "seed", camelot="8A", key="A minor", bpm=124.0))
    await sink.write(result("r-same", "same-key", camelot="8A", key="A minor", bpm=126.0))
    await sink.write(result("r-rel", "relative", camelot="8B", key="C major", bpm=123.0))
    await sink.write(result("r-up", "fifth-up", camelot="9A", key="E minor", bpm=124.5))
    await sink.write(result("r-far", "far-key", camelot="3A", key="Bb minor", bpm=124.0))
    await sink.write(result("r-fast", "too-fast", camelot="8B", key="C major", bpm=140.0))

    rows = await sink.compatible_recordings("seed", bpm_tolerance=4.0)
    assert [row["content_hash"] for row in rows] == ["fifth-up", "relative", "same-key"]
    assert rows[0] == {
        "content_hash": "fifth-up",
        "path": "library/fifth-up.flac",
        "bpm": 124.5,
        "key": "E minor",
        "camelot": "9A",
        "bpm_delta": 0.5,
    }
    assert [r["content_hash"] for r in await sink.compatible_recordings("seed", bpm_tolerance=1.0)] == [
        "fifth-up",
        "relative",
    ]
    assert len(await sink.compatible_recordings("seed", bpm_tolerance=20.0, limit=2)) == 2
    assert await sink.compatible_recordings("unknown-hash") == []


async def test_unknown_camelot_code_is_rejected_before_writing(sink: GraphSink, graph: Graph) -> None:
    with pytest.raises(ValueError, match="not a Camelot code"):
        await sink.write(result("req-bad", "hash-bad", camelot="13C"))
    assert await graph.labels() == {"Key": 24}


async def test_ping(sink: GraphSink) -> None:
    await sink.ping()


async def test_closed_port_is_sink_unavailable(closed_port: int) -> None:
    sink = GraphSink(Neo4jSettings(uri=f"bolt://127.0.0.1:{closed_port}"), connection_timeout_s=2.0)
    started = time.monotonic()
    try:
        with pytest.raises(SinkUnavailable, match="Neo4j unavailable while identifying the server"):
            await sink.start()
    finally:
        await sink.close()
    assert time.monotonic() - started < 5.0


async def test_use_before_start_is_a_bug() -> None:
    sink: ResultSink = GraphSink(Neo4jSettings())  # also checks, statically, that it is a ResultSink
    with pytest.raises(RuntimeError, match="before start"):
        await sink.ping()
