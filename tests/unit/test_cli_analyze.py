"""``analysis-service analyze`` end to end: real files of every format, bad inputs, exit statuses.

The command runs for real (process pool included), through typer's ``CliRunner`` and once as a
subprocess. MP3 and M4A files are made with ffmpeg: without it they are left out locally, and the
tests fail under CI (``CI`` set).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from typer.testing import CliRunner

from analysis_service.audio.key import NOTE_NAMES
from analysis_service.audio.registry import ENTRY_POINT_GROUP
from analysis_service.audio.synth import demo_song
from analysis_service.cli.main import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, app

FloatArray = npt.NDArray[np.float32]

RATE = 44100
SONG_S = 8.0
JOBS = "2"
#: Limits for the run with bad inputs: the 8 s songs stay below the duration limit, ``long.wav`` not.
LIMITS = {"ANALYSIS_ENGINE__MAX_DURATION_S": "10", "ANALYSIS_ENGINE__MAX_CHANNELS": "2"}


@dataclass(frozen=True)
class Song:
    bpm: float
    tonic: int
    mode: str

    @property
    def key(self) -> str:
        return f"{NOTE_NAMES[self.tonic]} {self.mode}"


#: One song per format, each with its own tempo and key (so that results cannot be mixed up).
SONGS = {
    "wav": Song(120.0, 9, "minor"),  # A minor
    "flac": Song(110.0, 7, "major"),  # G major
    "ogg": Song(135.0, 4, "minor"),  # E minor
    "mp3": Song(95.0, 5, "minor"),  # F minor
    "m4a": Song(126.0, 2, "minor"),  # D minor
}

#: Bad inputs of the mixed run and the error code each must get.
BAD = {
    "missing.flac": "file_not_found",
    "empty.wav": "empty_file",
    "text.mp3": "not_audio",
    "truncated.wav": "truncated_audio",
    "silence.wav": "silent_audio",
    "short.wav": "too_short",
    "long.wav": "too_long",
    "eight-channels.wav": "unsupported_audio",
    "four-khz.wav": "unsupported_audio",
}


# --------------------------------------------------------------------------------------------------
# Files


def _ffmpeg() -> str | None:
    """ffmpeg's path; None when it is missing (a failure under CI)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None and os.environ.get("CI"):
        pytest.fail("ffmpeg is required under CI", pytrace=False)
    return ffmpeg


def _write(path: Path, data: FloatArray, rate: int, **kwargs: Any) -> Path:
    """Write with libsndfile in chunks (one large Vorbis write segfaults libsndfile 1.2)."""
    frames = data.reshape(len(data), -1)
    with sf.SoundFile(path, "w", rate, frames.shape[1], **kwargs) as f:
        for start in range(0, len(frames), 1 << 14):
            f.write(frames[start : start + (1 << 14)])
    return path


def _make_song(folder: Path, fmt: str, song: Song, ffmpeg: str | None) -> Path | None:
    y = demo_song(bpm=song.bpm, tonic=song.tonic, mode=song.mode, seconds=SONG_S, sample_rate=RATE)
    stereo = np.stack([y, 0.7 * y], axis=1)
    path = folder / f"song.{fmt}"
    if fmt in ("wav", "flac"):
        return _write(path, stereo, RATE)
    if fmt == "ogg":
        return _write(path, stereo, RATE, format="OGG", subtype="VORBIS")
    if ffmpeg is None:
        return None
    source = _write(folder.parent / f"source-{fmt}.wav", stereo, RATE, subtype="FLOAT")
    codec = ["-c:a", "libmp3lame", "-b:a", "192k"] if fmt == "mp3" else ["-c:a", "aac", "-b:a", "160k"]
    subprocess.run([ffmpeg, "-y", "-v", "error", "-i", str(source), *codec, str(path)], check=True)
    source.unlink()
    return path


def _make_bad(folder: Path) -> None:
    (folder / "empty.wav").touch()
    (folder / "text.mp3").write_bytes(b"this is a text file, not an MP3\n" * 40)
    song = demo_song(bpm=120.0, tonic=9, mode="minor", seconds=12.0, sample_rate=RATE)
    whole = _write(folder.parent / "whole.wav", song[: 6 * RATE], RATE)
    (folder / "truncated.wav").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    _write(folder / "silence.wav", np.zeros(4 * RATE, dtype=np.float32), RATE)
    _write(folder / "short.wav", song[:RATE], RATE)
    _write(folder / "long.wav", song, RATE)  # 12 s, over the 10 s limit of the run
    _write(folder / "eight-channels.wav", np.repeat(song[: 3 * RATE, None], 8, axis=1), RATE)
    low = demo_song(bpm=120.0, tonic=9, mode="minor", seconds=3.0, sample_rate=4000)
    _write(folder / "four-khz.wav", low, 4000)


@dataclass(frozen=True)
class Library:
    songs: Path  # the good files only
    mixed: Path  # the good files and the bad ones
    formats: tuple[str, ...]  # formats present


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Library:
    root = tmp_path_factory.mktemp("library")
    songs, mixed = root / "songs", root / "mixed"
    songs.mkdir()
    mixed.mkdir()
    ffmpeg = _ffmpeg()
    formats = []
    for fmt, song in SONGS.items():
        path = _make_song(songs, fmt, song, ffmpeg)
        if path is not None:
            shutil.copy(path, mixed / path.name)
            formats.append(fmt)
    _make_bad(mixed)
    (songs / "notes.txt").write_text("not picked up: no audio extension\n")
    return Library(songs=songs, mixed=mixed, formats=tuple(formats))


# --------------------------------------------------------------------------------------------------
# Running the command


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ANALYSIS_* setting of the calling shell leaks into the command; a fresh result cache."""
    for name in list(os.environ):
        if name.startswith("ANALYSIS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["analyze", *args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _records(stdout: str) -> dict[str, dict[str, Any]]:
    """The ``--json`` lines by file name (each file must be reported exactly once)."""
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    by_name = {Path(r["path"]).name: r for r in records}
    assert len(by_name) == len(records), "a file was reported twice"
    return by_name


def _assert_song(record: dict[str, Any], song: Song) -> None:
    assert record["status"] == "completed", record
    out = record["output"]
    assert out["tempo"]["bpm"] == pytest.approx(song.bpm, rel=0.04), record["path"]
    assert out["key"]["key"] == song.key, record["path"]
    assert out["duration_s"] == pytest.approx(SONG_S, abs=0.1)
    assert out["mood"] is not None
    assert out["timeline"] is None
    assert set(out["analyzer_versions"]) == {"bpm", "key", "mood"}


def _assert_songs(records: dict[str, dict[str, Any]], library: Library) -> None:
    for fmt in library.formats:
        record = records[f"song.{fmt}"]
        _assert_song(record, SONGS[fmt])
        assert record["output"]["format"] == fmt
        assert record["output"]["source_sample_rate"] == RATE
        assert record["output"]["source_channels"] == 2


# --------------------------------------------------------------------------------------------------
# Tests


def test_good_and_bad_files_in_one_run(library: Library) -> None:
    missing = library.mixed.parent / "missing.flac"

    status, stdout, stderr = _invoke("--json", "-j", JOBS, str(library.mixed), str(missing), env=LIMITS)

    records = _records(stdout)
    assert set(records) == {f"song.{fmt}" for fmt in library.formats} | set(BAD)
    _assert_songs(records, library)
    codes = {name: r["error"]["code"] for name, r in records.items() if r["status"] == "failed"}
    assert codes == BAD
    for name in BAD:
        assert records[name]["error"]["message"], name
    assert records["missing.flac"]["path"] == str(missing)
    assert status == EXIT_FAILURES == 1
    assert f"{len(records)} files: {len(records) - len(BAD)} analysed" in stderr
    assert f"{len(BAD)} failed" in stderr


def test_too_long_against_a_two_second_limit(library: Library) -> None:
    three = library.mixed.parent / "three-seconds.wav"
    _write(three, demo_song(bpm=120.0, tonic=9, mode="minor", seconds=3.0, sample_rate=RATE), RATE)

    status, stdout, _ = _invoke("--json", str(three), env={"ANALYSIS_ENGINE__MAX_DURATION_S": "2"})

    assert _records(stdout)["three-seconds.wav"]["error"]["code"] == "too_long"
    assert status == EXIT_FAILURES


def test_table_shows_names_keys_and_errors(library: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(library.songs.parent)

    status, stdout, _ = _invoke("-j", JOBS, "songs", "missing.flac")

    lines = stdout.splitlines()
    for fmt in library.formats:
        song = SONGS[fmt]
        [row] = [line for line in lines if f"song.{fmt}" in line]
        assert song.key in row
        numbers = [float(n) for n in re.findall(r"\d+\.\d+", row)]
        assert any(n == pytest.approx(song.bpm, rel=0.04) for n in numbers), row
    [row] = [line for line in lines if "missing.flac" in line]
    assert "file_not_found" in row
    assert status == EXIT_FAILURES
    assert "{" not in stdout  # a table, not JSON


def test_all_good_exits_zero_and_analyses_bpm_gives_only_tempo(library: Library) -> None:
    status, stdout, _ = _invoke("--json", "-j", JOBS, "--analyses", "bpm", str(library.songs))

    records = _records(stdout)
    assert set(records) == {f"song.{fmt}" for fmt in library.formats}
    for fmt in library.formats:
        out = records[f"song.{fmt}"]["output"]
        assert out["tempo"]["bpm"] == pytest.approx(SONGS[fmt].bpm, rel=0.04)
        assert out["key"] is None
        assert out["mood"] is None
        assert out["analyzer_versions"] == {"bpm": "1.6.0"}
    assert status == EXIT_OK == 0


def test_timeline_is_forced_on_a_short_file(library: Library) -> None:
    path = library.songs / "song.wav"

    forced_status, forced, _ = _invoke("--json", "--timeline", str(path))
    default_status, default, _ = _invoke("--json", str(path))

    timeline = _records(forced)["song.wav"]["output"]["timeline"]
    assert timeline is not None
    assert timeline[0]["start_s"] == 0.0
    assert timeline[-1]["end_s"] == pytest.approx(SONG_S, abs=0.1)
    assert timeline[0]["key"] == SONGS["wav"].key
    assert _records(default)["song.wav"]["output"]["timeline"] is None
    assert forced_status == default_status == EXIT_OK


def test_a_bpm_range_reports_the_tempo_in_its_octave(library: Library) -> None:
    path = library.songs / "song.wav"  # 120 BPM

    status, stdout, _ = _invoke("--json", "--no-cache", "--bpm-range", "125-240", str(path))

    assert _records(stdout)["song.wav"]["output"]["tempo"]["bpm"] == pytest.approx(240.0, rel=0.04)
    assert status == EXIT_OK


def test_a_bpm_range_setting_is_the_default_and_a_bad_one_is_a_configuration_error(library: Library) -> None:
    path = str(library.songs / "song.wav")  # 120 BPM

    status, stdout, _ = _invoke("--json", "--no-cache", path, env={"ANALYSIS_ENGINE__BPM_RANGE": "125-240"})
    assert _records(stdout)["song.wav"]["output"]["tempo"]["bpm"] == pytest.approx(240.0, rel=0.04)
    assert status == EXIT_OK

    status, stdout, stderr = _invoke("--json", path, env={"ANALYSIS_ENGINE__BPM_RANGE": "88-150"})
    assert status == 4
    assert stdout == ""
    assert "invalid configuration: ANALYSIS_ENGINE__BPM_RANGE" in stderr
    assert "narrower than an octave" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("value", "says"),
    [("120-130", "narrower than an octave"), ("88", "LOW-HIGH"), ("fast-slow", "LOW-HIGH"), ("20-60", "40")],
)
def test_a_bad_bpm_range_is_a_usage_error(library: Library, value: str, says: str) -> None:
    status, stdout, stderr = _invoke("--json", "--bpm-range", value, str(library.songs / "song.wav"))

    assert status == EXIT_USAGE
    assert stdout == ""
    assert says in " ".join(stderr.replace("│", " ").split())  # the message, unwrapped from its box


def test_folder_without_audio_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no audio here\n")
    (tmp_path / "sub").mkdir()

    status, stdout, stderr = _invoke("--json", str(tmp_path))

    assert status == EXIT_USAGE == 2
    assert stdout == ""
    assert "no audio files found" in stderr


def test_third_party_analyzer_runs_in_the_pool(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"asvc_cli_plugin_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import os

            from analysis_service.audio.registry import Analyzer

            PEAK = Analyzer("peak", "3.0.1", lambda f, r: {"peak": round(f.peak, 2), "pid": os.getpid()})
            """
        )
    )
    dist = tmp_path / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\npeak = {module}:PEAK\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned pool processes inherit sys.path

    status, stdout, _ = _invoke("--json", "-j", JOBS, str(library.songs / "song.flac"))

    out = _records(stdout)["song.flac"]["output"]
    assert 0.3 < out["extra"]["peak"]["peak"] <= 0.9  # the song's peak, mixed to mono and resampled
    assert out["extra"]["peak"]["pid"] != os.getpid()  # it ran in a pool process
    assert out["analyzer_versions"]["peak"] == "3.0.1"
    assert status == EXIT_OK


def test_as_a_subprocess(library: Library) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYSIS_")}

    done = subprocess.run(
        [sys.executable, "-m", "analysis_service.cli", "analyze", "--json", "-j", JOBS, str(library.songs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )

    assert done.returncode == EXIT_OK, done.stderr
    records = _records(done.stdout)
    assert set(records) == {f"song.{fmt}" for fmt in library.formats}
    _assert_songs(records, library)
    assert "analyze" in done.stderr  # the progress bar is on stderr, not mixed into the JSON


def test_mp3_and_m4a_are_covered(library: Library) -> None:
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed: the MP3 and M4A files were left out")
    assert library.formats == ("wav", "flac", "ogg", "mp3", "m4a")


def test_a_file_that_kills_its_process_fails_alone(
    library: Library, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash (segfault, OOM kill) of a pool process costs only the file that caused it."""
    module = f"asvc_crash_plugin_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            import os

            from analysis_service.audio.registry import Analyzer

            def run(features, results):
                if 0.245 < features.peak < 0.255:  # the "poison" file below
                    os._exit(70)  # dies like a process killed mid-analysis
                return {}

            CRASH = Analyzer("crash", "1.0", run)
            """
        )
    )
    dist = tmp_path / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ncrash = {module}:CRASH\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = tmp_path / "run"
    folder.mkdir()
    for i in range(4):
        sf.write(
            folder / f"good{i}.wav",
            0.8 * demo_song(bpm=110 + 5 * i, tonic=i, mode="major", seconds=6.0, sample_rate=22050),
            22050,
        )
    sf.write(
        folder / "poison.wav",
        0.25 * demo_song(bpm=100, tonic=0, mode="minor", seconds=6.0, sample_rate=22050) / 0.9,
        22050,
    )

    status, stdout, _ = _invoke("--json", "-j", JOBS, str(folder))

    records = _records(stdout)
    assert records["poison.wav"]["status"] == "failed"
    assert records["poison.wav"]["error"]["code"] == "worker_crashed"
    assert {name: r["status"] for name, r in records.items() if name != "poison.wav"} == {
        f"good{i}.wav": "completed" for i in range(4)
    }
    assert status == EXIT_FAILURES
