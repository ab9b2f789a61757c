from __future__ import annotations

import numpy as np
import pytest

from analysis_service.audio.tempo import estimate_tempo
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
