"""A real Prometheus scrapes a real worker /metrics endpoint, evaluates the alert rules and answers
every query of the Grafana dashboard.

Catches what parsing cannot: a query that fails at evaluation (e.g. many-to-many matching), one
that returns nothing for the series the worker really exposes, a rule whose evaluation errors.
Needs the ``prometheus`` binary (``.ci/run`` takes it from Debian's ``prometheus`` package next to
``promtool``): skipped without it locally, failing under ``CI``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from analysis_service.http.server import HttpServer
from analysis_service.metrics import Metrics
from analysis_service.settings import HttpSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "infrastructure" / "prometheus" / "rules"
DASHBOARD = ROOT / "infrastructure" / "grafana" / "dashboards" / "analysis-service.json"
#: Seconds of samples generated before querying (scrape and rule interval: 1 s).
RUN_S = 12
#: Grafana variables, as Grafana would fill them for this short run.
VARIABLES = {"__rate_interval": "10s", "__interval": "1s", "__range": "1m"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prometheus_binary() -> str:
    path = os.environ.get("PROMETHEUS") or shutil.which("prometheus")
    if path is None:
        reason = "the prometheus binary is not installed (.ci/run installs it with promtool)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture
async def worker_metrics() -> AsyncIterator[tuple[Metrics, int]]:
    metrics = Metrics(time_limit_s=1500.0)
    server = HttpServer(HttpSettings(host="127.0.0.1", port=0), metrics, {})
    await server.start()
    yield metrics, server.port
    await server.stop()


@pytest.fixture
def prometheus(prometheus_binary: str, worker_metrics: tuple[Metrics, int], tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping the worker every second with the repository's rules; its API URL."""
    _, worker_port = worker_metrics
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES / "*.yml")],
                "scrape_configs": [
                    {
                        "job_name": "analysis-worker",
                        "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}],
                    }
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api/v1/"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "prometheus did not start: " + (tmp_path / "prometheus.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def api(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            result: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:  # a bad query answers 4xx with the error in the body
        result = json.load(exc)
    return result


def dashboard_queries() -> Iterator[tuple[str, str]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES.get(m.group(1), ".*"), target["expr"])
            yield f"{panel['title']}/{target['refId']}", expr


async def test_dashboard_and_rules_work_on_real_metrics(
    worker_metrics: tuple[Metrics, int], prometheus: str
) -> None:
    metrics, _ = worker_metrics
    metrics.slots.set(2)
    for second in range(RUN_S):
        # A busy worker: half of the requests fail, the graph store's breaker is open.
        metrics.requests_received.labels(priority="5").inc(4)
        metrics.outcomes.labels(status="completed", error_code="").inc(2)
        metrics.outcomes.labels(status="failed", error_code="not_audio").inc(2)
        metrics.audio_seconds.inc(360.0)
        for stage in ("decode", "features", "bpm", "key", "mood", "total", "queue_wait", "persist"):
            metrics.stage_duration.labels(stage=stage).observe(0.2 + second % 3)
        metrics.sink_latency.labels(sink="postgres").observe(0.01)
        metrics.sink_errors.labels(sink="neo4j").inc()
        metrics.cache_hits.inc()
        metrics.cache_misses.inc(3)
        metrics.queue_depth.labels(queue="analysis.requests").set(100 + 10 * second)
        metrics.dead_letter_depth.labels(queue="analysis.requests.dead").set(5 * second)
        metrics.queue_consumers.labels(queue="analysis.requests").set(1)
        metrics.set_breaker("postgres", "closed")
        metrics.set_breaker("neo4j", "open")
        metrics.slots_busy.set(2)
        metrics.consuming.set(1)
        metrics.last_success.set_to_current_time()
        metrics.retries.labels(reason="requeued").inc()
        metrics.pool_restarts.inc()
        await asyncio.sleep(1.0)

    problems = []
    for where, expr in dashboard_queries():
        answer = await asyncio.to_thread(api, prometheus + "query?" + urllib.parse.urlencode({"query": expr}))
        if answer["status"] != "success":
            problems.append(f"{where}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            problems.append(f"{where}: no result for {expr}")
    assert not problems, "\n".join(problems)

    rules = await asyncio.to_thread(api, prometheus + "rules")
    states = {
        rule["name"]: (rule["health"], rule["state"])
        for group in rules["data"]["groups"]
        for rule in group["rules"]
    }
    assert all(health == "ok" for health, _ in states.values()), states
    # Their conditions hold (they wait out their `for`), and a healthy worker is not "down".
    for alert in ("AnalysisErrorRatioHigh", "AnalysisCircuitBreakerOpen", "AnalysisDeadLettersGrowing"):
        assert states[alert][1] == "pending", (alert, states[alert])
    for alert in ("AnalysisWorkerDown", "AnalysisNoWorkerRunning", "AnalysisQueueHasNoConsumer"):
        assert states[alert][1] == "inactive", (alert, states[alert])
