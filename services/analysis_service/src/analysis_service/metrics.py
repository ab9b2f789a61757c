"""Prometheus metrics of the worker, kept in one object with its own registry.

:class:`Metrics` owns a :class:`prometheus_client.CollectorRegistry` instead of using the global
one, so a test (or a second worker in one process) can make as many as it likes. The worker updates
the attributes; :mod:`analysis_service.http.server` serves :meth:`Metrics.render` on ``/metrics``.

Labels are bounded sets (priorities, statuses, error codes, stages, sinks, dependencies); there
is never a per-file or per-request label.
"""

from __future__ import annotations

import math
from typing import Final

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

#: Values of ``analysis_circuit_breaker_state``. ``opened``/``half-opened`` are purgatory's spellings.
BREAKER_STATES: Final[dict[str, int]] = {
    "closed": 0,
    "half-open": 1,
    "half-opened": 1,
    "open": 2,
    "opened": 2,
}

#: Stages timed by ``analysis_stage_duration_seconds``.
STAGES: Final[tuple[str, ...]] = (
    "decode",
    "features",
    "bpm",
    "key",
    "mood",
    "timeline",
    "total",
    "queue_wait",
    "persist",
)

#: Smallest finite histogram bucket (seconds).
MIN_BUCKET_S: Final = 0.01
#: Ratio between neighbouring histogram buckets.
BUCKET_FACTOR: Final = 2.0
#: Largest finite bucket of the sink write-latency histogram (seconds).
SINK_LATENCY_MAX_S: Final = 60.0


def geometric_buckets(low: float, high: float, *, factor: float = BUCKET_FACTOR) -> tuple[float, ...]:
    """Histogram upper bounds ``low, low*factor, ...`` ending exactly at ``high`` (``+Inf`` is implicit).

    Parameters
    ----------
    low, high : float
        First and last finite bound, in seconds; ``0 < low <= high``.
    factor : float
        Ratio between neighbouring bounds, > 1. The last step may be smaller, so that the final
        bound is exactly ``high``.

    Returns
    -------
    tuple of float
        Strictly increasing bounds, rounded to 6 significant digits except ``high`` itself.

    Raises
    ------
    ValueError
        When the bounds or the factor are out of range.
    """
    if not 0 < low <= high or not math.isfinite(high):
        raise ValueError(f"histogram buckets need 0 < low <= high < inf, got low={low!r}, high={high!r}")
    if factor <= 1:
        raise ValueError(f"histogram bucket factor must exceed 1, got {factor!r}")
    bounds: list[float] = []
    bound = low
    while bound < high * (1 - 1e-9):
        bounds.append(float(f"{bound:.6g}"))
        bound *= factor
    bounds.append(float(high))
    return tuple(bounds)


class Metrics:
    """Every metric of the worker, registered in a private registry.

    Parameters
    ----------
    time_limit_s : float
        The longest an analysis may run (seconds); the stage-duration histogram's buckets go
        geometrically from 0.01 s up to exactly this value. Must be at least 0.01 s.

    Attributes
    ----------
    registry : prometheus_client.CollectorRegistry
        This object's registry (nothing is registered globally).
    requests_received : Counter
        ``analysis_requests_received_total{priority}``: requests taken from the queue.
    outcomes : Counter
        ``analysis_outcomes_total{status,error_code}``: finished requests; ``error_code`` is
        ``""`` for completed ones.
    stage_duration : Histogram
        ``analysis_stage_duration_seconds{stage}``: seconds per stage, see :data:`STAGES`.
    in_flight : Gauge
        ``analysis_in_flight``: requests being analysed or persisted.
    semaphore_waiters : Gauge
        ``analysis_semaphore_waiters``: requests waiting for an analysis slot.
    queue_depth : Gauge
        ``analysis_queue_depth_messages{queue}``: ready messages per queue.
    cache_hits, cache_misses : Counter
        ``analysis_cache_hits_total`` / ``analysis_cache_misses_total``: result-cache lookups.
    sink_latency : Histogram
        ``analysis_sink_write_duration_seconds{sink}``: seconds per result-store write.
    sink_errors : Counter
        ``analysis_sink_errors_total{sink}``: failed result-store writes.
    breaker_state : Gauge
        ``analysis_circuit_breaker_state{dependency}``: 0 closed, 1 half-open, 2 open; set it
        with :meth:`set_breaker`.
    rss_bytes : Gauge
        ``analysis_process_resident_memory_bytes{process}``: resident memory of the worker
        process (``worker``) and of all its descendants together (``pool``); set by
        :meth:`sample_memory`.
    pool_restarts : Counter
        ``analysis_pool_restarts_total``: process pools replaced after a crash.
    retries : Counter
        ``analysis_retries_total{reason}``: requests tried again, by reason.
    consuming : Gauge
        ``analysis_consuming``: 1 while consuming, 0 when paused (memory guard) or stopped.
    audio_seconds : Counter
        ``analysis_audio_seconds_processed_total``: seconds of audio analysed by this worker;
        add ``EngineOutput.duration_s`` once per analysed (not cached) completed request.
    dead_letter_depth : Gauge
        ``analysis_dead_letter_depth_messages{queue}``: messages held in a dead-letter queue.
    queue_consumers : Gauge
        ``analysis_queue_consumers{queue}``: consumers the broker counts on the request queue
        (every worker reports the same broker-wide figure). Set it for the request queue only:
        the alert rules read 0 as "nobody consumes".
    last_success : Gauge
        ``analysis_last_success_timestamp_seconds``: Unix time of this worker's latest completed
        request; 0 until the first one (set with ``last_success.set_to_current_time()``).
    slots : Gauge
        ``analysis_slots``: analysis slots (pool processes) of this worker.
    slots_busy : Gauge
        ``analysis_slots_busy``: analysis slots running an analysis now.
    urgent_slots_busy : Gauge
        ``analysis_urgent_slots_busy``: urgent slots running an urgent request now.
    host_cpu_wait : Histogram
        ``analysis_host_cpu_wait_seconds``: seconds each slot lease waited for one of the host's
        CPU tokens (shared with the host's other workers); buckets as for ``stage_duration``.
        Nothing is observed while host CPU sharing is off.
    host_cpu_waiters : Gauge
        ``analysis_host_cpu_waiters``: analyses waiting for a CPU (the worker's or a host token) now.
    """

    def __init__(self, *, time_limit_s: float) -> None:
        if time_limit_s < MIN_BUCKET_S:
            raise ValueError(f"time_limit_s must be at least {MIN_BUCKET_S} s, got {time_limit_s!r}")
        self.time_limit_s = float(time_limit_s)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_received = Counter(
            "analysis_requests_received_total",
            "Analysis requests taken from the queue, by request priority.",
            ["priority"],
            registry=r,
        )
        self.outcomes = Counter(
            "analysis_outcomes_total",
            "Finished analysis requests by status and error code (empty when completed).",
            ["status", "error_code"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "analysis_stage_duration_seconds",
            "Seconds spent per analysis stage (decode, features, bpm, key, mood, timeline, total, "
            "queue_wait, persist).",
            ["stage"],
            buckets=geometric_buckets(MIN_BUCKET_S, self.time_limit_s),
            registry=r,
        )
        self.in_flight = Gauge("analysis_in_flight", "Requests being analysed or persisted now.", registry=r)
        self.semaphore_waiters = Gauge(
            "analysis_semaphore_waiters", "Requests waiting for a free analysis slot.", registry=r
        )
        self.queue_depth = Gauge(
            "analysis_queue_depth_messages", "Messages ready in a queue.", ["queue"], registry=r
        )
        self.cache_hits = Counter(
            "analysis_cache_hits_total", "Requests answered from the result cache.", registry=r
        )
        self.cache_misses = Counter(
            "analysis_cache_misses_total", "Result-cache lookups that found nothing.", registry=r
        )
        self.sink_latency = Histogram(
            "analysis_sink_write_duration_seconds",
            "Seconds per write to a result store.",
            ["sink"],
            buckets=geometric_buckets(0.001, SINK_LATENCY_MAX_S),
            registry=r,
        )
        self.sink_errors = Counter(
            "analysis_sink_errors_total", "Failed writes to a result store.", ["sink"], registry=r
        )
        self.breaker_state = Gauge(
            "analysis_circuit_breaker_state",
            "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open.",
            ["dependency"],
            registry=r,
        )
        self.rss_bytes = Gauge(
            "analysis_process_resident_memory_bytes",
            "Resident memory of the worker process (worker) and of all its child processes (pool).",
            ["process"],
            registry=r,
        )
        self.pool_restarts = Counter(
            "analysis_pool_restarts_total", "Process pools replaced after a pool process died.", registry=r
        )
        self.retries = Counter(
            "analysis_retries_total", "Requests tried again, by reason.", ["reason"], registry=r
        )
        self.consuming = Gauge(
            "analysis_consuming",
            "1 while the worker consumes requests, 0 while paused by the memory guard or stopped.",
            registry=r,
        )
        self.audio_seconds = Counter(
            "analysis_audio_seconds_processed_total",
            "Seconds of audio analysed (completed requests, cache hits excluded).",
            registry=r,
        )
        self.dead_letter_depth = Gauge(
            "analysis_dead_letter_depth_messages",
            "Messages held in a dead-letter queue (requests that failed permanently).",
            ["queue"],
            registry=r,
        )
        self.queue_consumers = Gauge(
            "analysis_queue_consumers",
            "Consumers the broker counts on the request queue (all workers together).",
            ["queue"],
            registry=r,
        )
        self.last_success = Gauge(
            "analysis_last_success_timestamp_seconds",
            "Unix time of this worker's latest completed request (0: none yet).",
            registry=r,
        )
        self.slots = Gauge("analysis_slots", "Analysis slots (pool processes) of this worker.", registry=r)
        self.slots_busy = Gauge("analysis_slots_busy", "Analysis slots running an analysis now.", registry=r)
        self.urgent_slots_busy = Gauge(
            "analysis_urgent_slots_busy",
            "Urgent analysis slots (beyond analysis_slots) running an urgent request now.",
            registry=r,
        )
        self.host_cpu_wait = Histogram(
            "analysis_host_cpu_wait_seconds",
            "Seconds a slot lease waited for one of the host's CPU tokens (shared by its workers).",
            buckets=geometric_buckets(MIN_BUCKET_S, self.time_limit_s),
            registry=r,
        )
        self.host_cpu_waiters = Gauge(
            "analysis_host_cpu_waiters",
            "Analyses waiting for a CPU (a slot's or a host token) now.",
            registry=r,
        )
        for stage in STAGES:  # export every known stage from the start, at zero
            self.stage_duration.labels(stage=stage)
        self._process: psutil.Process | None = None  # created on the first sample_memory()

    def set_breaker(self, dependency: str, state: str) -> None:
        """Record the circuit-breaker ``state`` of ``dependency``.

        Parameters
        ----------
        dependency : str
            The guarded dependency, e.g. ``"postgres"`` or ``"redis"``.
        state : {"closed", "half-open", "open"}
            Also accepted: purgatory's ``"half-opened"`` and ``"opened"``.

        Raises
        ------
        ValueError
            On any other state.
        """
        try:
            value = BREAKER_STATES[state]
        except KeyError:
            raise ValueError(
                f"unknown circuit-breaker state {state!r} for {dependency!r}; "
                f"expected one of {sorted(BREAKER_STATES)}"
            ) from None
        self.breaker_state.labels(dependency=dependency).set(value)

    def sample_memory(self) -> None:
        """Set ``rss_bytes`` from the worker's resident memory and the sum over its descendants.

        Children that exit while being measured, or that may not be inspected, count as 0 bytes.
        """
        if self._process is None:
            self._process = psutil.Process()
        self.rss_bytes.labels(process="worker").set(self._process.memory_info().rss)
        pool = 0
        for child in self._process.children(recursive=True):
            try:
                pool += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited (or was recycled) between listing and measuring: nothing to count
        self.rss_bytes.labels(process="pool").set(pool)

    def sample_names(self) -> frozenset[str]:
        """Every sample name this registry can expose, labelled or not, observed or not.

        A histogram ``x`` exposes ``x_bucket``, ``x_sum``, ``x_count`` and ``x_created``; a counter
        ``x_total`` also ``x_created``; a gauge just its name. Dashboards and alert rules may use
        only these names (``tests/unit/test_dashboards.py`` checks).
        """
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"),
            "gauge": ("",),
        }
        return frozenset(
            family.name + suffix
            for family in self.registry.collect()
            for suffix in suffixes.get(family.type, ("",))
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        """HTTP ``Content-Type`` of :meth:`render`'s output."""
        return str(CONTENT_TYPE_LATEST)
