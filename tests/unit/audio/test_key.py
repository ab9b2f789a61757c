from __future__ import annotations

import numpy as np
import pytest
import soxr

from analysis_service.audio.key import NOTE_NAMES, camelot, estimate_key, key_confidence, tuning_cents
from analysis_service.audio.synth import demo_song
from tests.unit.audio.conftest import SR, FeaturesOf, features_of_signal


@pytest.mark.parametrize(
    ("pc", "mode", "code"),
    [
        (9, "minor", "8A"),
        (0, "major", "8B"),
        (7, "major", "9B"),
        (4, "minor", "9A"),
        (6, "major", "2B"),
        (5, "minor", "4A"),
    ],
)
def test_camelot_codes(pc: int, mode: str, code: str) -> None:
    assert camelot(pc, mode) == code


@pytest.mark.parametrize(
    ("tonic", "mode"), [(0, "major"), (9, "minor"), (7, "major"), (4, "minor"), (10, "major"), (1, "minor")]
)
def test_key_of_a_cadential_progression(song_features: FeaturesOf, tonic: int, mode: str) -> None:
    est = estimate_key(song_features(bpm=110, tonic=tonic, mode=mode))
    assert (est.tonic, est.mode) == (NOTE_NAMES[tonic], mode)
    assert est.camelot == camelot(tonic, mode)
    assert 0.0 < est.confidence <= 1.0


def test_drums_only_give_no_key_confidence(song_features: FeaturesOf) -> None:
    est = estimate_key(song_features(bpm=110, tonic=0, mode="major", harmony=0.0))
    assert est.confidence < 0.3


@pytest.mark.parametrize("cents", [-45.0, -40.0, -25.0, 25.0, 40.0, 45.0])
@pytest.mark.parametrize(("tonic", "mode"), [(0, "major"), (9, "minor")])
def test_detuned_audio_keeps_its_key(cents: float, tonic: int, mode: str) -> None:
    # Resampling by 2**(cents/1200) raises every partial by `cents` (and the tempo by the same ratio).
    y = demo_song(bpm=110, tonic=tonic, mode=mode, seconds=30, sample_rate=SR)
    ratio = 2 ** (cents / 1200)
    detuned = np.asarray(soxr.resample(y, SR, SR / ratio), dtype=np.float32)
    est = estimate_key(features_of_signal(detuned))
    assert (est.tonic, est.mode) == (NOTE_NAMES[tonic], mode)


@pytest.mark.parametrize("cents", [-45.0, -40.0, -20.0, 0.0, 20.0, 40.0, 45.0])
def test_tuning_is_measured_both_ways(cents: float) -> None:
    y = demo_song(bpm=110, tonic=2, mode="major", seconds=20, sample_rate=SR)
    detuned = np.asarray(soxr.resample(y, SR, SR / 2 ** (cents / 1200)), dtype=np.float32)
    assert tuning_cents(features_of_signal(detuned).chroma36) == pytest.approx(cents, abs=8.0)


def test_key_confidence_grows_with_margin_and_tonality_and_is_never_zero_for_tonal_music() -> None:
    margins = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4]
    by_margin = [key_confidence(m, 0.8) for m in margins]
    assert by_margin == sorted(by_margin)
    assert by_margin[-1] > 0.95
    by_fit = [key_confidence(0.2, f) for f in (0.4, 0.5, 0.6, 0.7, 0.9)]
    assert by_fit == sorted(by_fit)
    assert key_confidence(0.02, 0.7) > 0.0


def test_a_clear_key_is_more_confident_than_a_weak_one(song_features: FeaturesOf) -> None:
    clear = estimate_key(song_features(bpm=110, tonic=4, mode="major"))
    weak = estimate_key(song_features(bpm=110, tonic=4, mode="major", harmony=0.15))
    assert clear.confidence > weak.confidence
