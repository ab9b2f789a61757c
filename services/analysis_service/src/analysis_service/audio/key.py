"""Musical key estimation: tonic, mode, Camelot code and a confidence.

Method
------
1. Tuning: the 36-bin pitch-class profile tells which third of a semitone the partials sit on;
   the 12-bin chroma is folded around that offset (robust to +-50 cents of detuning).
2. Frame chroma is log-compressed and normalised per frame, so loud passages do not outvote the
   rest; the mean over the recording is correlated with a major and a minor key profile in all 12
   rotations (24 key scores).
3. Pitch-count profiles cannot tell a minor key from its relative major when the music uses only
   natural-minor chords: both keys have the same notes. The tonic is told by where the music
   rests: the bass line (the tonic is the most frequent and longest bass note) and the final
   sonority. Each key's score gets a term for the bass weight of its tonic and of its tonic triad,
   and one for how well the last sounding seconds match its tonic triad.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from analysis_service.audio.features import Features

F64 = npt.NDArray[np.float64]

NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
# Key profiles: tonic triad strongest, other diatonic degrees medium, chromatic degrees zero. The
# minor profile treats the natural-minor seventh as diatonic (as modal pop, rock and dance music do)
# and the raised leading tone as a weaker alternative (harmonic minor).
MAJOR_PROFILE = np.array([1.0, 0.0, 0.5, 0.0, 0.8, 0.5, 0.0, 0.9, 0.0, 0.5, 0.0, 0.4])
MINOR_PROFILE = np.array([1.0, 0.0, 0.5, 0.8, 0.0, 0.5, 0.0, 0.9, 0.5, 0.0, 0.45, 0.25])
MAJOR_TRIAD = np.array([1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=np.float64)
MINOR_TRIAD = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=np.float64)

BASS_WEIGHT = 0.3
ENDING_WEIGHT = 0.25
ENDING_S = 4.0


@dataclass(frozen=True)
class KeyEstimate:
    """Result of :func:`estimate_key`.

    Attributes
    ----------
    tonic : str
        Tonic pitch name, e.g. ``"A"`` or ``"F#"``.
    mode : str
        ``"major"`` or ``"minor"``.
    camelot : str
        Camelot wheel code, e.g. ``"8A"`` for A minor.
    confidence : float
        Margin of the best key over the runner-up, in [0, 1].
    """

    tonic: str
    mode: str
    camelot: str
    confidence: float

    @property
    def name(self) -> str:
        """Key as ``"<tonic> <mode>"``, e.g. ``"A minor"``."""
        return f"{self.tonic} {self.mode}"


def camelot(pitch_class: int, mode: str) -> str:
    """Camelot code of a key: ``camelot(9, "minor") == "8A"``, ``camelot(0, "major") == "8B"``."""
    major_pc = pitch_class if mode == "major" else (pitch_class + 3) % 12
    number = (7 * major_pc + 7) % 12 + 1
    return f"{number}{'B' if mode == 'major' else 'A'}"


def tuning_offset(chroma36: F64) -> int:
    """Which third of a semitone the partials sit on: 0 in tune, 1 sharp, 2 flat (~33 cents)."""
    return int(np.argmax(chroma36.reshape(12, 3, -1).sum(axis=(0, 2)))) if chroma36.size else 0


def fold_chroma(chroma36: F64, *, offset: int | None = None) -> F64:
    """Fold a 36-bin profile (rows) to 12 bins around a tuning offset.

    ``offset`` defaults to :func:`tuning_offset` of the profile itself; pass the offset of the full
    chroma when folding the bass chroma, whose coarse low-frequency bins cannot tell the tuning.
    """
    if chroma36.shape[-1] == 0:
        return np.zeros((12,) + chroma36.shape[1:])
    centre = tuning_offset(chroma36) if offset is None else offset
    rolled = np.roll(chroma36, -centre, axis=0).reshape(12, 3, -1)
    # centre bin plus half of each neighbour (neighbour of bin 0 is the previous pitch's bin 2)
    prev = np.roll(rolled[:, 2], 1, axis=0)
    return np.asarray(rolled[:, 0] + 0.5 * rolled[:, 1] + 0.5 * prev)


def _normalise_frames(chroma: F64) -> F64:
    c = np.log1p(chroma / (np.percentile(chroma, 95) + 1e-9) * 10.0)
    norm = c.sum(axis=0, keepdims=True)
    loud = norm[0] > 0.05 * (np.max(norm) + 1e-12)
    out: F64 = np.where(loud, c / np.maximum(norm, 1e-12), 0.0)
    return out


def _profile_scores(profile: F64) -> F64:
    """Pearson correlation of a 12-bin profile with the 24 keys (0-11 major, 12-23 minor)."""
    scores = np.zeros(24)
    for mode, ref in enumerate((MAJOR_PROFILE, MINOR_PROFILE)):
        for tonic in range(12):
            scores[mode * 12 + tonic] = np.corrcoef(profile, np.roll(ref, tonic))[0, 1]
    return np.nan_to_num(scores)


def _triad_scores(profile: F64) -> F64:
    """Cosine match of a 12-bin profile with each key's tonic triad (24 values)."""
    p = profile / (np.linalg.norm(profile) + 1e-12)
    out = np.zeros(24)
    for mode, triad in enumerate((MAJOR_TRIAD, MINOR_TRIAD)):
        for tonic in range(12):
            t = np.roll(triad, tonic)
            out[mode * 12 + tonic] = float(p @ t) / np.linalg.norm(t)
    return out


def key_scores(features: Features) -> F64:
    """Scores of the 24 keys (index ``mode * 12 + tonic``; mode 0 major, 1 minor)."""
    offset = tuning_offset(features.chroma36.astype(np.float64))
    chroma = _normalise_frames(fold_chroma(features.chroma36.astype(np.float64), offset=offset))
    bass = _normalise_frames(fold_chroma(features.bass36.astype(np.float64), offset=offset))
    if not np.any(chroma):
        return np.zeros(24)
    scores = _profile_scores(chroma.mean(axis=1))
    bass_mean = bass.mean(axis=1)
    if np.any(bass_mean):
        b = bass_mean / bass_mean.max()
        tonic_bass = np.concatenate([b, b])
        scores += BASS_WEIGHT * (tonic_bass - tonic_bass.mean())
    n_end = max(1, int(ENDING_S * features.chroma_rate))
    voiced = np.flatnonzero(chroma.sum(axis=0) > 0)
    if len(voiced) > 4 * n_end:
        ending = chroma[:, voiced[-n_end:]].mean(axis=1) + bass[:, voiced[-n_end:]].mean(axis=1)
        tri = _triad_scores(ending)
        scores += ENDING_WEIGHT * (tri - tri.mean())
    return scores


def estimate_key(features: Features) -> KeyEstimate:
    """Estimate the key of a recording.

    Parameters
    ----------
    features : Features
        Shared features of the recording (or of an excerpt).

    Returns
    -------
    KeyEstimate
        Tonic, mode, Camelot code and confidence. A recording without pitched content gets
        confidence 0.
    """
    scores = key_scores(features)
    order = np.argsort(scores)[::-1]
    best = int(order[0])
    mode = "major" if best < 12 else "minor"
    pc = best % 12
    spread = float(scores[best] - scores[order[1]])
    confidence = float(np.clip(spread / 0.15, 0.0, 1.0)) if scores[best] > 0 else 0.0
    return KeyEstimate(tonic=NOTE_NAMES[pc], mode=mode, camelot=camelot(pc, mode), confidence=round(confidence, 3))
