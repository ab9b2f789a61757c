"""The job API's reads and writes of the outcome ledger (``requests`` and ``analysis_results``).

The API only ever

* inserts ``queued`` rows for a submission (and deletes those of a submission the broker refused
  before any of them was published),
* sets ``cancel_requested_at`` on rows that are not terminal (``status IN ('queued', 'running')``),
  which the worker turns into the terminal ``cancelled`` outcome, and
* reads.

Every terminal transition is the worker's; the API never writes ``status`` after the insert.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from analysis_service.errors import InvalidCursor, LedgerUnavailable
from analysis_service.settings import PostgresSettings
from analysis_service.sinks.postgres import fingerprint, load_migrations, open_migrated_pool
from service_shared.messages import ID_PATTERN, AnalysisRequest

_ID_RE = re.compile(ID_PATTERN)
#: The span of submission times a cursor may name (well inside PostgreSQL's ``timestamptz``).
_CURSOR_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_LATEST = datetime(9999, 1, 1, tzinfo=UTC)

#: Columns of a job as the API shows it.
_JOB_COLUMNS = """
r.request_id, r.batch_id, r.file, r.status, r.priority, r.analyses, r.correlation_id, r.attempts,
r.submitted_at, r.started_at, r.finished_at, r.updated_at, r.cancel_requested_at, r.error_code,
a.error_message
"""

_INSERT = """
INSERT INTO requests (request_id, fingerprint, file, analyses, priority, options, correlation_id,
                      batch_id, status)
SELECT u.request_id, u.fingerprint, u.file, $4::text[], $5, $6::jsonb, $7, $8, 'queued'
FROM unnest($1::text[], $2::text[], $3::text[]) AS u (request_id, fingerprint, file)
"""

_GET_JOB = f"""
SELECT {_JOB_COLUMNS}
FROM requests r LEFT JOIN analysis_results a USING (request_id)
WHERE r.request_id = $1
"""

_GET_RESULT = """
SELECT r.status, a.result, a.output, a.error_code, a.error_message, a.content_hash, a.cached,
       a.finished_at, r.file, r.correlation_id
FROM requests r LEFT JOIN analysis_results a USING (request_id)
WHERE r.request_id = $1
"""

_CANCEL_JOB = f"""
WITH updated AS (
    UPDATE requests SET cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now()
    WHERE request_id = $1 AND status IN ('queued', 'running')
    RETURNING *
)
SELECT {_JOB_COLUMNS} FROM updated r LEFT JOIN analysis_results a USING (request_id)
"""

_CANCEL_BATCH = """
UPDATE requests SET cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now()
WHERE batch_id = $1 AND status IN ('queued', 'running')
RETURNING request_id
"""

_CANCEL_IDS = """
UPDATE requests SET cancel_requested_at = COALESCE(cancel_requested_at, now()), updated_at = now()
WHERE request_id = ANY($1::text[]) AND status IN ('queued', 'running')
"""

_DELETE_QUEUED = """
DELETE FROM requests WHERE request_id = ANY($1::text[]) AND status = 'queued' AND attempts = 0
"""

_BATCH_SUMMARY = """
SELECT count(*) AS total,
       count(*) FILTER (WHERE status = 'queued') AS queued,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE cancel_requested_at IS NOT NULL AND status IN ('queued', 'running'))
           AS cancel_requested,
       min(submitted_at) AS submitted_at,
       min(started_at) AS started_at,
       max(finished_at) AS finished_at
FROM requests WHERE batch_id = $1
"""

_BATCH_FAILURES = """
SELECT COALESCE(error_code, 'unknown') AS code, count(*) AS n
FROM requests WHERE batch_id = $1 AND status = 'failed'
GROUP BY 1 ORDER BY 1
"""

_BATCH_RUNNING = "SELECT request_id FROM requests WHERE batch_id = $1 AND status = 'running'"

_BATCH_IDS = "SELECT request_id FROM requests WHERE batch_id = $1"


@dataclass(frozen=True)
class Cursor:
    """Position after the last job of a page: its ``(submitted_at, request_id)``."""

    submitted_at: datetime
    request_id: str

    def encode(self) -> str:
        raw = json.dumps([self.submitted_at.isoformat(), self.request_id], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """Parse a cursor handed out by :meth:`encode`.

        Raises
        ------
        InvalidCursor
            When ``text`` is not one.
        """
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            when, request_id = json.loads(raw)
            submitted_at = datetime.fromisoformat(when)
        except (ValueError, TypeError) as exc:
            raise InvalidCursor(f"cursor {text[:80]!r} is not one this API handed out") from exc
        if (
            not isinstance(request_id, str)
            or not _ID_RE.match(request_id)
            or submitted_at.tzinfo is None
            or not _CURSOR_EARLIEST <= submitted_at <= _CURSOR_LATEST
        ):  # PostgreSQL would refuse it (a NUL, a surrogate, a time outside timestamptz's range)
            raise InvalidCursor(f"cursor {text[:80]!r} is not one this API handed out")
        return cls(submitted_at, request_id)


@dataclass(frozen=True)
class BatchRow:
    """The aggregate of a batch's rows."""

    total: int
    counts: dict[str, int]
    cancel_requested: int
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    failures_by_code: dict[str, int]
    running_ids: list[str]


_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


@contextmanager
def _unavailable(action: str) -> Iterator[None]:
    """Driver and network errors while doing ``action`` become :class:`LedgerUnavailable` (503)."""
    try:
        yield
    except _DRIVER_ERRORS as exc:
        detail = f"{type(exc).__name__}: {exc}"
        raise LedgerUnavailable(f"PostgreSQL unavailable while {action}: {detail}") from exc


class JobLedger:
    """The API's access to the ledger.

    Parameters
    ----------
    settings : PostgresSettings
        DSN, pool sizes and the statement timeout (seconds).

    Notes
    -----
    The constructor does no I/O; :meth:`start` opens the pool and applies pending migrations (under
    the same advisory lock as the workers, so API and workers may start in any order).
    """

    def __init__(self, settings: PostgresSettings) -> None:
        self._settings = settings
        self._pool: Any = None

    async def start(self) -> None:
        migrations = load_migrations()
        with _unavailable("starting (pool, migrations)"):
            self._pool = await open_migrated_pool(self._settings, migrations, pool=self._pool)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("JobLedger used before start() (or after close())")
        return self._pool

    async def ping(self) -> None:
        with _unavailable("pinging"):
            await self.pool.fetchval("SELECT 1")

    async def insert_queued(
        self, batch_id: str, requests: Sequence[AnalysisRequest], *, options_json: str
    ) -> None:
        """Record ``requests`` (one submission, sharing analyses, priority, options and correlation id)
        as ``queued`` rows of ``batch_id``, in one transaction."""
        first = requests[0]
        with _unavailable(f"recording batch {batch_id!r}"):
            async with self.pool.acquire() as connection, connection.transaction():
                await connection.execute(
                    _INSERT,
                    [r.request_id for r in requests],
                    [fingerprint(r) for r in requests],
                    [r.file for r in requests],
                    [str(a) for a in first.analyses],
                    first.priority,
                    options_json,
                    first.correlation_id,
                    batch_id,
                )

    async def withdraw(self, never_enqueued: Sequence[str], maybe_enqueued: Sequence[str]) -> None:
        """Undo a submission the broker refused: delete the rows of requests it never enqueued
        (still queued and never started) and request the cancellation of those it confirmed or may
        hold unconfirmed, so that a worker that receives one records ``cancelled`` instead of
        analysing it. (An unconfirmed request the broker did not keep stays ``queued`` with its
        cancellation requested: no message will ever end it.)"""
        with _unavailable("withdrawing a refused submission"):
            async with self.pool.acquire() as connection, connection.transaction():
                if never_enqueued:
                    await connection.execute(_DELETE_QUEUED, list(never_enqueued))
                if maybe_enqueued:
                    await connection.execute(_CANCEL_IDS, list(maybe_enqueued))

    async def job(self, request_id: str) -> Any:
        """The job's row (an ``asyncpg.Record`` of ``_JOB_COLUMNS``) or None."""
        with _unavailable(f"reading job {request_id!r}"):
            return await self.pool.fetchrow(_GET_JOB, request_id)

    async def result(self, request_id: str) -> Any:
        with _unavailable(f"reading the result of {request_id!r}"):
            return await self.pool.fetchrow(_GET_RESULT, request_id)

    async def cancel_job(self, request_id: str) -> Any:
        """Request the cancellation of a job that is not terminal; its row, or None when the job is
        unknown or terminal (no row changed)."""
        with _unavailable(f"cancelling job {request_id!r}"):
            return await self.pool.fetchrow(_CANCEL_JOB, request_id)

    async def cancel_batch(self, batch_id: str) -> int:
        """Request the cancellation of every job of the batch that is not terminal; how many."""
        with _unavailable(f"cancelling batch {batch_id!r}"):
            rows = await self.pool.fetch(_CANCEL_BATCH, batch_id)
        return len(rows)

    async def jobs(
        self, *, status: str | None, batch_id: str | None, after: Cursor | None, limit: int
    ) -> list[Any]:
        """A page of jobs in ``(submitted_at, request_id)`` order, after ``after``."""
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            args.append(status)
            where.append(f"r.status = ${len(args)}")
        if batch_id is not None:
            args.append(batch_id)
            where.append(f"r.batch_id = ${len(args)}")
        if after is not None:
            args.extend([after.submitted_at, after.request_id])
            where.append(f"(r.submitted_at, r.request_id) > (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        sql = (
            f"SELECT {_JOB_COLUMNS} FROM requests r LEFT JOIN analysis_results a USING (request_id) "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + f"ORDER BY r.submitted_at, r.request_id LIMIT ${len(args)}"
        )
        with _unavailable("listing jobs"):
            return list(await self.pool.fetch(sql, *args))

    async def batch(self, batch_id: str) -> BatchRow | None:
        with _unavailable(f"reading batch {batch_id!r}"):
            async with self.pool.acquire() as connection, connection.transaction(readonly=True):
                row = await connection.fetchrow(_BATCH_SUMMARY, batch_id)
                if row is None or row["total"] == 0:
                    return None
                failures = await connection.fetch(_BATCH_FAILURES, batch_id)
                running = await connection.fetch(_BATCH_RUNNING, batch_id)
        return BatchRow(
            total=int(row["total"]),
            counts={s: int(row[s]) for s in ("queued", "running", "completed", "failed", "cancelled")},
            cancel_requested=int(row["cancel_requested"]),
            submitted_at=row["submitted_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            failures_by_code={str(f["code"]): int(f["n"]) for f in failures},
            running_ids=[str(r["request_id"]) for r in running],
        )

    async def batch_ids(self, batch_id: str) -> list[str]:
        with _unavailable(f"reading batch {batch_id!r}"):
            rows = await self.pool.fetch(_BATCH_IDS, batch_id)
        return [str(r["request_id"]) for r in rows]
