"""Pure parts of the job API: key checks, cursors, the per-client queue, error mapping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from analysis_service.api.app import check_key, status_of, validation_error
from analysis_service.api.events import ProgressHub, Subscription
from analysis_service.api.ledger import Cursor
from analysis_service.errors import (
    ApiKeyMissing,
    ApiKeyRejected,
    InvalidCursor,
    InvalidFile,
    InvalidQuery,
    MalformedJson,
    TooManyFiles,
)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "Token abc", "abc"])
def test_missing_or_malformed_authorization_is_missing(header: str | None) -> None:
    with pytest.raises(ApiKeyMissing):
        check_key(header, ["abc"])


def test_wrong_key_is_rejected_and_every_key_is_accepted() -> None:
    with pytest.raises(ApiKeyRejected):
        check_key("Bearer abd", ["abc", "xyz"])
    with pytest.raises(ApiKeyRejected):
        check_key("Bearer ab", ["abc"])
    check_key("Bearer abc", ["abc", "xyz"])
    check_key("bearer   xyz ", ["abc", "xyz"])
    assert status_of(ApiKeyMissing("x")) == 401
    assert status_of(ApiKeyRejected("x")) == 403


def test_cursor_round_trip_and_refusal() -> None:
    cursor = Cursor(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "job/1:a")
    assert Cursor.decode(cursor.encode()) == cursor
    for bad in ("", "!!!", "e30", Cursor(datetime(2026, 1, 1), "x").encode()):
        with pytest.raises(InvalidCursor):
            Cursor.decode(bad)


def test_subscription_drops_the_oldest_when_full() -> None:
    sub = Subscription(["r"], size=3)
    results = [sub.offer({"request_id": "r", "n": n}) for n in range(10)]
    assert results == [True] * 3 + [False] * 7
    assert sub.pending == 3
    assert sub.take_dropped() == 7
    assert sub.take_dropped() == 0


async def test_subscription_keeps_the_newest_updates() -> None:
    sub = Subscription(["r"], size=2)
    for n in range(5):
        sub.offer({"request_id": "r", "n": n})
    assert [(await sub.next(0.1) or {}).get("n") for _ in range(2)] == [3, 4]
    assert await sub.next(0.01) is None


def test_hub_dispatches_by_request_id_and_forgets_unsubscribed() -> None:
    drops: list[int] = []
    hub = ProgressHub(client=None, channel="p", queue_size=1, on_drop=lambda: drops.append(1))  # type: ignore[arg-type]
    one = hub.subscribe(["a"])
    both = hub.subscribe(["a", "b"])
    hub.dispatch({"request_id": "b", "percent": 1})
    hub.dispatch({"request_id": "c"})
    hub.dispatch({"no": "id"})
    assert (one.pending, both.pending) == (0, 1)
    hub.dispatch({"request_id": "b", "percent": 2})
    assert drops == [1]
    assert hub.clients == 2
    hub.unsubscribe(one)
    hub.unsubscribe(both)
    assert hub.clients == 0


@pytest.mark.parametrize(
    ("errors", "expected", "status"),
    [
        ([{"loc": ("body",), "type": "json_invalid", "msg": "bad"}], MalformedJson, 400),
        ([{"loc": ("body",), "type": "model_attributes_type", "msg": "bad"}], MalformedJson, 400),
        ([{"loc": ("body", "files"), "type": "too_short", "msg": "bad"}], InvalidFile, 422),  # no file
        ([{"loc": ("body", "files"), "type": "too_long", "msg": "bad"}], TooManyFiles, 422),
        ([{"loc": ("body", "files", 3), "type": "string_pattern_mismatch", "msg": "bad"}], InvalidFile, 422),
        ([{"loc": ("query", "limit"), "type": "less_than_equal", "msg": "bad"}], InvalidQuery, 422),
    ],
)
def test_validation_errors_map_to_specific_codes(
    errors: list[dict[str, object]], expected: type, status: int
) -> None:
    error = validation_error(errors)
    assert type(error) is expected
    assert status_of(error) == status
