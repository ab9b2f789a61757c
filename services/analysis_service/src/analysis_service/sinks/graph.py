"""Neo4j result sink: recordings linked to their key, mood and tempo range, for DJ-style queries.

Graph model::

    (:Analysis {request_id, status, correlation_id, file, content_hash, bpm, key, camelot, mood,
                error_code, error_message, cached, finished_at})
        -[:OF]-> (:Recording {content_hash, path, duration_s, format, bpm, key, camelot, mood,
                              title, artist, album, year, genre, isrc, tag_bpm, tag_key,
                              tag_bpm_check, tag_key_check})
    (:Recording) -[:IN_KEY]->         (:Key {camelot: "8A", name: "A minor", tonic: "A", mode: "minor"})
    (:Recording) -[:HAS_MOOD]->       (:Mood {label})
    (:Recording) -[:IN_TEMPO_RANGE]-> (:TempoRange {name: "120-129", min_bpm: 120, max_bpm: 130})
    (:Key) -[:MIXES_WITH]-> (:Key)

* One ``Analysis`` per request id (the idempotency key) and one ``Recording`` per content hash;
  every write uses ``MERGE``, so a redelivered result creates nothing new. A failed result without
  a content hash creates only its ``Analysis`` node.
* A recording's ``IN_KEY``/``HAS_MOOD``/``IN_TEMPO_RANGE`` edge is replaced when a later analysis
  finds a different value; an analysis that did not compute a facet leaves its edge alone.
* ``TempoRange`` buckets are 10 BPM wide: ``min_bpm <= bpm < max_bpm``, named ``"120-129"``.
* :meth:`GraphSink.start` creates the 24 ``Key`` nodes (identified by their Camelot code; names
  spelled like :mod:`analysis_service.audio.key`: C, C#, D, Eb, E, F, F#, G, Ab, A, Bb, B) and a
  ``MIXES_WITH`` edge from each key to each of its three Camelot neighbours: the same number with
  the other letter (relative major/minor) and the same letter one step either way round the wheel
  (fifth up/down). That is 72 directed edges; a key is also compatible with itself, which the query
  below expresses with a zero-length hop rather than a self-loop.

Tracks that mix with this one (:meth:`GraphSink.compatible_recordings`)::

    MATCH (r:Recording {content_hash: $content_hash})-[:IN_KEY]->(:Key)
          -[:MIXES_WITH*0..1]->(k:Key)<-[:IN_KEY]-(o:Recording)
    WHERE o.content_hash <> r.content_hash AND abs(o.bpm - r.bpm) <= $bpm_tolerance
    RETURN DISTINCT o.content_hash AS content_hash, o.path AS path, o.bpm AS bpm,
           k.name AS key, k.camelot AS camelot, abs(o.bpm - r.bpm) AS bpm_delta
    ORDER BY bpm_delta, content_hash
    LIMIT $limit

All Cypher is parameterised and runs on Neo4j 5 and on FalkorDB's Bolt endpoint (used by the
tests). Only schema setup differs, see :meth:`GraphSink.start`.

The graph is derived from the outcome ledger: the worker writes here only the outcome PostgreSQL
holds, so both stores name the same outcome. As a second guard, an ``Analysis`` node that holds a
terminal status is never given another one.

Driver errors are classified here: a ``ClientError`` other than an authentication or permission
failure means "the server refuses this statement or data" and raises
:class:`~analysis_service.errors.SinkRejected`; everything else (connection loss, time-outs,
authentication after a password rotation, ``DatabaseError``, transient server errors) raises
:class:`~analysis_service.errors.SinkUnavailable`.

FalkorDB caveats (test backend only): its Bolt shim acknowledges ``BEGIN``/``COMMIT`` without
transactions (each statement is applied when run, atomically: a write is therefore one
statement), inlines parameters into the query text (so
string parameters are sent with ``\\`` and ``'`` backslash-escaped, which its parser undoes; floats
keep 6 decimals; several KB of parameters crash the server), and has no ``CREATE CONSTRAINT``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final, Literal, TypeVar

import neo4j
from neo4j.exceptions import AuthError, ClientError, DriverError, Forbidden, Neo4jError

from analysis_service.errors import SinkRejected, SinkUnavailable
from analysis_service.settings import Neo4jSettings
from service_shared.messages import AnalysisResultMessage

STORE = "Neo4j"

#: Everything the driver or the network raises.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (Neo4jError, DriverError, OSError, asyncio.TimeoutError)
#: Schema statements that lost a race with another replica creating the same thing.
_ALREADY_EXISTS = ("already indexed", "already exists", "EquivalentSchemaRuleAlreadyExists")


def _refused(exc: BaseException) -> bool:
    """A client error that is not about credentials or permissions: the server refuses the data."""
    return isinstance(exc, ClientError) and not isinstance(exc, AuthError | Forbidden)


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Translate driver errors raised while doing ``action`` into the service's store errors."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        if _refused(exc):
            raise SinkRejected(f"{STORE} refused the data while {action}: {exc}") from exc
        raise SinkUnavailable(f"{STORE} unavailable while {action}: {type(exc).__name__}: {exc}") from exc


def _falkordb_escaped(value: Any) -> Any:
    """``value`` with every string backslash-escaped for FalkorDB's parameter inlining."""
    if isinstance(value, str):
        return value.replace("\\", "\\\\").replace("'", "\\'")
    if isinstance(value, dict):
        return {k: _falkordb_escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_falkordb_escaped(v) for v in value]
    return value


Dialect = Literal["neo4j", "falkordb"]

NOTE_NAMES: Final = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
TEMPO_BUCKET_BPM: Final = 10


def camelot_code(pitch_class: int, mode: Literal["major", "minor"]) -> str:
    """Camelot wheel code of a key, e.g. ``camelot_code(9, "minor") == "8A"`` (A minor)."""
    major_pc = pitch_class if mode == "major" else (pitch_class + 3) % 12
    return f"{(7 * major_pc + 7) % 12 + 1}{'B' if mode == 'major' else 'A'}"


def camelot_keys() -> list[dict[str, str]]:
    """The 24 keys as ``{"camelot", "name", "tonic", "mode"}``, e.g. ``8A`` / ``A minor``."""
    modes: tuple[Literal["major", "minor"], ...] = ("major", "minor")
    return [
        {"camelot": camelot_code(pc, mode), "name": f"{tonic} {mode}", "tonic": tonic, "mode": mode}
        for mode in modes
        for pc, tonic in enumerate(NOTE_NAMES)
    ]


def camelot_neighbours(code: str) -> list[str]:
    """Codes that mix harmonically with ``code`` (itself excluded): ``"8A"`` → ``["8B", "7A", "9A"]``.

    Raises
    ------
    ValueError
        When ``code`` is not ``1A``..``12B``.
    """
    number, letter = code[:-1], code[-1:]
    if letter not in ("A", "B") or not number.isdigit() or not 1 <= int(number) <= 12:
        raise ValueError(f"{code!r} is not a Camelot code (1A..12A, 1B..12B)")
    n = int(number)
    other = "B" if letter == "A" else "A"
    return [f"{n}{other}", f"{(n - 2) % 12 + 1}{letter}", f"{n % 12 + 1}{letter}"]


def tempo_range(bpm: float) -> dict[str, Any]:
    """The 10-BPM bucket of ``bpm``: ``tempo_range(124.6) == {"name": "120-129", "min_bpm": 120, ...}``."""
    low = int(bpm // TEMPO_BUCKET_BPM) * TEMPO_BUCKET_BPM
    return {"name": f"{low}-{low + TEMPO_BUCKET_BPM - 1}", "min_bpm": low, "max_bpm": low + TEMPO_BUCKET_BPM}


# -- schema ----------------------------------------------------------------------------------------

#: (label, property) pairs that identify nodes; unique constraints on Neo4j, indexes on FalkorDB.
_NODE_KEYS: Final = (
    ("Recording", "content_hash"),
    ("Analysis", "request_id"),
    ("Key", "camelot"),
    ("Mood", "label"),
    ("TempoRange", "name"),
)

# Identifiers cannot be parameters in schema commands; these are built from the constants above.
_NEO4J_CONSTRAINTS: Final = tuple(
    f"CREATE CONSTRAINT {label.lower()}_{prop} IF NOT EXISTS FOR (n:{label}) REQUIRE n.{prop} IS UNIQUE"
    for label, prop in _NODE_KEYS
)
_FALKORDB_INDEXES: Final = {
    (label, prop): f"CREATE INDEX FOR (n:{label}) ON (n.{prop})" for label, prop in _NODE_KEYS
}

_LIST_PROCEDURES: Final = "CALL dbms.procedures() YIELD name RETURN collect(name) AS names"
_FALKORDB_PROCEDURE: Final = "db.idx.fulltext.createNodeIndex"  # FalkorDB's namespace is db.idx
_PROCEDURE_NOT_FOUND: Final = "Neo.ClientError.Procedure.ProcedureNotFound"
_FALKORDB_LIST_INDEXES: Final = "CALL db.indexes() YIELD label, properties RETURN label, properties"

_MERGE_KEYS: Final = """
UNWIND $keys AS key
MERGE (k:Key {camelot: key.camelot})
SET k.name = key.name, k.tonic = key.tonic, k.mode = key.mode
"""
_MERGE_MIXES_WITH: Final = """
UNWIND $pairs AS pair
MATCH (a:Key {camelot: pair.a})
MATCH (b:Key {camelot: pair.b})
MERGE (a)-[:MIXES_WITH]->(b)
"""

# -- writes ------------------------------------------------------------------------------------------

# A write is one statement (one round trip; atomic on both servers): the analysis, the removal of
# its edge to another recording, then, when the result names its content, that recording and its
# facets. A terminal status, once set, is never replaced by another (the ledger already
# guarantees it); the rest of the statement runs either way.
_MERGE_ANALYSIS: Final = """
MERGE (a:Analysis {request_id: $request_id})
FOREACH (_ IN CASE WHEN a.status IS NULL OR a.status = $props.status THEN [1] ELSE [] END |
    SET a += $props)
WITH a
OPTIONAL MATCH (a)-[of:OF]->(other:Recording)
WHERE $content_hash IS NULL OR other.content_hash <> $content_hash
WITH a, collect(of) AS stale
FOREACH (edge IN stale | DELETE edge)
WITH DISTINCT a
"""
_MERGE_RECORDING: Final = """
MERGE (r:Recording {content_hash: $content_hash})
SET r += $recording
MERGE (a)-[:OF]->(r)
WITH DISTINCT r
"""
# The facets of a recording, appended to _MERGE_RECORDING: each
# deletes the recording's edge to another value, if any, then merges the edge to this one. The key
# comes last: it is the only part that MATCHes (the 24 Key nodes exist from start()).
_SET_TEMPO_RANGE: Final = """
OPTIONAL MATCH (r)-[old_t:IN_TEMPO_RANGE]->(t0:TempoRange)
WHERE t0.name <> $tempo.name
WITH r, collect(old_t) AS stale_t
FOREACH (edge IN stale_t | DELETE edge)
MERGE (t:TempoRange {name: $tempo.name})
ON CREATE SET t.min_bpm = $tempo.min_bpm, t.max_bpm = $tempo.max_bpm
MERGE (r)-[:IN_TEMPO_RANGE]->(t)
WITH DISTINCT r
"""
_SET_MOOD: Final = """
OPTIONAL MATCH (r)-[old_m:HAS_MOOD]->(m0:Mood)
WHERE m0.label <> $label
WITH r, collect(old_m) AS stale_m
FOREACH (edge IN stale_m | DELETE edge)
MERGE (m:Mood {label: $label})
MERGE (r)-[:HAS_MOOD]->(m)
WITH DISTINCT r
"""
_SET_KEY: Final = """
OPTIONAL MATCH (r)-[old_k:IN_KEY]->(k0:Key)
WHERE k0.camelot <> $camelot
WITH r, collect(old_k) AS stale_k
FOREACH (edge IN stale_k | DELETE edge)
WITH r
MATCH (k:Key {camelot: $camelot})
MERGE (r)-[:IN_KEY]->(k)
WITH DISTINCT r
"""

# -- reads -------------------------------------------------------------------------------------------

COMPATIBLE_RECORDINGS: Final = """
MATCH (r:Recording {content_hash: $content_hash})-[:IN_KEY]->(:Key)
      -[:MIXES_WITH*0..1]->(k:Key)<-[:IN_KEY]-(o:Recording)
WHERE o.content_hash <> r.content_hash AND abs(o.bpm - r.bpm) <= $bpm_tolerance
RETURN DISTINCT o.content_hash AS content_hash, o.path AS path, o.bpm AS bpm,
       k.name AS key, k.camelot AS camelot, abs(o.bpm - r.bpm) AS bpm_delta
ORDER BY bpm_delta, content_hash
LIMIT $limit
"""

_T = TypeVar("_T")
_Work = Callable[[neo4j.AsyncTransaction], Awaitable[_T]]


#: Set while a statement runs on FalkorDB: string parameters must be escaped for its inlining.
_ESCAPE_STRINGS: ContextVar[bool] = ContextVar("escape_strings", default=False)


async def _run(tx: neo4j.AsyncTransaction, query: str, **parameters: Any) -> list[dict[str, Any]]:
    if _ESCAPE_STRINGS.get():
        parameters = _falkordb_escaped(parameters)
    result = await tx.run(query, parameters)
    return [record.data() async for record in result]


class GraphSink:
    """Stores outcomes as a graph in Neo4j (implements :class:`~analysis_service.sinks.base.ResultSink`).

    Parameters
    ----------
    settings : Neo4jSettings
        Bolt URI, credentials and database (``None``: the server's default database).
    connection_timeout_s : float, optional
        Seconds to wait for a TCP connection and Bolt handshake before the store counts as
        unavailable.

    Notes
    -----
    The constructor does no I/O; :meth:`start` creates the driver and the schema. The driver's own
    transaction retries are not used (explicit transactions): retrying is the caller's
    :class:`~analysis_service.sinks.resilience.Guard`'s job.
    """

    name = "neo4j"

    def __init__(self, settings: Neo4jSettings, *, connection_timeout_s: float = 10.0) -> None:
        self._settings = settings
        self._connection_timeout_s = connection_timeout_s
        self._driver: neo4j.AsyncDriver | None = None
        self._dialect: Dialect | None = None

    @property
    def dialect(self) -> Dialect | None:
        """``"neo4j"`` or ``"falkordb"`` once :meth:`start` has identified the server, else ``None``."""
        return self._dialect

    async def start(self) -> None:
        """Connect, create the schema and the 24 ``Key`` nodes with their ``MIXES_WITH`` edges.

        Idempotent. On Neo4j the node keys get ``CREATE CONSTRAINT ... IF NOT EXISTS`` unique
        constraints. FalkorDB cannot create constraints in Cypher and has no ``IF NOT EXISTS``, so
        there the existing indexes are listed and only the missing ones created. The server is
        identified by ``CALL dbms.procedures()``: FalkorDB lists its ``db.idx.*`` procedures, Neo4j 5
        answers ``ProcedureNotFound`` (the procedure moved to ``SHOW PROCEDURES``). The agent string
        cannot tell them apart: FalkorDB announces itself as ``Neo4j/5.13.0``, since the driver
        refuses servers that do not.

        Raises
        ------
        SinkUnavailable
            When the server cannot be reached.
        """
        if self._driver is None:
            auth = (self._settings.user, self._settings.password)
            self._driver = neo4j.AsyncGraphDatabase.driver(
                self._settings.uri, auth=auth, connection_timeout=self._connection_timeout_s
            )
        if self._dialect is None:
            self._dialect = await self._detect_dialect()
        if self._dialect == "neo4j":
            for statement in _NEO4J_CONSTRAINTS:  # schema commands may not share a transaction
                await self._create_schema("creating constraints", _schema_statement(statement))
        else:
            await self._create_schema("creating indexes", _create_missing_falkordb_indexes)
        keys = camelot_keys()
        pairs = [{"a": k["camelot"], "b": n} for k in keys for n in camelot_neighbours(k["camelot"])]
        await self._execute("creating Key nodes", _statement(_MERGE_KEYS, keys=keys))
        await self._execute("creating MIXES_WITH edges", _statement(_MERGE_MIXES_WITH, pairs=pairs))

    async def write(self, result: AnalysisResultMessage) -> None:
        """MERGE the analysis, its recording and the recording's key, mood and tempo range.

        Raises
        ------
        SinkUnavailable
            When the server cannot be reached.
        ValueError
            When the result's Camelot code is not one of the 24 keys.
        RuntimeError
            When called before :meth:`start`.
        """
        out = result.output
        if out is not None and out.key is not None:
            camelot_neighbours(out.key.camelot)  # validates the code before anything is written
        analysis = {
            "status": result.status.value,
            "correlation_id": result.correlation_id,
            "file": result.file,
            "content_hash": result.content_hash,
            "error_code": result.error.code if result.error else None,
            "error_message": result.error.message if result.error else None,
            "bpm": out.tempo.bpm if out and out.tempo else None,
            "key": out.key.key if out and out.key else None,
            "camelot": out.key.camelot if out and out.key else None,
            "mood": out.mood.label if out and out.mood else None,
            "cached": result.cached,
            "finished_at": result.finished_at.isoformat(),  # FalkorDB's Bolt shim has no temporal types
        }
        recording = {
            "path": result.file,
            "duration_s": out.duration_s if out else None,
            "format": out.format if out else None,
            "bpm": analysis["bpm"],
            "key": analysis["key"],
            "camelot": analysis["camelot"],
            "mood": analysis["mood"],
        }
        tags = out.tags if out else None
        if tags is not None:  # what the file's tags say, and how they compare with the measurement
            recording |= {
                "title": tags.title,
                "artist": tags.artist,
                "album": tags.album,
                "year": tags.year,
                "genre": tags.genre,
                "isrc": tags.isrc,
                "tag_bpm": tags.bpm,
                "tag_key": tags.key,
            }
        if out is not None and out.tag_check is not None:
            recording |= {"tag_bpm_check": out.tag_check.bpm, "tag_key_check": out.tag_check.key}
        # Keep what earlier analyses found for facets this one did not compute.
        recording = {name: value for name, value in recording.items() if value is not None}
        rid, content_hash = result.request_id, result.content_hash

        query = _MERGE_ANALYSIS
        params: dict[str, Any] = {"request_id": rid, "content_hash": content_hash, "props": analysis}
        if content_hash is None:
            query += "RETURN count(a) AS n"
        else:
            query += _MERGE_RECORDING
            params["recording"] = recording
            if out is not None and out.tempo is not None:
                query += _SET_TEMPO_RANGE
                params["tempo"] = tempo_range(out.tempo.bpm)
            if out is not None and out.mood is not None:
                query += _SET_MOOD
                params["label"] = out.mood.label
            if out is not None and out.key is not None:
                query += _SET_KEY
                params["camelot"] = out.key.camelot
            query += "RETURN count(r) AS n"

        await self._execute(f"writing result {rid!r}", _statement(query, **params))

    async def compatible_recordings(
        self, content_hash: str, *, bpm_tolerance: float = 5.0, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recordings that mix harmonically with ``content_hash`` at a similar tempo.

        Parameters
        ----------
        content_hash : str
            The recording to mix from.
        bpm_tolerance : float, optional
            Largest accepted tempo difference (BPM).
        limit : int, optional
            Most rows returned.

        Returns
        -------
        list of dict
            ``{"content_hash", "path", "bpm", "key", "camelot", "bpm_delta"}`` of each recording in
            the same key or a Camelot neighbour, within ``bpm_tolerance``, closest tempo first. Empty
            when the recording is unknown or has no key or BPM.
        """
        params = {"content_hash": content_hash, "bpm_tolerance": float(bpm_tolerance), "limit": int(limit)}
        return await self._execute(
            f"finding recordings compatible with {content_hash!r}",
            _statement(COMPATIBLE_RECORDINGS, **params),
            read=True,
        )

    async def ping(self) -> None:
        """Run ``RETURN 1`` in a read transaction.

        Raises
        ------
        SinkUnavailable
            When the server does not answer.
        """
        await self._execute("pinging", _statement("RETURN 1 AS ok"), read=True)

    async def close(self) -> None:
        """Close the driver and its connections. Idempotent."""
        driver, self._driver = self._driver, None
        if driver is not None:
            await driver.close()

    async def _create_schema(self, action: str, work: _Work[None], *, attempts: int = 3) -> None:
        """Run a schema statement; a replica creating the same index at the same moment makes it
        fail (FalkorDB answers with an unknown error), so it is tried again: statements that list
        what exists first (FalkorDB) or say ``IF NOT EXISTS`` (Neo4j) then find it there."""
        for attempt in range(1, attempts + 1):
            try:
                await self._execute(action, work)
                return
            except (SinkRejected, SinkUnavailable) as exc:
                if attempt == attempts and not any(marker in str(exc) for marker in _ALREADY_EXISTS):
                    raise
                await asyncio.sleep(0.2 * attempt)

    async def _detect_dialect(self) -> Dialect:
        try:
            rows = await self._execute("identifying the server", _statement(_LIST_PROCEDURES), read=True)
        except SinkRejected as exc:
            if isinstance(exc.__cause__, ClientError) and exc.__cause__.code == _PROCEDURE_NOT_FOUND:
                return "neo4j"
            raise
        return "falkordb" if _FALKORDB_PROCEDURE in rows[0]["names"] else "neo4j"

    async def _execute(self, action: str, work: _Work[_T], *, read: bool = False) -> _T:
        """Run ``work`` in one explicit transaction, translating transient driver errors."""
        if self._driver is None:
            raise RuntimeError(f"GraphSink used before start() (or after close()) while {action}")
        mode = neo4j.READ_ACCESS if read else neo4j.WRITE_ACCESS
        token = _ESCAPE_STRINGS.set(self._dialect == "falkordb")
        try:
            with _translated(action):
                return await self._session_work(work, mode)
        finally:
            _ESCAPE_STRINGS.reset(token)

    async def _session_work(self, work: _Work[_T], mode: str) -> _T:
        assert self._driver is not None
        async with self._driver.session(
            database=self._settings.database, default_access_mode=mode
        ) as session:
            tx = await session.begin_transaction()
            async with tx:
                value = await work(tx)
                await tx.commit()
            return value


def _statement(query: str, **parameters: Any) -> _Work[list[dict[str, Any]]]:
    async def work(tx: neo4j.AsyncTransaction) -> list[dict[str, Any]]:
        return await _run(tx, query, **parameters)

    return work


def _schema_statement(query: str) -> _Work[None]:
    async def work(tx: neo4j.AsyncTransaction) -> None:
        await _run(tx, query)

    return work


async def _create_missing_falkordb_indexes(tx: neo4j.AsyncTransaction) -> None:
    existing = {
        (row["label"], prop) for row in await _run(tx, _FALKORDB_LIST_INDEXES) for prop in row["properties"]
    }
    for node_key, statement in _FALKORDB_INDEXES.items():
        if node_key not in existing:
            await _run(tx, statement)
