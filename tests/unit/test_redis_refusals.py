"""Which Redis errors mean "unavailable for now" (retried, best effort) and which are bugs."""

from __future__ import annotations

import pytest
import redis.exceptions

from analysis_service.errors import SinkUnavailable
from analysis_service.sinks._util import translate_redis


def _raises(exc: BaseException) -> None:
    with translate_redis(store="Redis (test)", action="writing 'k'"):
        raise exc


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis.exceptions.ResponseError(
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk."
        ),
        redis.exceptions.ResponseError("BUSY Redis is busy running a script."),
        redis.exceptions.MasterDownError(
            "Link with MASTER is down and replica-serve-stale-data is set to 'no'."
        ),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.exceptions.ConnectionError("Connection refused"),
    ],
)
def test_a_redis_refusing_or_unreachable_is_unavailable(exc: BaseException) -> None:
    with pytest.raises(SinkUnavailable, match=r"Redis \(test\) unavailable while writing 'k'") as info:
        _raises(exc)
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    "exc",
    [
        redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis.exceptions.ResponseError("ERR unknown command 'HSETX'"),
        redis.exceptions.ResponseError("BUSYKEY Target key name already exists."),
    ],
)
def test_a_bad_command_is_a_bug_and_propagates(exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        _raises(exc)
