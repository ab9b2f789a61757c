"""The local result cache of ``analyze`` (SQLite) and the file selection, without running analyses."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from analysis_service.cli.cache import (
    CACHE_FORMAT,
    ResultCache,
    config_digest,
    default_cache_path,
    package_version,
)
from analysis_service.cli.discover import Selection, expand_paths
from analysis_service.cli.progress import Stats
from analysis_service.cli.settings_view import redact, redact_url
from analysis_service.media import FileIdentity
from service_shared.messages import EngineOutput, TempoResult

OUTPUT = EngineOutput(
    duration_s=8.0,
    source_sample_rate=44100,
    source_channels=2,
    format="wav",
    tempo=TempoResult(bpm=120.0, confidence=0.9),
    analyzer_versions={"bpm": "1.1.0"},
    timings_s={"total": 0.5},
)
VERSIONS = {"bpm": "1.1.0", "key": "1.0.0", "mood": "1.0.0"}


def _digest(**changes: object) -> str:
    args: dict[str, object] = {
        "analyzer_versions": VERSIONS,
        "analyses": None,
        "timeline": None,
        "sample_rate": 22050,
        "timeline_threshold_s": 600.0,
    } | changes
    return config_digest(**args)  # type: ignore[arg-type]


def test_the_configuration_digest_changes_with_whatever_shapes_an_output() -> None:
    base = _digest()
    assert _digest() == base
    assert _digest(analyzer_versions={**VERSIONS, "bpm": "1.2.0"}) != base
    assert _digest(analyses=["bpm"]) != base
    assert _digest(analyses=["key", "bpm"]) == _digest(analyses=["bpm", "key"])
    assert _digest(timeline=True) != base
    assert _digest(timeline=False) != _digest(timeline=True)
    assert _digest(sample_rate=44100) != base
    assert _digest(timeline_threshold_s=60.0) != base
    assert _digest(timeline=True, timeline_threshold_s=60.0) == _digest(timeline=True)  # irrelevant then
    assert _digest(bpm_range=(88.0, 175.0)) != base
    # Unset, the digest is the one of the release before the option: its cached results stay valid.
    before = {
        "format": CACHE_FORMAT,
        "package": package_version(),
        "analyzers": sorted(f"{name}={v}" for name, v in VERSIONS.items()),
        "analyses": None,
        "timeline": "auto",
        "timeline_threshold_s": 600.0,
        "sample_rate": 22050,
    }
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert base == hashlib.sha256(canonical.encode()).hexdigest()[:32]
    assert _digest(bpm_range=(88.0, 175.0)) != _digest(bpm_range=(78.0, 155.0))


def test_results_round_trip_in_wal_mode(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "sub" / "results.sqlite3")
    try:
        assert cache.get("sha256:aa", "cfg") is None
        cache.put("sha256:aa", "cfg", OUTPUT)
        assert cache.get("sha256:aa", "cfg") == OUTPUT
        assert cache.get("sha256:aa", "other") is None
        assert cache.get("sha256:bb", "cfg") is None
    finally:
        cache.close()
    db = sqlite3.connect(tmp_path / "sub" / "results.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    reopened = ResultCache(tmp_path / "sub" / "results.sqlite3")
    assert reopened.get("sha256:aa", "cfg") == OUTPUT
    reopened.close()


def test_an_entry_that_no_longer_parses_is_a_miss(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "c.sqlite3")
    cache.put("sha256:aa", "cfg", OUTPUT)
    db = sqlite3.connect(tmp_path / "c.sqlite3")
    db.execute("UPDATE results SET output = '{\"old\": 1}'")
    db.commit()
    db.close()
    assert cache.get("sha256:aa", "cfg") is None
    cache.put("sha256:aa", "cfg", OUTPUT)
    assert cache.get("sha256:aa", "cfg") == OUTPUT
    cache.close()


def test_a_file_is_known_until_it_changes(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "c.sqlite3")
    song = tmp_path / "song.wav"
    song.write_bytes(b"one")
    identity = FileIdentity.of(song)
    cache.remember_file(identity, "sha256:one", 8.0)
    assert cache.known_file(FileIdentity.of(song)) is not None
    assert cache.known_file(FileIdentity.of(song)).duration_s == 8.0  # type: ignore[union-attr]

    stat = song.stat()
    time.sleep(0.01)
    song.write_bytes(b"two")  # same size...
    os.utime(song, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and modification time put back
    assert cache.known_file(FileIdentity.of(song)) is None  # the change time still tells
    renamed = tmp_path / "renamed.wav"
    song.rename(renamed)
    assert cache.known_file(FileIdentity.of(renamed)) is None  # another path: hashed again
    cache.close()


def test_a_write_killed_mid_transaction_leaves_the_last_committed_state(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    cache = ResultCache(path)
    cache.put("sha256:aa", "cfg", OUTPUT)
    cache.close()
    script = textwrap.dedent(
        f"""
        import os, sqlite3
        db = sqlite3.connect({str(path)!r}, isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM results")
        db.execute("INSERT INTO results VALUES ('sha256:bb', 'cfg', 'half-written', 0)")
        os._exit(9)  # killed before COMMIT
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert done.returncode == 9
    reopened = ResultCache(path)
    assert reopened.get("sha256:aa", "cfg") == OUTPUT
    assert reopened.get("sha256:bb", "cfg") is None
    assert reopened.count() == 1
    reopened.close()


def test_the_default_path_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "analysis-service" / "results.sqlite3"


def test_selection(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("a/x.flac", "a/y.txt", ".git/z.wav", ".h.mp3", "b.WAV", "live-c.ogg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "loop").symlink_to(tmp_path)  # a symlink loop is visited once

    def names(sel: Selection, *paths: Path) -> list[str]:
        return [p.relative_to(tmp_path).as_posix() for p in expand_paths(list(paths or [tmp_path]), sel)]

    assert names(Selection()) == ["a/x.flac", "b.WAV", "live-c.ogg"]
    assert names(Selection(exclude=("live-*",))) == ["a/x.flac", "b.WAV"]
    assert names(Selection(exclude=("a",))) == ["b.WAV", "live-c.ogg"]
    assert names(Selection(include=("*.txt",))) == ["a/y.txt"]
    assert names(Selection(hidden=True)) == [".git/z.wav", ".h.mp3", "a/x.flac", "b.WAV", "live-c.ogg"]
    assert names(Selection(), tmp_path / ".h.mp3") == [".h.mp3"]  # named explicitly: taken
    assert names(Selection(), tmp_path / "a" / "x.flac", tmp_path / "loop" / "a" / "x.flac") == ["a/x.flac"]


def test_eta_comes_from_the_audio_left() -> None:
    stats = Stats(files_total=4)
    for duration in (60.0, 60.0):
        stats.scanned_file(duration)
    assert stats.total_audio_s() == 240.0  # two files not read yet count the mean duration
    stats.analysis_started = time.monotonic() - 10.0
    stats.done, stats.done_audio_s, stats.analysed_audio_s = 1, 60.0, 60.0
    eta = stats.eta_s()
    assert eta is not None
    assert eta == pytest.approx(30.0, rel=0.05)  # 180 s of audio left at 6x real time
    assert "1/4 files" in stats.line()
    assert "0.02/0.07 h audio" in stats.line()
    assert "6x real time" in stats.line()


def test_redaction() -> None:
    assert redact_url("amqp://guest:pw@host:5672/vh") == "amqp://guest:***@host:5672/vh"
    assert redact_url("amqp://host/") == "amqp://host/"
    assert redact_url("host=db user=pg password=s3cret dbname=x") == "host=db user=pg password=*** dbname=x"
    assert redact("password", "s3cret") == "***"
    assert redact("password", "") == ""
    assert redact("dsn", "postgresql://u:s3cret@db/x") == "postgresql://u:***@db/x"
    assert redact("concurrency", 3) == "3"
