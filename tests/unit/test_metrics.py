"""Metrics: every metric exported under its name, breaker mapping, bucket bounds, memory sampling."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from analysis_service.metrics import BREAKER_STATES, STAGES, Metrics, geometric_buckets

EXPECTED_NAMES = (
    "analysis_requests_received_total",
    "analysis_outcomes_total",
    "analysis_stage_duration_seconds",
    "analysis_in_flight",
    "analysis_semaphore_waiters",
    "analysis_queue_depth_messages",
    "analysis_cache_hits_total",
    "analysis_cache_misses_total",
    "analysis_sink_write_duration_seconds",
    "analysis_sink_errors_total",
    "analysis_circuit_breaker_state",
    "analysis_process_resident_memory_bytes",
    "analysis_pool_restarts_total",
    "analysis_retries_total",
    "analysis_consuming",
    "analysis_audio_seconds_processed_total",
    "analysis_dead_letter_depth_messages",
    "analysis_queue_consumers",
    "analysis_last_success_timestamp_seconds",
    "analysis_slots",
    "analysis_slots_busy",
    "analysis_urgent_slots_busy",
    "analysis_host_cpu_wait_seconds",
    "analysis_host_cpu_waiters",
)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The current value of one sample of ``metrics``' registry (None: no such sample)."""
    return metrics.registry.get_sample_value(name, labels)


def test_render_lists_every_metric() -> None:
    text = Metrics(time_limit_s=60.0).render().decode()
    for name in EXPECTED_NAMES:
        assert f"# HELP {name} " in text, name


def test_content_type_is_prometheus_text() -> None:
    assert Metrics(time_limit_s=60.0).content_type.startswith("text/plain")


def test_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(time_limit_s=10.0), Metrics(time_limit_s=10.0)
    first.cache_hits.inc()
    assert sample(first, "analysis_cache_hits_total") == 1.0
    assert sample(second, "analysis_cache_hits_total") == 0.0


def test_labelled_counters_and_gauges() -> None:
    metrics = Metrics(time_limit_s=60.0)
    metrics.requests_received.labels(priority="7").inc()
    metrics.outcomes.labels(status="completed", error_code="").inc()
    metrics.outcomes.labels(status="failed", error_code="file_not_found").inc(2)
    metrics.queue_depth.labels(queue="analysis.requests").set(12)
    metrics.retries.labels(reason="worker_crashed").inc()
    metrics.sink_errors.labels(sink="postgres").inc()
    assert sample(metrics, "analysis_requests_received_total", priority="7") == 1.0
    assert sample(metrics, "analysis_outcomes_total", status="completed", error_code="") == 1.0
    assert sample(metrics, "analysis_outcomes_total", status="failed", error_code="file_not_found") == 2.0
    assert sample(metrics, "analysis_queue_depth_messages", queue="analysis.requests") == 12.0
    assert sample(metrics, "analysis_retries_total", reason="worker_crashed") == 1.0
    assert sample(metrics, "analysis_sink_errors_total", sink="postgres") == 1.0


@pytest.mark.parametrize(
    ("state", "value"),
    [("closed", 0.0), ("half-open", 1.0), ("open", 2.0), ("half-opened", 1.0), ("opened", 2.0)],
)
def test_set_breaker_maps_states(state: str, value: float) -> None:
    metrics = Metrics(time_limit_s=60.0)
    metrics.set_breaker("postgres", state)
    assert sample(metrics, "analysis_circuit_breaker_state", dependency="postgres") == value


def test_set_breaker_rejects_unknown_state() -> None:
    metrics = Metrics(time_limit_s=60.0)
    with pytest.raises(ValueError, match="unknown circuit-breaker state 'broken' for 'neo4j'"):
        metrics.set_breaker("neo4j", "broken")
    assert set(BREAKER_STATES.values()) == {0, 1, 2}


@pytest.mark.parametrize("time_limit_s", [0.01, 1.0, 60.0, 1500.0, 1234.5])
def test_stage_buckets_end_at_the_time_limit(time_limit_s: float) -> None:
    metrics = Metrics(time_limit_s=time_limit_s)
    metrics.stage_duration.labels(stage="decode").observe(0.005)
    bounds = [
        float(s.labels["le"])
        for family in metrics.registry.collect()
        if family.name == "analysis_stage_duration_seconds"
        for s in family.samples
        if s.name.endswith("_bucket") and s.labels["stage"] == "decode"
    ]
    finite = [b for b in bounds if b != float("inf")]
    assert finite[0] == pytest.approx(0.01)
    assert finite[-1] == time_limit_s
    assert finite == sorted(set(finite))
    assert bounds[-1] == float("inf")


def test_every_stage_is_exported_from_the_start() -> None:
    metrics = Metrics(time_limit_s=60.0)
    for stage in STAGES:
        assert sample(metrics, "analysis_stage_duration_seconds_count", stage=stage) == 0.0


def test_geometric_buckets() -> None:
    assert geometric_buckets(0.01, 0.08) == (0.01, 0.02, 0.04, 0.08)
    assert geometric_buckets(0.01, 0.05) == (0.01, 0.02, 0.04, 0.05)
    assert geometric_buckets(1.0, 1.0) == (1.0,)
    with pytest.raises(ValueError, match="0 < low <= high"):
        geometric_buckets(1.0, 0.5)
    with pytest.raises(ValueError, match="factor must exceed 1"):
        geometric_buckets(0.01, 1.0, factor=1.0)


def test_time_limit_below_the_first_bucket_is_refused() -> None:
    with pytest.raises(ValueError, match="time_limit_s must be at least"):
        Metrics(time_limit_s=0.001)


def test_sample_memory_sets_worker_and_pool_rss() -> None:
    metrics = Metrics(time_limit_s=60.0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        metrics.sample_memory()
    finally:
        child.kill()
        child.wait()
    worker = sample(metrics, "analysis_process_resident_memory_bytes", process="worker")
    pool = sample(metrics, "analysis_process_resident_memory_bytes", process="pool")
    assert worker is not None
    assert worker > 1_000_000
    assert pool is not None
    assert pool > 0


def test_dashboard_metrics_record_their_values() -> None:
    metrics = Metrics(time_limit_s=60.0)
    metrics.audio_seconds.inc(183.4)
    metrics.dead_letter_depth.labels(queue="analysis.requests.dead").set(3)
    metrics.queue_consumers.labels(queue="analysis.requests").set(2)
    metrics.slots.set(4)
    metrics.slots_busy.set(3)
    metrics.last_success.set_to_current_time()
    assert sample(metrics, "analysis_audio_seconds_processed_total") == pytest.approx(183.4)
    assert sample(metrics, "analysis_dead_letter_depth_messages", queue="analysis.requests.dead") == 3.0
    assert sample(metrics, "analysis_queue_consumers", queue="analysis.requests") == 2.0
    assert (sample(metrics, "analysis_slots"), sample(metrics, "analysis_slots_busy")) == (4.0, 3.0)
    last = sample(metrics, "analysis_last_success_timestamp_seconds")
    assert last is not None
    assert abs(last - time.time()) < 5


def test_host_cpu_wait_is_a_histogram_up_to_the_time_limit() -> None:
    metrics = Metrics(time_limit_s=60.0)
    metrics.host_cpu_wait.observe(0.0)
    metrics.host_cpu_wait.observe(0.4)
    assert sample(metrics, "analysis_host_cpu_wait_seconds_count") == 2.0
    assert sample(metrics, "analysis_host_cpu_wait_seconds_bucket", le="0.01") == 1.0
    assert sample(metrics, "analysis_host_cpu_wait_seconds_bucket", le="60.0") == 2.0


def test_last_success_is_zero_until_the_first_success() -> None:
    assert sample(Metrics(time_limit_s=60.0), "analysis_last_success_timestamp_seconds") == 0.0


def test_sample_names_cover_unobserved_labelled_metrics() -> None:
    names = Metrics(time_limit_s=60.0).sample_names()
    # Labelled metrics without children expose no sample yet, but their names are known.
    assert {
        "analysis_outcomes_total",
        "analysis_dead_letter_depth_messages",
        "analysis_sink_write_duration_seconds_bucket",
        "analysis_sink_write_duration_seconds_count",
        "analysis_stage_duration_seconds_sum",
    } <= names
    assert "analysis_outcomes" not in names
    assert "analysis_dead_letter_depth_messages_total" not in names
