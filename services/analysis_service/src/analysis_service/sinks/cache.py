"""Cache of engine outputs in Redis, keyed by audio content and by what produced the output.

Key: ``{prefix}:cache:{content_hash}:{versions_digest}``, where ``prefix`` is
``RedisSettings.key_prefix`` and ``versions_digest`` (:func:`versions_digest`) changes whenever an
analyzer version, the set of requested analyses, the timeline option or the cache format changes,
so a new analyzer release or a different request is a miss rather than a stale hit. Values are the
:class:`~service_shared.messages.EngineOutput` JSON, expiring after ``RedisSettings.cache_ttl_s``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Final

import structlog
from pydantic import ValidationError
from redis.asyncio import Redis

from analysis_service.settings import RedisSettings
from analysis_service.sinks._util import redis_client, translate_redis
from service_shared.messages import EngineOutput

STORE = "Redis (cache)"

#: Bump when the stored representation changes incompatibly: every earlier entry becomes a miss.
CACHE_FORMAT: Final = 1

#: Length of the hex digest in the key (64 bits: collisions need ~4e9 configurations).
DIGEST_CHARS: Final = 16


def versions_digest(
    analyzer_versions: Mapping[str, str],
    analyses: Iterable[str],
    timeline: bool | None,
    bpm_range: tuple[float, float] | None = None,
) -> str:
    """Short, order-independent digest of everything besides the audio that shapes an output.

    Parameters
    ----------
    analyzer_versions : mapping of str to str
        Analyzer name to version, e.g. ``{"tempo": "1.2.0", "key": "1.0.0"}``.
    analyses : iterable of str
        The requested analyses (``AnalysisKind`` values are str).
    timeline : bool or None
        The request's timeline option: forced on, forced off, or ``None`` for the worker's
        duration-based default.
    bpm_range : (float, float) or None
        The request's ``bpm_range`` option. Left out of the digest when ``None``, so that entries
        written before the option existed are still found.

    Returns
    -------
    str
        The first :data:`DIGEST_CHARS` hex characters of a SHA-256 over the canonical form.
    """
    fields: dict[str, object] = {
        "format": CACHE_FORMAT,
        "analyzers": sorted(f"{name}={version}" for name, version in analyzer_versions.items()),
        "analyses": sorted({str(a) for a in analyses}),
        "timeline": {True: "on", False: "off", None: "auto"}[timeline],
    }
    if bpm_range is not None:
        fields["bpm_range"] = [float(bpm_range[0]), float(bpm_range[1])]
    canonical = json.dumps(
        fields,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


class ResultCache:
    """Engine outputs cached by content hash and analyzer versions.

    Parameters
    ----------
    settings : RedisSettings
        URL, key prefix, ``cache_ttl_s`` and ``socket_timeout_s``.
    client : redis.asyncio.Redis, optional
        A client to share; when omitted the cache makes its own and
        :meth:`close` closes it.

    Notes
    -----
    The constructor does no I/O; the client connects on first use.
    """

    name = "redis-cache"

    def __init__(self, settings: RedisSettings, *, client: Redis | None = None) -> None:
        self._settings = settings
        self._owns_client = client is None
        self._client = client if client is not None else redis_client(settings)
        self._log = structlog.get_logger(__name__)

    def key(
        self,
        content_hash: str,
        *,
        analyzer_versions: Mapping[str, str],
        analyses: Iterable[str],
        timeline: bool | None,
        bpm_range: tuple[float, float] | None = None,
    ) -> str:
        """The Redis key of one cache entry."""
        digest = versions_digest(analyzer_versions, analyses, timeline, bpm_range)
        return f"{self._settings.key_prefix}:cache:{content_hash}:{digest}"

    async def get(
        self,
        content_hash: str,
        *,
        analyzer_versions: Mapping[str, str],
        analyses: Iterable[str],
        timeline: bool | None,
        bpm_range: tuple[float, float] | None = None,
    ) -> EngineOutput | None:
        """The cached output for this audio and configuration, or ``None`` on a miss.

        An entry that no longer parses as :class:`EngineOutput` (a model change without a
        :data:`CACHE_FORMAT` bump) is deleted, logged and reported as a miss.

        Raises
        ------
        SinkUnavailable
            When Redis cannot be reached in ``socket_timeout_s``.
        """
        key = self.key(
            content_hash,
            analyzer_versions=analyzer_versions,
            analyses=analyses,
            timeline=timeline,
            bpm_range=bpm_range,
        )
        with translate_redis(store=STORE, action=f"reading {key!r}"):
            raw: bytes | str | None = await self._client.get(key)
        if raw is None:
            return None
        try:
            return EngineOutput.model_validate_json(raw)
        except ValidationError as exc:
            self._log.warning("cache_entry_invalid", key=key, errors=exc.error_count(), error=str(exc))
            with translate_redis(store=STORE, action=f"deleting {key!r}"):
                await self._client.delete(key)
            return None

    async def put(
        self,
        content_hash: str,
        output: EngineOutput,
        *,
        analyzer_versions: Mapping[str, str],
        analyses: Iterable[str],
        timeline: bool | None,
        bpm_range: tuple[float, float] | None = None,
    ) -> None:
        """Store ``output`` for this audio and configuration for ``cache_ttl_s`` seconds.

        Raises
        ------
        SinkUnavailable
            When Redis cannot be reached in ``socket_timeout_s``.
        """
        key = self.key(
            content_hash,
            analyzer_versions=analyzer_versions,
            analyses=analyses,
            timeline=timeline,
            bpm_range=bpm_range,
        )
        with translate_redis(store=STORE, action=f"writing {key!r}"):
            await self._client.set(key, output.model_dump_json(), ex=self._settings.cache_ttl_s)

    async def ping(self) -> None:
        """Raise :class:`SinkUnavailable` unless Redis answers ``PING`` now."""
        with translate_redis(store=STORE, action="pinging"):
            await self._client.ping()

    async def close(self) -> None:
        """Close the client if this cache created it."""
        if self._owns_client:
            await self._client.aclose()
