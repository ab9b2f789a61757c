#!/usr/bin/env python3
"""Octave errors of the tempo estimator on the project's own numpy demo songs (not the generator).

    uv run python benchmarks/demo_tempo.py [--backbeat-weight W]

Renders ``synth.demo_song`` (kick on 1 and 3, snare on 2 and 4, eighth hats, bass and chords) at
70-178 BPM in 4 BPM steps, minor and major, 30 s each, and prints every song whose estimate is more
than 4 % off. ``--backbeat-weight 0`` turns the backbeat step of ``tempo.py`` off for comparison.
"""

from __future__ import annotations

import argparse

from analysis_service.audio import tempo
from analysis_service.audio.features import FeatureExtractor
from analysis_service.audio.synth import demo_song

SR = 22050


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbeat-weight", type=float, default=tempo.BACKBEAT_WEIGHT)
    args = ap.parse_args()
    tempo.BACKBEAT_WEIGHT = args.backbeat_weight
    misses, total = [], 0
    for bpm in range(70, 181, 4):
        for mode, seed in (("minor", 0), ("major", 1)):
            y = demo_song(bpm=float(bpm), tonic=bpm % 12, mode=mode, seconds=30, sample_rate=SR, seed=seed)
            fx = FeatureExtractor(sample_rate=SR)
            fx.push(y)
            est = tempo.estimate_tempo(fx.finish()).bpm
            total += 1
            if abs(est - bpm) > 0.04 * bpm:
                misses.append(f"  {bpm} BPM {mode}: {est:.1f} (x{est / bpm:.2f})")
    print(f"backbeat weight {args.backbeat_weight}: {len(misses)} of {total} songs off by more than 4 %")
    print("\n".join(misses))


if __name__ == "__main__":
    main()
