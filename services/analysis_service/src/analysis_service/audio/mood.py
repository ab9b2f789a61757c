"""Mood: energy, valence and danceability in [0, 1], and a label.

How each is derived (all inputs come from the shared features and the tempo and key results):

* **energy** rises with loudness (upper-quartile frame level, -35 to -5 dBFS), tempo (60 to 180
  BPM), brightness (median spectral centroid, 200 Hz to 4 kHz on a log scale) and onset activity
  (mean spectral flux, 0.05 to 0.3): ``0.35 loud + 0.25 tempo + 0.2 bright + 0.2 activity``.
* **valence** rises with major mode (weighted by the key confidence), brightness, tempo and
  loudness: ``0.35 mode + 0.25 bright + 0.25 tempo + 0.15 loud``, where ``mode`` is
  ``0.5 +/- 0.5 * key confidence``.

Each input is mapped linearly onto [0, 1] between the bounds given (clipped outside them); the
bounds span dark, quiet synthetic material and loud, bright mastered pop alike.
* **danceability** rises with pulse clarity (tempo confidence), closeness of the tempo to the
  dance range (log-Gaussian around 120 BPM, 0.5 octave) and the share of onset energy in the kick
  band: ``0.45 clarity + 0.35 tempo fit + 0.2 kick share``.
* **label** is the quadrant of (energy, valence): happy (high, high), energetic (high energy, low
  valence), calm (low energy, high valence), sad (low, low). Its confidence is the distance from the
  quadrant centre lines, scaled to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis_service.audio.features import Features
from analysis_service.audio.key import KeyEstimate
from analysis_service.audio.tempo import TempoEstimate


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
        return MoodEstimate(energy=0.0, valence=0.5, danceability=0.0, label="calm", confidence=0.0)
    loudness = _ramp(float(np.percentile(loud_db[active], 75)), -35.0, -5.0)
    centroid = float(np.median(features.centroid_hz[active]))
    brightness = _ramp(float(np.log2(max(centroid, 1.0))), float(np.log2(200.0)), float(np.log2(4000.0)))
    pace = _ramp(tempo.bpm, 60.0, 180.0) if tempo.bpm > 0 else 0.0
    flux = features.onset[:, active]
    activity = _ramp(float(flux.mean()), 0.05, 0.3)
    energy = 0.35 * loudness + 0.25 * pace + 0.2 * brightness + 0.2 * activity

    mode = 0.5 + (0.5 if key.mode == "major" else -0.5) * key.confidence
    valence = 0.35 * mode + 0.25 * brightness + 0.25 * pace + 0.15 * loudness

    fit = float(np.exp(-0.5 * (np.log2(max(tempo.bpm, 1.0) / 120.0) / 0.5) ** 2)) if tempo.bpm else 0.0
    band_energy = flux.sum(axis=1)
    kick_share = float(band_energy[0] / band_energy.sum()) if band_energy.sum() > 0 else 0.0
    danceability = 0.45 * tempo.confidence + 0.35 * fit + 0.2 * _ramp(kick_share, 0.1, 0.5)

    if energy >= 0.5:
        label = "happy" if valence >= 0.5 else "energetic"
    else:
        label = "calm" if valence >= 0.5 else "sad"
    confidence = float(np.clip(2.0 * min(abs(energy - 0.5), abs(valence - 0.5)) * 4.0, 0.0, 1.0))
    return MoodEstimate(
        energy=round(float(np.clip(energy, 0, 1)), 3),
        valence=round(float(np.clip(valence, 0, 1)), 3),
        danceability=round(float(np.clip(danceability, 0, 1)), 3),
        label=label,
        confidence=round(confidence, 3),
    )
