#!/usr/bin/env python3
"""``analyze`` at library scale, in small: resume from the result cache and stop on Ctrl-C.

Writes ``--files`` synthetic songs of ``--seconds`` each into a temporary folder, then measures:

1. a cold run (``--json``, empty result cache): wall seconds;
2. the same run again (every result reused): wall seconds and the number reused;
3. the cold run in a pseudo-terminal interrupted by Ctrl-C after the first finished file: seconds from
   Ctrl-C to exit, exit status, and whether any process of the command survived.

    uv run python benchmarks/cli_resume.py [--files 12] [--seconds 30] [--jobs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pexpect
import psutil
import soundfile as sf

from analysis_service.audio.synth import demo_song


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        songs = root / "songs"
        songs.mkdir()
        for i in range(args.files):
            y = demo_song(bpm=90 + 3 * i, tonic=i % 12, mode="minor", seconds=args.seconds, sample_rate=44100)
            sf.write(songs / f"song{i:03d}.wav", y, 44100)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANALYSIS_")}
        env["ANALYSIS_CLI_CACHE"] = str(root / "cache.sqlite3")
        command = [sys.executable, "-m", "analysis_service.cli", "analyze", "-j", str(args.jobs)]

        timings = []
        for label in ("cold", "cached"):
            started = time.monotonic()
            done = subprocess.run([*command, "--json", str(songs)], env=env, capture_output=True, text=True)
            timings.append(time.monotonic() - started)
            reused = sum('"cached": true' in line for line in done.stdout.splitlines())
            print(
                f"{label:7s} run: {timings[-1]:6.1f} s wall, exit {done.returncode}, "
                f"{reused}/{args.files} reused"
            )

        env["ANALYSIS_CLI_CACHE"] = str(root / "cache2.sqlite3")
        child = pexpect.spawn(command[0], [*command[1:], str(songs)], env=env, encoding="utf-8", timeout=600)
        child.expect(rf"[1-9]\d*/{args.files} files")
        processes = psutil.Process(child.pid).children(recursive=True)
        sent = time.monotonic()
        child.sendintr()
        child.expect(pexpect.EOF, timeout=120)
        stopped = time.monotonic() - sent
        child.close()
        time.sleep(0.5)
        survivors = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        print(
            f"Ctrl-C : exit {child.exitstatus} {stopped:.2f} s after the signal, "
            f"{len(processes)} child processes, {len(survivors)} survived"
        )


if __name__ == "__main__":
    main()
