"""The Grafana dashboard and the Prometheus alert rules use only metrics the worker exposes.

* Every PromQL expression (dashboard panels, template variables, alert rules) is parsed with
  ``promql-parser`` and each metric it selects must be a sample name of
  :class:`~analysis_service.metrics.Metrics` (or one Prometheus makes itself, such as ``up``), and
  each label it filters or groups by must be one of that metric's labels.
* ``promtool check rules`` / ``check config`` / ``test rules`` run on the rule files and their unit
  tests (``tests/prometheus/*.test.yaml``). Without ``promtool`` these tests skip, except under
  ``CI`` where they fail: ``.ci/run`` installs it.
* The Grafana provisioning files point at the dashboards and the Prometheus service of the
  compose file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from analysis_service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infrastructure"
COMPOSE_FILE = INFRA / "docker-compose.yaml"
PROMETHEUS_FILE = INFRA / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((INFRA / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.test.yaml"))
GRAFANA = INFRA / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

#: Series Prometheus makes itself (scrape health, alert state) that dashboards and rules may use.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {
    "up": frozenset(),
    "ALERTS": frozenset({"alertname", "alertstate", "severity", "queue", "dependency"}),
}
#: Labels every scraped series has (prometheus.yml adds ``service``).
TARGET_LABELS = frozenset({"job", "instance", "service"})
#: Values substituted for Grafana's variables before parsing.
GRAFANA_DURATIONS = {"__rate_interval": "1m", "__interval": "1m", "__range": "6h"}

METRICS = Metrics(time_limit_s=1500.0)


def metric_labels() -> dict[str, frozenset[str]]:
    """Each exposed sample name and the labels it may carry."""
    labels: dict[str, frozenset[str]] = {}
    for metric in vars(METRICS).values():
        if isinstance(metric, MetricWrapperBase):
            own = frozenset(metric._labelnames)
            for family in metric.describe():
                for name in METRICS.sample_names():
                    if name == family.name or name.startswith(family.name + "_"):
                        labels[name] = own | ({"le"} if name.endswith("_bucket") else frozenset())
    assert set(labels) == set(METRICS.sample_names()), "a metric of Metrics is not an attribute"
    return labels


EXPOSED = metric_labels()


def substitute_grafana_variables(expr: str) -> str:
    """``expr`` with ``$__rate_interval``-like durations and ``$var`` / ``${var}`` values filled in."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return GRAFANA_DURATIONS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """``(metric name, label names used)`` for every vector selector of the PromQL ``expr``.

    Labels used are those in the selector's matchers plus those of every ``by``/``on``/``ignoring``
    clause of an enclosing aggregation or binary operation (checked against each selector below it).
    """
    found: list[tuple[str, set[str]]] = []

    def grouping(node: Any) -> set[str]:
        modifier = getattr(node, "modifier", None)
        if (
            isinstance(node, promql_parser.AggregateExpr)
            and modifier is not None
            and modifier.type == promql_parser.AggModifierType.By
        ):
            return set(modifier.labels)
        if isinstance(node, promql_parser.BinaryExpr) and modifier is not None and modifier.matching:
            return set(modifier.matching.labels)
        return set()

    def visit(node: Any, context: set[str]) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names = {m.name for m in node.matchers.matchers if m.name != "__name__"}
            if node.name is None:
                raise AssertionError(f"selector without a metric name in {expr!r}")
            found.append((node.name, names | context))
            return
        here = context | grouping(node)
        children: list[Any] = []
        if isinstance(node, promql_parser.AggregateExpr):
            children = [node.expr, node.param]
        elif isinstance(node, promql_parser.BinaryExpr):
            # on()/ignoring() labels belong to both sides; by() labels to what is aggregated.
            children = [node.lhs, node.rhs]
        elif isinstance(node, promql_parser.Call):
            children = list(node.args)
        elif isinstance(node, promql_parser.MatrixSelector):
            children = [node.vector_selector]
        elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
            children = [node.expr]
        for child in children:
            if child is not None:
                visit(child, here)

    visit(promql_parser.parse(expr), set())
    return iter(found)


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, PromQL)`` of every panel target and query variable of a dashboard."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target.get('refId')}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
            yield f"variable {variable['name']!r}", match.group(1) if match else text


def rule_expressions() -> Iterator[tuple[str, str]]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                yield f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"]


def check_expression(where: str, expr: str) -> list[str]:
    """Problems of one expression: unknown metrics or labels, or a parse error."""
    problems = []
    try:
        found = list(selectors(substitute_grafana_variables(expr)))
    except (ValueError, RuntimeError) as exc:  # the parser's error for invalid PromQL
        return [f"{where}: does not parse: {exc}"]
    for name, labels in found:
        allowed = EXPOSED.get(name, PROMETHEUS_SERIES.get(name))
        if allowed is None:
            problems.append(f"{where}: metric {name} is not exposed by Metrics")
            continue
        unknown = labels - allowed - TARGET_LABELS
        if unknown:
            problems.append(f"{where}: {name} has no label {sorted(unknown)}")
    return problems


# ------------------------------------------------------------------------------------- the checker


def test_checker_finds_metrics_and_labels() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) "
        '(rate(analysis_stage_duration_seconds_bucket{stage=~"$stage"}[$__rate_interval])))'
        " > on () group_left () max(up)"
    )
    found = dict(selectors(substitute_grafana_variables(expr)))
    assert found == {"analysis_stage_duration_seconds_bucket": {"le", "stage"}, "up": set()}
    assert check_expression("ok", expr) == []
    assert check_expression("typo", "rate(analysis_outcome_total[5m])") == [
        "typo: metric analysis_outcome_total is not exposed by Metrics"
    ]
    assert check_expression("label", "sum by (stage) (analysis_outcomes_total)") == [
        "label: analysis_outcomes_total has no label ['stage']"
    ]
    assert check_expression("broken", "sum(rate(x[5m])")[0].startswith("broken: does not parse")


def test_exposed_names_include_the_new_metrics() -> None:
    for name in (
        "analysis_audio_seconds_processed_total",
        "analysis_dead_letter_depth_messages",
        "analysis_last_success_timestamp_seconds",
        "analysis_slots_busy",
        "analysis_queue_consumers",
        "analysis_stage_duration_seconds_bucket",
    ):
        assert name in EXPOSED, name
    assert EXPOSED["analysis_dead_letter_depth_messages"] == {"queue"}
    assert EXPOSED["analysis_stage_duration_seconds_bucket"] == {"stage", "le"}


# ----------------------------------------------------------------------------- dashboard and rules


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_use_exposed_metrics(path: Path) -> None:
    expressions = list(dashboard_expressions(json.loads(path.read_text())))
    assert len(expressions) > 20
    problems = [p for where, expr in expressions for p in check_expression(where, expr)]
    assert not problems, "\n".join(problems)


def test_alert_rules_use_exposed_metrics() -> None:
    expressions = list(rule_expressions())
    assert len(expressions) >= 6
    problems = [p for where, expr in expressions for p in check_expression(where, expr)]
    assert not problems, "\n".join(problems)


def test_dashboard_shows_what_operators_need() -> None:
    (path,) = [p for p in DASHBOARDS if p.name == "analysis-service.json"]
    dashboard = json.loads(path.read_text())
    text = " ".join(expr for _, expr in dashboard_expressions(dashboard))
    for needed in (
        "analysis_outcomes_total",  # files per second, outcomes by error code
        "analysis_audio_seconds_processed_total",  # audio seconds per second
        "analysis_stage_duration_seconds_bucket",  # latency percentiles by stage
        "analysis_queue_depth_messages",
        "analysis_dead_letter_depth_messages",
        "analysis_circuit_breaker_state",
        "analysis_process_resident_memory_bytes",
        "analysis_slots_busy",
    ):
        assert needed in text, needed
    assert "by (error_code)" in text
    assert "by (le, stage)" in text
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] == "analysis-service"


def test_every_alert_is_unit_tested_and_documented() -> None:
    alerts = {where.split(": ", 1)[1] for where, _ in rule_expressions()}
    assert {
        "AnalysisWorkerDown",
        "AnalysisNoWorkerRunning",
        "AnalysisQueueHasNoConsumer",
        "AnalysisDeadLettersGrowing",
        "AnalysisCircuitBreakerOpen",
        "AnalysisErrorRatioHigh",
        "AnalysisQueueStalled",
        "AnalysisQueueBacklogGrowing",
    } <= alerts
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts <= tested, f"alerts never shown firing in a promtool test: {sorted(alerts - tested)}"
    operations = (ROOT / "docs" / "operations.md").read_text()
    undocumented = sorted(a for a in alerts if f"`{a}`" not in operations)
    assert not undocumented, f"not in docs/operations.md: {undocumented}"


# ------------------------------------------------------------------------------------------ promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if path is None:
        reason = "promtool is not installed (Debian package `prometheus`; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI requires it", pytrace=False)
        pytest.skip(reason)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def test_promtool_checks_the_rules(promtool: str) -> None:
    assert RULE_FILES
    result = run(promtool, "check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_the_config_and_finds_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in RULE_FILES:
        assert path.name in result.stdout + result.stderr, f"{path.name} is not loaded by prometheus.yml"


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    assert RULE_TESTS
    result = run(promtool, "test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    # The same tests against rules whose thresholds were raised tenfold must fail.
    rules = tmp_path / "infrastructure" / "prometheus" / "rules"
    rules.mkdir(parents=True)
    for path in RULE_FILES:
        text = path.read_text()
        text = re.sub(r"> (0\.2|10|1800)\b", lambda m: f"> {float(m.group(1)) * 10:g}", text)
        (rules / path.name).write_text(text)
    tests = tmp_path / "tests" / "prometheus"
    tests.mkdir(parents=True)
    for path in RULE_TESTS:
        (tests / path.name).write_text(path.read_text())
    result = run(promtool, "test", "rules", *map(str, sorted(tests.glob("*.test.yaml"))))
    assert result.returncode != 0
    for alert in ("AnalysisErrorRatioHigh", "AnalysisDeadLettersGrowing", "AnalysisQueueBacklogGrowing"):
        assert alert in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------- Grafana


def test_grafana_provisioning_matches_compose() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    grafana = services["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    assert (INFRA / mounts["/etc/grafana/provisioning"]).resolve() == (GRAFANA / "provisioning").resolve()

    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in services

    (provider,) = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "analysis-service.yml").read_text()
    )["providers"]
    assert provider["type"] == "file"
    dashboards_mount = provider["options"]["path"]
    assert (INFRA / mounts[dashboards_mount]).resolve() == (GRAFANA / "dashboards").resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_mount + "/")
    assert (GRAFANA / "dashboards" / home.rsplit("/", 1)[1]).is_file()

    # Every panel queries the provisioned data source.
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_prometheus_loads_the_rule_files() -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    mounts = {}
    for volume in services["prometheus"]["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = source
    config_dir = Path(next(t for t in mounts if t.endswith("prometheus.yml"))).parent
    for pattern in config["rule_files"]:
        in_container = (config_dir / pattern).parent
        assert str(in_container) in mounts, f"{pattern}: {in_container} is not mounted"
        assert (INFRA / mounts[str(in_container)]).resolve() == (INFRA / "prometheus" / "rules").resolve()
        assert sorted((PROMETHEUS_FILE.parent).glob(pattern)) == RULE_FILES


def test_promtool_lints_the_exposition(promtool: str) -> None:
    metrics = Metrics(time_limit_s=60.0)
    metrics.outcomes.labels(status="failed", error_code="not_audio").inc()
    metrics.dead_letter_depth.labels(queue="analysis.requests.dead").set(1)
    metrics.queue_consumers.labels(queue="analysis.requests").set(1)
    metrics.set_breaker("postgres", "open")
    metrics.sample_memory()
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=metrics.render().decode(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout  # no naming or unit lint findings
