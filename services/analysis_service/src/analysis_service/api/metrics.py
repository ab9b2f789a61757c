"""Prometheus metrics of the job API, in a private registry (labels are bounded: route templates,
methods, status codes, error codes)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from analysis_service.metrics import geometric_buckets


class ApiMetrics:
    """Every metric of the API process."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "analysis_api_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "analysis_api_request_duration_seconds",
            "Time to answer an HTTP request (streams: until the stream ended).",
            ["route", "method"],
            buckets=geometric_buckets(0.001, 60.0, factor=4.0),
            registry=r,
        )
        self.jobs_submitted = Counter(
            "analysis_api_jobs_submitted", "Jobs accepted (recorded and confirmed by the broker).", registry=r
        )
        self.refused = Counter(
            "analysis_api_refusals", "Requests refused with an error, by error code.", ["code"], registry=r
        )
        self.cancellations = Counter(
            "analysis_api_cancellations",
            "Jobs whose cancellation was requested, by the endpoint used (job or batch).",
            ["scope"],
            registry=r,
        )
        self.stream_clients = Gauge(
            "analysis_api_stream_clients",
            "Live stream clients connected, by transport.",
            ["transport"],
            registry=r,
        )
        self.stream_dropped = Counter(
            "analysis_api_stream_events_dropped",
            "Progress updates dropped because a stream client read too slowly.",
            registry=r,
        )
        self.redis_fallbacks = Counter(
            "analysis_api_progress_fallbacks",
            "Reads that fell back to the ledger alone because Redis did not answer.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
