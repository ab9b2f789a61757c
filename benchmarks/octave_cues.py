#!/usr/bin/env python3
"""Octave cues measured on real and on synthetic material side by side (issue 7's metrical level).

    uv run python benchmarks/octave_cues.py --work WORK [--sets real,seed1,seed2,demo,loops] [--grid]

Most wrong tempo answers on real recordings are made where ``audio/tempo.py`` chooses between a
level and its double or half (step 4 of its docstring). This script measures other cues for that
choice on the same candidates, so that a cue is judged on every kind of material at once:

- ``real``, ``seed1``, ``seed2``: the corpora ``benchmarks/accuracy.py`` builds under WORK
  (``real/truth_real.csv``, ``corpus-seed1/truth_A.csv``, ``corpus-seed2/truth_A.csv``); the mixes
  are left out (they are scored per section of their timeline);
- ``real-<degradation>`` (``real-speed``, ``real-mp3_64k``, ...): the degraded copies of the real
  set that ``accuracy.py --real --degrade`` makes (``degraded-real/<degradation>/truth_A.csv``);
- ``demo`` and ``loops``: the project's own numpy demo songs (``synth.demo_song``: kick on 1 and 3,
  snare on 2 and 4, eighth hats) at 70-178 BPM, 30 s long, and as loops of 6-22 s
  (``benchmarks/demo_tempo.py``).

Each file's candidates (``tempo.tempo_candidates``) are computed once and cached in
``WORK/octave-cues/``, under a name that changes with the tempo, key and feature code, this
script and the truth file (a change to any of them computes them again). For each variant the
script prints how many files of each set get a tempo within 4 % of the truth (Acc1; a file
without candidates counts as wrong). The variants are the shipped choice without the onset
density (step 5 of ``audio/tempo.py``) and with other settings of it, and the cues tried in
docs/accuracy.md (each on top of the shipped onset density);
``--grid`` also searches the weights of four cues (backbeat, high band, bar salience, kick; the
tempo preference as shipped) and prints the best settings for the synthetic sets and for the real
set.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from accuracy import DEGRADATIONS

from analysis_service.audio import features as features_module
from analysis_service.audio import key, synth, tempo
from analysis_service.audio.decode import iter_mono_blocks, probe
from analysis_service.audio.features import FeatureExtractor, Features, compute_features
from analysis_service.audio.synth import demo_song
from analysis_service.settings import EngineSettings

F64 = npt.NDArray[np.float64]
CORPORA = {
    "real": "real/truth_real.csv",
    "seed1": "corpus-seed1/truth_A.csv",
    "seed2": "corpus-seed2/truth_A.csv",
    **{f"real-{name}": f"degraded-real/{name}/truth_A.csv" for name in DEGRADATIONS},
}
DEMO_SETS = ("demo", "loops")
DEMO_SR = 22050


@dataclass(frozen=True)
class Item:
    """One file: its name, its true tempo, its candidates and the extra cues (:func:`cues`)."""

    name: str
    truth: float
    candidates: tempo.TempoCandidates | None  # None: no pulse to read (counts as a wrong answer)
    cues: dict[str, F64]


def contrast(c: tempo.TempoCandidates, curve: F64) -> F64:
    """:func:`tempo.backbeat_contrast` of ``curve`` at every candidate of ``c``."""
    if not np.any(curve):
        return np.zeros(len(c.bpm))
    max_lag = min(int(4 * 60.0 * c.rate / (tempo.MIN_BPM / 2)) + 2, len(curve) - 1)
    acf = tempo.windowed_acf(curve, rate=c.rate, max_lag=max_lag)
    return np.array([tempo.backbeat_contrast(acf, rate=c.rate, bpm=float(b)) for b in c.bpm])


def _novelty(c: tempo.TempoCandidates) -> F64:
    """The combined novelty curve ``c`` was read from (as in :func:`tempo.tempo_candidates`)."""
    return np.asarray(np.asarray(tempo.BAND_WEIGHTS) @ c.bands)


def _acf_at(acf: F64, lags: F64) -> F64:
    """``acf`` read at fractional ``lags`` (0 beyond its end)."""
    inside = lags < len(acf) - 1
    return np.asarray(np.where(inside, np.interp(lags, np.arange(len(acf), dtype=np.float64), acf), 0.0))


def chord_changes(chroma36: npt.NDArray[np.floating[Any]], rate: float) -> F64:
    """Harmonic-change novelty: the rise of the log-compressed, unit-length 12-bin chroma (folded
    around the recording's tuning, :func:`key.fold_chroma`) from one frame to the next, summed over
    pitch classes, minus its one-second moving average, rectified."""
    c12 = key.fold_chroma(chroma36)
    c12 = np.log1p(100.0 * c12 / max(float(c12.max(initial=0.0)), 1e-12))
    unit = c12 / (np.linalg.norm(c12, axis=0, keepdims=True) + 1e-9)
    rise = np.concatenate([[0.0], np.maximum(np.diff(unit, axis=1), 0.0).sum(axis=0)])
    width = max(1, round(rate))
    return np.asarray(np.maximum(rise - np.convolve(rise, np.ones(width) / width, mode="same"), 0.0))


def cues(c: tempo.TempoCandidates, f: Features) -> dict[str, F64]:
    """Other cues for the octave choice, one value per candidate of ``c``:

    - backbeat contrasts of other curves: the snare curve with the high band added
      (``snare+high``), the high band minus the low one (``high``), the low band alone (``kick``);
    - ``harmony``: how much more the chords change every four of the candidate's beats than every
      two (the autocorrelation of :func:`chord_changes` at 4 beats minus at 2), for music whose
      chords change once a bar;
    - ``sub8``: the novelty's autocorrelation peak at an eighth of the candidate's beat over the
      troughs half a period either side, rectified (a beat of eight onsets is likely two beats).
    """
    low, mid, high = c.bands[0], c.bands[1], c.bands[2]
    w = tempo.SNARE_LOW_WEIGHT
    out = {
        "snare+high": contrast(c, np.maximum(mid + high - w * low, 0.0)),
        "high": contrast(c, np.maximum(high - w * low, 0.0)),
        "kick": contrast(c, low),
    }
    changes = chord_changes(f.chroma36, f.chroma_rate)
    if len(changes) > 2 and np.any(changes):
        long_lag = min(len(changes) - 1, int(tempo.METRE_WINDOW_S * f.chroma_rate))
        acf = tempo.windowed_acf(changes, rate=f.chroma_rate, window_s=tempo.METRE_WINDOW_S, max_lag=long_lag)
        beat = 60.0 * f.chroma_rate / c.bpm
        out["harmony"] = _acf_at(acf, 4 * beat) - _acf_at(acf, 2 * beat)
    else:
        out["harmony"] = np.zeros(len(c.bpm))
    curve = _novelty(c)
    acf = tempo.windowed_acf(curve, rate=c.rate, max_lag=min(400, len(curve) - 1))
    period = 60.0 * c.rate / (8 * c.bpm)
    trough = 0.5 * (_acf_at(acf, 0.5 * period) + _acf_at(acf, 1.5 * period))
    out["sub8"] = np.maximum(_acf_at(acf, period) - trough, 0.0)
    return out


def _item(name: str, truth: float, features_of: Callable[[], Features]) -> Item:
    f = features_of()
    c = tempo.tempo_candidates(f)
    return Item(name, truth, c, {} if c is None else cues(c, f))


def _file_item(args: tuple[str, float]) -> Item:
    path, truth = args
    settings = EngineSettings()

    def features() -> Features:
        info = probe(path, settings=settings)
        return compute_features(
            iter_mono_blocks(info, target_rate=settings.sample_rate), sample_rate=settings.sample_rate
        )

    return _item(path, truth, features)


def _demo_item(args: tuple[float, float, str, int]) -> Item:
    seconds, bpm, mode, seed = args

    def features() -> Features:
        y = demo_song(
            bpm=bpm, tonic=int(bpm) % 12, mode=mode, seconds=seconds, sample_rate=DEMO_SR, seed=seed
        )
        fx = FeatureExtractor(sample_rate=DEMO_SR)
        fx.push(y)
        return fx.finish()

    return _item(f"demo {seconds:.0f} s, {bpm:.0f} BPM {mode}", bpm, features)


def _jobs(name: str, work: Path) -> tuple[Callable[..., Item], list[Any], bytes] | None:
    """The item function, its arguments, and what the items depend on besides the code."""
    if name in CORPORA:
        truth = work / CORPORA[name]
        if not truth.exists():
            return None
        with truth.open() as fh:
            rows = [r for r in csv.DictReader(fh) if not r.get("sections")]  # mixes: scored per section
        return (
            _file_item,
            [(str(truth.parent / r["path"]), float(r["bpm"])) for r in rows],
            truth.read_bytes(),
        )
    lengths = (30.0,) if name == "demo" else (6.0, 8.0, 10.0, 14.0, 18.0, 22.0)
    step = 4 if name == "demo" else 8
    modes = (("minor", 0), ("major", 1))
    args = [(s, float(b), m, k) for s in lengths for b in range(70, 181, step) for m, k in modes]
    return _demo_item, args, Path(synth.__file__).read_bytes()


def load_set(name: str, work: Path, jobs: int) -> list[Item] | None:
    """The items of one set, from the cache or computed (``None`` when its corpus is not built)."""
    planned = _jobs(name, work)
    if planned is None:
        return None
    fn, args, data = planned
    digest = hashlib.sha256(data)
    for source in (tempo.__file__, key.__file__, features_module.__file__, __file__):
        digest.update(Path(source or "").read_bytes())
    cache = work / "octave-cues" / f"{name}-{digest.hexdigest()[:16]}.pickle"
    if cache.exists():
        with cache.open("rb") as fh:
            items: list[Item] = pickle.load(fh)
        return items
    print(f"computing the candidates of {len(args)} {name} files ...", flush=True)
    with ProcessPoolExecutor(jobs) as pool:
        items = list(pool.map(fn, args))
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial")
    with partial.open("wb") as fh:
        pickle.dump(items, fh)
    os.replace(partial, cache)
    return items


@dataclass(frozen=True)
class Variant:
    """An octave choice: the backbeat contrast it uses, its weight, and other cues' weights."""

    name: str
    backbeat: str = "snare"  # "snare" (as shipped) or a key of :func:`cues`
    weights: tuple[tuple[str, float], ...] = ()  # (cue, weight); cue "bar" is the bar salience
    backbeat_weight: float | None = None  # None: tempo.BACKBEAT_WEIGHT (as shipped)
    density_weight: float | None = None  # None: tempo.DENSITY_WEIGHT (as shipped)
    events_per_beat: float | None = None  # None: tempo.EVENTS_PER_BEAT (as shipped)
    onset_floor: float | None = None  # None: tempo.ONSET_FLOOR (as shipped)
    onset_ramp: float | None = None  # None: tempo.ONSET_RAMP (as shipped); 0: a hard floor

    def choose(self, item: Item) -> float:
        """The tempo this variant chooses for ``item`` (0 where it has no candidates)."""
        c = item.candidates
        if c is None:
            return 0.0
        base = c.backbeat if self.backbeat == "snare" else item.cues[self.backbeat]
        weight = tempo.BACKBEAT_WEIGHT if self.backbeat_weight is None else self.backbeat_weight
        density = c.density
        if self.onset_floor is not None or self.onset_ramp is not None:
            density = tempo.onset_density(
                _novelty(c), rate=c.rate, floor=self.onset_floor, ramp=self.onset_ramp
            )
        evidence = weight * base + tempo.density_evidence(
            c.bpm, density, weight=self.density_weight, per_beat=self.events_per_beat
        )
        for cue, w in self.weights:
            evidence = evidence + w * (c.bar if cue == "bar" else item.cues[cue])
        return tempo.choose_tempo(c, octave_evidence=evidence).bpm


VARIANTS = (
    Variant("as shipped"),
    Variant("without the onset density (bpm 1.4.0)", density_weight=0.0),
    Variant("onset density: at most 1.5 strong onsets a beat", events_per_beat=1.5),
    Variant("onset density: at most 2.5 strong onsets a beat", events_per_beat=2.5),
    Variant("onset density: weight x0.75", density_weight=0.75),
    Variant("onset density: weight x1.5", density_weight=1.5),
    Variant("onset density: a hard floor at 0.5 of the strong onsets (bpm 1.5.0)", onset_ramp=0.0),
    Variant("onset density: ramp 0.2 either side of the floor", onset_ramp=0.2),
    Variant("onset density: ramp 0.4 either side of the floor", onset_ramp=0.4),
    Variant("onset density: onsets from 0.4 of the strong ones (hard)", onset_floor=0.4, onset_ramp=0.0),
    Variant("onset density: onsets from 0.6 of the strong ones (hard)", onset_floor=0.6, onset_ramp=0.0),
    Variant(
        "onset density, first setting: hard floor 0.25, 2.5 a beat, x0.5",
        onset_floor=0.25,
        onset_ramp=0.0,
        events_per_beat=2.5,
        density_weight=0.5,
    ),
    Variant("snare curve with the high band added", backbeat="snare+high"),
    Variant("bar salience in the octave choice (x2.5)", weights=(("bar", 2.5),)),
    Variant(
        "fitted on the synthetic sets: backbeat x1.5, high band x1, kick x-1",
        backbeat_weight=1.5,
        weights=(("high", 1.0), ("kick", -1.0)),
    ),
    Variant(
        "fitted on the real set: backbeat x0.5, high band x0.5, bar x2, kick x-0.5",
        backbeat_weight=0.5,
        weights=(("high", 0.5), ("bar", 2.0), ("kick", -0.5)),
    ),
    Variant("chords changing once a bar (harmony x1)", weights=(("harmony", 1.0),)),
    Variant("no beat of eight onsets (sub8 x-4)", weights=(("sub8", -4.0),)),
)


def right(variant: Variant, items: list[Item]) -> int:
    """Files whose chosen tempo is within 4 % of the truth."""
    return sum(abs(variant.choose(it) / it.truth - 1.0) <= 0.04 for it in items)


def grid() -> Iterator[Variant]:
    """Weights of the backbeat, the high band, the bar salience and the kick contrast."""
    for bb, hi, bar, kick in itertools.product(
        (0.0, 0.5, 1.0, 1.5, 2.0), (0.0, 0.5, 1.0, 1.5), (0.0, 1.0, 2.0, 3.0), (-1.0, -0.5, 0.0)
    ):
        weights = tuple((k, w) for k, w in (("high", hi), ("bar", bar), ("kick", kick)) if w)
        yield Variant(
            f"backbeat x{bb}, high x{hi}, bar x{bar}, kick x{kick}", backbeat_weight=bb, weights=weights
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the folder accuracy.py --work built")
    names = (*CORPORA, *DEMO_SETS)
    ap.add_argument("--sets", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--grid", action="store_true", help="also search cue weights")
    args = ap.parse_args()
    unknown = sorted(set(args.sets.split(",")) - set(names))
    if unknown:
        ap.error(f"unknown sets {', '.join(unknown)} (known: {', '.join(names)})")
    sets = {}
    for name in args.sets.split(","):
        items = load_set(name, args.work, args.jobs)
        if items is None:
            print(f"{name}: not built under {args.work} (run benchmarks/accuracy.py first); left out")
        else:
            sets[name] = items
    header = "".join(f"{n:>14}" for n in sets)
    print(f"\n{'Acc1 (files right / files)':72}{header}")
    for v in VARIANTS:
        print(f"{v.name:72}" + "".join(f"{f'{right(v, its)}/{len(its)}':>14}" for its in sets.values()))
    if args.grid:
        synthetic = [n for n in sets if n != "real"]
        scored = [(v, {n: right(v, its) / len(its) for n, its in sets.items()}) for v in grid()]
        for title, key in (
            ("best on the synthetic sets (mean Acc1)", lambda s: (sum(s[n] for n in synthetic), 0.0)),
            ("best on the real set", lambda s: (s.get("real", 0.0), sum(s[n] for n in synthetic))),
        ):
            print(f"\n{title}:")
            for v, s in sorted(scored, key=lambda vs: key(vs[1]), reverse=True)[:5]:
                print(f"{v.name:72}" + "".join(f"{s[n]:14.3f}" for n in sets))


if __name__ == "__main__":
    main()
