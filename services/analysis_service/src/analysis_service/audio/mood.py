"""Mood: energy, valence and danceability in [0, 1], and a label.

The three values follow the vocabulary of Spotify's audio features, which is what users know:

* *energy* "represents a perceptual measure of intensity and activity. Typically, energetic tracks
  feel fast, loud, and noisy" (death metal high, a Bach prelude low);
* *valence* describes "the musical positiveness conveyed by a track": high is happy, cheerful,
  euphoric; low is sad, depressed, angry;
* *danceability* says "how suitable a track is for dancing based on a combination of musical
  elements including tempo, rhythm stability, beat strength, and overall regularity".

Inputs (from the shared features and the tempo and key results), each mapped linearly onto [0, 1]
between the bounds given and clipped outside them:

``loud``
    upper-quartile frame level, -35 to -5 dBFS.
``pace``
    tempo, 60 to 180 BPM (0 without a tempo).
``bright``
    median spectral centroid, 300 Hz to 3 kHz on a log scale.
``activity``
    mean spectral flux, 0.05 to 0.3 (log-magnitude units).
``rough``
    roughness / distortion: flatness (geometric over arithmetic mean) of the recording's 12-bin
    pitch-class profile of sustained spectral peaks, 0.25 to 0.65. Clean tonal music puts its
    peaks on a few pitch classes (about 0.2); distortion adds intermodulation partials everywhere
    (a tanh-clipped song reaches 0.5-0.6) and noise is flat (about 1).
``mode``
    +1 for major, -1 for minor, scaled by ``0.3 + 0.7 * key confidence``.

Derivation:

* ``energy = 0.35 loud + 0.2 pace + 0.15 bright + 0.15 activity + 0.15 rough`` — fast, loud and
  noisy.
* ``valence = 0.5 + 0.22 mode + 0.18 (bright - 0.5) + 0.1 (pace - 0.5) - 0.3 rough`` — major mode,
  brightness and a lively tempo raise it; minor mode, a dark sound and distortion or roughness
  (the aggression of metal) lower it. Loudness is deliberately absent: a louder master of the same
  music is not happier, and loud, bright, distorted death metal comes out negative, not "happy".
* ``danceability = 0.45 clarity + 0.35 tempo fit + 0.2 kick share`` where clarity is the tempo
  confidence (beat strength and regularity), tempo fit a log-Gaussian around 120 BPM with 0.5
  octave deviation, and kick share the kick band's share of onset energy (0.1 to 0.5).

**Label** (:func:`mood_label`): the quadrant of (energy, valence) — happy (high, high), energetic
(high energy, low valence), calm (low energy, high valence), sad (low, low) — only when both values
are at least ``NEUTRAL_MARGIN`` from the 0.5 centre lines; otherwise ``neutral``. The margin is wider
than the differences that a lossy codec makes to the same audio, so the same recording as WAV and
as Ogg cannot land in opposite quadrants. Confidence is the smaller distance from a centre line,
scaled so that 0.25 (a corner) is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis_service.audio.features import Features
from analysis_service.audio.key import KeyEstimate, fold_chroma
from analysis_service.audio.tempo import TempoEstimate

#: Distance from the 0.5 centre lines below which the label is ``neutral``.
NEUTRAL_MARGIN = 0.08
#: Bounds of the roughness input (flatness of the pitch-class profile).
ROUGH_RANGE = (0.25, 0.65)


@dataclass(frozen=True)
class MoodEstimate:
    """Result of :func:`estimate_mood` (all values in [0, 1])."""

    energy: float
    valence: float
    danceability: float
    label: str
    confidence: float


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def roughness(features: Features) -> float:
    """Flatness of the recording's pitch-class profile, in [0, 1] (see the module docstring)."""
    if features.chroma36.size == 0:
        return 0.0
    profile = fold_chroma(features.chroma36).sum(axis=1)
    if profile.sum() <= 0:
        return 0.0
    p = profile / profile.sum() + 1e-9
    return float(np.exp(np.mean(np.log(p))) / np.mean(p))


def mood_label(energy: float, valence: float) -> tuple[str, float]:
    """The label of an (energy, valence) pair and its confidence in [0, 1]."""
    distance = min(abs(energy - 0.5), abs(valence - 0.5))
    confidence = float(np.clip(distance / 0.25, 0.0, 1.0))
    if distance < NEUTRAL_MARGIN:
        return "neutral", confidence
    if energy > 0.5:
        return ("happy" if valence > 0.5 else "energetic"), confidence
    return ("calm" if valence > 0.5 else "sad"), confidence


def estimate_mood(features: Features, *, tempo: TempoEstimate, key: KeyEstimate) -> MoodEstimate:
    """Estimate mood descriptors from features plus the tempo and key estimates.

    Parameters
    ----------
    features : Features
        Shared features of the recording.
    tempo : TempoEstimate
        Its tempo (BPM and confidence).
    key : KeyEstimate
        Its key (mode and confidence).
    """
    loud_db = features.loudness_db
    active = loud_db > -60.0
    if not np.any(active):
        return MoodEstimate(energy=0.0, valence=0.5, danceability=0.0, label="neutral", confidence=0.0)
    loudness = _ramp(float(np.percentile(loud_db[active], 75)), -35.0, -5.0)
    centroid = float(np.median(features.centroid_hz[active]))
    brightness = _ramp(float(np.log2(max(centroid, 1.0))), float(np.log2(300.0)), float(np.log2(3000.0)))
    pace = _ramp(tempo.bpm, 60.0, 180.0) if tempo.bpm > 0 else 0.0
    flux = features.onset[:, active]
    activity = _ramp(float(flux.mean()), 0.05, 0.3)
    rough = _ramp(roughness(features), *ROUGH_RANGE)
    energy = 0.35 * loudness + 0.2 * pace + 0.15 * brightness + 0.15 * activity + 0.15 * rough

    mode = (1.0 if key.mode == "major" else -1.0) * (0.3 + 0.7 * key.confidence)
    valence = 0.5 + 0.22 * mode + 0.18 * (brightness - 0.5) + 0.1 * (pace - 0.5) - 0.3 * rough

    fit = float(np.exp(-0.5 * (np.log2(max(tempo.bpm, 1.0) / 120.0) / 0.5) ** 2)) if tempo.bpm else 0.0
    band_energy = flux.sum(axis=1)
    kick_share = float(band_energy[0] / band_energy.sum()) if band_energy.sum() > 0 else 0.0
    danceability = 0.45 * tempo.confidence + 0.35 * fit + 0.2 * _ramp(kick_share, 0.1, 0.5)

    energy, valence = float(np.clip(energy, 0, 1)), float(np.clip(valence, 0, 1))
    label, confidence = mood_label(energy, valence)
    return MoodEstimate(
        energy=round(energy, 3),
        valence=round(valence, 3),
        danceability=round(float(np.clip(danceability, 0, 1)), 3),
        label=label,
        confidence=round(confidence, 3),
    )
