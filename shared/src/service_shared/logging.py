"""structlog configuration: JSON lines with timestamp, level, service and bound context."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


def configure_logging(*, service: str, level: str = "info", fmt: Literal["json", "console"] = "json") -> None:
    """Configure structlog and the standard library to emit one JSON object per line on stderr.

    Every line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``service`` and whatever the caller
    bound with :func:`structlog.contextvars.bind_contextvars` (e.g. ``request_id``, ``correlation_id``).
    """
    numeric = logging.getLevelName(level.upper())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service(service),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (aio-pika, aiormq, asyncpg, neo4j) log through the standard library: render those
    # lines with the same processors so the stream stays one JSON object per line, their
    # exceptions as traceback text (``exception``) like the service's own.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING) if numeric < logging.WARNING else numeric)


def _add_service(service: str) -> structlog.typing.Processor:
    def processor(
        _logger: object, _name: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        event.setdefault("service", service)
        return event

    return processor
