"""Synthetic test signals of known tempo and key (for the demo command, tests and benchmarks).

Pure numpy: a drum kit (kick, snare, hi-hat), a bass line and chords rendered from additive
tones. The rhythm is a standard 4/4 rock pattern (kick on 1 and 3, snare on 2 and 4, hats on
eighths), so the tempo a listener taps is unambiguous.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

MAJOR_PROGRESSION = (0, 7, 9, 5)  # I - V - vi - IV (semitones above the tonic)
MINOR_PROGRESSION = (0, 5, 7, 0)  # i - iv - V - i
_MAJOR_THIRD, _MINOR_THIRD = 4, 3


def _env(n: int, decay_s: float, sr: int) -> npt.NDArray[np.float64]:
    return np.asarray(np.exp(-np.arange(n) / (decay_s * sr)))


def _tone(
    freq: float, n: int, sr: int, *, harmonics: int = 4, decay_s: float = 0.6
) -> npt.NDArray[np.float64]:
    t = np.arange(n) / sr
    wave = sum(np.sin(2 * np.pi * freq * h * t) / h**1.5 for h in range(1, harmonics + 1))
    return np.asarray(wave * _env(n, decay_s, sr))


def _midi_hz(note: float) -> float:
    return float(440.0 * 2 ** ((note - 69) / 12))


def demo_song(
    *,
    bpm: float,
    tonic: int,
    mode: str,
    seconds: float,
    sample_rate: int = 22050,
    drums: float = 1.0,
    harmony: float = 1.0,
    brightness: float = 1.0,
    seed: int = 0,
) -> FloatArray:
    """Render a short song with a known tempo and key.

    Parameters
    ----------
    bpm : float
        Tempo in beats per minute (quarter notes).
    tonic : int
        Tonic pitch class, 0 = C ... 11 = B.
    mode : {"major", "minor"}
        Mode; the chords follow I-V-vi-IV (major) or i-iv-V-i (minor, with a major dominant).
    seconds : float
        Duration in seconds.
    sample_rate : int
        Output rate in Hz.
    drums, harmony : float
        Gains of the drum kit and of the pitched parts (0 removes them).
    brightness : float
        Gain of the hi-hats and of the upper harmonics (more is brighter).
    seed : int
        Seed of the noise generator (drum noise).

    Returns
    -------
    np.ndarray, shape (n,)
        float32 mono signal, peak-normalised to 0.9.
    """
    sr = sample_rate
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n + sr)
    beat = 60.0 / bpm
    n_beats = int(seconds / beat)
    kick_n, snare_n, hat_n = int(0.25 * sr), int(0.2 * sr), int(0.05 * sr)
    t_kick = np.arange(kick_n) / sr
    kick = np.sin(2 * np.pi * (50 * t_kick + 60 * 0.04 * (1 - np.exp(-t_kick / 0.04)))) * _env(
        kick_n, 0.12, sr
    )
    snare_noise = rng.standard_normal(snare_n) * _env(snare_n, 0.06, sr)
    snare = 0.6 * snare_noise + 0.4 * np.sin(2 * np.pi * 190 * np.arange(snare_n) / sr) * _env(
        snare_n, 0.05, sr
    )
    hat = np.diff(rng.standard_normal(hat_n + 1)) * _env(hat_n, 0.012, sr)

    def place(sig: npt.NDArray[np.float64], at_s: float, gain: float) -> None:
        i = int(at_s * sr)
        j = min(len(out), i + len(sig))
        if i < len(out):
            out[i:j] += gain * sig[: j - i]

    third = _MAJOR_THIRD if mode == "major" else _MINOR_THIRD
    progression = MAJOR_PROGRESSION if mode == "major" else MINOR_PROGRESSION
    for b in range(n_beats):
        t = b * beat
        if drums:
            place(kick if b % 2 == 0 else snare, t, drums * (1.0 if b % 2 == 0 else 0.8))
            place(hat, t, drums * 0.25 * brightness)
            place(hat, t + beat / 2, drums * 0.18 * brightness)
        if harmony and b % 4 == 0:
            root = progression[(b // 4) % len(progression)]
            chord_third = _MAJOR_THIRD if (mode == "minor" and root == 7) else third
            if mode == "major" and root == 9:
                chord_third = _MINOR_THIRD
            bar = int(4 * beat * sr)
            base = 48 + tonic + root
            for interval in (0, chord_third, 7):
                place(
                    _tone(
                        _midi_hz(base + 12 + interval),
                        bar,
                        sr,
                        harmonics=2 + int(2 * brightness),
                        decay_s=1.5,
                    ),
                    t,
                    harmony * 0.25,
                )
            for e in range(8):
                place(
                    _tone(_midi_hz(base - 12), bar // 8, sr, harmonics=3, decay_s=0.2),
                    t + e * beat / 2,
                    harmony * 0.5,
                )
    y = out[:n]
    peak = float(np.max(np.abs(y))) or 1.0
    return (0.9 * y / peak).astype(np.float32)
