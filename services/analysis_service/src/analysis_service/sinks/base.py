"""The seam every result store implements."""

from __future__ import annotations

from typing import Protocol

from service_shared.messages import AnalysisResultMessage


class ResultSink(Protocol):
    """A durable store of analysis outcomes.

    ``write`` must be idempotent on ``result.request_id`` (upsert / MERGE): a redelivered request
    writes the same rows again and creates nothing new. Driver errors are translated to
    :class:`analysis_service.errors.SinkUnavailable` at the adapter.
    """

    name: str

    async def start(self) -> None:
        """Connect and prepare (migrations, constraints). Idempotent."""

    async def write(self, result: AnalysisResultMessage) -> None:
        """Store one outcome (completed or failed)."""

    async def ping(self) -> None:
        """Raise SinkUnavailable unless the store answers now."""

    async def close(self) -> None:
        """Release connections."""
