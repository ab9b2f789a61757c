"""The JSON log: lines of the libraries that log through the standard library (aio-pika, aiormq,
asyncpg, asyncio) carry their traceback as text, like the service's own lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from service_shared.logging import configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _fail() -> None:
    raise ValueError("the broker said no")


def test_a_library_error_logged_with_its_exception_carries_the_traceback_text(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(service="test-service")
    try:
        _fail()
    except ValueError:
        logging.getLogger("aiormq.connection").error("Unexpected connection close", exc_info=True)
        structlog.get_logger("own").error("own line", exc_info=True)
    library, own = _lines(capsys.readouterr().err)
    assert library["logger"] == "aiormq.connection"
    assert library["service"] == "test-service"
    for line in (library, own):
        assert "exc_info" not in line
        text = str(line["exception"])
        assert text.startswith("Traceback (most recent call last):")
        assert "in _fail" in text
        assert "ValueError: the broker said no" in text
