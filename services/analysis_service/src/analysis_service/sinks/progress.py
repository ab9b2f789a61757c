"""Request progress in Redis: a hash per request, plus a message per update on two channels.

Key ``{prefix}:progress:{request_id}`` (``prefix`` is ``RedisSettings.key_prefix``, by default
``analysis``) is a hash with the fields

==================  =====================================================================
``request_id``      the request
``status``          ``queued`` | ``running`` | ``completed`` | ``failed`` | ``cancelled``
``percent``         0-100
``stage``           what is happening, e.g. ``decode``, ``features``, ``store``
``updated_at``      ISO 8601 UTC time of the last update
``started_at``      first update with status ``running`` (cleared by ``queued``)
``finished_at``     update with a terminal status (cleared by ``queued``/``running``)
``error_code``      only while the last update carried one (e.g. ``file_not_found``)
``error``           only while the last update carried one: the human-readable message
``correlation_id``  once given, kept
``file``            once given, kept
==================  =====================================================================

and expires ``RedisSettings.progress_ttl_s`` seconds after its last update.

Every update is also published as a JSON object (``request_id``, ``status``, ``percent``,
``stage``, ``updated_at`` and whichever optional fields the update carried) on two channels:

* ``{prefix}:progress:{request_id}`` for clients following one request (no pattern matching), and
* ``{prefix}:progress`` for consumers of every update (a WebSocket gateway, a dashboard).

The hash write, its expiry and both publishes are one server-side script (``EVALSHA`` of
:data:`UPDATE_SCRIPT`): one round trip and one command to encode and parse, atomic like a
``MULTI``/``EXEC`` transaction, so a subscriber that reads the hash after a message sees at least
that update. (The transaction it replaced sent seven commands and parsed seven replies per update,
the largest part of the worker's Redis CPU.) A Redis user restricted by an ACL needs ``EVALSHA`` and
``SCRIPT LOAD`` besides the hash and ``PUBLISH`` commands; redis-py loads the script again after a
server restart (``NOSCRIPT``).

Progress is best effort for the worker; failures surface as :class:`SinkUnavailable` so that the
caller's circuit breaker can stop trying for a while.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any, Final, Literal, get_args

from redis.asyncio import Redis
from redis.typing import EncodableT

from analysis_service.settings import RedisSettings
from analysis_service.sinks._util import redis_client, translate_redis, utc_now_iso

STORE = "Redis (progress)"

#: One update: KEYS[1] is the request's hash (and its channel); ARGV is the expiry in seconds, the
#: all-updates channel, the JSON message, ``started_at`` to set unless present (empty: none), the
#: number n of fields to set, then n field/value pairs, then the names of the fields to remove.
UPDATE_SCRIPT: Final = """
local n = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + 2 * n))
if #ARGV > 5 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 6 + 2 * n, #ARGV))
end
if ARGV[4] ~= '' then
  redis.call('HSETNX', KEYS[1], 'started_at', ARGV[4])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('PUBLISH', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""

ProgressStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
PROGRESS_STATUSES: Final[frozenset[str]] = frozenset(get_args(ProgressStatus))


class ProgressStore:
    """Reads and writes request progress in Redis.

    Parameters
    ----------
    settings : RedisSettings
        URL, key prefix, ``progress_ttl_s`` and ``socket_timeout_s``.
    client : redis.asyncio.Redis, optional
        A client to share (e.g. with :class:`~analysis_service.sinks.cache.ResultCache`). When
        omitted the store makes its own from ``settings`` and
        :meth:`close` closes it; a shared client is left to its owner.

    Notes
    -----
    The constructor does no I/O; the client connects on first use.
    """

    name = "redis-progress"

    def __init__(self, settings: RedisSettings, *, client: Redis | None = None) -> None:
        self._settings = settings
        self._owns_client = client is None
        self._client = client if client is not None else redis_client(settings)
        self._update = self._client.register_script(UPDATE_SCRIPT)

    def key(self, request_id: str) -> str:
        """Hash key of ``request_id`` (also its per-request channel)."""
        return f"{self._settings.key_prefix}:progress:{request_id}"

    @property
    def channel(self) -> str:
        """The channel that receives every update."""
        return f"{self._settings.key_prefix}:progress"

    async def update(
        self,
        request_id: str,
        *,
        status: ProgressStatus,
        percent: float,
        stage: str,
        error_code: str | None = None,
        error: str | None = None,
        correlation_id: str | None = None,
        file: str | None = None,
        summary: Mapping[str, str] | None = None,
    ) -> None:
        """Record and publish the state of ``request_id``, and renew its expiry.

        Parameters
        ----------
        request_id : str
            The request.
        status : {"queued", "running", "completed", "failed", "cancelled"}
            Its state.
        percent : float
            Progress, 0 to 100.
        stage : str
            What is happening now.
        error_code, error : str, optional
            Why it failed; fields absent from an update are removed from the hash.
        summary : mapping of str to str, optional
            Result fields for pollers (e.g. ``bpm``, ``key``, ``camelot``, ``mood``), stored in the
            hash and the published message.
        correlation_id, file : str, optional
            Stored when given; absent ones keep their earlier value.

        Raises
        ------
        ValueError
            On an unknown status or a percent outside 0-100 (a caller bug).
        SinkUnavailable
            When Redis cannot be reached in ``socket_timeout_s``.
        """
        if status not in PROGRESS_STATUSES:
            raise ValueError(f"progress status must be one of {sorted(PROGRESS_STATUSES)}, not {status!r}")
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"progress percent must be within 0..100, not {percent!r}")
        now = utc_now_iso()
        fields: dict[str, str] = {
            "request_id": request_id,
            "status": status,
            "percent": f"{float(percent):g}",
            "stage": stage,
            "updated_at": now,
        }
        optional = {"error_code": error_code, "error": error, "correlation_id": correlation_id, "file": file}
        fields.update({name: value for name, value in optional.items() if value is not None})
        fields.update(summary or {})
        removed = [name for name in ("error_code", "error") if optional[name] is None]
        if status in ("completed", "failed", "cancelled"):
            fields["finished_at"] = now
        else:
            removed.append("finished_at")
        if status == "queued":
            removed.append("started_at")

        payload = json.dumps({**fields, "percent": float(percent)}, separators=(",", ":"))
        args: list[EncodableT] = [
            self._settings.progress_ttl_s,
            self.channel,
            payload,
            now if status == "running" else "",
            len(fields),
            *itertools.chain.from_iterable(fields.items()),
            *removed,
        ]
        action = f"updating progress of {request_id!r}"
        with translate_redis(store=STORE, action=action):
            await self._update(keys=[self.key(request_id)], args=args)

    async def get(self, request_id: str) -> dict[str, Any] | None:
        """The progress hash of ``request_id``, or ``None`` if unknown or expired.

        Returns
        -------
        dict or None
            The fields listed in the module docstring: strings, except ``percent`` (float).

        Raises
        ------
        SinkUnavailable
            When Redis cannot be reached in ``socket_timeout_s``.
        """
        with translate_redis(store=STORE, action=f"reading {request_id!r}"):
            raw = await self._client.hgetall(self.key(request_id))
        if not raw:
            return None
        progress: dict[str, Any] = {_text(name): _text(value) for name, value in raw.items()}
        if "percent" in progress:
            progress["percent"] = float(progress["percent"])
        return progress

    async def ping(self) -> None:
        """Raise :class:`SinkUnavailable` unless Redis answers ``PING`` now."""
        with translate_redis(store=STORE, action="pinging"):
            await self._client.ping()

    async def close(self) -> None:
        """Close the client if this store created it."""
        if self._owns_client:
            await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value
