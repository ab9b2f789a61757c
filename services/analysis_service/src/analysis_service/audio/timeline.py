"""Segment timeline of long recordings (DJ mixes, live sets): where tempo and key change.

Method
------
The recording is cut into steps of ``STEP_S`` seconds. Each step is described by its normalised
chroma (12 values, what key) and by its tempo salience on a log-BPM grid (what pulse), computed
from the onset curve in a window centred on the step. An optimal partition of the steps (dynamic
programming, cost = squared deviation from each segment's mean plus a fixed penalty per segment,
segments at least ``MIN_SEGMENT_S`` long) gives the boundaries; then tempo and key are estimated
for each segment with the same functions as for whole files, on the segment minus its edges
(where the crossfades are). Neighbouring segments with the same key and tempo (within 3 %) are
merged.

Cost is O(n_steps^2) in time and O(n_steps) in memory: a 3-hour file has 2160 steps.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from analysis_service.audio.features import Features
from analysis_service.audio.key import NOTE_NAMES, KeyEstimate, camelot, estimate_key, fold_chroma
from analysis_service.audio.tempo import (
    BpmRange,
    TempoEstimate,
    estimate_tempo,
    novelty,
    tempo_salience,
    windowed_acf,
)

F64 = npt.NDArray[np.float64]

STEP_S = 5.0
MIN_SEGMENT_S = 60.0
EDGE_TRIM_S = 6.0
PENALTY = 3.0
_BPM_GRID = np.exp(np.linspace(np.log(50.0), np.log(220.0), 48))


@dataclass(frozen=True)
class Segment:
    """One stretch of constant tempo and key (seconds, BPM, key name, and the confidences of the
    tempo and key estimates of the segment, in [0, 1])."""

    start_s: float
    end_s: float
    bpm: float
    key: str
    bpm_confidence: float = 0.0
    key_confidence: float = 0.0


def _step_descriptors(features: Features) -> F64:
    n_steps = max(1, int(np.ceil(features.duration_s / STEP_S)))
    chroma = fold_chroma(features.chroma36)
    curve = novelty(features)
    rate = features.onset_rate
    half = int(6.0 * rate)
    max_lag = int(2 * 60.0 * rate / _BPM_GRID[0]) + 2
    rows = []
    for i in range(n_steps):
        a, b = int(i * STEP_S * features.chroma_rate), int((i + 1) * STEP_S * features.chroma_rate)
        c = chroma[:, a:b].sum(axis=1)
        c = c / (np.linalg.norm(c) + 1e-12)
        centre = int((i + 0.5) * STEP_S * rate)
        seg = curve[max(0, centre - half) : centre + half]
        if len(seg) > max_lag + 2:
            acf = windowed_acf(seg, rate=rate, window_s=len(seg) / rate, max_lag=max_lag)
            s = tempo_salience(acf, rate=rate, bpms=_BPM_GRID)
            s = s / (np.linalg.norm(s) + 1e-12)
        else:
            s = np.zeros(len(_BPM_GRID))
        rows.append(np.concatenate([c, s]))
    return np.asarray(rows)


def _partition(x: F64, *, min_len: int, penalty: float) -> list[int]:
    """Boundaries (step indices, including 0 and n) of the least-cost partition of rows of x."""
    n = len(x)
    cs = np.vstack([np.zeros(x.shape[1]), np.cumsum(x, axis=0)])
    cs2 = np.concatenate([[0.0], np.cumsum((x**2).sum(axis=1))])
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    back = np.zeros(n + 1, dtype=int)
    for end in range(min_len, n + 1):
        starts = np.arange(0, end - min_len + 1)
        starts = starts[np.isfinite(best[starts])]
        if not len(starts):
            continue
        length = (end - starts).astype(np.float64)
        sums = cs[end] - cs[starts]
        cost = (cs2[end] - cs2[starts]) - (sums**2).sum(axis=1) / length
        total = best[starts] + cost + penalty
        j = int(np.argmin(total))
        best[end], back[end] = total[j], starts[j]
    if not np.isfinite(best[n]):
        return [0, n]
    bounds = [n]
    while bounds[-1] > 0:
        bounds.append(int(back[bounds[-1]]))
    return bounds[::-1]


def estimate_timeline(features: Features, *, bpm_range: BpmRange | None = None) -> list[Segment]:
    """Split a recording into segments of constant tempo and key.

    Parameters
    ----------
    features : Features
        Shared features of the whole recording.
    bpm_range : (float, float), optional
        Each segment's tempo is reported within it (see :func:`~analysis_service.audio.tempo.estimate_tempo`).

    Returns
    -------
    list of Segment
        Consecutive segments covering ``[0, features.duration_s]``.
    """
    x = _step_descriptors(features)
    min_len = max(1, int(MIN_SEGMENT_S / STEP_S))
    bounds = _partition(x, min_len=min(min_len, len(x)), penalty=PENALTY)
    segments: list[Segment] = []
    for a, b in itertools.pairwise(bounds):
        start, end = a * STEP_S, min(b * STEP_S, features.duration_s)
        trim = min(EDGE_TRIM_S, (end - start) / 4)
        core = features.window(start + trim, end - trim)
        tempo = estimate_tempo(core, bpm_range=bpm_range)
        key = estimate_key(core, edges=False)
        seg = Segment(
            start_s=round(start, 2),
            end_s=round(end, 2),
            bpm=tempo.bpm,
            key=key.name,
            bpm_confidence=tempo.confidence,
            key_confidence=key.confidence,
        )
        prev = segments[-1] if segments else None
        if prev and prev.key == seg.key and abs(prev.bpm / max(seg.bpm, 1e-6) - 1) < 0.03:
            segments[-1] = dataclasses.replace(prev, end_s=seg.end_s)
        else:
            segments.append(seg)
    return segments


#: Two tempi within this relative difference count as the same tempo when coverage is summed.
SAME_TEMPO = 0.04


def reconcile(
    tempo: TempoEstimate, key: KeyEstimate, segments: list[Segment]
) -> tuple[TempoEstimate, KeyEstimate, list[Segment]]:
    """Make one response agree with itself: the file's tempo and key and its timeline.

    * A one-segment timeline describes the whole file: it gets the file's tempo and key (the
      file-level key also has the evidence of the first and last seconds, which a segment lacks).
    * With several segments, the file's tempo is the one that covers most of its duration (segment
      tempi within ``SAME_TEMPO`` of each other pooled, the longest-covering pool's duration-weighted
      median), and its key is the key that covers most of it. A file-level estimate that already
      agrees is kept as it is; one that is replaced takes the coverage-weighted confidence of the
      segments that agree with the new value times their share of the duration.

    Returns the (possibly replaced) tempo and key, and the segments.
    """
    if not segments:
        return tempo, key, segments
    if len(segments) == 1:
        only = dataclasses.replace(
            segments[0],
            bpm=tempo.bpm,
            key=key.name,
            bpm_confidence=tempo.confidence,
            key_confidence=key.confidence,
        )
        return tempo, key, [only]
    dur = np.array([s.end_s - s.start_s for s in segments])
    total = float(dur.sum()) or 1.0

    bpms = np.array([s.bpm for s in segments])
    pools = [np.abs(bpms / max(b, 1e-6) - 1) <= SAME_TEMPO for b in bpms]
    best = max(pools, key=lambda m: float(dur[m].sum()))
    if not (tempo.bpm > 0 and np.any(np.abs(bpms[best] / tempo.bpm - 1) <= SAME_TEMPO)):
        order = np.argsort(bpms[best])
        cum = np.cumsum(dur[best][order])
        bpm = float(bpms[best][order][int(np.searchsorted(cum, cum[-1] / 2))])
        conf = np.array([s.bpm_confidence for s in segments])[best]
        share = float(dur[best].sum()) / total
        confidence = float(np.average(conf, weights=dur[best])) * share
        tempo = TempoEstimate(bpm=round(bpm, 2), confidence=round(confidence, 3))

    names = [s.key for s in segments]
    cover = {n: float(dur[[m == n for m in names]].sum()) for n in set(names)}
    top = max(cover, key=lambda n: (cover[n], n == key.name))
    if top != key.name:
        sel = np.array([m == top for m in names])
        conf = np.array([s.key_confidence for s in segments])[sel]
        confidence = float(np.average(conf, weights=dur[sel])) * cover[top] / total
        tonic, mode = top.split(" ")
        key = KeyEstimate(
            tonic=tonic,
            mode=mode,
            camelot=camelot(NOTE_NAMES.index(tonic), mode),
            confidence=round(confidence, 3),
        )
    return tempo, key, segments
