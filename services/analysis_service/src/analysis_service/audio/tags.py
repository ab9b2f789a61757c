"""Embedded metadata: read a file's tags with mutagen, parse DJ key notations, compare tags with
what was measured.

* :func:`read_tags` reads title, artist, album, track number, year, genre, ISRC and the BPM and
  key tags that DJ software writes, from ID3 (MP3, WAV, AIFF), MP4 atoms (M4A/ALAC), Vorbis
  comments (FLAC, Ogg Vorbis, Opus), ASF attributes (WMA) and APEv2 (WavPack, Musepack, APE).
  Tags are untrusted: a tag mutagen cannot parse, or a field that makes no sense (a BPM of
  "fast"), is simply absent; nothing here fails an analysis.
* :func:`parse_key` is a pure function over the key notations in use: ``"Am"``, ``"A minor"``,
  ``"A min"``, ``"F#m"``, ``"Gbm"``, ``"C"``, ``"Cmaj"``, Camelot ``"8A"`` and Open Key
  ``"1m"``/``"1d"``.
* :func:`compare_bpm` and :func:`compare_key` say how a tagged value relates to the measured one,
  which is the list DJs want: a tagged BPM at half or double the measured tempo, a tagged key that
  is the relative minor of the measured major, a Camelot neighbour...
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import mutagen
import mutagen.id3
import mutagen.mp4

from analysis_service.audio.key import NOTE_NAMES, camelot
from service_shared.messages import TagCheck, TrackTags

BpmRelation = Literal["match", "double", "half", "other"]
KeyRelation = Literal["match", "relative", "parallel", "fifth", "other"]

#: A measured tempo within this share of the tagged one (or of its double or half) matches it.
BPM_TOLERANCE: Final = 0.04
#: Longest text kept from a tag (characters); longer values are cut.
MAX_TEXT: Final = 500

#: Where each field lives, as lower-case keys of :func:`_flatten`'s mapping: ID3 frame ids (and
#: ``txxx:<description>``), MP4 atom names (and ``----:com.apple.itunes:<name>``), Vorbis/APE/ASF names.
_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "title": ("tit2", "©nam", "title"),
    "artist": ("tpe1", "©art", "artist", "author"),
    "album": ("talb", "©alb", "album", "wm/albumtitle"),
    "track_number": ("trck", "trkn", "tracknumber", "track", "wm/tracknumber"),
    "year": ("tdrc", "tyer", "tdor", "©day", "date", "year", "originaldate", "wm/year"),
    "genre": ("tcon", "©gen", "genre", "wm/genre"),
    "isrc": ("tsrc", "txxx:isrc", "----:com.apple.itunes:isrc", "isrc", "wm/isrc"),
    "bpm": ("tbpm", "txxx:bpm", "tmpo", "----:com.apple.itunes:bpm", "bpm", "tempo", "wm/beatsperminute"),
    "key": (
        "tkey", "txxx:initialkey", "txxx:key",
        "----:com.apple.itunes:initialkey", "----:com.apple.itunes:key",
        "initialkey", "initial key", "key", "wm/initialkey",
    ),
}  # fmt: skip

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_YEAR = re.compile(r"(?<!\d)(1[89]\d\d|20\d\d)(?!\d)")
_NUMBER = re.compile(r"^\s*(\d+(?:[.,]\d+)?)")
#: Errors mutagen (or bad data inside a tag) may raise while parsing untrusted files.
_TAG_ERRORS = (mutagen.MutagenError, ValueError, TypeError, KeyError, IndexError, EOFError, OverflowError)

_LETTER_PC = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_KEY_NAME = re.compile(
    r"^([A-G])[\s_-]*(#|♯|b|♭|sharp|flat)?[\s_-]*(m|min|minor|maj|major)?\.?$", re.IGNORECASE
)
_CAMELOT = re.compile(r"^\s*(1[0-2]|0?[1-9])\s*([ABab])\s*$")
_OPEN_KEY = re.compile(r"^\s*(1[0-2]|0?[1-9])\s*([mdMD])\s*$")


@dataclass(frozen=True)
class MusicalKey:
    """A key as a pitch class and a mode.

    Attributes
    ----------
    pitch_class : int
        Tonic, 0 (C) to 11 (B).
    mode : {"major", "minor"}
    """

    pitch_class: int
    mode: Literal["major", "minor"]

    @property
    def name(self) -> str:
        """``"A minor"``, with the service's spelling of the tonic (:data:`key.NOTE_NAMES`)."""
        return f"{NOTE_NAMES[self.pitch_class]} {self.mode}"

    @property
    def camelot(self) -> str:
        return camelot(self.pitch_class, self.mode)


# --------------------------------------------------------------------------------------------------
# Key notations


def parse_key(text: str) -> MusicalKey | None:
    """Parse a key written in any of the notations DJ software and stores use.

    Parameters
    ----------
    text : str
        ``"Am"``, ``"A minor"``, ``"A min"``, ``"a-moll"``, ``"F#m"``, ``"Gbm"``, ``"Bb"``,
        ``"C major"``, ``"Cmaj"``; Camelot ``"8A"`` (A: minor, B: major); Open Key ``"1m"`` /
        ``"1d"`` (m: minor, d: major). Sharps and flats as ``#``/``b`` or ``♯``/``♭``.

    Returns
    -------
    MusicalKey or None
        None for anything else: empty text, ``"o"`` (Open Key's "off key"), free text.

    Examples
    --------
    >>> parse_key("8A").name, parse_key("1d").name, parse_key("Gbm").name
    ('A minor', 'C major', 'F# minor')
    """
    text = text.strip()
    if match := _CAMELOT.match(text):
        number, letter = int(match.group(1)), match.group(2).upper()
        major_pc = (7 * (number - 8)) % 12  # 8B is C major; each step is a fifth up
        return MusicalKey(major_pc, "major") if letter == "B" else MusicalKey((major_pc + 9) % 12, "minor")
    if match := _OPEN_KEY.match(text):
        number, letter = int(match.group(1)), match.group(2).lower()
        return parse_key(f"{(number + 6) % 12 + 1}{'A' if letter == 'm' else 'B'}")  # 1d is 8B
    match = _KEY_NAME.match(text)
    if match is None:
        return None
    letter, accidental, quality = match.group(1).upper(), (match.group(2) or "").lower(), match.group(3) or ""
    pc = _LETTER_PC[letter] + (1 if accidental in ("#", "♯", "sharp") else -1 if accidental else 0)
    minor = quality.lower() in ("m", "min", "minor")
    return MusicalKey(pc % 12, "minor" if minor else "major")


# --------------------------------------------------------------------------------------------------
# Comparisons


def compare_bpm(tagged: float, measured: float, *, tolerance: float = BPM_TOLERANCE) -> BpmRelation:
    """How a measured tempo relates to a tagged one.

    Parameters
    ----------
    tagged, measured : float > 0
        Tempi in BPM.
    tolerance : float
        Largest relative difference that still counts as equal.

    Returns
    -------
    {"match", "double", "half", "other"}
        ``"double"``: the measured tempo is twice the tag's; ``"half"``: half of it.
    """
    ratio = measured / tagged
    for relation, factor in (("match", 1.0), ("double", 2.0), ("half", 0.5)):
        if abs(ratio / factor - 1.0) <= tolerance:
            return relation  # type: ignore[return-value]
    return "other"


def compare_key(tagged: MusicalKey, measured: MusicalKey) -> KeyRelation:
    """How a measured key relates to a tagged one.

    Returns
    -------
    {"match", "relative", "parallel", "fifth", "other"}
        ``"relative"``: same notes, other mode (A minor / C major, one Camelot code's A and B);
        ``"parallel"``: same tonic, other mode; ``"fifth"``: same mode a fifth apart (a Camelot
        neighbour, 8A / 7A or 9A); ``"other"``: anything else.
    """
    if tagged == measured:
        return "match"
    if tagged.mode != measured.mode:
        if tagged.camelot[:-1] == measured.camelot[:-1]:
            return "relative"
        return "parallel" if tagged.pitch_class == measured.pitch_class else "other"
    return "fifth" if (tagged.pitch_class - measured.pitch_class) % 12 in (5, 7) else "other"


def check_tags(tags: TrackTags | None, *, bpm: float | None, key: MusicalKey | None) -> TagCheck | None:
    """Compare a file's BPM and key tags with the measured tempo and key.

    Returns
    -------
    TagCheck or None
        None when there is nothing to compare (no tag, or nothing measured).
    """
    if tags is None:
        return None
    tagged_key = parse_key(tags.key) if tags.key else None
    bpm_relation = compare_bpm(tags.bpm, bpm) if tags.bpm and bpm else None
    key_relation = compare_key(tagged_key, key) if tagged_key and key else None
    if bpm_relation is None and key_relation is None:
        return None
    return TagCheck(
        bpm=bpm_relation,
        bpm_tagged=tags.bpm if bpm_relation else None,
        bpm_measured=bpm if bpm_relation else None,
        key=key_relation,
        key_tagged=tagged_key.name if tagged_key and key_relation else None,
        key_measured=key.name if key and key_relation else None,
    )


# --------------------------------------------------------------------------------------------------
# Reading


def read_tags(path: str | os.PathLike[str], *, codec: str = "", bit_rate: int = 0) -> TrackTags:
    """Read a file's tags with mutagen.

    Parameters
    ----------
    path : path-like
        The audio file (already probed: it exists and is audio).
    codec : str
        The codec name the decoder reported (``"mp3"``, ``"aac"``, ``"flac"``...).
    bit_rate : int
        The bit rate the decoder reported, in bit/s (0: unknown; mutagen's is used then).

    Returns
    -------
    TrackTags
        Every field found; the others are None. A file whose tags cannot be parsed gives a
        ``TrackTags`` with only the codec and bit rate.
    """
    try:
        parsed = mutagen.File(os.fspath(path))
    except (*_TAG_ERRORS, OSError):
        parsed = None
    fields: dict[str, list[str]] = {}
    if parsed is not None and parsed.tags is not None:
        try:
            fields = _flatten(parsed.tags)
        except _TAG_ERRORS:
            fields = {}
    if not bit_rate and parsed is not None:
        bit_rate = int(getattr(parsed.info, "bitrate", 0) or 0)
    first = {name: _first(fields, keys) for name, keys in _KEYS.items()}
    return TrackTags(
        title=first["title"],
        artist=first["artist"],
        album=first["album"],
        track_number=_track_number(first["track_number"]),
        year=_year(first["year"]),
        genre=first["genre"],
        isrc=_isrc(first["isrc"]),
        bpm=_bpm(first["bpm"]),
        key=first["key"],
        codec=codec or None,
        bitrate_kbps=round(bit_rate / 1000) if bit_rate > 0 else None,
    )


def _flatten(tags: Any) -> dict[str, list[str]]:
    """A tag container as ``{lower-case key: [text values]}``, whatever the tag format."""
    out: dict[str, list[str]] = {}
    untyped: Any = tags  # mutagen's containers are not annotated
    if isinstance(tags, mutagen.id3.ID3):
        frame: Any
        for frame in untyped.values():
            key = frame.FrameID.lower()
            if isinstance(frame, mutagen.id3.TXXX):
                key = f"txxx:{str(getattr(frame, 'desc', '')).lower()}"
            if isinstance(frame, mutagen.id3.TCON):
                values = list(frame.genres)
            elif isinstance(frame, mutagen.id3.TextFrame):
                values = [str(v) for v in getattr(frame, "text", [])]
            else:
                continue
            out.setdefault(key, []).extend(values)
        return out
    if isinstance(tags, mutagen.mp4.MP4Tags):
        for key, raw in untyped.items():
            out[key.lower()] = [_mp4_text(v) for v in (raw if isinstance(raw, list) else [raw])]
        return out
    for key, raw in tags.items():  # Vorbis comments, APEv2, ASF: name -> value(s)
        values = raw if isinstance(raw, list) else [raw]
        out.setdefault(str(key).lower(), []).extend(_plain_text(v) for v in values)
    return out


def _mp4_text(value: Any) -> str:
    if isinstance(value, tuple):  # trkn / disk: (number, total)
        return str(value[0])
    if isinstance(value, bytes):  # freeform ----:com.apple.iTunes:* atoms
        return value.decode("utf-8", "replace")
    return str(value)


def _plain_text(value: Any) -> str:
    value = getattr(value, "value", value)  # ASF and APE values wrap their content
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _first(fields: Mapping[str, list[str]], keys: Iterable[str]) -> str | None:
    """The first non-empty, cleaned value under any of ``keys``."""
    for key in keys:
        for value in fields.get(key, ()):
            text = _CONTROL.sub("", value).strip()
            if text:
                return text[:MAX_TEXT]
    return None


def _track_number(text: str | None) -> int | None:
    match = _NUMBER.match(text or "")
    number = int(float(match.group(1).replace(",", "."))) if match else 0
    return number if 0 < number < 10_000 else None


def _year(text: str | None) -> int | None:
    match = _YEAR.search(text or "")
    return int(match.group(1)) if match else None


def _isrc(text: str | None) -> str | None:
    code = re.sub(r"[\s-]", "", text or "").upper()
    return code if re.fullmatch(r"[A-Z]{2}[A-Z0-9]{3}\d{7}", code) else None


def _bpm(text: str | None) -> float | None:
    match = _NUMBER.match(text or "")
    if match is None:
        return None
    bpm = float(match.group(1).replace(",", "."))
    return round(bpm, 2) if math.isfinite(bpm) and 20.0 <= bpm <= 999.0 else None
