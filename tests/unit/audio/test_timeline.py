"""Timeline of long recordings: synthetic DJ mixes of demo songs with known tempo, key and boundaries."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from analysis_service.audio.features import Features
from analysis_service.audio.key import NOTE_NAMES, KeyEstimate
from analysis_service.audio.synth import demo_song
from analysis_service.audio.tempo import TempoEstimate
from analysis_service.audio.timeline import MIN_SEGMENT_S, Segment, estimate_timeline, reconcile
from tests.unit.audio.conftest import SR, features_of_signal

FloatArray = npt.NDArray[np.float32]

CROSSFADE_S = 4.0
BOUNDARY_TOLERANCE_S = 10.0


@dataclass(frozen=True)
class Section:
    bpm: float
    tonic: int
    mode: str
    seconds: float

    @property
    def key(self) -> str:
        return f"{NOTE_NAMES[self.tonic]} {self.mode}"


def dj_mix(sections: list[Section], *, crossfade_s: float = CROSSFADE_S) -> tuple[FloatArray, list[float]]:
    """Concatenate demo songs with linear crossfades; the signal and the true boundaries (s).

    A boundary is the middle of its crossfade.
    """
    n = round(crossfade_s * SR)
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    out = np.zeros(0, dtype=np.float32)
    bounds: list[float] = []
    for i, s in enumerate(sections):
        y = demo_song(bpm=s.bpm, tonic=s.tonic, mode=s.mode, seconds=s.seconds, sample_rate=SR, seed=i)
        if not len(out):
            out = y
            continue
        bounds.append((len(out) - n / 2) / SR)
        out = np.concatenate([out[:-n], out[-n:] * (1 - ramp) + y[:n] * ramp, y[n:]])
    return out, bounds


def _mix_features(sections: list[Section]) -> tuple[Features, list[float]]:
    y, bounds = dj_mix(sections)
    return features_of_signal(y, block=10 * SR), bounds


def _assert_covers(segments: list[Segment], features: Features) -> None:
    assert segments[0].start_s == 0.0
    assert segments[-1].end_s == pytest.approx(features.duration_s, abs=0.01)
    for a, b in itertools.pairwise(segments):
        assert a.end_s == b.start_s
        assert b.end_s - b.start_s >= MIN_SEGMENT_S - 5.0


def _assert_matches(segments: list[Segment], sections: list[Section], bounds: list[float]) -> None:
    found = [(s.bpm, s.key) for s in segments]
    assert len(segments) == len(sections), found
    for seg, truth in zip(segments, sections, strict=True):
        assert seg.bpm == pytest.approx(truth.bpm, rel=0.04), found
        assert seg.key == truth.key, found
    for seg, bound in zip(segments[1:], bounds, strict=True):
        assert abs(seg.start_s - bound) <= BOUNDARY_TOLERANCE_S, ([s.start_s for s in segments], bounds)


def test_three_section_mix() -> None:
    sections = [
        Section(110.0, 9, "minor", 70.0),  # A minor
        Section(128.0, 7, "major", 70.0),  # G major
        Section(95.0, 4, "minor", 70.0),  # E minor
    ]
    features, bounds = _mix_features(sections)

    segments = estimate_timeline(features)

    _assert_covers(segments, features)
    _assert_matches(segments, sections, bounds)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="key.estimate_key cannot tell C major from its relative A minor on I-V-vi-IV material cut "
    "from the middle of a song: the 128 BPM C major section's core comes out 'A minor' (a near tie, "
    "confidence ~0.08, whatever the start/end weights); boundaries and BPM are right",
)
def test_three_section_mix_with_a_c_major_section() -> None:
    sections = [
        Section(110.0, 9, "minor", 80.0),  # A minor
        Section(128.0, 0, "major", 80.0),  # C major
        Section(95.0, 4, "minor", 80.0),  # E minor
    ]
    features, bounds = _mix_features(sections)

    segments = estimate_timeline(features)

    _assert_covers(segments, features)
    _assert_matches(segments, sections, bounds)


def test_a_tempo_change_alone_makes_a_boundary() -> None:
    sections = [Section(110.0, 9, "minor", 65.0), Section(130.0, 9, "minor", 65.0)]
    features, bounds = _mix_features(sections)

    segments = estimate_timeline(features)

    _assert_covers(segments, features)
    _assert_matches(segments, sections, bounds)


def test_a_distant_key_change_alone_makes_a_boundary() -> None:
    sections = [Section(120.0, 9, "minor", 65.0), Section(120.0, 3, "minor", 65.0)]  # A -> Eb minor
    features, bounds = _mix_features(sections)

    segments = estimate_timeline(features)

    _assert_covers(segments, features)
    _assert_matches(segments, sections, bounds)


def test_a_neighbouring_key_change_at_the_same_tempo_makes_a_boundary() -> None:
    sections = [Section(120.0, 9, "minor", 65.0), Section(120.0, 4, "minor", 65.0)]  # A -> E minor
    features, bounds = _mix_features(sections)

    segments = estimate_timeline(features)

    _assert_covers(segments, features)
    _assert_matches(segments, sections, bounds)


@pytest.mark.parametrize("seconds", [30.0, 125.0])
def test_a_constant_piece_is_one_segment(seconds: float) -> None:
    features = features_of_signal(
        demo_song(bpm=124.0, tonic=4, mode="minor", seconds=seconds, sample_rate=SR), block=10 * SR
    )

    segments = estimate_timeline(features)

    assert len(segments) == 1
    assert segments[0].start_s == 0.0
    assert segments[0].end_s == pytest.approx(seconds, abs=0.01)
    assert segments[0].bpm == pytest.approx(124.0, rel=0.04)
    assert segments[0].key == "E minor"


def test_a_one_segment_timeline_has_the_files_tempo_and_key() -> None:
    tempo, key = TempoEstimate(bpm=120.0, confidence=0.8), KeyEstimate("G", "major", "9B", 0.7)
    seg = Segment(0.0, 700.0, bpm=121.0, key="C major", bpm_confidence=0.5, key_confidence=0.4)
    t2, k2, segs = reconcile(tempo, key, [seg])
    assert (t2, k2) == (tempo, key)
    assert [(s.bpm, s.key) for s in segs] == [(120.0, "G major")]


def test_a_long_files_tempo_and_key_are_the_ones_covering_most_of_it() -> None:
    # The 14-minute file of issue 7: 53 BPM globally, while its timeline said 120 then 93.
    tempo, key = TempoEstimate(bpm=53.0, confidence=0.9), KeyEstimate("C", "major", "8B", 0.9)
    segs = [
        Segment(0.0, 300.0, bpm=120.0, key="A minor", bpm_confidence=0.8, key_confidence=0.6),
        Segment(300.0, 540.0, bpm=93.0, key="D minor", bpm_confidence=0.9, key_confidence=0.9),
        Segment(540.0, 840.0, bpm=121.0, key="A minor", bpm_confidence=0.6, key_confidence=0.4),
    ]
    t2, k2, out = reconcile(tempo, key, segs)
    assert out == segs
    assert t2.bpm == pytest.approx(120.5, abs=0.6)
    assert k2.name == "A minor"
    assert k2.camelot == "8A"
    # Confidence: the agreeing segments' (duration-weighted) confidence times their share of the file.
    assert t2.confidence == pytest.approx(0.7 * 600 / 840, abs=0.01)
    assert k2.confidence == pytest.approx(0.5 * 600 / 840, abs=0.01)


def test_a_global_estimate_that_agrees_with_the_timeline_is_kept() -> None:
    tempo, key = TempoEstimate(bpm=119.0, confidence=0.9), KeyEstimate("A", "minor", "8A", 0.8)
    segs = [
        Segment(0.0, 500.0, bpm=120.0, key="A minor"),
        Segment(500.0, 800.0, bpm=90.0, key="E minor"),
    ]
    assert reconcile(tempo, key, segs)[:2] == (tempo, key)


def test_a_bpm_range_reads_each_segment_in_its_octave() -> None:
    sections = [Section(90.0, 9, "minor", 65.0), Section(150.0, 7, "major", 65.0)]
    features, _ = _mix_features(sections)

    plain = estimate_timeline(features)
    ranged = estimate_timeline(features, bpm_range=(100.0, 200.0))

    assert [s.bpm for s in plain] == [pytest.approx(90.0, rel=0.04), pytest.approx(150.0, rel=0.04)]
    assert [s.bpm for s in ranged] == [pytest.approx(180.0, rel=0.04), pytest.approx(150.0, rel=0.04)]
    assert [(s.start_s, s.end_s, s.key) for s in ranged] == [(s.start_s, s.end_s, s.key) for s in plain]
