"""Where settings come from: environment over the .env file over defaults, and unknown names.

The ``.env`` file is ``./.env`` or the file named by ``ANALYSIS_ENV_FILE``; a misspelt
``ANALYSIS_*`` variable (environment or file) is listed with the closest real name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog

from analysis_service.settings import Settings
from service_shared.settings import UnknownSetting, warn_unknown_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ANALYSIS_* variable from the test process; the working directory is an empty folder."""
    for name in list(os.environ):
        if name.upper().startswith("ANALYSIS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dot_env_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ANALYSIS_WORKER__CONCURRENCY=3\nANALYSIS_LOG_LEVEL=debug\n")
    settings = Settings()
    assert settings.worker.concurrency == 3
    assert settings.log_level == "debug"


def test_no_dot_env_means_defaults() -> None:
    assert Settings().worker.concurrency is None


def test_environment_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("ANALYSIS_WORKER__CONCURRENCY=3\n")
    monkeypatch.setenv("ANALYSIS_WORKER__CONCURRENCY", "5")
    assert Settings().worker.concurrency == 5


def test_env_file_variable_names_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("ANALYSIS_WORKER__CONCURRENCY=3\n")
    other = tmp_path / "conf" / "analysis.env"
    other.parent.mkdir()
    other.write_text("ANALYSIS_WORKER__CONCURRENCY=7\n")
    monkeypatch.setenv("ANALYSIS_ENV_FILE", str(other))
    assert Settings().worker.concurrency == 7
    assert Settings.env_file_path() == other


def test_empty_env_file_variable_reads_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("ANALYSIS_WORKER__CONCURRENCY=3\n")
    monkeypatch.setenv("ANALYSIS_ENV_FILE", "")
    assert Settings().worker.concurrency is None
    assert Settings.env_file_path() is None


def test_an_explicit_env_file_argument_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("ANALYSIS_WORKER__CONCURRENCY=3\n")
    monkeypatch.setenv("ANALYSIS_ENV_FILE", str(tmp_path / ".env"))
    assert Settings(_env_file=None).worker.concurrency is None


def test_references_in_the_file_are_expanded(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "POSTGRES_PASSWORD=s3cret\nANALYSIS_POSTGRES__DSN=postgresql://u:${POSTGRES_PASSWORD}@db:5432/x\n"
    )
    assert Settings().postgres.dsn == "postgresql://u:s3cret@db:5432/x"


def test_unknown_names_from_environment_and_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "ANALYSIS_WORKER__CONCURENCY=3\nANALYSIS_LOG_LEVEL=info\nOTHER_TOOL_SETTING=1\n"
    )
    environ = {
        "ANALYSIS_REDIS__URLL": "redis://x",
        "analysis_postgres__dsn": "postgresql://ok",  # names are case-insensitive
        "ANALYSIS_ENV_FILE": str(tmp_path / ".env"),
        "ANALYSIS_TOTALLY_UNRELATED": "1",
        "PATH": "/bin",
    }
    assert Settings.unknown_env_names(environ) == [
        UnknownSetting("ANALYSIS_REDIS__URLL", "environment", "ANALYSIS_REDIS__URL"),
        UnknownSetting("ANALYSIS_TOTALLY_UNRELATED", "environment", None),
        UnknownSetting("ANALYSIS_WORKER__CONCURENCY", str(tmp_path / ".env"), "ANALYSIS_WORKER__CONCURRENCY"),
    ]


def test_known_names_include_nested_fields_and_sections() -> None:
    names = Settings.env_names()
    assert {"ANALYSIS_WORKER__CONCURRENCY", "ANALYSIS_WORKER", "ANALYSIS_LOG_LEVEL"} <= names
    assert Settings.unknown_env_names({"ANALYSIS_WORKER": '{"concurrency": 2}'}, env_file=None) == []


def test_warn_unknown_settings_logs_each_one() -> None:
    # An earlier test may have configured structlog with a level filter that capture_logs keeps.
    saved = structlog.get_config()
    structlog.reset_defaults()
    try:
        with structlog.testing.capture_logs() as logs:
            unknown = warn_unknown_settings(Settings, {"ANALYSIS_WORKER__CONCURENCY": "3"})
    finally:
        structlog.configure(**saved)
    assert [u.name for u in unknown] == ["ANALYSIS_WORKER__CONCURENCY"]
    assert logs == [
        {
            "event": "unknown setting ignored",
            "log_level": "warning",
            "variable": "ANALYSIS_WORKER__CONCURENCY",
            "source": "environment",
            "did_you_mean": "ANALYSIS_WORKER__CONCURRENCY",
        }
    ]
