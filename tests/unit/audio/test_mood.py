"""Mood must move the documented way: louder/faster/brighter/rougher -> energy up; major/brighter ->
valence up; minor/darker/distorted -> valence down; loudness leaves valence alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from analysis_service.audio.key import estimate_key
from analysis_service.audio.mood import NEUTRAL_MARGIN, MoodEstimate, estimate_mood, mood_label
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
        assert m.label in (quadrant[(m.energy >= 0.5, m.valence >= 0.5)], "neutral")


def _mood(y: np.ndarray) -> MoodEstimate:
    f = features_of_signal(np.asarray(y, dtype=np.float32))
    return estimate_mood(f, tempo=estimate_tempo(f), key=estimate_key(f))


@pytest.mark.parametrize("mode", ["major", "minor"])
def test_valence_does_not_rise_with_loudness(mode: str) -> None:
    y = demo_song(bpm=110, tonic=0, mode=mode, seconds=30, sample_rate=SR)
    quiet, loud = _mood(0.05 * y), _mood(y)
    assert loud.energy > quiet.energy
    assert loud.valence <= quiet.valence + 0.02


def test_distortion_lowers_valence_and_raises_energy() -> None:
    y = demo_song(bpm=110, tonic=0, mode="major", seconds=30, sample_rate=SR)
    clipped = np.tanh(10 * y)
    # Same peak level: what changes is the roughness (and the loudness that clipping brings).
    clean, distorted = _mood(y), _mood(0.9 * clipped / np.max(np.abs(clipped)))
    assert distorted.valence < clean.valence - 0.1
    assert distorted.energy > clean.energy


def test_minor_and_dark_is_sad_not_energetic() -> None:
    y = demo_song(bpm=72, tonic=9, mode="minor", seconds=30, sample_rate=SR, brightness=0.3)
    m = _mood(0.3 * np.convolve(y, np.ones(8) / 8, mode="same"))
    assert m.valence < 0.5
    assert m.label in ("sad", "neutral")


@pytest.mark.parametrize(
    ("energy", "valence", "label"),
    [(0.8, 0.8, "happy"), (0.8, 0.2, "energetic"), (0.2, 0.8, "calm"), (0.2, 0.2, "sad")],
)
def test_clear_quadrants_are_labelled(energy: float, valence: float, label: str) -> None:
    assert mood_label(energy, valence)[0] == label


@pytest.mark.parametrize(("energy", "valence"), [(0.5, 0.9), (0.9, 0.5), (0.55, 0.45), (0.5, 0.5)])
def test_near_a_centre_line_the_label_is_neutral(energy: float, valence: float) -> None:
    label, confidence = mood_label(energy, valence)
    assert label == "neutral"
    assert confidence < 1.0


def test_label_margin_is_wider_than_codec_noise() -> None:
    # The same audio as WAV and as Ogg Vorbis: values move by less than the neutral margin, so a
    # label can only become "neutral", never the opposite quadrant.
    y = demo_song(bpm=124, tonic=7, mode="major", seconds=30, sample_rate=SR)
    buf = io.BytesIO()
    sf.write(buf, y, SR, format="OGG", subtype="VORBIS")
    buf.seek(0)
    ogg, _ = sf.read(buf, dtype="float32")
    a, b = _mood(y), _mood(ogg)
    assert abs(a.valence - b.valence) < NEUTRAL_MARGIN / 2
    assert abs(a.energy - b.energy) < NEUTRAL_MARGIN / 2
    assert {a.label, b.label} <= {a.label, "neutral"}
