"""The engine on generated files: output, timings, versions, progress, bad signals and the timeline."""

from __future__ import annotations

import itertools
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from analysis_service.audio.engine import MIN_DURATION_S, SILENCE_PEAK_DBFS, analyze_file
from analysis_service.audio.registry import BUILTIN_ANALYZERS
from analysis_service.audio.synth import demo_song
from analysis_service.errors import FileMissing, SilentAudio, TooShort
from analysis_service.settings import EngineSettings
from service_shared.messages import EngineOutput
from tests.unit.audio.test_timeline import Section, dj_mix

FloatArray = npt.NDArray[np.float32]
SR = 22050
SETTINGS = EngineSettings()
VERSIONS = {a.name: a.version for a in BUILTIN_ANALYZERS}

Make = Callable[..., Path]


class Recorder:
    """A progress callback that keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []

    def __call__(self, fraction: float, stage: str) -> None:
        self.calls.append((fraction, stage))

    @property
    def fractions(self) -> list[float]:
        return [f for f, _ in self.calls]

    @property
    def stages(self) -> list[str]:
        """Stage names in order, each run of repeats collapsed."""
        out: list[str] = []
        for _, stage in self.calls:
            if not out or out[-1] != stage:
                out.append(stage)
        return out


@pytest.fixture
def make(tmp_path: Path) -> Make:
    """``make(name, signal, rate=SR, channels=1, subtype=None)``: write a WAV/FLAC file into tmp_path."""

    def write(
        name: str, signal: FloatArray, *, rate: int = SR, channels: int = 1, subtype: str | None = None
    ) -> Path:
        data = np.stack([signal / (c + 1) for c in range(channels)], axis=1)
        path = tmp_path / name
        sf.write(path, data, rate, subtype=subtype)
        return path

    return write


def _song(
    seconds: float, *, rate: int = SR, bpm: float = 120.0, tonic: int = 9, mode: str = "minor"
) -> FloatArray:
    return demo_song(bpm=bpm, tonic=tonic, mode=mode, seconds=seconds, sample_rate=rate)


# --------------------------------------------------------------------------------------------------
# A normal file


def test_output_of_a_song(make: Make) -> None:
    path = make("song.wav", _song(8.0, rate=44100), rate=44100, channels=2)
    progress = Recorder()

    out = analyze_file(path, settings=SETTINGS, progress=progress)

    assert (out.format, out.source_sample_rate, out.source_channels) == ("wav", 44100, 2)
    assert out.duration_s == pytest.approx(8.0, abs=0.01)
    assert out.tempo is not None
    assert out.tempo.bpm == pytest.approx(120.0, rel=0.04)
    assert out.key is not None
    assert (out.key.key, out.key.tonic, out.key.mode, out.key.camelot) == ("A minor", "A", "minor", "8A")
    assert out.mood is not None
    assert 0.0 <= min(out.mood.energy, out.mood.valence, out.mood.danceability) <= 1.0
    assert out.mood.label
    assert out.timeline is None
    assert out.extra == {}
    assert out.analyzer_versions == VERSIONS == {"bpm": "1.6.0", "key": "1.1.0", "mood": "1.5.0"}


def test_timings_cover_every_stage(make: Make) -> None:
    out = analyze_file(make("song.wav", _song(6.0)), settings=SETTINGS)

    t = out.timings_s
    assert set(t) == {"decode", "features", "bpm", "key", "mood", "tags", "total"}
    assert all(v >= 0.0 for v in t.values())
    assert t["features"] > 0.0
    assert t["total"] > 0.0
    stages = t["decode"] + t["features"] + t["bpm"] + t["key"] + t["mood"]
    assert stages <= t["total"] + 1e-3  # stages are disjoint parts of the total (4-decimal rounding)
    assert stages >= 0.5 * t["total"]  # ... and account for most of it


def test_progress_is_monotonic_and_ends_at_one(make: Make) -> None:
    progress = Recorder()

    analyze_file(make("song.wav", _song(6.0)), settings=SETTINGS, progress=progress)

    fractions = progress.fractions
    assert progress.calls[0] == (0.0, "decode")
    assert progress.calls[-1] == (1.0, "done")
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert all(b >= a for a, b in itertools.pairwise(fractions)), fractions
    assert progress.stages == ["decode", "bpm", "key", "mood", "done"]
    assert fractions.count(1.0) == 1


def test_progress_is_reported_for_every_decoded_block(make: Make) -> None:
    progress = Recorder()

    analyze_file(make("long.wav", _song(25.0)), settings=SETTINGS, progress=progress)  # 10 s blocks

    decode = [f for f, stage in progress.calls if stage == "decode"]
    assert len(decode) >= 4  # the start and one per block
    assert all(b > a for a, b in itertools.pairwise(decode)), decode
    assert decode[1] == pytest.approx(0.85 * 10 / 25, abs=0.01)
    assert decode[-1] == pytest.approx(0.85, abs=0.01)


def test_only_the_analyses_asked_for(make: Make) -> None:
    path = make("song.wav", _song(6.0))

    bpm_only = analyze_file(path, settings=SETTINGS, analyses=["bpm"])
    mood_only = analyze_file(path, settings=SETTINGS, analyses=["mood"])

    assert bpm_only.tempo is not None
    assert (bpm_only.key, bpm_only.mood) == (None, None)
    assert bpm_only.analyzer_versions == {"bpm": "1.6.0"}
    assert set(bpm_only.timings_s) == {"decode", "features", "bpm", "tags", "total"}
    assert mood_only.mood is not None
    assert (mood_only.tempo, mood_only.key) == (None, None)
    assert mood_only.analyzer_versions == VERSIONS  # its dependencies ran


def test_output_pickles(make: Make) -> None:
    out = analyze_file(make("song.flac", _song(5.0)), settings=SETTINGS)

    copy = pickle.loads(pickle.dumps(out))

    assert isinstance(copy, EngineOutput)
    assert copy == out
    assert out.format == "flac"


# --------------------------------------------------------------------------------------------------
# Bad signals


def test_silence_is_refused(make: Make) -> None:
    path = make("silence.wav", np.zeros(SR * 4, dtype=np.float32))

    with pytest.raises(SilentAudio, match="silent") as caught:
        analyze_file(path, settings=SETTINGS)

    assert caught.value.path == str(path)
    assert caught.value.code == "silent_audio"


@pytest.mark.parametrize(("peak_dbfs", "silent"), [(-80.0, True), (-72.0, True), (-65.0, False)])
def test_silence_threshold(make: Make, peak_dbfs: float, silent: bool) -> None:
    assert SILENCE_PEAK_DBFS == -70.0
    song = _song(5.0)
    quiet = (song / np.abs(song).max() * 10 ** (peak_dbfs / 20)).astype(np.float32)
    path = make("quiet.wav", quiet, subtype="FLOAT")

    if silent:
        with pytest.raises(SilentAudio):
            analyze_file(path, settings=SETTINGS)
    else:
        out = analyze_file(path, settings=SETTINGS)
        assert out.tempo is not None
        assert out.tempo.bpm == pytest.approx(120.0, rel=0.04)


@pytest.mark.parametrize("seconds", [1.0, 1.9])
def test_too_short_is_refused(make: Make, seconds: float) -> None:
    path = make("short.wav", _song(seconds))

    with pytest.raises(TooShort, match=rf"{seconds:.2f} s long") as caught:
        analyze_file(path, settings=SETTINGS)

    assert caught.value.path == str(path)
    assert caught.value.code == "too_short"


def test_just_long_enough_is_analysed(make: Make) -> None:
    out = analyze_file(make("short.wav", _song(MIN_DURATION_S + 0.5)), settings=SETTINGS)

    assert out.duration_s == pytest.approx(MIN_DURATION_S + 0.5, abs=0.01)
    assert out.key is not None
    assert out.tempo is not None


def test_short_silence_is_too_short(make: Make) -> None:
    with pytest.raises(TooShort):
        analyze_file(make("blip.wav", np.zeros(SR, dtype=np.float32)), settings=SETTINGS)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileMissing):
        analyze_file(tmp_path / "nope.wav", settings=SETTINGS)


def test_tiny_file_is_too_short(make: Make) -> None:
    with pytest.raises(TooShort):
        analyze_file(make("tiny.wav", _song(0.1)), settings=SETTINGS)


def test_file_ending_just_after_a_block_boundary(make: Make) -> None:
    path = make("edge.wav", _song(11.0)[: 10 * SR + 300])

    out = analyze_file(path, settings=SETTINGS)

    assert out.duration_s == pytest.approx(10.0 + 300 / SR, abs=0.001)


# --------------------------------------------------------------------------------------------------
# Timeline


def test_long_file_gets_a_timeline(make: Make) -> None:
    path = make("long.wav", _song(12.0))
    progress = Recorder()

    out = analyze_file(path, settings=EngineSettings(timeline_threshold_s=5.0), progress=progress)

    assert out.timeline is not None
    assert len(out.timeline) >= 1
    assert out.timeline[0].start_s == 0.0
    assert out.timeline[-1].end_s == pytest.approx(12.0, abs=0.01)
    for a, b in itertools.pairwise(out.timeline):
        assert a.end_s == b.start_s
    assert out.timeline[0].bpm == pytest.approx(120.0, rel=0.04)
    assert out.timeline[0].key == "A minor"
    # One response never contradicts itself: a one-segment timeline has the file's tempo and key.
    assert out.tempo is not None
    assert out.key is not None
    assert len(out.timeline) == 1
    assert (out.timeline[0].bpm, out.timeline[0].key) == (out.tempo.bpm, out.key.key)
    assert "timeline" in out.timings_s
    assert progress.stages == ["decode", "bpm", "key", "mood", "timeline", "done"]
    fractions = progress.fractions
    assert all(b >= a for a, b in itertools.pairwise(fractions))


def test_short_file_gets_no_timeline(make: Make) -> None:
    out = analyze_file(make("short.wav", _song(4.0)), settings=EngineSettings(timeline_threshold_s=5.0))

    assert out.timeline is None
    assert "timeline" not in out.timings_s


def test_timeline_can_be_forced_or_suppressed(make: Make) -> None:
    settings = EngineSettings(timeline_threshold_s=5.0)
    short, long = make("short.wav", _song(4.0)), make("long.wav", _song(12.0))

    forced = analyze_file(short, settings=settings, timeline=True)
    suppressed = analyze_file(long, settings=settings, timeline=False)

    assert forced.timeline is not None
    assert [(s.start_s, s.end_s) for s in forced.timeline] == [(0.0, 4.0)]
    assert suppressed.timeline is None
    assert "timeline" not in suppressed.timings_s


def test_a_file_probed_by_the_caller_is_not_probed_again(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    import analysis_service.audio.engine as engine
    from analysis_service.audio.decode import probe

    path = make("song.wav", _song(4.0, rate=44100), rate=44100)
    info = probe(path, settings=SETTINGS)

    def no_probe(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("probed again")

    monkeypatch.setattr(engine, "probe", no_probe)
    out = analyze_file(path, settings=SETTINGS, analyses=["bpm"], info=info)
    assert (out.source_sample_rate, out.format) == (44100, "wav")
    with pytest.raises(ValueError, match="not"):
        analyze_file(make("other.wav", _song(4.0)), settings=SETTINGS, info=info)


def test_a_bpm_range_moves_the_tempo_and_each_timeline_segment_to_its_octave(make: Make) -> None:
    # Two sections, 65 s each (a segment is at least 60 s): the range reaches every segment.
    sections = [Section(90.0, 9, "minor", 65.0), Section(150.0, 7, "major", 65.0)]
    path = make("mix.wav", dj_mix(sections)[0])

    plain = analyze_file(path, settings=SETTINGS, timeline=True)
    ranged = analyze_file(path, settings=SETTINGS, timeline=True, bpm_range=(100.0, 200.0))

    assert plain.timeline is not None
    assert ranged.timeline is not None
    assert [s.bpm for s in plain.timeline] == [pytest.approx(90.0, rel=0.04), pytest.approx(150.0, rel=0.04)]
    assert [s.bpm for s in ranged.timeline] == [
        pytest.approx(180.0, rel=0.04),
        pytest.approx(150.0, rel=0.04),
    ]
    assert ranged.tempo is not None
    assert 100.0 <= ranged.tempo.bpm <= 200.0
    assert ranged.mood == plain.mood
    assert ranged.key == plain.key
