#!/usr/bin/env python3
"""Octave errors of the tempo estimator on the project's own numpy demo songs (not the generator).

    uv run python benchmarks/demo_tempo.py [--backbeat-weight W] [--seconds 6,8,10,14,18,22] [--step 8]

Renders ``synth.demo_song`` (kick on 1 and 3, snare on 2 and 4, eighth hats, bass and chords) at
70-178 BPM in 4 BPM steps (``--step``), minor and major, 30 s each (``--seconds`` gives other
lengths, e.g. short loops), and prints every song whose estimate is more than 4 % off.
``--backbeat-weight 0`` turns the backbeat step of ``tempo.py`` off for comparison.
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
    ap.add_argument(
        "--seconds", default="30", help="comma-separated song lengths (short loops: 6,8,10,14,18,22)"
    )
    ap.add_argument("--step", type=int, default=4, help="BPM step from 70 to 180")
    args = ap.parse_args()
    tempo.BACKBEAT_WEIGHT = args.backbeat_weight
    misses, total = [], 0
    for seconds in (float(s) for s in args.seconds.split(",")):
        for bpm in range(70, 181, args.step):
            for mode, seed in (("minor", 0), ("major", 1)):
                y = demo_song(
                    bpm=float(bpm), tonic=bpm % 12, mode=mode, seconds=seconds, sample_rate=SR, seed=seed
                )
                fx = FeatureExtractor(sample_rate=SR)
                fx.push(y)
                est = tempo.estimate_tempo(fx.finish()).bpm
                total += 1
                if abs(est - bpm) > 0.04 * bpm:
                    misses.append(f"  {seconds:g} s, {bpm} BPM {mode}: {est:.1f} (x{est / bpm:.2f})")
    print(f"backbeat weight {args.backbeat_weight}: {len(misses)} of {total} songs off by more than 4 %")
    print("\n".join(misses))


if __name__ == "__main__":
    main()
