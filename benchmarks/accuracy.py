#!/usr/bin/env python3
"""Accuracy benchmark: generate the evaluation corpus, run ``analysis-service analyze`` over it and
print the scorer's table (and, with ``--peer``, Essentia's on the same files).

Uses ``../shared/eval`` beside the repository (generator, scorer, peer); its tools run in their own
virtual environment, made by ``../shared/eval/setup.sh`` (needs root for apt-get) when missing.

    uv run python benchmarks/accuracy.py --seed 1 [--peer] [--limit N] [--work .bench]

Prints: the scorer's table for this project, the same for the peer, and throughput (audio seconds
per CPU second, decoding included) of both.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def ensure_eval_env(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        sh(["bash", str(EVAL / "setup.sh")], env={**os.environ, "VENV": str(venv)}, cwd=str(EVAL))
    return python


def ensure_corpus(python: Path, out: Path, seed: int, limit: int | None) -> Path:
    truth = out / "truth_A.csv"
    if not truth.exists():
        cmd = [str(python), str(EVAL / "generate.py"), "--out", str(out), "--seed", str(seed), "--jobs", "2"]
        if limit:
            cmd += ["--limit", str(limit)]
        sh(cmd, stdout=sys.stderr)
    return truth


def run_analyze(corpus: Path, preds: Path) -> tuple[float, float]:
    """Run ``analyze --json`` over the corpus; write scorer predictions; return (wall, cpu) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "analysis_service.cli", "analyze", "--json", "--no-cache", str(corpus)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        sys.exit(f"analyze failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    with preds.open("w") as fh:
        for line in proc.stdout.splitlines():
            row = json.loads(line)
            out = row.get("output") or {}
            fh.write(
                json.dumps(
                    {
                        "path": row["path"],
                        "bpm": (out.get("tempo") or {}).get("bpm"),
                        "key": (out.get("key") or {}).get("key"),
                        "segments": out.get("timeline"),
                    }
                )
                + "\n"
            )
            if row["status"] != "completed":
                print(f"failed: {row['path']}: {row['error']}", file=sys.stderr)
    return wall, cpu


def audio_seconds(truth: Path) -> float:
    with truth.open() as fh:
        return sum(float(r["duration_s"]) for r in csv.DictReader(fh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="generate a small subset")
    ap.add_argument("--work", type=Path, default=REPO / ".bench")
    ap.add_argument("--peer", action="store_true", help="also run Essentia (peer_essentia.py)")
    args = ap.parse_args()

    python = ensure_eval_env(args.work / "venv-eval")
    out = args.work / (f"corpus-seed{args.seed}" + (f"-limit{args.limit}" if args.limit else ""))
    truth = ensure_corpus(python, out, args.seed, args.limit)
    preds = out / "predictions.jsonl"
    wall, cpu = run_analyze(out / "corpus", preds)
    total = audio_seconds(truth)
    print(f"\n== analysis-service (seed {args.seed}) ==")
    sh([str(python), str(EVAL / "score.py"), "--truth", str(truth), "--pred", str(preds)])
    print(
        f"throughput: {total / cpu:.0f}x real time per core ({total:.0f} s of audio, {cpu:.1f} CPU s, "
        f"{wall:.1f} s wall on {os.cpu_count()} cores; decoding, tempo, key, mood and timelines included)"
    )
    if args.peer:
        print("\n== peer: Essentia RhythmExtractor2013 + KeyExtractor (handed the mix sections) ==")
        sh(
            [
                str(python),
                str(EVAL / "peer_essentia.py"),
                "--truth",
                str(truth),
                "--out",
                str(out / "essentia.csv"),
            ]
        )


if __name__ == "__main__":
    main()
