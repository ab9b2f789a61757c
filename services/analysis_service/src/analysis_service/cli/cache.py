"""The local result cache of ``analyze``: SQLite under the user's cache folder.

Two tables:

``results``
    One :class:`~service_shared.messages.EngineOutput` (JSON) per ``(content_hash, config)``.
    ``content_hash`` is the SHA-256 of the file's bytes, so a renamed or copied file is a hit and an
    edited one a miss; ``config`` (:func:`config_digest`) covers the analyzer versions, the requested
    analyses, the timeline option, the analysis sample rate and the package version, so a new engine
    or a different request is a miss, never a stale hit. Only completed analyses are stored.
``files``
    What a file's bytes hashed to, keyed by its path and ``stat`` identity (device, inode, size,
    modification and change times in ns), plus its duration. A re-run over unchanged files reads
    neither their bytes nor their headers. Editing a file changes its size or times (``ctime`` changes
    on every write and cannot be set back by tools), so it is hashed again.

The database runs in WAL mode and every write is one transaction: a run killed mid-write (Ctrl-C,
power loss) leaves the last committed state. Several runs may share the cache (``busy_timeout``).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from analysis_service.media import FileIdentity
from service_shared.messages import EngineOutput

#: Bump when the stored representation changes incompatibly: every earlier entry becomes a miss.
CACHE_FORMAT: Final = 1
#: File name of the database inside the cache folder.
DB_NAME: Final = "results.sqlite3"
#: Milliseconds a writer waits for another run's transaction to finish.
BUSY_TIMEOUT_MS: Final = 10_000

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS results (
    content_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    output TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (content_hash, config)
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    device INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    duration_s REAL
);
"""


def default_cache_path() -> Path:
    """``results.sqlite3`` in the user's cache folder (``$XDG_CACHE_HOME/analysis-service`` on Linux)."""
    from platformdirs import user_cache_path

    return user_cache_path("analysis-service", appauthor=False) / DB_NAME


def package_version() -> str:
    """The installed ``analysis-service`` version (``"unknown"`` when run from a bare source tree)."""
    try:
        return version("analysis-service")
    except PackageNotFoundError:
        return "unknown"


def config_digest(
    *,
    analyzer_versions: Mapping[str, str],
    analyses: Iterable[str] | None,
    timeline: bool | None,
    sample_rate: int,
    timeline_threshold_s: float,
    bpm_range: tuple[float, float] | None = None,
) -> str:
    """Digest of everything besides the audio that shapes an engine output.

    Parameters
    ----------
    analyzer_versions : mapping of str to str
        Version of every analyzer that runs (the requested ones and their dependencies).
    analyses : iterable of str, optional
        The requested analyzers; ``None``: all.
    timeline : bool, optional
        Timeline forced on, off, or ``None`` (by duration, then ``timeline_threshold_s`` counts).
    sample_rate : int
        Analysis sample rate (Hz).
    timeline_threshold_s : float
        Duration (s) above which a timeline is computed when ``timeline`` is ``None``.
    bpm_range : (float, float), optional
        ``--bpm-range``: the octave range the tempi are reported in.

    Returns
    -------
    str
        32 hex characters of a SHA-256 over the canonical JSON form.
    """
    fields: dict[str, object] = {
        "format": CACHE_FORMAT,
        "package": package_version(),
        "analyzers": sorted(f"{name}={v}" for name, v in analyzer_versions.items()),
        "analyses": None if analyses is None else sorted(set(analyses)),
        "timeline": {True: "on", False: "off", None: "auto"}[timeline],
        "timeline_threshold_s": timeline_threshold_s if timeline is None else None,
        "sample_rate": sample_rate,
    }
    if bpm_range is not None:  # only when set: the cache of a release without the option stays valid
        fields["bpm_range"] = [float(bpm_range[0]), float(bpm_range[1])]
    canonical = json.dumps(
        fields,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class KnownFile:
    """What an earlier run learnt about a file that has not changed since."""

    content_hash: str
    duration_s: float | None


class ResultCache:
    """The SQLite result cache (see the module docstring).

    Parameters
    ----------
    path : Path
        The database file; its folder is created when missing.

    Raises
    ------
    sqlite3.Error, OSError
        When the database cannot be opened or is not a SQLite database.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
        except BaseException:
            self._db.close()
            raise

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def known_file(self, identity: FileIdentity) -> KnownFile | None:
        """The hash (and duration) recorded for this exact file state, or ``None``."""
        row = self._db.execute(
            "SELECT content_hash, duration_s FROM files WHERE path = ? AND device = ? AND inode = ? "
            "AND size = ? AND mtime_ns = ? AND ctime_ns = ?",
            (
                identity.path,
                identity.device,
                identity.inode,
                identity.size,
                identity.mtime_ns,
                identity.ctime_ns,
            ),
        ).fetchone()
        return None if row is None else KnownFile(row[0], row[1])

    def remember_file(self, identity: FileIdentity, content_hash: str, duration_s: float | None) -> None:
        """Record what ``identity``'s bytes hash to (replacing what was known for its path)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    identity.path,
                    identity.device,
                    identity.inode,
                    identity.size,
                    identity.mtime_ns,
                    identity.ctime_ns,
                    content_hash,
                    duration_s,
                ),
            )

    def get(self, content_hash: str, config: str) -> EngineOutput | None:
        """The stored output for these bytes and this configuration, or ``None``.

        An entry that no longer parses (a model change without a :data:`CACHE_FORMAT` bump) is a miss;
        the next :meth:`put` replaces it.
        """
        row = self._db.execute(
            "SELECT output FROM results WHERE content_hash = ? AND config = ?", (content_hash, config)
        ).fetchone()
        if row is None:
            return None
        try:
            return EngineOutput.model_validate_json(row[0])
        except ValidationError:
            return None

    def put(self, content_hash: str, config: str, output: EngineOutput) -> None:
        """Store ``output`` for these bytes and this configuration (one transaction)."""
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                (content_hash, config, output.model_dump_json(), time.time()),
            )

    def count(self) -> int:
        """Stored results (all configurations)."""
        return int(self._db.execute("SELECT count(*) FROM results").fetchone()[0])

    def close(self) -> None:
        """Close the database (idempotent)."""
        self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an exception), for autocommit connections."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
