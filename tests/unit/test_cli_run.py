"""``analyze`` driven for real, in a pseudo-terminal (pexpect) and through pipes.

Interruptions (Ctrl-C once, twice, at different moments), a closed stdout (``| head``), the result
cache across re-runs, renames, edits and analyzer upgrades, per-file time limits, output formats.
Songs are short synthetic clips; a test analyzer plugin (installed through a ``.dist-info`` on
``PYTHONPATH``) makes analyses last as long as a test needs: ``SLOW_S`` seconds each, and forever
for the quiet "poison" file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect
import psutil
import pytest
import soundfile as sf

from analysis_service.audio.registry import ENTRY_POINT_GROUP
from analysis_service.audio.synth import demo_song

RATE = 22050
SONG_S = 6.0
SONGS = 6
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


@dataclass(frozen=True)
class Setup:
    songs: Path  # SONGS good files: song0.wav ...
    plugin: Path  # folder holding the slow analyzer plugin
    plugin_module: str


def _song(path: Path, i: int, *, gain: float = 0.8) -> Path:
    y = demo_song(bpm=100 + 6 * i, tonic=i % 12, mode="major", seconds=SONG_S, sample_rate=RATE)
    sf.write(path, gain * y / max(float(abs(y).max()), 1e-9), RATE)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("cli-run")
    songs = root / "songs"
    songs.mkdir()
    for i in range(SONGS):
        _song(songs / f"song{i}.wav", i)
    plugin = root / "plugin"
    plugin.mkdir()
    module = f"asvc_slow_plugin_{uuid.uuid4().hex[:10]}"
    (plugin / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import os
            import time

            from analysis_service.audio.registry import Analyzer

            def run(features, results):
                if 0.2 < features.peak < 0.3:  # the poison file: never ends
                    time.sleep(3600)
                time.sleep(float(os.environ.get("SLOW_S", "0")))
                return {"peak": round(features.peak, 3)}

            SLOW = Analyzer("slow", os.environ.get("SLOW_VERSION", "1.0"), run)
            """
        )
    )
    dist = plugin / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nslow = {module}:SLOW\n")
    return Setup(songs=songs, plugin=plugin, plugin_module=module)


def _env(setup: Setup, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANALYSIS_", "SLOW_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(setup.plugin), env.get("PYTHONPATH")]))
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    env["TERM"] = "xterm"
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "analysis_service.cli", "analyze", *args]


def _spawn(env: dict[str, str], *args: str) -> pexpect.spawn[str]:
    cmd = _command(*args)
    return pexpect.spawn(
        cmd[0], cmd[1:], env=env, dimensions=(50, 200), encoding="utf-8", codec_errors="replace", timeout=120
    )


def _descendants(pid: int | None) -> list[psutil.Process]:
    assert pid is not None
    try:
        children: list[psutil.Process] = psutil.Process(pid).children(recursive=True)
        return children
    except psutil.NoSuchProcess:
        return []


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive


def _wait_for_children(pid: int | None, count: int, timeout_s: float = 120.0) -> list[psutil.Process]:
    """The command's descendants, once it has at least ``count`` of them."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _descendants(pid)
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"the command did not start {count} processes within {timeout_s} s")


def _finish(child: pexpect.spawn[str], timeout_s: float) -> tuple[int | None, str]:
    """Wait for the end of the command's output and process; its exit status and the rest of its output."""
    child.expect(pexpect.EOF, timeout=timeout_s)
    rest = str(child.before)
    child.close()
    return child.exitstatus, rest


def _assert_gone(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 5
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(processes), f"processes survived the command: {_alive(processes)}"


# --------------------------------------------------------------------------------------------------
# Interruptions in a terminal


def test_ctrl_c_once_prints_the_partial_table_and_exits_130(setup: Setup, tmp_path: Path) -> None:
    child = _spawn(_env(setup, tmp_path, SLOW_S="2.5"), "-j", "2", str(setup.songs))
    try:
        child.expect(r"[1-9]/6 files", timeout=120)  # at least one finished, others in flight
        processes = _descendants(child.pid)
        assert processes, "no analysis process was running"
        sent = time.monotonic()
        child.sendintr()
        status, rest = _finish(child, timeout_s=30)
        stopped_s = time.monotonic() - sent
    finally:
        child.terminate(force=True)

    assert status == EXIT_INTERRUPTED
    assert stopped_s < 5.0, f"took {stopped_s:.1f} s to stop"
    match = re.search(r"interrupted: (\d) of 6 files done", rest)
    assert match, rest
    done = int(match.group(1))
    assert 1 <= done < 6
    table = rest[rest.rindex("duration") :]  # the table, after the last progress redraw
    rows = [line for line in table.splitlines() if re.search(r"song\d\.wav", line)]
    assert len(rows) == done, rest  # the partial table: exactly the files that finished
    assert f"{6 - done} not analysed" in rest
    assert "Traceback" not in rest
    _assert_gone(processes)


def test_ctrl_c_twice_exits_at_once(setup: Setup, tmp_path: Path) -> None:
    child = _spawn(_env(setup, tmp_path, SLOW_S="30"), "-j", "2", str(setup.songs))
    try:
        child.expect(r"song\d\.wav", timeout=120)  # files in flight
        processes = _wait_for_children(child.pid, 3)
        sent = time.monotonic()
        child.sendintr()
        child.sendintr()
        status, rest = _finish(child, timeout_s=10)
        stopped_s = time.monotonic() - sent
    finally:
        child.terminate(force=True)

    assert status == EXIT_INTERRUPTED
    assert stopped_s < 3.0
    assert "Traceback" not in rest
    _assert_gone(processes)


def test_ctrl_c_while_starting_up(setup: Setup, tmp_path: Path) -> None:
    """Ctrl-C before any analysis finished (processes still starting): nothing done, 130, no orphans."""
    child = _spawn(_env(setup, tmp_path, SLOW_S="30"), "-j", "2", str(setup.songs))
    try:
        processes = _wait_for_children(child.pid, 1)
        child.sendintr()
        status, rest = _finish(child, timeout_s=30)
        processes += _descendants(child.pid)
    finally:
        child.terminate(force=True)

    assert status == EXIT_INTERRUPTED
    assert "interrupted: 0 of 6 files done" in rest
    assert "Traceback" not in rest
    _assert_gone(processes)


def test_sigterm_stops_like_ctrl_c_and_json_lines_are_complete(setup: Setup, tmp_path: Path) -> None:
    env = _env(setup, tmp_path, SLOW_S="2.5")
    process = subprocess.Popen(
        _command("--json", "-j", "2", str(setup.songs)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # one file finished
        processes = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        rest, err = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == EXIT_INTERRUPTED
    lines = [first, *rest.splitlines()]
    records = [json.loads(line) for line in lines if line.strip()]  # every line is whole
    assert 1 <= len(records) < SONGS
    assert all(r["status"] == "completed" for r in records)
    assert f"interrupted: {len(records)} of 6 files done" in err
    assert "Traceback" not in err
    _assert_gone(processes)


# --------------------------------------------------------------------------------------------------
# Pipes


def test_closed_stdout_ends_the_run_quietly(setup: Setup, tmp_path: Path) -> None:
    """``analyze --json DIR | head -2``: the run ends at the next write, not after every file."""
    env = _env(setup, tmp_path, SLOW_S="3")
    producer = subprocess.Popen(
        _command("--json", "-j", "1", str(setup.songs)),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    head = subprocess.Popen(["head", "-2"], stdin=producer.stdout, stdout=subprocess.PIPE)
    assert producer.stdout is not None
    producer.stdout.close()  # head alone holds the pipe now
    try:
        out, _ = head.communicate(timeout=120)
        head_done = time.monotonic()
        processes = _descendants(producer.pid)
        _, err = producer.communicate(timeout=60)
        after_head_s = time.monotonic() - head_done
    finally:
        producer.kill()

    assert len(out.splitlines()) == 2
    assert all(json.loads(line)["status"] == "completed" for line in out.splitlines())
    assert producer.returncode == EXIT_BROKEN_PIPE
    # Quiet: progress lines at most (stderr is a pipe); no traceback, "Exception ignored" or summary.
    assert all(line.startswith("analyze: ") for line in err.decode().splitlines()), err.decode()
    # One more file (3 s) ends it; the four left would have taken 12 s.
    assert after_head_s < 8.0
    _assert_gone(processes)


def test_plain_output_when_redirected(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "named"
    folder.mkdir()
    shutil.copy(setup.songs / "song0.wav", folder / "[red] x.wav")
    (folder / "bad [bold]name.wav").write_bytes(b"not audio [red]at all[/red]\n" * 20)

    done = subprocess.run(
        _command(str(folder)),
        env=_env(setup, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 1
    assert "\x1b[" not in done.stdout + done.stderr  # no colours or cursor moves in files
    assert not set("│┃┏┓┗┛━─╇┡") & set(done.stdout)  # no box drawing
    [row] = [line for line in done.stdout.splitlines() if "x.wav" in line]
    assert row.startswith("named/[red] x.wav") or "[red] x.wav" in row
    [bad] = [line for line in done.stdout.splitlines() if "name.wav" in line]
    assert "bad [bold]name.wav" in bad
    assert "not_audio" in bad
    assert "2 files: 1 analysed" in done.stderr


def test_names_are_verbatim_in_a_terminal_table(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "named"
    folder.mkdir()
    shutil.copy(setup.songs / "song1.wav", folder / "[red] x.wav")
    child = _spawn(_env(setup, tmp_path), "-j", "1", str(folder))
    status, rest = _finish(child, timeout_s=120)
    assert status == 0
    assert "[red] x.wav" in rest


# --------------------------------------------------------------------------------------------------
# The result cache


def _run_json(env: dict[str, str], *args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    done = subprocess.run(
        _command("--json", *args), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    records = {Path(r["path"]).name: r for r in map(json.loads, done.stdout.splitlines())}
    return done.returncode, records, done.stderr


def test_rerun_reuses_the_cache_across_renames_edits_and_upgrades(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    shutil.copytree(setup.songs, folder)
    env = _env(setup, tmp_path)

    status, first, err = _run_json(env, "-j", "2", str(folder))
    assert status == 0
    assert not any(r["cached"] for r in first.values())
    assert f"{SONGS} analysed, 0 reused from the cache" in err

    status, again, err = _run_json(env, "-j", "2", str(folder))
    assert status == 0
    assert all(r["cached"] for r in again.values())
    assert f"0 analysed, {SONGS} reused from the cache" in err
    assert {n: r["output"]["tempo"] for n, r in again.items()} == {
        n: r["output"]["tempo"] for n, r in first.items()
    }

    (folder / "song0.wav").rename(folder / "renamed.wav")  # same bytes, new name: reused
    _song(folder / "song1.wav", 9)  # new bytes under the old name: analysed again
    status, edited, err = _run_json(env, "-j", "2", str(folder))
    assert edited["renamed.wav"]["cached"] is True
    assert edited["renamed.wav"]["output"] == first["song0.wav"]["output"]
    assert edited["song1.wav"]["cached"] is False
    assert edited["song1.wav"]["output"]["tempo"]["bpm"] == pytest.approx(100 + 6 * 9, rel=0.04)
    assert f"1 analysed, {SONGS - 1} reused" in err

    upgraded = {**env, "SLOW_VERSION": "1.1"}  # an analyzer's new version: nothing is reused
    status, after, err = _run_json(upgraded, "-j", "2", str(folder))
    assert not any(r["cached"] for r in after.values())
    assert all(r["output"]["analyzer_versions"]["slow"] == "1.1" for r in after.values())

    status, only_bpm, err = _run_json(env, "-j", "2", "--analyses", "bpm", str(folder))  # other options
    assert not any(r["cached"] for r in only_bpm.values())

    status, bypass, err = _run_json(env, "-j", "2", "--no-cache", str(folder))
    assert not any(r["cached"] for r in bypass.values())
    assert "reused" not in err


def test_an_interrupted_run_resumes_from_the_cache(setup: Setup, tmp_path: Path) -> None:
    env = _env(setup, tmp_path, SLOW_S="2")
    child = _spawn(env, "-j", "2", str(setup.songs))
    try:
        child.expect(r"[2-5]/6 files", timeout=120)
        child.sendintr()
        status, rest = _finish(child, timeout_s=30)
    finally:
        child.terminate(force=True)
    assert status == EXIT_INTERRUPTED
    done = int(re.search(r"interrupted: (\d) of 6 files done", rest).group(1))  # type: ignore[union-attr]

    status, records, err = _run_json({**env, "SLOW_S": "0"}, "-j", "2", str(setup.songs))

    assert status == 0
    assert sum(r["cached"] for r in records.values()) == done
    assert f"{SONGS - done} analysed, {done} reused from the cache" in err


def test_a_corrupt_cache_file_warns_and_the_run_goes_on(setup: Setup, tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db.sqlite3"
    bad.write_bytes(b"this is not a SQLite database" * 100)
    status, records, err = _run_json(
        _env(setup, tmp_path), "--cache", str(bad), str(setup.songs / "song2.wav")
    )
    assert status == 0
    assert records["song2.wav"]["status"] == "completed"
    assert "warning" in err
    assert "unusable" in err


# --------------------------------------------------------------------------------------------------
# Time limits, formats, selection


def test_a_file_that_never_ends_times_out_alone(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    for i in range(3):
        shutil.copy(setup.songs / f"song{i}.wav", folder)
    _song(folder / "poison.wav", 4, gain=0.25)  # the plugin sleeps forever on it
    env = _env(
        setup,
        tmp_path,
        ANALYSIS_WORKER__TIME_LIMIT_BASE_S="15",  # ample for a 6 s song, even on a busy machine
        ANALYSIS_WORKER__TIME_LIMIT_PER_AUDIO_MINUTE_S="0.1",
    )
    started = time.monotonic()
    status, records, _ = _run_json(env, "-j", "2", "--no-cache", str(folder))

    assert records["poison.wav"]["status"] == "failed"
    assert records["poison.wav"]["error"]["code"] == "analysis_timeout"
    assert re.search(r"time limit of 15(\.\d+)? s", records["poison.wav"]["error"]["message"])
    assert {n: r["status"] for n, r in records.items() if n != "poison.wav"} == dict.fromkeys(
        ["song0.wav", "song1.wav", "song2.wav"], "completed"
    )
    assert status == 1
    assert time.monotonic() - started < 120


@pytest.mark.parametrize(("fmt", "dialect"), [("csv", "excel"), ("tsv", "excel-tab")])
def test_csv_and_tsv(setup: Setup, tmp_path: Path, fmt: str, dialect: str) -> None:
    missing = tmp_path / 'missing, "quoted".wav'
    done = subprocess.run(
        _command("--format", fmt, str(setup.songs / "song3.wav"), str(missing)),
        env=_env(setup, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    rows = list(csv.DictReader(io.StringIO(done.stdout), dialect=dialect))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["song3.wav"]["status"] == "completed"
    assert float(by_name["song3.wav"]["bpm"]) > 0
    assert by_name["song3.wav"]["camelot"]
    assert by_name[missing.name]["error_code"] == "file_not_found"
    assert done.returncode == 1


def test_include_exclude_hidden_and_symlinks(setup: Setup, tmp_path: Path) -> None:
    folder = tmp_path / "sel"
    (folder / "live").mkdir(parents=True)
    (folder / ".trash").mkdir()
    shutil.copy(setup.songs / "song0.wav", folder / "a.wav")
    shutil.copy(setup.songs / "song1.wav", folder / "live" / "b.wav")
    shutil.copy(setup.songs / "song2.wav", folder / ".hidden.wav")
    shutil.copy(setup.songs / "song3.wav", folder / ".trash" / "c.wav")
    shutil.copy(setup.songs / "song4.wav", folder / "d.audio")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(setup.songs / "song5.wav", outside / "e.wav")
    (folder / "link").symlink_to(outside)
    env = _env(setup, tmp_path)

    def names(*args: str) -> set[str]:
        return set(_run_json(env, "-j", "2", *args, str(folder))[1])

    assert names() == {"a.wav", "b.wav", "e.wav"}
    assert names("--no-follow-symlinks") == {"a.wav", "b.wav"}
    assert names("--hidden") == {"a.wav", "b.wav", "e.wav", ".hidden.wav", "c.wav"}
    assert names("--exclude", "live", "--exclude", "link") == {"a.wav"}
    assert names("--include", "*.audio") == {"d.audio"}


# --------------------------------------------------------------------------------------------------
# Usage


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "analysis_service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_unknown_analyzer_is_a_usage_error_listed_in_help(setup: Setup, tmp_path: Path) -> None:
    env = _env(setup, tmp_path)
    started = time.monotonic()
    bad = _cli("analyze", "--analyses", "bpm,foo", str(setup.songs), env={**env, "COLUMNS": "300"})
    assert bad.returncode == 2
    assert "'foo'" in bad.stderr
    assert "bpm, key, mood, slow" in " ".join(bad.stderr.split())  # the plugin is listed too
    assert time.monotonic() - started < 30  # no analysis was started
    helped = _cli("analyze", "--help", env={**env, "COLUMNS": "200"})
    assert "bpm, key, mood, slow" in helped.stdout


def test_version_config_and_worker_help(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYSIS_")}
    env |= {
        "ANALYSIS_RABBITMQ__URL": "amqp://user:s3cret-amqp@broker:5672/vhost",
        "ANALYSIS_POSTGRES__DSN": "postgresql://pg:s3cret-pg@db:5432/music",
        "ANALYSIS_NEO4J__PASSWORD": "s3cret-neo",
        "ANALYSIS_WORKER__CONCURRENCY": "3",
        "ANALYSIS_ENGINE__BPM_RANGE": "88-175",
        "COLUMNS": "200",
    }
    version = _cli("--version", env=env)
    assert version.returncode == 0
    assert re.fullmatch(r"analysis-service \d+\.\d+\.\d+\S*\n", version.stdout)

    config = _cli("config", env=env)
    assert config.returncode == 0
    assert "s3cret" not in config.stdout
    assert "ANALYSIS_RABBITMQ__URL=amqp://user:***@broker:5672/vhost" in config.stdout
    assert "ANALYSIS_POSTGRES__DSN=postgresql://pg:***@db:5432/music" in config.stdout
    assert "ANALYSIS_NEO4J__PASSWORD=***" in config.stdout
    assert "ANALYSIS_WORKER__CONCURRENCY=3" in config.stdout
    as_json = json.loads(_cli("config", "--json", env=env).stdout)
    assert as_json["ANALYSIS_WORKER__CONCURRENCY"] == "3"
    # What config prints can be set again as it is.
    assert as_json["ANALYSIS_ENGINE__BPM_RANGE"] == "[88.0, 175.0]"
    again = _cli(
        "config", "--json", env=env | {"ANALYSIS_ENGINE__BPM_RANGE": as_json["ANALYSIS_ENGINE__BPM_RANGE"]}
    )
    assert json.loads(again.stdout)["ANALYSIS_ENGINE__BPM_RANGE"] == "[88.0, 175.0]"
    bad = _cli("config", env=env | {"ANALYSIS_ENGINE__BPM_RANGE": "20-60"})
    assert (bad.returncode, bad.stdout) == (4, "")
    assert bad.stderr.startswith("analysis-service: invalid configuration: ANALYSIS_ENGINE__BPM_RANGE: ")

    worker = _cli("worker", "--help", env=env)
    assert worker.returncode == 0
    text = " ".join(worker.stdout.split())
    for name in (
        "ANALYSIS_WORKER__MEDIA_ROOT",
        "ANALYSIS_RABBITMQ__URL",
        "ANALYSIS_WORKER__TIME_LIMIT_BASE_S",
    ):
        assert name in text
    assert "neo4j-password" not in text  # the default password is redacted too
