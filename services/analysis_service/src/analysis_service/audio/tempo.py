"""Global tempo estimation from band-wise onset strength.

Method
------
1. Each onset band (kick, snare/chords, hats) is normalised, high-passed (a one-second moving
   average is subtracted) and half-wave rectified; the bands are summed into one novelty curve.
2. The curve's autocorrelation, computed in 12-second windows and averaged (so that tempo drift or
   a change of section only blurs, never cancels, the peaks), is evaluated on a fine grid of tempi
   with a harmonic comb: the salience of tempo ``T`` is the weighted sum of the autocorrelation at
   1, 2, 3 and 4 beat periods. That sharpens the estimate (the fourth multiple is read at four
   times the precision) and favours periodicities that hold across the bar.
3. The strongest salience peak gives the candidate metrical levels: its multiples and divisions
   (``LEVEL_RATIOS``: x1/4 .. x4, including the ternary x1/3, x2/3, x3/2, x3 and the x3/4, x4/3
   relatives). Each level gets one log score (:func:`metrical_levels`), and the best one is the
   tempo; levels are compared all at once, not octave family first.
4. The score is the log of the level's salience plus the log of a perceptual tempo preference
   (log-normal, centred at ``PRIOR_CENTER_BPM`` with ``PRIOR_OCTAVES`` octaves of spread), plus,
   for the octaves of the strongest pulse only, two cues of the beat a listener taps:

   * the **backbeat**: in most popular music the snare or clap falls on beats 2 and 4, so at the
     tapped level it recurs every second beat and is absent from the beats between (the cue Goto
     and Muraoka's beat tracker used to find the quarter-note level). The snare curve is the mid
     band's normalised onset strength minus ``SNARE_LOW_WEIGHT`` times the low band's (what kicks
     and bass explain), rectified. Its autocorrelation at 2 and 4 beats minus that at 1 and 3
     beats (:func:`backbeat_contrast`) is high only at that level: one level too slow puts a snare
     on every beat, one level too fast puts none on the beats between;
   * the **kick/snare alternation**: kick and snare take turns one beat apart (kick on 1 and 3,
     snare on 2 and 4; in punk and drum & bass at 160-200 BPM just as in a ballad). The
     cross-correlation of the low band with the snare curve at plus and minus one beat
     (:func:`alternation`) is high at the tapped level; one level too slow pairs kick with kick,
     one level too fast pairs nothing.

   They are weighted by ``BACKBEAT_WEIGHT`` and ``ALTERNATION_WEIGHT``; music without drums has
   neither cue and is decided by salience and preference. They are not applied to the ternary and
   4:3 relatives, where a bar of 4 against 3 can imitate them. The preference is centred a little
   above the 110-120 BPM where listeners' tapping peaks, and the reason is the crossover it sets:
   a pulse ``T`` and its double of the same salience tie where ``T * sqrt(2)`` is the centre, so
   at 125 an 85 BPM pulse whose double is as strong reads 170 and a 90-100 BPM one reads itself;
   where the salience or the cues disagree, they decide.

Confidence (:func:`tempo_confidence`) is meant to be read as a probability that the tempo is the
tapped one, and it is measured as such (accuracy by confidence bucket, ``benchmarks/accuracy.py``).
It multiplies two things:

* pulse clarity: the chosen tempo's salience above the median salience of all tempi, scaled so that
  ``CONFIDENCE_SPAN`` or more is 1, and scaled down when the recording has little onset activity
  at all (``ACTIVITY_REFERENCE``);
* the chosen level's share of ``softmax(score / LEVEL_TEMPERATURE)`` over all candidate levels
  (:attr:`MetricalLevels.posterior`): almost all wrong tempi are another metrical level, so the
  confidence is the ambiguity between the levels. Two levels scoring alike give one half.

A doubled mid-tempo song whose double does not clearly win therefore gets about half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from analysis_service.audio.features import Features

MIN_BPM = 40.0
MAX_BPM = 240.0
#: Tempo preference: log-normal, centred here, with this standard deviation in octaves.
PRIOR_CENTER_BPM = 125.0
PRIOR_OCTAVES = 0.8
#: Candidate levels, as ratios to the strongest pulse (binary, ternary and 4:3 relatives).
LEVEL_RATIOS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 2.0, 3.0, 4.0)
#: Weights of the onset bands (kick, snare/chords, hats) in the novelty curve.
BAND_WEIGHTS = (2.0, 1.0, 1.0)
#: Smallest band standard deviation used for normalising (log-flux units): keeps the numerical
#: noise of a steady tone from being scaled up into a "pulse".
NOVELTY_FLOOR = 0.01
#: Weight of the backbeat contrast in the choice between a tempo and its double or half.
BACKBEAT_WEIGHT = 1.0
#: Weight of the kick/snare alternation one beat apart in the same choice.
ALTERNATION_WEIGHT = 2.0
#: The snare curve is the mid band minus this many times the low band (kick and bass onsets also
#: reach into the mid band; this keeps them out of it).
SNARE_LOW_WEIGHT = 1.5
#: Salience margin (over the median salience of all tempi) that counts as full confidence.
CONFIDENCE_SPAN = 0.4
#: Temperature of the softmax over the levels' log scores whose share for the chosen level is the
#: level factor of the confidence (a tie of two levels gives one half).
LEVEL_TEMPERATURE = 0.3
#: Mean spectral flux (log-magnitude units, nearly level-independent) of clearly rhythmic music;
#: less onset activity than this scales the confidence down (a steady tone has almost none).
ACTIVITY_REFERENCE = 0.05
_ACF_WINDOW_S = 12.0
_COMB_WEIGHTS = (1.0, 0.5, 0.33, 0.25)

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class TempoEstimate:
    """Result of :func:`estimate_tempo`.

    Attributes
    ----------
    bpm : float
        Tempo in beats per minute (0.0 when no periodicity was found).
    confidence : float
        How clearly the signal has this pulse, in [0, 1].
    """

    bpm: float
    confidence: float


def band_novelty(features: Features) -> F64:
    """Per-band onset novelty, shape ``(n_bands, n_frames)``: each band normalised by its standard
    deviation, minus its one-second moving average, half-wave rectified."""
    onset = features.onset.astype(np.float64)
    width = max(1, round(features.onset_rate))
    kernel = np.ones(width) / width
    out = np.zeros_like(onset)
    for i, band in enumerate(onset):
        b = band / max(float(np.std(band)), NOVELTY_FLOOR)
        out[i] = np.maximum(b - np.convolve(b, kernel, mode="same"), 0.0)
    return out


def novelty(features: Features, *, weights: tuple[float, ...] = BAND_WEIGHTS) -> F64:
    """Combined onset novelty curve at ``features.onset_rate`` frames per second."""
    if features.onset.shape[1] == 0:
        return np.zeros(0)
    bands = band_novelty(features)
    return np.asarray(np.asarray(weights[: len(bands)]) @ bands[: len(weights)])


def windowed_acf(curve: F64, *, rate: float, window_s: float = _ACF_WINDOW_S, max_lag: int) -> F64:
    """Average normalised autocorrelation over half-overlapping windows (lags 0..max_lag frames)."""
    win = int(window_s * rate)
    if len(curve) <= win:
        starts = [0]
        win = len(curve)
    else:
        starts = list(range(0, len(curve) - win + 1, win // 2))
    n_fft = 1 << int(np.ceil(np.log2(2 * win + 1)))
    acc = np.zeros(max_lag + 1)
    taper = np.hanning(win) if win > 8 else np.ones(win)
    for s in starts:
        seg = curve[s : s + win]
        seg = (seg - seg.mean()) * taper[: len(seg)]
        spec = np.fft.rfft(seg, n_fft)
        acf = np.fft.irfft(spec * np.conj(spec), n_fft)[: max_lag + 1]
        if acf[0] > 0:
            acc += acf / acf[0]
    return acc / max(1, len(starts))


def tempo_salience(acf: F64, *, rate: float, bpms: F64) -> F64:
    """Harmonic-comb salience of each tempo in ``bpms`` from an autocorrelation at ``rate`` fps."""
    lags = np.arange(len(acf), dtype=np.float64)
    sal = np.zeros(len(bpms))
    for k, w in enumerate(_COMB_WEIGHTS, start=1):
        period = k * 60.0 * rate / bpms
        ok = period < len(acf) - 1
        sal[ok] += w * np.interp(period[ok], lags, np.maximum(acf, 0.0))
    return sal / sum(_COMB_WEIGHTS)


def backbeat_contrast(snare_acf: F64, *, rate: float, bpm: float) -> float:
    """How much a snare-like curve recurs every second beat rather than on every beat, at ``bpm``.

    ``0.5 * (r(2) + r(4) - r(1) - r(3))`` where ``r(k)`` is the normalised autocorrelation
    ``snare_acf`` (frames at ``rate`` per second) at ``k`` beats; 0 where the lags run past it.
    """
    lag = 60.0 * rate / bpm
    if 4 * lag > len(snare_acf) - 1:
        return 0.0
    lags = np.arange(len(snare_acf), dtype=np.float64)
    r = np.interp(np.array([1.0, 2.0, 3.0, 4.0]) * lag, lags, snare_acf)
    return float(0.5 * (r[1] + r[3] - r[0] - r[2]))


def windowed_xcf(a: F64, b: F64, *, rate: float, max_lag: int, window_s: float = _ACF_WINDOW_S) -> F64:
    """Average normalised cross-correlation of two curves over half-overlapping windows.

    Returns lags ``-max_lag .. max_lag`` frames (index ``max_lag`` is lag 0); a positive lag ``L``
    correlates ``a[t + L]`` with ``b[t]``. Each window is normalised by the two curves' energies
    in it, so a value is a correlation coefficient (windows where either curve is flat count 0).
    """
    win = min(int(window_s * rate), len(a))
    starts = [0] if len(a) <= win else list(range(0, len(a) - win + 1, max(1, win // 2)))
    n_fft = 1 << int(np.ceil(np.log2(2 * win + 1)))
    taper = np.hanning(win) if win > 8 else np.ones(win)
    acc = np.zeros(2 * max_lag + 1)
    for s in starts:
        x = (a[s : s + win] - a[s : s + win].mean()) * taper
        y = (b[s : s + win] - b[s : s + win].mean()) * taper
        den = float(np.sqrt(np.sum(x * x) * np.sum(y * y)))
        if den > 0:
            c = np.fft.irfft(np.fft.rfft(x, n_fft) * np.conj(np.fft.rfft(y, n_fft)), n_fft)
            acc += np.concatenate([c[n_fft - max_lag :], c[: max_lag + 1]]) / den
    return acc / max(1, len(starts))


def alternation(xcf: F64, *, rate: float, bpm: float) -> float:
    """How strongly kick and snare alternate one beat apart at ``bpm``.

    The mean of the kick/snare cross-correlation ``xcf`` (from :func:`windowed_xcf`, lags
    ``-m .. m`` frames at ``rate`` per second) at plus and minus one beat; 0 past its lags.
    """
    max_lag = (len(xcf) - 1) // 2
    lag = 60.0 * rate / bpm
    if lag > max_lag:
        return 0.0
    lags = np.arange(-max_lag, max_lag + 1, dtype=np.float64)
    return float(0.5 * (np.interp(lag, lags, xcf) + np.interp(-lag, lags, xcf)))


def _prior(bpm: F64 | float, octaves: float | None = None) -> F64:
    """Log-normal tempo preference (1 at ``PRIOR_CENTER_BPM``), ``octaves`` wide (one sigma)."""
    width = PRIOR_OCTAVES if octaves is None else octaves
    return np.asarray(np.exp(-0.5 * (np.log2(np.asarray(bpm) / PRIOR_CENTER_BPM) / width) ** 2))


def _refine(bpms: F64, sal: F64, target: float) -> float:
    """Salience peak nearest to ``target`` (within 6 %), parabolic-interpolated."""
    sel = np.flatnonzero(np.abs(bpms / target - 1.0) <= 0.06)
    if not len(sel):
        return target
    i = sel[int(np.argmax(sal[sel]))]
    if 0 < i < len(bpms) - 1:
        a, b, c = sal[i - 1], sal[i], sal[i + 1]
        den = a - 2 * b + c
        if den < 0:
            off = 0.5 * (a - c) / den
            return float(bpms[i] + off * (bpms[i + 1] - bpms[i - 1]) / 2)
    return float(bpms[i])


@dataclass(frozen=True)
class MetricalLevels:
    """The candidate metrical levels of a recording and the evidence for each (step 3).

    Attributes
    ----------
    bpm : np.ndarray
        Candidate tempi (BPM), distinct (more than 4 % apart), within ``MIN_BPM`` .. ``MAX_BPM``.
    salience : np.ndarray
        Harmonic-comb salience of each candidate (autocorrelation units).
    clarity : np.ndarray
        Salience above the median salience of all tempi in range (at least ``1e-6``).
    backbeat : np.ndarray
        :func:`backbeat_contrast` of each candidate (0 for those not an octave of the strongest).
    alternation : np.ndarray
        :func:`alternation` of each candidate (0 for those not an octave of the strongest).
    score : np.ndarray
        Log score: ``log(salience) + log(prior) + BACKBEAT_WEIGHT * backbeat +
        ALTERNATION_WEIGHT * alternation``.
    """

    bpm: F64
    salience: F64
    clarity: F64
    backbeat: F64
    alternation: F64
    score: F64

    @property
    def pick(self) -> int:
        """Index of the best-scoring level."""
        return int(np.argmax(self.score))

    @property
    def posterior(self) -> float:
        """Share of the chosen level in ``softmax(score / LEVEL_TEMPERATURE)`` over all levels."""
        w = np.exp((self.score - np.max(self.score)) / LEVEL_TEMPERATURE)
        return float(w[self.pick] / np.sum(w))


def metrical_levels(features: Features) -> MetricalLevels | None:
    """Candidate metrical levels and their scores (steps 1-4 of the module docstring).

    Returns None when the recording is shorter than four seconds or has no onset activity.
    """
    rate = features.onset_rate
    if features.onset.shape[1] == 0:
        return None
    bands = band_novelty(features)
    curve = np.asarray(np.asarray(BAND_WEIGHTS) @ bands)
    if len(curve) < 4 * rate or not np.any(curve):
        return None
    max_lag = min(int(4 * 60.0 * rate / (MIN_BPM / 2)) + 2, len(curve) - 1)
    acf = windowed_acf(curve, rate=rate, max_lag=max_lag)
    bpms = np.exp(np.linspace(np.log(MIN_BPM / 2), np.log(MAX_BPM * 2), 1600))
    sal = tempo_salience(acf, rate=rate, bpms=bpms)
    in_range = (bpms >= MIN_BPM) & (bpms <= MAX_BPM)
    best = float(bpms[in_range][int(np.argmax(sal[in_range]))])
    refined: list[float] = []
    for f in LEVEL_RATIOS:
        if MIN_BPM <= best * f <= MAX_BPM:
            r = _refine(bpms, sal, best * f)
            if all(abs(r / q - 1.0) > 0.04 for q in refined):
                refined.append(r)
    cand = np.array(refined)
    sal_at = np.interp(np.log(cand), np.log(bpms), sal)
    clarity = np.maximum(sal_at - float(np.median(sal[in_range])), 1e-6)
    snare = np.maximum(bands[1] - SNARE_LOW_WEIGHT * bands[0], 0.0)
    snare_acf = windowed_acf(snare, rate=rate, max_lag=max_lag) if np.any(snare) else np.zeros(1)
    kick_snare = windowed_xcf(bands[0], snare, rate=rate, max_lag=int(60.0 * rate / MIN_BPM) + 2)
    # The backbeat cues only separate the octaves of one pulse (a bar of 4 against 3 imitates them).
    octave = np.abs((np.log2(cand / best) + 0.5) % 1.0 - 0.5) < 0.03
    contrast = np.array([backbeat_contrast(snare_acf, rate=rate, bpm=float(b)) for b in cand])
    alt = np.array([alternation(kick_snare, rate=rate, bpm=float(b)) for b in cand])
    contrast = np.where(octave, contrast, 0.0)
    alt = np.where(octave, alt, 0.0)
    score = (
        np.log(np.maximum(sal_at, 1e-6))
        + np.log(_prior(cand))
        + BACKBEAT_WEIGHT * contrast
        + ALTERNATION_WEIGHT * alt
    )
    return MetricalLevels(
        bpm=cand,
        salience=sal_at,
        clarity=clarity,
        backbeat=contrast,
        alternation=alt,
        score=score,
    )


def tempo_confidence(*, clarity: float, posterior: float, activity: float) -> float:
    """Confidence in [0, 1] that the reported tempo is the tapped one (see the module docstring).

    Parameters
    ----------
    clarity : float
        Salience of the chosen tempo above the median salience of all tempi (autocorrelation units).
    posterior : float
        :attr:`MetricalLevels.posterior` of the chosen level (1 when it has no rival).
    activity : float
        Mean onset strength over ``ACTIVITY_REFERENCE``.
    """
    pulse = float(np.clip(clarity / CONFIDENCE_SPAN, 0.0, 1.0)) * min(max(activity, 0.0), 1.0)
    return float(np.clip(pulse * posterior, 0.0, 1.0))


def estimate_tempo(features: Features) -> TempoEstimate:
    """Estimate the global tempo of a recording.

    Parameters
    ----------
    features : Features
        Shared features of the recording (or of an excerpt, see :meth:`Features.window`).

    Returns
    -------
    TempoEstimate
        Tempo in BPM, between ``MIN_BPM`` and ``MAX_BPM``, and a confidence in [0, 1].
    """
    levels = metrical_levels(features)
    if levels is None:
        return TempoEstimate(bpm=0.0, confidence=0.0)
    pick = levels.pick
    confidence = tempo_confidence(
        clarity=float(levels.clarity[pick]),
        posterior=levels.posterior,
        activity=float(features.onset.mean()) / ACTIVITY_REFERENCE,
    )
    return TempoEstimate(bpm=round(float(levels.bpm[pick]), 2), confidence=round(confidence, 3))
