"""PostgreSQL result sink: one row per request, typed columns, the full output as ``jsonb``.

Schema (see ``migrations/0001_initial.sql``)::

    recordings        (content_hash PK, path, duration_s, format, sample_rate, channels,
                       first_seen_at, updated_at)
    analysis_results  (request_id PK, correlation_id, status, file, content_hash -> recordings,
                       error_code, error_message, bpm, bpm_confidence, key, key_tonic, key_mode,
                       camelot, key_confidence, energy, valence, danceability, mood_label,
                       mood_confidence, analyzer_versions jsonb, timings jsonb, output jsonb,
                       cached, finished_at, created_at, updated_at)
    timeline_segments (request_id -> analysis_results, idx, start_s, end_s, bpm, key;
                       PK (request_id, idx))
    schema_migrations (version PK, name, applied_at)

Migrations are the files ``migrations/NNNN_<name>.sql`` of this package. :meth:`PostgresSink.start`
applies the ones not yet recorded in ``schema_migrations``, in version order, in one transaction
that first takes ``pg_advisory_xact_lock``: replicas starting together queue on the lock, and the
later ones find every version recorded and apply nothing.

:meth:`PostgresSink.write` is one transaction and idempotent on ``request_id``: the result row is
upserted and the request's segments are deleted and inserted again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from analysis_service.settings import PostgresSettings
from analysis_service.sinks._util import translate_unavailable
from service_shared.messages import AnalysisResultMessage, EngineOutput

STORE = "PostgreSQL"

#: Errors meaning "PostgreSQL cannot be reached or is overloaded right now; retry later". Everything
#: else (syntax errors, constraint violations, bad data) is a bug or a bad result and propagates.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused / reset / unreachable; includes TimeoutError (connect and command timeouts)
    asyncpg.exceptions.PostgresConnectionError,  # class 08, and "connection was closed in the middle"
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full, OOM
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, cannot connect now, cancelled
    asyncpg.exceptions.TransactionRollbackError,  # class 40: serialization failure, deadlock
)

#: Key of the advisory lock that serialises migrations across replicas (any fixed bigint works;
#: derived from a name so that it is unlikely to collide with another application's locks).
MIGRATION_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"analysis_service.schema_migrations").digest()[:8], "big", signed=True
)

_MIGRATION_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

_UPSERT_RECORDING = """
INSERT INTO recordings (content_hash, path, duration_s, format, sample_rate, channels)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (content_hash) DO UPDATE SET
    path        = COALESCE(EXCLUDED.path, recordings.path),
    duration_s  = COALESCE(EXCLUDED.duration_s, recordings.duration_s),
    format      = COALESCE(EXCLUDED.format, recordings.format),
    sample_rate = COALESCE(EXCLUDED.sample_rate, recordings.sample_rate),
    channels    = COALESCE(EXCLUDED.channels, recordings.channels),
    updated_at  = now()
"""

_RESULT_COLUMNS = (
    "request_id",
    "correlation_id",
    "status",
    "file",
    "content_hash",
    "error_code",
    "error_message",
    "bpm",
    "bpm_confidence",
    "key",
    "key_tonic",
    "key_mode",
    "camelot",
    "key_confidence",
    "energy",
    "valence",
    "danceability",
    "mood_label",
    "mood_confidence",
    "analyzer_versions",
    "timings",
    "output",
    "cached",
    "finished_at",
)
_JSONB_COLUMNS = frozenset({"analyzer_versions", "timings", "output"})

_UPSERT_RESULT = (
    f"INSERT INTO analysis_results ({', '.join(_RESULT_COLUMNS)})\n"
    "VALUES ("
    + ", ".join(
        f"${i}::jsonb" if column in _JSONB_COLUMNS else f"${i}"
        for i, column in enumerate(_RESULT_COLUMNS, start=1)
    )
    + ")\nON CONFLICT (request_id) DO UPDATE SET "
    + ", ".join(f"{column} = EXCLUDED.{column}" for column in _RESULT_COLUMNS[1:])
    + ", updated_at = now()"
)

_DELETE_SEGMENTS = "DELETE FROM timeline_segments WHERE request_id = $1"

_INSERT_SEGMENTS = """
INSERT INTO timeline_segments (request_id, idx, start_s, end_s, bpm, key)
SELECT $1, s.idx, s.start_s, s.end_s, s.bpm, s.key
FROM unnest($2::integer[], $3::double precision[], $4::double precision[],
            $5::double precision[], $6::text[]) AS s (idx, start_s, end_s, bpm, key)
"""


@dataclass(frozen=True)
class Migration:
    """One versioned SQL file of ``migrations/``."""

    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """Read the packaged migrations, sorted by version.

    Returns
    -------
    list of Migration
        Every ``NNNN_<name>.sql`` file of ``analysis_service/sinks/migrations``.

    Raises
    ------
    ValueError
        When a ``.sql`` file is not named ``NNNN_<name>.sql`` or two files share a version: the
        package is broken and must not touch the database.
    """
    migrations: dict[int, Migration] = {}
    for entry in resources.files("analysis_service.sinks").joinpath("migrations").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            raise ValueError(f"migration file {entry.name!r} is not named NNNN_<lowercase_name>.sql")
        version = int(match["version"])
        if version in migrations:
            raise ValueError(
                f"migration version {version} is used twice: {migrations[version].name!r} and "
                f"{match['name']!r}"
            )
        migrations[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    return [migrations[v] for v in sorted(migrations)]


async def apply_migrations(connection: Any, migrations: list[Migration]) -> list[int]:
    """Apply the migrations not yet recorded, in order, in one transaction under the advisory lock.

    Parameters
    ----------
    connection : asyncpg.Connection
        A connection not inside a transaction.
    migrations : list of Migration
        As returned by :func:`load_migrations`.

    Returns
    -------
    list of int
        The versions this call applied (empty when the schema was already current).
    """
    applied_now: list[int] = []
    async with connection.transaction():
        # Held until commit/rollback: a second replica blocks here, then sees our versions.
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await connection.execute(_CREATE_MIGRATIONS_TABLE)
        rows = await connection.fetch("SELECT version FROM schema_migrations")
        done = {int(row["version"]) for row in rows}
        for migration in migrations:
            if migration.version in done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied_now.append(migration.version)
    return applied_now


def _result_row(result: AnalysisResultMessage) -> tuple[Any, ...]:
    """The ``analysis_results`` values of ``result``, in ``_RESULT_COLUMNS`` order."""
    out = result.output
    tempo = out.tempo if out else None
    key = out.key if out else None
    mood = out.mood if out else None
    values: dict[str, Any] = {
        "request_id": result.request_id,
        "correlation_id": result.correlation_id,
        "status": result.status.value,
        "file": result.file,
        "content_hash": result.content_hash,
        "error_code": result.error.code if result.error else None,
        "error_message": result.error.message if result.error else None,
        "bpm": tempo.bpm if tempo else None,
        "bpm_confidence": tempo.confidence if tempo else None,
        "key": key.key if key else None,
        "key_tonic": key.tonic if key else None,
        "key_mode": key.mode if key else None,
        "camelot": key.camelot if key else None,
        "key_confidence": key.confidence if key else None,
        "energy": mood.energy if mood else None,
        "valence": mood.valence if mood else None,
        "danceability": mood.danceability if mood else None,
        "mood_label": mood.label if mood else None,
        "mood_confidence": mood.confidence if mood else None,
        "analyzer_versions": json.dumps(out.analyzer_versions, sort_keys=True) if out else None,
        "timings": json.dumps(out.timings_s, sort_keys=True) if out else None,
        "output": out.model_dump_json() if out else None,
        "cached": result.cached,
        "finished_at": result.finished_at,
    }
    return tuple(values[column] for column in _RESULT_COLUMNS)


def _recording_row(result: AnalysisResultMessage, content_hash: str) -> tuple[Any, ...]:
    out: EngineOutput | None = result.output
    return (
        content_hash,
        result.file,
        out.duration_s if out else None,
        out.format if out else None,
        out.source_sample_rate if out else None,
        out.source_channels if out else None,
    )


class PostgresSink:
    """Stores every outcome in PostgreSQL (implements :class:`~analysis_service.sinks.base.ResultSink`).

    Parameters
    ----------
    settings : PostgresSettings
        DSN and pool size. ``command_timeout_s`` bounds every statement and also the time to open
        a connection (seconds).

    Notes
    -----
    The constructor does no I/O; :meth:`start` opens the pool and migrates.
    """

    name = "postgres"

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self._pool: Any = None  # asyncpg.Pool once started

    async def start(self) -> None:
        """Open the connection pool and apply pending migrations. Idempotent.

        Raises
        ------
        SinkUnavailable
            When PostgreSQL cannot be reached.
        ValueError
            When the packaged migrations are malformed.
        """
        # Read before any I/O on the database: a broken package is a bug, not "unavailable".
        migrations = load_migrations()
        with translate_unavailable(TRANSIENT_ERRORS, store=STORE, action="starting (pool, migrations)"):
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    dsn=self._settings.dsn,
                    min_size=self._settings.min_pool_size,
                    max_size=self._settings.max_pool_size,
                    command_timeout=self._settings.command_timeout_s,
                    timeout=self._settings.command_timeout_s,
                )
            async with self._pool.acquire() as connection:
                await apply_migrations(connection, migrations)

    async def write(self, result: AnalysisResultMessage) -> None:
        """Upsert ``result`` and replace its timeline segments, in one transaction.

        Raises
        ------
        SinkUnavailable
            When PostgreSQL cannot be reached or aborted the transaction for a transient reason.
        RuntimeError
            When called before :meth:`start`.
        """
        pool = self._require_pool("write")
        segments = (result.output.timeline if result.output else None) or []
        action = f"writing result {result.request_id!r}"
        with translate_unavailable(TRANSIENT_ERRORS, store=STORE, action=action):
            async with pool.acquire() as connection, connection.transaction():
                if result.content_hash:
                    await connection.execute(_UPSERT_RECORDING, *_recording_row(result, result.content_hash))
                await connection.execute(_UPSERT_RESULT, *_result_row(result))
                await connection.execute(_DELETE_SEGMENTS, result.request_id)
                if segments:
                    await connection.execute(
                        _INSERT_SEGMENTS,
                        result.request_id,
                        list(range(len(segments))),
                        [s.start_s for s in segments],
                        [s.end_s for s in segments],
                        [s.bpm for s in segments],
                        [s.key for s in segments],
                    )

    async def ping(self) -> None:
        """Run ``SELECT 1``.

        Raises
        ------
        SinkUnavailable
            When PostgreSQL does not answer.
        RuntimeError
            When called before :meth:`start`.
        """
        pool = self._require_pool("ping")
        with translate_unavailable(TRANSIENT_ERRORS, store=STORE, action="pinging"):
            await pool.fetchval("SELECT 1")

    async def close(self) -> None:
        """Close the pool, waiting for connections in use to be released. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _require_pool(self, operation: str) -> Any:
        if self._pool is None:
            raise RuntimeError(f"PostgresSink.{operation}() called before start() (or after close())")
        return self._pool
