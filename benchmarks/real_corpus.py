#!/usr/bin/env python3
"""Assemble a corpus of REAL, human-made music from Debian packages, with tempo truth that no
estimator decided, and write it as a truth CSV that ``../shared/eval/score.py`` and the peers read.

    uv run python benchmarks/real_corpus.py [--work .bench/real] [--max-seconds 240]

Needs root (``apt-get install`` of the renderers below when they are missing) and Debian's package
archive. Downloads ``.deb`` files with ``apt-get download`` into ``WORK/debs`` and unpacks them
into ``WORK/x``: nothing is written into the repository and no audio is committed.

Sets (``corpus/<set>/...``) and where each tempo comes from:

``R_tracker``
    Tracker modules (ProTracker .mod, Scream Tracker .s3m, Impulse Tracker .it, FastTracker .xm)
    composed by people for the games tecnoballz, pingus, pachi and solarwolf. Rendered with
    libopenmpt (Debian's ``libopenmpt0``, called through ``ctypes``). A module's tempo is not an
    estimate: the player advances one row every ``speed * 2.5 / tempo`` seconds, from the
    ``speed`` and ``tempo`` commands stored in the file, and a beat is ``rows_per_beat`` rows
    (the file's row highlight where the format stores it, IT; four rows otherwise, the tracker
    convention). A module whose row highlight states a compound measure (6, 9 or 12 of those beats
    a bar, as in 6/8) is left out, as the MIDI set leaves out compound metres: its beat is a dotted
    value, three of the notated ones. libopenmpt reports exactly that figure as it plays
    (``openmpt_module_get_current_estimated_bpm``); we sample it every 0.25 s and keep a module only
    when one value holds for at least 95 % of the rendered time (no tempo changes). A stated tempo
    above 200 BPM (a beat notated as few rows at a low speed) is halved until it is not
    (``TAP_MAX_BPM``): that octave is a convention, so the tracker set is the least certain one.
``R_lmms``
    The demo and "shorties" projects that ship with LMMS (``lmms-common``), rendered with
    ``lmms render``. Truth: the project's tempo (``<head bpm=...>``); projects whose tempo
    automation track has more than one value are left out.
``R_hydrogen``
    The demo songs of the Hydrogen drum machine (``hydrogen-data``), rendered with ``h2cli``. Truth:
    the song's ``<bpm>``; songs with a tempo timeline are left out.
``R_loops``
    The recorded drum loops of ``lmms-common`` (``samples/beats``), each repeated to 30 s. Truth:
    the file holds a whole number of 4/4 bars, so the tempo is ``240 * bars / duration``; the bar
    count is given in ``LOOPS`` with its reason (the integer tempo it gives, the style's range).

``R_midi``
    Standard MIDI files composed by people for the games OpenTTD (``openttd-openmsx``, the OpenMSX
    set) and Planet Blupi (``planetblupi-music-midi``), rendered with FluidSynth and the
    FluidR3 General MIDI soundfont (Debian's ``fluidsynth``, ``fluid-soundfont-gm``). Truth: the
    file's own tempo (its ``set_tempo`` events, quarter notes per minute), kept only when every
    tempo event states the same value and the metre's beat is the quarter note (time signatures
    2/4, 3/4, 4/4, 5/4, or none, which MIDI defines as 4/4); compound metres (6/8, 6/4, 12/8),
    where the beat is a dotted value, and files with no tempo event are left out.

``R_recorded``
    Recorded songs (drums, bass, distorted guitars; metal and rock at 95-190 BPM) by the bands
    Muldjord and Sectoid, shipped as the Frets on Fire song packs ``fretsonfire-songs-muldjord`` and
    ``fretsonfire-songs-sectoid``. Each song is a backing track and a guitar track (Ogg Vorbis),
    mixed here into one file, and a chart (``notes.mid``) the game plays in time with the audio.
    Truth: the chart's tempo, under the same rule as ``R_midi`` (one tempo, a simple metre). The
    chart plays in time with the recording, so its tempo is the recording's; its octave is the
    charter's notation (a chart at half the tempo on a finer grid would play the same). The only
    set here played by people rather than rendered.

No set has key truth (drum loops have no key; the projects state none), so the ``key`` column is
empty. Columns: path, duration_s, bpm, key, sections, notes, source, justification.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gzip
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import mido
import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SR = 44100

#: Debian packages whose music is used, by set.
TRACKER_PACKAGES = ("tecnoballz-data", "pingus-data", "pachi-data", "solarwolf")
LMMS_PACKAGE = "lmms-common"
#: Frets on Fire song packs: recorded songs with a chart (notes.mid) timed to the audio.
RECORDED_PACKAGES = ("fretsonfire-songs-muldjord", "fretsonfire-songs-sectoid")
RECORDED_FOLDER = "usr/share/games/fretsonfire/data/songs"
HYDROGEN_PACKAGE = "hydrogen-data"
#: (package, folder of its MIDI files)
MIDI_SOURCES = (
    ("openttd-openmsx", "usr/share/games/openttd/baseset/openmsx"),
    ("planetblupi-music-midi", "usr/share/planetblupi/music"),
)
RENDERERS = {
    "lmms": "lmms",
    "h2cli": "hydrogen",
    "libopenmpt.so.0": "libopenmpt0",
    "fluidsynth": "fluidsynth",
}
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
SOUNDFONT_PACKAGE = "fluid-soundfont-gm"
#: Time-signature numerators (over a quarter note) whose beat is the quarter note.
SIMPLE_METRES = (2, 3, 4, 5)

#: Drum loops of lmms-common/samples/beats: (file, bars, reason). The duration of each file is a
#: whole number of bars at the tempo given; the single-instrument rave_* parts are left out (a
#: kick alone does not say which of two octaves is the beat).
LOOPS = (
    ("909beat01.ogg", 2, "3.952 s = 2 bars at 121.5 BPM (1 bar would be 60.7, house/techno 909 beat)"),
    ("break01.ogg", 1, "1.439 s = 1 bar at 166.8 BPM (breakbeat for jungle, 160-180)"),
    ("break02.ogg", 1, "1.720 s = 1 bar at 139.6 BPM (breakbeat)"),
    ("break03.ogg", 1, "1.440 s = 1 bar at 166.7 BPM (breakbeat for jungle, 160-180)"),
    ("electro_beat01.ogg", 2, "4.000 s = 2 bars at exactly 120.0 BPM"),
    ("electro_beat02.ogg", 1, "2.000 s = 1 bar at exactly 120.0 BPM"),
    ("house_loop01.ogg", 1, "1.690 s = 1 bar at exactly 142.0 BPM"),
    ("jungle01.ogg", 2, "2.780 s = 2 bars at 172.7 BPM (jungle, 160-180; 1 bar would be 86.3)"),
)
LOOP_SECONDS = 30.0
#: A tracker's nominal beat (rows per beat) is a notation, not always the beat a listener taps:
#: at speed 2-3 composers write a beat as 8 rows. A stated tempo above this is halved until it is
#: not (nobody taps faster; the ``x2`` relative still counts for Acc2).
TAP_MAX_BPM = 200.0
#: Beats per bar of a compound measure (6/8, 9/8, 12/8): the beat a listener taps is three of them.
COMPOUND_BEATS = (6, 9, 12)
#: Renders quieter than this peak level (dBFS) are left out (a module libopenmpt plays near-silent).
MIN_PEAK_DBFS = -40.0


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def fetch(packages: tuple[str, ...], work: Path) -> Path:
    """``apt-get download`` the packages (once) and unpack them into ``work/x``; return that."""
    debs, root = work / "debs", work / "x"
    debs.mkdir(parents=True, exist_ok=True)
    for name in packages:
        if not list(debs.glob(f"{name}_*.deb")):
            sh(["apt-get", "download", name], cwd=str(debs), stdout=subprocess.DEVNULL)
        for deb in debs.glob(f"{name}_*.deb"):
            sh(["dpkg-deb", "-x", str(deb), str(root)])
    return root


def ensure_renderers() -> None:
    missing = [pkg for tool, pkg in RENDERERS.items() if not _have(tool)]
    missing += [] if SOUNDFONT.exists() else [SOUNDFONT_PACKAGE]
    if missing:
        cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        sh(cmd, stdout=subprocess.DEVNULL)


def _have(tool: str) -> bool:
    if tool.endswith(".so.0"):
        try:
            ctypes.CDLL(tool)
        except OSError:
            return False
        return True
    return shutil.which(tool) is not None


# --------------------------------------------------------------------------------------------- tracker


def _openmpt() -> ctypes.CDLL:
    lib = ctypes.CDLL("libopenmpt.so.0")
    lib.openmpt_module_create_from_memory2.restype = ctypes.c_void_p
    lib.openmpt_module_create_from_memory2.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    lib.openmpt_module_read_float_stereo.restype = ctypes.c_size_t
    lib.openmpt_module_read_float_stereo.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int32,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_float),
        ctypes.POINTER(ctypes.c_float),
    ]
    lib.openmpt_module_get_current_estimated_bpm.restype = ctypes.c_double
    lib.openmpt_module_get_current_estimated_bpm.argtypes = [ctypes.c_void_p]
    for name in ("openmpt_module_get_current_speed", "openmpt_module_get_current_tempo"):
        getattr(lib, name).restype = ctypes.c_int32
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    lib.openmpt_module_set_repeat_count.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    lib.openmpt_module_destroy.argtypes = [ctypes.c_void_p]
    return lib


def render_module(
    lib: ctypes.CDLL, path: Path, max_s: float
) -> tuple[np.ndarray, list[tuple[float, int, int]]]:
    """Render a module once through; return stereo audio and (bpm, speed, tempo) every 0.25 s."""
    data = path.read_bytes()
    err = ctypes.c_int(0)
    create = lib.openmpt_module_create_from_memory2
    mod = create(data, len(data), None, None, None, None, ctypes.byref(err), None, None)
    if not mod:
        raise RuntimeError(f"libopenmpt cannot open {path} (error {err.value})")
    try:
        lib.openmpt_module_set_repeat_count(mod, 0)
        chunk = SR // 4
        left, right = (ctypes.c_float * chunk)(), (ctypes.c_float * chunk)()
        parts: list[np.ndarray] = []
        states: list[tuple[float, int, int]] = []
        while len(parts) * chunk < max_s * SR:
            states.append(
                (
                    float(lib.openmpt_module_get_current_estimated_bpm(mod)),
                    int(lib.openmpt_module_get_current_speed(mod)),
                    int(lib.openmpt_module_get_current_tempo(mod)),
                )
            )
            n = lib.openmpt_module_read_float_stereo(mod, SR, chunk, left, right)
            if n == 0:
                break
            l_ch, r_ch = np.ctypeslib.as_array(left)[:n].copy(), np.ctypeslib.as_array(right)[:n].copy()
            parts.append(np.stack([l_ch, r_ch], 1))
        return np.concatenate(parts) if parts else np.zeros((0, 2), np.float32), states
    finally:
        lib.openmpt_module_destroy(mod)


def it_highlight(path: Path) -> tuple[int, int] | None:
    """An Impulse Tracker module's row highlight, (rows per beat, rows per measure), from its header
    (``PHiligt``, bytes 0x1E-0x1F); ``None`` for other formats or an unset highlight."""
    head = path.read_bytes()[:0x20]
    if (
        path.suffix.lower() != ".it"
        or head[:4] != b"IMPM"
        or len(head) < 0x20
        or not head[0x1E]
        or not head[0x1F]
    ):
        return None
    return head[0x1E], head[0x1F]


def tracker_rows(root: Path, out: Path, max_s: float) -> list[dict[str, str]]:
    lib = _openmpt()
    rows = []
    mods = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".mod", ".xm", ".it", ".s3m"})
    for path in mods:
        measure = it_highlight(path)
        if measure and measure[1] % measure[0] == 0 and measure[1] // measure[0] in COMPOUND_BEATS:
            beats = measure[1] // measure[0]
            print(f"skip {path.name}: compound measure ({beats} beats of {measure[0]} rows)", file=sys.stderr)
            continue
        audio, states = render_module(lib, path, max_s)
        if len(audio) < 10 * SR:
            print(f"skip {path.name}: shorter than 10 s", file=sys.stderr)
            continue
        if float(np.max(np.abs(audio))) < 10 ** (MIN_PEAK_DBFS / 20):
            print(f"skip {path.name}: the render is nearly silent", file=sys.stderr)
            continue
        bpms = np.array([s[0] for s in states])
        value = float(np.median(bpms))
        share = float(np.mean(np.abs(bpms / value - 1) < 0.01))
        if share < 0.95:
            why = f"tempo changes (median {value:.1f} BPM holds {share:.0%})"
            print(f"skip {path.name}: {why}", file=sys.stderr)
            continue
        speed, tempo = max(set((s[1], s[2]) for s in states), key=[(s[1], s[2]) for s in states].count)
        rows_per_beat = 24.0 * tempo / (speed * value)
        stated, halvings = value, 0
        while value > TAP_MAX_BPM:
            value, halvings = value / 2, halvings + 1
        package = next(p for p in TRACKER_PACKAGES if p.split("-")[0] in str(path))
        dest = out / "corpus" / "R_tracker" / f"{package.split('-')[0]}_{path.stem}.flac"
        dest.parent.mkdir(parents=True, exist_ok=True)
        sf.write(dest, audio, SR)
        rows.append(
            _row(
                dest,
                out,
                len(audio) / SR,
                value,
                source=f"Debian {package}: {path.name}",
                why=(
                    f"{path.suffix[1:].upper()} module: speed {speed}, tempo {tempo}, "
                    f"{rows_per_beat:.0f} rows per beat -> {stated:.2f} BPM, held {share:.0%} of the time"
                    + (f"; halved {halvings}x to {value:.2f} (above {TAP_MAX_BPM:.0f})" if halvings else "")
                ),
            )
        )
    return rows


# ------------------------------------------------------------------------------------------- lmms


def _lmms_xml(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".mmpz":
        data = zlib.decompress(data[4:])  # Qt's qCompress: 4-byte length, then zlib
    return data.decode("utf-8", "replace")


def lmms_rows(root: Path, out: Path) -> list[dict[str, str]]:
    rows = []
    projects = sorted(root.glob("usr/share/lmms/projects/*/**/*.mmp*"))
    for path in projects:
        if "tutorials" in path.parts:
            continue
        xml = _lmms_xml(path)
        head = re.search(r"<head[^>]*>", xml)
        bpm_attr = re.search(r'bpm="(\d+(?:\.\d+)?)"', head.group(0)) if head else None
        if not bpm_attr:
            print(f"skip {path.name}: no tempo in the project head", file=sys.stderr)
            continue
        bpm = float(bpm_attr.group(1))
        tempo_values = set()
        pattern = r'<automationpattern[^>]*name="Tempo"[^>]*>(.*?)</automationpattern>'
        for pat in re.finditer(pattern, xml, re.S):
            tempo_values |= set(re.findall(r'<time[^>]*value="([\d.]+)"', pat.group(1)))
        if len(tempo_values) > 1:
            print(f"skip {path.name}: tempo automation {sorted(tempo_values)}", file=sys.stderr)
            continue
        dest = out / "corpus" / "R_lmms" / (re.sub(r"[^\w.-]", "_", path.stem) + ".wav")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            sh(
                ["lmms", "--allowroot", "render", str(path), "-f", "wav", "-o", str(dest)],
                env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin", "HOME": str(out)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        rows.append(
            _rendered(
                dest,
                out,
                bpm,
                source=f"Debian {LMMS_PACKAGE}: {path.relative_to(root / 'usr/share/lmms')}",
                why=f'LMMS project tempo <head bpm="{bpm_attr.group(1)}">, no tempo automation',
            )
        )
    return rows


# --------------------------------------------------------------------------------------- hydrogen


def hydrogen_rows(root: Path, out: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(root.glob("usr/share/hydrogen/data/demo_songs/*.h2song")):
        text = path.read_bytes()
        xml = (gzip.decompress(text) if text[:2] == b"\x1f\x8b" else text).decode("utf-8", "replace")
        bpm = float(re.search(r"<bpm>([\d.]+)</bpm>", xml).group(1))  # type: ignore[union-attr]
        if re.search(r"<BPMTimeLine>\s*<newBPM>", xml):
            print(f"skip {path.name}: tempo timeline", file=sys.stderr)
            continue
        dest = out / "corpus" / "R_hydrogen" / f"{path.stem}.wav"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            sh(
                ["h2cli", "-s", str(path), "-o", str(dest)],
                cwd=str(out),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        rows.append(
            _rendered(
                dest,
                out,
                bpm,
                source=f"Debian {HYDROGEN_PACKAGE}: demo_songs/{path.name}",
                why=f"Hydrogen song tempo <bpm>{bpm:g}</bpm>, no tempo timeline",
            )
        )
    return rows


# ------------------------------------------------------------------------------------------- midi


def midi_tempo(path: Path) -> tuple[float | None, str]:
    """The one tempo (quarter notes per minute) a MIDI file states, or ``None`` and the reason it
    has none usable: tempo changes, no tempo event, or a metre whose beat is not the quarter."""
    try:
        midi = mido.MidiFile(path)
    except (OSError, EOFError, ValueError, KeyError) as exc:
        return None, f"unreadable ({exc})"
    tempos = {round(mido.tempo2bpm(m.tempo), 2) for t in midi.tracks for m in t if m.type == "set_tempo"}
    metres = {(m.numerator, m.denominator) for t in midi.tracks for m in t if m.type == "time_signature"}
    if len(tempos) != 1:
        return None, f"{len(tempos)} tempi stated"
    first_note = first_tempo = None
    tick = 0
    for m in mido.merge_tracks(midi.tracks):
        tick += m.time
        if m.type == "set_tempo" and first_tempo is None:
            first_tempo = tick
        if m.type == "note_on" and m.velocity > 0 and first_note is None:
            first_note = tick
    if first_tempo is None or (first_note is not None and first_tempo > first_note):
        return None, "notes before the tempo is stated (they play at MIDI's default 120)"
    if any(den != 4 or num not in SIMPLE_METRES for num, den in metres):
        return None, f"metre {sorted(metres)}: the beat is not the quarter note"
    metre = "/".join(map(str, sorted(metres)[0])) if metres else "none stated (MIDI's default 4/4)"
    return tempos.pop(), f"metre {metre}"


def midi_rows(root: Path, out: Path, max_s: float) -> list[dict[str, str]]:
    rows = []
    for package, path in (
        (p, f) for p, folder in MIDI_SOURCES for f in sorted((root / folder).glob("*.mid"))
    ):
        bpm, why = midi_tempo(path)
        if bpm is None:
            print(f"skip {path.name}: {why}", file=sys.stderr)
            continue
        dest = out / "corpus" / "R_midi" / f"{path.stem}.flac"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            wav = dest.with_suffix(".wav")
            cmd = [
                "fluidsynth",
                "-ni",
                "-q",
                "-g",
                "0.5",
                "-F",
                str(wav),
                "-r",
                str(SR),
                str(SOUNDFONT),
                str(path),
            ]
            sh(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            y, sr = sf.read(wav, dtype="float32", always_2d=True, frames=int(max_s * SR))
            sf.write(dest, y, sr)
            wav.unlink()
        rows.append(
            _rendered(
                dest,
                out,
                bpm,
                source=f"Debian {package}: {path.name}",
                why=f"MIDI set_tempo {bpm:g} quarter notes/min, the only tempo stated; {why}",
            )
        )
    return rows


# --------------------------------------------------------------------------------------- recorded


def recorded_rows(root: Path, out: Path) -> list[dict[str, str]]:
    rows = []
    for song in sorted(p.parent for p in (root / RECORDED_FOLDER).glob("*/*/notes.mid")):
        bpm, why = midi_tempo(song / "notes.mid")
        if bpm is None:
            print(f"skip {song.name}: {why}", file=sys.stderr)
            continue
        stems = sorted(song.glob("*.ogg"))
        if not stems:
            print(f"skip {song.name}: no audio", file=sys.stderr)
            continue
        dest = (
            out
            / "corpus"
            / "R_recorded"
            / (re.sub(r"[^\w.-]", "_", f"{song.parent.name}_{song.name}") + ".flac")
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            tracks = [sf.read(stem, dtype="float32", always_2d=True) for stem in stems]
            if len({sr for _, sr in tracks}) != 1:
                sys.exit(f"{song}: the stems have different sample rates")
            mix = np.zeros((max(len(y) for y, _ in tracks), 2), np.float32)
            for y, _ in tracks:
                mix[: len(y)] += y if y.shape[1] == 2 else np.repeat(y[:, :1], 2, axis=1)
            sf.write(dest, mix / max(1.0, float(np.max(np.abs(mix)))), tracks[0][1])
        mixed = " + ".join(stem.name for stem in stems)
        rows.append(
            _rendered(
                dest,
                out,
                bpm,
                source=f"Debian fretsonfire-songs-{song.parent.name}: {song.name} ({mixed})",
                why=f"chart notes.mid set_tempo {bpm:g} quarter notes/min, the only tempo stated; {why}",
            )
        )
    return rows


# ------------------------------------------------------------------------------------------ loops


def loop_rows(root: Path, out: Path) -> list[dict[str, str]]:
    rows = []
    for name, bars, reason in LOOPS:
        src = root / "usr/share/lmms/samples/beats" / name
        y, sr = sf.read(src, dtype="float32", always_2d=True)
        bpm = 240.0 * bars / (len(y) / sr)
        reps = int(np.ceil(LOOP_SECONDS * sr / len(y)))
        dest = out / "corpus" / "R_loops" / f"{Path(name).stem}.flac"
        dest.parent.mkdir(parents=True, exist_ok=True)
        sf.write(dest, np.tile(y, (reps, 1)), sr)
        rows.append(
            _row(
                dest,
                out,
                reps * len(y) / sr,
                bpm,
                source=f"Debian {LMMS_PACKAGE}: samples/beats/{name} x{reps}",
                why=f"recorded loop of a whole number of bars: {reason}",
            )
        )
    return rows


def _rendered(dest: Path, out: Path, bpm: float, *, source: str, why: str) -> dict[str, str]:
    """The truth row of a rendered file, its duration read from the file."""
    info = sf.info(dest)
    return _row(dest, out, info.frames / info.samplerate, bpm, source=source, why=why)


def _row(dest: Path, out: Path, duration: float, bpm: float, *, source: str, why: str) -> dict[str, str]:
    return {
        "path": str(dest.relative_to(out)),
        "duration_s": f"{duration:.2f}",
        "bpm": f"{bpm:.2f}",
        "key": "",
        "sections": "",
        "notes": "",
        "source": source,
        "justification": why,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".bench" / "real")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="render at most this much of a module")
    ap.add_argument("--only", default="tracker,lmms,hydrogen,loops,midi,recorded")
    args = ap.parse_args()
    work = args.work.resolve()
    ensure_renderers()
    only = set(args.only.split(","))
    rows: list[dict[str, str]] = []
    if "tracker" in only:
        rows += tracker_rows(fetch(TRACKER_PACKAGES, work), work, args.max_seconds)
    if "lmms" in only or "loops" in only:
        root = fetch((LMMS_PACKAGE,), work)
        rows += lmms_rows(root, work) if "lmms" in only else []
        rows += loop_rows(root, work) if "loops" in only else []
    if "hydrogen" in only:
        rows += hydrogen_rows(fetch((HYDROGEN_PACKAGE,), work), work)
    if "midi" in only:
        midi = midi_rows(fetch(tuple(p for p, _ in MIDI_SOURCES), work), work, args.max_seconds)
        if not midi:
            sys.exit(f"no usable MIDI file under {[folder for _, folder in MIDI_SOURCES]}")
        rows += midi
    if "recorded" in only:
        rows += recorded_rows(fetch(RECORDED_PACKAGES, work), work)
    truth = work / "truth_real.csv"
    with truth.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["path"].split("/")[1]] = counts.get(r["path"].split("/")[1], 0) + 1
    print(f"{truth}: {len(rows)} recordings ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")


if __name__ == "__main__":
    main()
