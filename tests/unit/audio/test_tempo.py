from __future__ import annotations

import numpy as np
import pytest

from analysis_service.audio import tempo
from analysis_service.audio.tempo import (
    alternation,
    backbeat_contrast,
    estimate_tempo,
    metrical_levels,
    tempo_confidence,
    windowed_acf,
    windowed_xcf,
)
from tests.unit.audio.conftest import SR, FeaturesOf, features_of_signal


@pytest.mark.parametrize("bpm", [92.0, 104.5, 118.0, 128.0, 140.0, 150.0])
def test_tempo_of_a_rock_pattern(song_features: FeaturesOf, bpm: float) -> None:
    est = estimate_tempo(song_features(bpm=bpm, tonic=9, mode="minor"))
    assert est.bpm == pytest.approx(bpm, rel=0.04)
    assert 0.0 < est.confidence <= 1.0


def test_tempo_of_a_click_track_is_not_an_octave_off() -> None:
    beat = int(SR * 60 / 120)
    y = np.zeros(SR * 30, dtype=np.float32)
    click = (np.random.default_rng(0).standard_normal(200) * np.exp(-np.arange(200) / 40)).astype(np.float32)
    for i in range(0, len(y) - 200, beat):
        y[i : i + 200] += click
    assert estimate_tempo(features_of_signal(y)).bpm == pytest.approx(120.0, rel=0.04)


def test_no_pulse_gives_zero_confidence() -> None:
    t = np.arange(SR * 20) / SR
    drone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    est = estimate_tempo(features_of_signal(drone))
    assert est.confidence < 0.2


@pytest.mark.parametrize("bpm", [156.0, 170.0, 178.0])
def test_a_fast_backbeat_is_not_halved(song_features: FeaturesOf, bpm: float) -> None:
    # Kick on 1 and 3, snare on 2 and 4 at drum & bass tempi: half the tempo has nearly the same
    # salience and a better prior; the snare falling on every second beat decides.
    assert estimate_tempo(song_features(bpm=bpm, tonic=2, mode="major")).bpm == pytest.approx(bpm, rel=0.04)


def test_the_backbeat_cues_favour_the_fast_level_of_a_fast_backbeat(song_features: FeaturesOf) -> None:
    levels = metrical_levels(song_features(bpm=170.0, tonic=2, mode="major"))
    assert levels is not None
    fast = int(np.argmin(np.abs(levels.bpm - 170.0)))
    slow = int(np.argmin(np.abs(levels.bpm - 85.0)))
    assert levels.bpm[fast] == pytest.approx(170.0, rel=0.04)
    assert levels.bpm[slow] == pytest.approx(85.0, rel=0.04)
    assert levels.backbeat[fast] > levels.backbeat[slow]
    assert levels.alternation[fast] > levels.alternation[slow]
    assert levels.pick == fast


def test_without_the_backbeat_cues_and_with_a_slow_preference_a_fast_backbeat_is_halved(
    song_features: FeaturesOf, monkeypatch: pytest.MonkeyPatch
) -> None:
    features = song_features(bpm=170.0, tonic=2, mode="major")
    monkeypatch.setattr(tempo, "BACKBEAT_WEIGHT", 0.0)
    monkeypatch.setattr(tempo, "ALTERNATION_WEIGHT", 0.0)
    monkeypatch.setattr(tempo, "PRIOR_CENTER_BPM", 100.0)
    assert estimate_tempo(features).bpm == pytest.approx(85.0, rel=0.04)


def test_alternation_is_highest_where_kick_and_snare_are_one_beat_apart() -> None:
    rate, bpm = 100.0, 120.0
    beat = int(rate * 60 / bpm)
    kick = np.zeros(int(60 * rate))
    snare = np.zeros(int(60 * rate))
    kick[:: 2 * beat] = 1.0  # beats 1 and 3
    snare[beat :: 2 * beat] = 1.0  # beats 2 and 4
    xcf = windowed_xcf(kick, snare, rate=rate, max_lag=2 * beat)
    assert xcf[2 * beat + beat] > 0.8  # kick one beat after a snare
    assert xcf[2 * beat - beat] > 0.8  # and one beat before
    at = {f: alternation(xcf, rate=rate, bpm=bpm * f) for f in (0.5, 1.0, 2.0)}
    assert at[1.0] > 0.8
    assert at[0.5] < 0.1  # two beats apart: kick meets kick
    assert at[2.0] < 0.1  # half a beat apart: nothing meets
    assert alternation(xcf, rate=rate, bpm=20.0) == 0.0  # one beat exceeds the lags


def test_backbeat_contrast_is_highest_where_the_snare_falls_on_every_second_beat() -> None:
    rate, bpm = 100.0, 120.0
    beat = int(rate * 60 / bpm)
    snare = np.zeros(int(60 * rate))
    snare[beat :: 2 * beat] = 1.0  # beats 2 and 4
    acf = windowed_acf(snare, rate=rate, max_lag=8 * beat)
    at = {f: backbeat_contrast(acf, rate=rate, bpm=bpm * f) for f in (0.5, 1.0, 2.0)}
    assert at[1.0] > 0.8
    assert at[0.5] < 0.1  # one level too slow: a snare on every beat
    assert at[2.0] < at[1.0] - 0.3  # one level too fast: no snare on the beats between
    assert backbeat_contrast(acf, rate=rate, bpm=10.0) == 0.0  # four beats exceed the lags


def test_confidence_falls_when_the_level_is_a_judgement() -> None:
    assert tempo_confidence(clarity=0.6, posterior=1.0, activity=2.0) == pytest.approx(1.0)
    # Two levels scoring alike (a tie) halve it.
    assert tempo_confidence(clarity=0.6, posterior=0.5, activity=2.0) == pytest.approx(0.5)
    # Little pulse, or little onset activity, gives little confidence.
    assert tempo_confidence(clarity=0.05, posterior=1.0, activity=2.0) < 0.2
    assert tempo_confidence(clarity=0.6, posterior=1.0, activity=0.1) < 0.2


def test_a_tie_of_two_levels_has_a_posterior_of_one_half() -> None:
    levels = tempo.MetricalLevels(
        bpm=np.array([90.0, 180.0]),
        salience=np.array([0.5, 0.5]),
        clarity=np.array([0.4, 0.4]),
        backbeat=np.zeros(2),
        alternation=np.zeros(2),
        score=np.array([-1.0, -1.0]),
    )
    assert levels.posterior == pytest.approx(0.5)


def test_confidence_is_a_probability_in_range(song_features: FeaturesOf) -> None:
    est = estimate_tempo(song_features(bpm=96, tonic=0, mode="major"))
    assert 0.0 <= est.confidence <= 1.0
