"""Mood must move the documented way: louder/faster/brighter -> energy up; major/brighter -> valence up."""

from __future__ import annotations

import numpy as np

from analysis_service.audio.key import estimate_key
from analysis_service.audio.mood import MoodEstimate, estimate_mood
from analysis_service.audio.synth import demo_song
from analysis_service.audio.tempo import estimate_tempo
from tests.unit.audio.conftest import SR, FeaturesOf, features_of_signal


def mood_of(features_factory: FeaturesOf, **kw: object) -> MoodEstimate:
    f = features_factory(**kw)
    return estimate_mood(f, tempo=estimate_tempo(f), key=estimate_key(f))


def test_faster_is_more_energetic(song_features: FeaturesOf) -> None:
    slow = mood_of(song_features, bpm=70, tonic=0, mode="major")
    fast = mood_of(song_features, bpm=150, tonic=0, mode="major")
    assert fast.energy > slow.energy


def test_louder_is_more_energetic() -> None:
    y = demo_song(bpm=110, tonic=0, mode="major", seconds=30, sample_rate=SR)
    quiet, loud = features_of_signal((0.05 * y).astype(np.float32)), features_of_signal(y)
    m = [estimate_mood(f, tempo=estimate_tempo(f), key=estimate_key(f)) for f in (quiet, loud)]
    assert m[1].energy > m[0].energy


def _tilt(y: np.ndarray, *, bright: bool) -> np.ndarray:
    """The same music with more (first difference) or less (moving average) treble, equal RMS."""
    out = np.diff(y, prepend=0.0) + 0.3 * y if bright else np.convolve(y, np.ones(8) / 8, mode="same")
    return np.asarray(out * np.sqrt(np.mean(y**2) / np.mean(out**2)), dtype=np.float32)


def test_brighter_is_more_energetic_and_happier() -> None:
    y = demo_song(bpm=110, tonic=0, mode="major", seconds=30, sample_rate=SR)
    moods = []
    for bright in (False, True):
        f = features_of_signal(_tilt(y, bright=bright))
        moods.append(estimate_mood(f, tempo=estimate_tempo(f), key=estimate_key(f)))
    dull, bright_mood = moods
    assert bright_mood.energy > dull.energy
    assert bright_mood.valence > dull.valence


def test_major_is_happier_than_minor(song_features: FeaturesOf) -> None:
    major = mood_of(song_features, bpm=110, tonic=0, mode="major")
    minor = mood_of(song_features, bpm=110, tonic=0, mode="minor")
    assert major.valence > minor.valence


def test_values_in_range_and_label_matches_quadrant(song_features: FeaturesOf) -> None:
    for kw in ({"bpm": 60, "mode": "minor"}, {"bpm": 160, "mode": "major"}):
        m = mood_of(song_features, tonic=2, **kw)
        for v in (m.energy, m.valence, m.danceability, m.confidence):
            assert 0.0 <= v <= 1.0
        quadrant = {
            (True, True): "happy",
            (True, False): "energetic",
            (False, True): "calm",
            (False, False): "sad",
        }
        assert m.label == quadrant[(m.energy >= 0.5, m.valence >= 0.5)]
