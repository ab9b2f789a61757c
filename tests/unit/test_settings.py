from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from analysis_service.settings import RabbitSettings, Settings, WorkerSettings, available_cpus


@pytest.mark.parametrize(
    ("cpu_max", "limit"), [("50000 100000", 1), ("150000 100000", 2), ("max 100000", None)]
)
def test_available_cpus_respects_the_cgroup_quota(tmp_path: Path, cpu_max: str, limit: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    unlimited = available_cpus(cgroup_cpu_max=tmp_path / "absent")
    assert available_cpus(cgroup_cpu_max=path) == (unlimited if limit is None else min(unlimited, limit))


def test_empty_environment_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYSIS_WORKER__CONCURRENCY", "")
    monkeypatch.setenv("ANALYSIS_NEO4J__DATABASE", "")
    monkeypatch.setenv("ANALYSIS_POSTGRES__DSN", "postgresql://x@db:5432/music")
    s = Settings()
    assert s.worker.concurrency is None
    assert s.neo4j.database is None
    assert s.postgres.dsn == "postgresql://x@db:5432/music"


def test_host_cpu_sharing_is_on_by_default_in_the_temporary_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANALYSIS_WORKER__SHARE_HOST_CPUS", raising=False)
    monkeypatch.setenv("ANALYSIS_WORKER__HOST_CPUS_DIR", "")  # empty: unset, the default folder
    w = Settings().worker
    assert w.share_host_cpus is True
    assert w.host_cpus_dir is None
    assert w.host_cpus_base() == Path(tempfile.gettempdir()) / "analysis-service-cpus"


def test_host_cpu_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYSIS_WORKER__HOST_CPUS_DIR", "/run/analysis-cpus")
    monkeypatch.setenv("ANALYSIS_WORKER__SHARE_HOST_CPUS", "false")
    w = Settings().worker
    assert w.host_cpus_dir == Path("/run/analysis-cpus")
    assert w.host_cpus_base() == Path("/run/analysis-cpus")
    assert w.share_host_cpus is False


def test_time_limits_must_stay_below_the_consumer_timeout() -> None:
    with pytest.raises(ValidationError, match="consumer_timeout_ms"):
        Settings(
            worker=WorkerSettings(time_limit_max_s=1500, persist_deadline_s=240),
            rabbitmq=RabbitSettings(consumer_timeout_ms=1_000_000),
        )


def test_memory_percent_reads_the_container_limit(tmp_path: Path) -> None:
    from analysis_service.worker.worker import memory_percent

    (tmp_path / "memory.max").write_text("1000\n")
    (tmp_path / "memory.current").write_text("250\n")
    assert memory_percent(cgroup=tmp_path) == 25.0
    (tmp_path / "memory.max").write_text("max\n")
    assert 0.0 < memory_percent(cgroup=tmp_path) <= 100.0  # no limit: the host's figure
