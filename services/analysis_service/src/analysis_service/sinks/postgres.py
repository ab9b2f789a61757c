"""PostgreSQL: the outcome ledger, the record of every request id and of its one terminal outcome.

Schema (``migrations/``)::

    requests          (request_id PK, fingerprint, file, analyses, priority, options, correlation_id,
                       batch_id, status queued|running|completed|failed|cancelled, error_code,
                       attempts, given_back, submitted_at, started_at, finished_at,
                       cancel_requested_at, published_at, updated_at)
    analysis_results  (request_id PK -> requests, the terminal outcome in typed columns, the full
                       EngineOutput as ``output`` and the announced result message as ``result``)
    recordings        (content_hash PK, path, duration_s, format, sample_rate, channels, the file's
                       tags: title, artist, album, track_number, year, genre, isrc, codec,
                       bitrate_kbps, tag_bpm, tag_key)
    timeline_segments (request_id -> analysis_results, idx, start_s, end_s, bpm, key)
    schema_migrations (version PK, name, applied_at)

The ledger's rules (:class:`PostgresLedger`):

* **A terminal outcome is final.** :meth:`~PostgresLedger.finish` moves a request from ``queued`` or
  ``running`` to ``completed``, ``failed`` or ``cancelled`` and inserts its ``analysis_results`` row
  in the same statement, guarded by ``status NOT IN (terminal)``. When another delivery got there
  first, nothing is written and the stored outcome is returned instead: every later step (the
  graph, the results exchange, progress) works from what the ledger holds, so the stores cannot
  disagree and no write path can replace a completed outcome with a failed one.
* **A request id belongs to one request.** The ``fingerprint`` (a digest of file, analyses and
  options) is fixed by the row's first write. A delivery that reuses the id for something else
  neither starts nor finishes that row (:class:`IdConflict`); its outcome is keyed elsewhere.
* **One worker runs a request at a time.** The worker running a request renews its lease
  (``heartbeat_at``) every ``cancel_poll_s``; :meth:`~PostgresLedger.begin` refuses to start a
  request whose lease is younger than ``lease_s`` (a redelivery after a connection blip while the
  first worker still analyses it), and that delivery is requeued with a delay instead.
* **Attempts count starts without an outcome.** :meth:`~PostgresLedger.begin` adds one per start
  (minus the starts the worker gave back by requeueing in an orderly way), which is how a request
  that keeps killing workers is recognised on classic queues. A start refused for a live lease
  is not counted. A copy requeued with a delay carries the running total of starts given back;
  ``given_back`` records how much of it has been subtracted, so a copy delivered again (it
  crashed a worker) gives nothing back twice.

Migrations are the files ``migrations/NNNN_<name>.sql`` of this package. :meth:`PostgresLedger.start`
applies the ones not yet recorded in ``schema_migrations``, in version order, in one transaction
that first takes ``pg_advisory_xact_lock``: replicas starting together queue on the lock, and the
later ones find every version recorded and apply nothing.

Driver errors are classified here: data the database refuses (SQLSTATE classes 22, 23, 42 but
42501) raise :class:`~analysis_service.errors.SinkRejected`; everything else the driver or the
network raises (connection loss, time-outs, read-only standby, authentication, server errors,
asyncpg's internal client errors while a connection dies) raises
:class:`~analysis_service.errors.SinkUnavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import asyncpg
import structlog
from pydantic import ValidationError

from analysis_service.errors import SinkRejected, SinkUnavailable
from analysis_service.settings import PostgresSettings
from service_shared.messages import AnalysisRequest, AnalysisResultMessage, EngineOutput, ResultStatus

STORE = "PostgreSQL"

log = structlog.get_logger(__name__)

#: SQLSTATE classes of errors meaning "the database answered and refuses this data": data exceptions
#: (22: e.g. a NUL byte in text), integrity violations (23) and syntax/access errors (42). Retrying
#: cannot help. Insufficient privilege (42501) is an operator's fix away, so it is not among them.
_REFUSALS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.SyntaxOrAccessError,
)
#: Everything the driver or the network raises; what is not a refusal is "unavailable, retry".
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused / reset / unreachable; includes TimeoutError
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresError,  # every server error: read-only standby, auth, shutdown, ...
    asyncpg.exceptions.InterfaceError,  # connection closed in the middle of an operation
    asyncpg.exceptions.InternalClientError,  # e.g. releasing a connection whose server went away
)


_CLOSE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *_DRIVER_ERRORS)


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Translate driver errors raised while doing ``action`` into the service's store errors."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        detail = f"while {action}: {type(exc).__name__}: {exc}"
        refused = isinstance(exc, _REFUSALS) and not isinstance(
            exc, asyncpg.exceptions.InsufficientPrivilegeError
        )
        if refused:
            raise SinkRejected(f"{STORE} refused the data {detail}") from exc
        raise SinkUnavailable(f"{STORE} unavailable {detail}") from exc


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

_RECORDING_COLUMNS = (
    "content_hash",
    "path",
    "duration_s",
    "format",
    "sample_rate",
    "channels",
    "title",
    "artist",
    "album",
    "track_number",
    "year",
    "genre",
    "isrc",
    "codec",
    "bitrate_kbps",
    "tag_bpm",
    "tag_key",
)

#: Recording columns named like the ``TrackTags`` fields they hold.
_TAG_COLUMNS = ("title", "artist", "album", "track_number", "year", "genre", "isrc", "codec", "bitrate_kbps")

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
    "result",
    "tag_bpm_check",
    "tag_key_check",
)
#: Columns of type jsonb, in any of the tables written here (their values are sent as JSON text).
_JSONB_COLUMNS = frozenset({"options", "analyzer_versions", "timings", "output", "result"})


def _placeholders(columns: Sequence[str], first: int) -> str:
    """``$first, $first+1, ...`` for ``columns``, cast to jsonb where the column is one."""
    return ", ".join(
        f"${i}::jsonb" if column in _JSONB_COLUMNS else f"${i}"
        for i, column in enumerate(columns, start=first)
    )


#: The request's columns besides its id, in ``RequestFields.values()`` order.
_REQUEST_COLUMNS = ("fingerprint", "file", "analyses", "priority", "options", "correlation_id")
#: The ``requests`` columns of a terminal outcome: the statement's first parameters, in this order.
_OUTCOME_COLUMNS = ("request_id", *_REQUEST_COLUMNS, "status", "error_code", "finished_at")
_RECORDING_FIRST = 1 + len(_OUTCOME_COLUMNS)
_RESULT_FIRST = _RECORDING_FIRST + len(_RECORDING_COLUMNS)
_SEGMENTS_FIRST = _RESULT_FIRST + len(_RESULT_COLUMNS)

#: The terminal transition and everything stored with it, in one statement (so one round trip and
#: atomic without a transaction block): the ``requests`` row moves to its terminal status unless it
#: is terminal already or the id belongs to another request (another fingerprint); only when it
#: moved are the recording's facts upserted (a later analysis that does not know one keeps the
#: earlier value; skipped when the result has no content hash), the ``analysis_results`` row and
#: the timeline's segments inserted. Returns the request id when it moved, no row otherwise.
#: Sub-statements of one WITH see one snapshot, but the foreign keys are checked at its end, when
#: the recording and the result row exist.
_FINISH = f"""
WITH won AS (
    INSERT INTO requests AS r ({", ".join(_OUTCOME_COLUMNS)}, started_at)
    VALUES ({_placeholders(_OUTCOME_COLUMNS, 1)}, now())
    ON CONFLICT (request_id) DO UPDATE SET
        status      = EXCLUDED.status,
        error_code  = EXCLUDED.error_code,
        finished_at = EXCLUDED.finished_at,
        updated_at  = now()
    WHERE r.status IN ('queued', 'running')
      AND r.fingerprint = EXCLUDED.fingerprint
    RETURNING request_id
), recording AS (
    INSERT INTO recordings ({", ".join(_RECORDING_COLUMNS)})
    SELECT {_placeholders(_RECORDING_COLUMNS, _RECORDING_FIRST)}
    FROM won WHERE ${_RECORDING_FIRST}::text IS NOT NULL
    ON CONFLICT (content_hash) DO UPDATE SET
        {", ".join(f"{c} = COALESCE(EXCLUDED.{c}, recordings.{c})" for c in _RECORDING_COLUMNS[1:])},
        updated_at = now()
), result AS (
    INSERT INTO analysis_results ({", ".join(_RESULT_COLUMNS)})
    SELECT {_placeholders(_RESULT_COLUMNS, _RESULT_FIRST)} FROM won
), segments AS (
    INSERT INTO timeline_segments (request_id, idx, start_s, end_s, bpm, key)
    SELECT won.request_id, s.idx, s.start_s, s.end_s, s.bpm, s.key
    FROM won, unnest(${_SEGMENTS_FIRST}::integer[], ${_SEGMENTS_FIRST + 1}::double precision[],
                     ${_SEGMENTS_FIRST + 2}::double precision[], ${_SEGMENTS_FIRST + 3}::double precision[],
                     ${_SEGMENTS_FIRST + 4}::text[]) AS s (idx, start_s, end_s, bpm, key)
)
SELECT request_id FROM won
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


async def open_migrated_pool(
    settings: PostgresSettings, migrations: list[Migration], *, pool: Any = None
) -> Any:
    """An asyncpg pool for ``settings`` (``pool`` when already open) with ``migrations`` applied.

    ``command_timeout_s`` bounds every statement and the time to open a connection. Driver errors
    propagate: each caller translates them for its own error tree.
    """
    if pool is None:
        pool = await asyncpg.create_pool(
            dsn=settings.dsn,
            min_size=settings.min_pool_size,
            max_size=settings.max_pool_size,
            command_timeout=settings.command_timeout_s,
            timeout=settings.command_timeout_s,
        )
    async with pool.acquire() as connection:
        await apply_migrations(connection, migrations)
    return pool


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
        "result": result.model_dump_json(),
        "tag_bpm_check": out.tag_check.bpm if out and out.tag_check else None,
        "tag_key_check": out.tag_check.key if out and out.tag_check else None,
    }
    return tuple(values[column] for column in _RESULT_COLUMNS)


def _recording_row(result: AnalysisResultMessage) -> tuple[Any, ...]:
    """The ``recordings`` values of ``result``, in ``_RECORDING_COLUMNS`` order."""
    out: EngineOutput | None = result.output
    tags = out.tags if out else None
    values: dict[str, Any] = {
        "content_hash": result.content_hash,
        "path": result.file,
        "duration_s": out.duration_s if out else None,
        "format": out.format if out else None,
        "sample_rate": out.source_sample_rate if out else None,
        "channels": out.source_channels if out else None,
        "tag_bpm": tags.bpm if tags else None,
        "tag_key": tags.key if tags else None,
    }
    for name in _TAG_COLUMNS:
        values[name] = getattr(tags, name) if tags else None
    return tuple(values[column] for column in _RECORDING_COLUMNS)


TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})

#: A start: create the row 'running', or move a queued/running row of the same request to
#: 'running', counting the attempt ($8: 1 or 0) minus the starts given back since the last start
#: (the running total $9 that the message carries, less what ``given_back`` has already taken) and
#: taking the lease for the delivery whose token is $11. No row comes back when the id is terminal,
#: belongs to another request, has a cancellation pending, or another delivery's lease on it is
#: younger than $10 seconds. The same token again is the same start retried after its reply was
#: lost: it keeps its lease and counts nothing more.
_BEGIN = """
INSERT INTO requests AS r (request_id, fingerprint, file, analyses, priority, options, correlation_id,
                           status, attempts, given_back, started_at, heartbeat_at, lease_token)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, 'running', $8, $9, now(), now(), $11)
ON CONFLICT (request_id) DO UPDATE SET
    status       = 'running',
    attempts     = CASE WHEN r.lease_token = EXCLUDED.lease_token THEN r.attempts
                        ELSE GREATEST(r.attempts + EXCLUDED.attempts
                                      - GREATEST(EXCLUDED.given_back - r.given_back, 0), 0) END,
    given_back   = GREATEST(r.given_back, EXCLUDED.given_back),
    started_at   = COALESCE(r.started_at, now()),
    heartbeat_at = now(),
    lease_token  = EXCLUDED.lease_token,
    updated_at   = now()
WHERE r.status IN ('queued', 'running')
  AND r.fingerprint = EXCLUDED.fingerprint
  AND r.cancel_requested_at IS NULL
  AND (r.heartbeat_at IS NULL OR r.heartbeat_at < now() - make_interval(secs => $10)
       OR r.lease_token = EXCLUDED.lease_token)
RETURNING attempts
"""

_LOOKUP = """
SELECT r.request_id, r.fingerprint, r.status, r.attempts, r.cancel_requested_at IS NOT NULL AS cancel,
       r.status = 'running' AND r.heartbeat_at >= now() - make_interval(secs => $2) AS leased,
       r.published_at IS NOT NULL AS published, r.file, a.result
FROM requests r LEFT JOIN analysis_results a USING (request_id)
WHERE r.request_id = $1
"""

#: An orderly requeue: the start does not count, and the lease is released at once; only while
#: the lease is still the delivery's own ($2; NULL: whoever holds it).
_GIVE_BACK = """
UPDATE requests SET attempts = GREATEST(attempts - 1, 0), heartbeat_at = NULL, lease_token = NULL,
                    updated_at = now()
WHERE request_id = $1 AND status = 'running' AND ($2::text IS NULL OR lease_token = $2::text)
"""

#: Terminal progress Redis did not take, owed by whichever worker writes it first (see 0006).
_OWE_PROGRESS = """
UPDATE requests SET progress_owed = true WHERE request_id = ANY($1::text[]) AND finished_at IS NOT NULL
"""

#: Take up to $1 debts: cleared as they are read, rows another worker is taking are skipped, so
#: each debt has one payer (it owes it again if Redis refuses the write).
_CLAIM_OWED_PROGRESS = """
UPDATE requests r SET progress_owed = false
FROM analysis_results a
WHERE a.request_id = r.request_id
  AND r.request_id IN (SELECT request_id FROM requests WHERE progress_owed
                       ORDER BY request_id LIMIT $1 FOR UPDATE SKIP LOCKED)
RETURNING r.request_id, a.result
"""

_PROGRESS_PAID = """
UPDATE requests SET progress_owed = false WHERE request_id = ANY($1::text[]) AND progress_owed
"""

_MARK_PUBLISHED = """
UPDATE requests SET published_at = COALESCE(published_at, now()) WHERE request_id = $1
"""

#: Renew the leases a worker still holds (request $1[i] under token $2[i]; NULL: whoever holds
#: it): a lease another worker took over after this one stalled stays that worker's. Report the
#: requests whose cancellation is pending, held or not.
_HEARTBEAT = """
WITH renewed AS (
    UPDATE requests r SET heartbeat_at = now()
    FROM unnest($1::text[], $2::text[]) AS u (request_id, lease_token)
    WHERE r.request_id = u.request_id AND r.status = 'running'
      AND (u.lease_token IS NULL OR r.lease_token = u.lease_token)
)
SELECT request_id FROM requests
WHERE request_id = ANY($1::text[]) AND status = 'running' AND cancel_requested_at IS NOT NULL
"""


def fingerprint(request: AnalysisRequest) -> str:
    """A digest of what a request asks for (file, analyses, options): two deliveries with the same id
    and the same fingerprint are the same request; the same id with another fingerprint is a reuse.

    An option added since the ledger began (``bpm_range``) counts only when set: a request
    recorded before it existed keeps its fingerprint, so its redelivery is not taken for a reuse.
    """
    options = request.options.model_dump(exclude=request.options.unset_later_options())
    canonical = json.dumps(
        {"file": request.file, "analyses": sorted(request.analyses), "options": options},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class LedgerRecord:
    """What the ledger holds for a request id."""

    request_id: str
    fingerprint: str
    status: str
    attempts: int
    cancel_requested: bool
    leased: bool
    published: bool
    file: str | None
    result: AnalysisResultMessage | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass(frozen=True)
class Started:
    """:meth:`PostgresLedger.begin` moved the request to ``running``; ``attempts`` starts so far."""

    attempts: int


@dataclass(frozen=True)
class Known:
    """:meth:`PostgresLedger.begin` did not start the request: the ledger's record says why (it is
    terminal, reused by another request, or has a cancellation pending)."""

    record: LedgerRecord


@dataclass(frozen=True)
class Finished:
    """The stored terminal outcome; ``written`` is False when an earlier delivery had stored it."""

    result: AnalysisResultMessage
    written: bool
    published: bool


class IdConflict(Exception):
    """The request id belongs to another request (another fingerprint): nothing was written."""

    def __init__(self, record: LedgerRecord) -> None:
        super().__init__(f"request id {record.request_id!r} belongs to another request ({record.file!r})")
        self.record = record


@dataclass(frozen=True)
class RequestFields:
    """The ledger columns of a request (all None for a message that is not a valid request)."""

    fingerprint: str
    file: str | None = None
    analyses: Sequence[str] | None = None
    priority: int | None = None
    options: str | None = None
    correlation_id: str | None = None

    @classmethod
    def of(cls, request: AnalysisRequest) -> RequestFields:
        return cls(
            fingerprint=fingerprint(request),
            file=request.file,
            analyses=list(request.analyses),
            priority=request.priority,
            options=request.options.model_dump_json(),
            correlation_id=request.correlation_id,
        )

    def values(self) -> tuple[Any, ...]:
        analyses = list(self.analyses) if self.analyses is not None else None
        return (self.fingerprint, self.file, analyses, self.priority, self.options, self.correlation_id)


class PostgresLedger:
    """The outcome ledger in PostgreSQL (see the module docstring for its rules).

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

    def __init__(self, settings: PostgresSettings, *, lease_s: float = 15.0) -> None:
        self._settings = settings
        self._lease_s = lease_s
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
        with _translated("starting (pool, migrations)"):
            self._pool = await open_migrated_pool(self._settings, migrations, pool=self._pool)

    async def begin(
        self,
        request_id: str,
        fields: RequestFields,
        *,
        count_attempt: bool,
        given_back: int = 0,
        lease: str | None = None,
    ) -> Started | Known:
        """Record that a delivery of ``request_id`` starts, unless the ledger says it must not.

        Parameters
        ----------
        request_id : str
            The request.
        fields : RequestFields
            Its fingerprint and columns (used when this creates the row).
        count_attempt : bool
            Add one to ``attempts`` (classic queues count starts here; quorum queues use the
            broker's delivery count).
        given_back : int
            Starts of this request that ended in an orderly requeue, a running total carried by the
            message; what it adds to the total the ledger has already subtracted is subtracted from
            ``attempts`` (so a message delivered again gives nothing back twice).
        lease : str, optional
            A token of this delivery, the same for every retry of this call: a retry whose first
            try committed but lost its reply finds its own lease, counted once. None: every call is
            a new start.

        Returns
        -------
        Started or Known
            ``Started`` when the request may run; otherwise the record that says why not.

        Raises
        ------
        SinkUnavailable, SinkRejected
            See the module docstring.
        """
        pool = self._require_pool("begin")
        with _translated(f"starting {request_id!r}"):
            attempts = await pool.fetchval(
                _BEGIN,
                request_id,
                *fields.values(),
                1 if count_attempt else 0,
                given_back,
                self._lease_s,
                lease,
            )
            if attempts is not None:
                return Started(int(attempts))
            record = await self._lookup(pool, request_id)
        if record is None:  # deleted between the two statements: by an operator, or by the job API
            # rolling back a queued submission that reused the id (retried: the id is free again)
            raise SinkUnavailable(f"{STORE}: the ledger row of {request_id!r} vanished while starting it")
        return Known(record)

    async def finish(self, result: AnalysisResultMessage, fields: RequestFields) -> Finished:
        """Store ``result`` as the request's terminal outcome, unless one is stored already.

        Returns
        -------
        Finished
            The outcome the ledger holds now: ``result`` (``written=True``) or the one an earlier
            delivery stored (``written=False``), which every later step must use instead.

        Raises
        ------
        IdConflict
            The id belongs to another request; nothing was written.
        SinkUnavailable, SinkRejected
            See the module docstring.
        """
        pool = self._require_pool("finish")
        rid = result.request_id
        segments = (result.output.timeline if result.output else None) or []
        with _translated(f"storing the outcome of {rid!r}"):
            won = await pool.fetchval(
                _FINISH,
                rid,
                *fields.values(),
                result.status.value,
                _code(result),
                result.finished_at,
                *_recording_row(result),  # skipped by the statement when there is no content hash
                *_result_row(result),
                list(range(len(segments))),
                [s.start_s for s in segments],
                [s.end_s for s in segments],
                [s.bpm for s in segments],
                [s.key for s in segments],
            )
            if won is not None:
                return Finished(result, written=True, published=False)
            # A statement of its own, so that it sees a row another transaction committed after
            # the first one's snapshot was taken (its conflict check saw that row; its snapshot did not).
            record = await self._lookup(pool, rid)
        if record is None:  # deleted between the two statements: by an operator, or by the job API
            # rolling back a queued submission that reused the id (retried: the id is free again)
            raise SinkUnavailable(f"{STORE}: the ledger row of {rid!r} vanished while storing its outcome")
        if record.fingerprint != fields.fingerprint:
            raise IdConflict(record)
        if record.result is None:  # terminal without a result row: only a manual edit does that
            raise SinkRejected(f"{STORE}: {rid!r} is {record.status} but has no stored result")
        return Finished(record.result, written=False, published=record.published)

    async def lookup(self, request_id: str) -> LedgerRecord | None:
        """The ledger's record of ``request_id`` (None: never seen)."""
        pool = self._require_pool("lookup")
        with _translated(f"reading {request_id!r}"):
            return await self._lookup(pool, request_id)

    async def give_back(self, request_id: str, *, lease: str | None = None) -> None:
        """Undo the attempt count of a start that ended in an orderly requeue (shutdown), and
        release its lease; with ``lease``, only while that token still holds it (a start whose
        reply was lost may not have committed, another worker may have taken the lease over)."""
        pool = self._require_pool("give_back")
        with _translated(f"giving back a start of {request_id!r}"):
            await pool.execute(_GIVE_BACK, request_id, lease)

    async def owe_progress(self, request_ids: Sequence[str]) -> None:
        """Record that Redis did not take the terminal progress of these finished requests."""
        pool = self._require_pool("owe_progress")
        with _translated("recording terminal progress owed"):
            await pool.execute(_OWE_PROGRESS, list(request_ids))

    async def claim_owed_progress(self, limit: int) -> list[AnalysisResultMessage]:
        """Take up to ``limit`` stored outcomes whose terminal progress is owed (by any worker):
        their debt is now the caller's, to write or to owe again (:meth:`owe_progress`). A stored
        result that no longer parses is logged and dropped (its debt with it)."""
        pool = self._require_pool("claim_owed_progress")
        with _translated("taking terminal progress owed"):
            rows = await pool.fetch(_CLAIM_OWED_PROGRESS, limit)
        results = []
        for row in rows:
            if row["result"] is None:
                continue  # stored before whole results were kept: nothing to write
            try:
                results.append(AnalysisResultMessage.model_validate_json(row["result"]))
            except ValidationError as exc:
                log.error(
                    "stored result unreadable: its terminal progress is not written",
                    request_id=row["request_id"],
                    error=str(exc),
                )
        return results

    async def progress_paid(self, request_ids: Sequence[str]) -> None:
        """Record that the terminal progress of these requests is written."""
        pool = self._require_pool("progress_paid")
        with _translated("recording terminal progress written"):
            await pool.execute(_PROGRESS_PAID, list(request_ids))

    async def mark_published(self, request_id: str) -> None:
        """Record that the broker confirmed the result of ``request_id``."""
        pool = self._require_pool("mark_published")
        with _translated(f"marking {request_id!r} published"):
            await pool.execute(_MARK_PUBLISHED, request_id)

    async def heartbeat(self, leases: Mapping[str, str | None]) -> set[str]:
        """Renew this worker's leases (request id -> the token it began with; None: any holder's)
        where the token still holds them; return the ids whose cancellation is pending."""
        if not leases:
            return set()
        pool = self._require_pool("heartbeat")
        with _translated("renewing leases"):
            rows = await pool.fetch(_HEARTBEAT, list(leases), list(leases.values()))
        return {str(row["request_id"]) for row in rows}

    async def ping(self) -> None:
        """Run ``SELECT 1`` (raises SinkUnavailable when PostgreSQL does not answer)."""
        pool = self._require_pool("ping")
        with _translated("pinging"):
            await pool.fetchval("SELECT 1")

    async def close(self) -> None:
        """Close the pool, waiting briefly for connections in use. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except _CLOSE_ERRORS:
                pool.terminate()

    async def _lookup(self, connection: Any, request_id: str) -> LedgerRecord | None:
        row = await connection.fetchrow(_LOOKUP, request_id, self._lease_s)
        if row is None:
            return None
        raw = row["result"]
        return LedgerRecord(
            request_id=row["request_id"],
            fingerprint=row["fingerprint"],
            status=row["status"],
            attempts=int(row["attempts"]),
            cancel_requested=bool(row["cancel"]),
            leased=bool(row["leased"]),
            published=bool(row["published"]),
            file=row["file"],
            result=AnalysisResultMessage.model_validate_json(raw) if raw is not None else None,
        )

    def _require_pool(self, operation: str) -> Any:
        if self._pool is None:
            raise RuntimeError(f"PostgresLedger.{operation}() called before start() (or after close())")
        return self._pool


def _code(result: AnalysisResultMessage) -> str | None:
    if result.status is ResultStatus.COMPLETED:
        return None
    return result.error.code if result.error else None
