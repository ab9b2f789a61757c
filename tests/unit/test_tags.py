"""Tags: key notations, BPM/key comparisons, and tags read from real files written in tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mutagen.asf
import mutagen.flac
import mutagen.id3
import mutagen.mp4
import mutagen.oggopus
import numpy as np
import numpy.typing as npt
import pytest

from analysis_service.audio.encode import write_audio
from analysis_service.audio.engine import analyze_file
from analysis_service.audio.key import NOTE_NAMES
from analysis_service.audio.synth import demo_song
from analysis_service.audio.tags import MusicalKey, check_tags, compare_bpm, compare_key, parse_key, read_tags
from analysis_service.settings import EngineSettings
from service_shared.messages import TrackTags

# mutagen's classes are not annotated: used through Any
id3: Any = mutagen.id3
mp4: Any = mutagen.mp4
flac: Any = mutagen.flac
asf: Any = mutagen.asf
oggopus: Any = mutagen.oggopus

A_MINOR = MusicalKey(9, "minor")
C_MAJOR = MusicalKey(0, "major")


# --------------------------------------------------------------------------------------------------
# parse_key


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Am", "A minor"),
        ("A minor", "A minor"),
        ("A min", "A minor"),
        ("a minor", "A minor"),
        ("A Minor", "A minor"),
        ("F#m", "F# minor"),
        ("F# min", "F# minor"),
        ("Gbm", "F# minor"),
        ("G♭m", "F# minor"),
        ("Ebm", "Eb minor"),
        ("D#m", "Eb minor"),
        ("Bbm", "Bb minor"),
        ("Bm", "B minor"),
        ("C", "C major"),
        ("Cmaj", "C major"),
        ("C major", "C major"),
        ("Bb", "Bb major"),
        ("A♯", "Bb major"),
        ("C#", "C# major"),
        ("Db major", "C# major"),
        ("8A", "A minor"),
        ("8B", "C major"),
        ("08A", "A minor"),
        ("10A", "B minor"),
        ("10B", "D major"),
        ("12B", "E major"),
        ("1A", "Ab minor"),
        ("1m", "A minor"),
        ("1d", "C major"),
        ("2d", "G major"),
        ("12d", "F major"),
        ("4m", "F# minor"),
        ("6m", "Ab minor"),
        (" 8a ", "A minor"),
    ],
)
def test_parse_key_notations(text: str, name: str) -> None:
    key = parse_key(text)

    assert key is not None
    assert key.name == name


@pytest.mark.parametrize("text", ["", "o", "  ", "hello", "13A", "0B", "H", "Am7", "A minor blues", "128"])
def test_parse_key_refuses_what_is_not_a_key(text: str) -> None:
    assert parse_key(text) is None


@pytest.mark.parametrize("pitch_class", range(12))
@pytest.mark.parametrize("mode", ["major", "minor"])
def test_every_key_round_trips_through_each_notation(pitch_class: int, mode: str) -> None:
    key = MusicalKey(pitch_class, "minor" if mode == "minor" else "major")
    open_key = f"{(int(key.camelot[:-1]) + 4) % 12 + 1}{'m' if mode == 'minor' else 'd'}"

    assert parse_key(key.name) == key
    assert parse_key(key.camelot) == key
    assert parse_key(open_key) == key
    assert parse_key(NOTE_NAMES[pitch_class] + ("m" if mode == "minor" else "")) == key


# --------------------------------------------------------------------------------------------------
# Comparisons


@pytest.mark.parametrize(
    ("tagged", "measured", "relation"),
    [
        (128.0, 128.0, "match"),
        (128.0, 131.0, "match"),
        (128.0, 123.5, "match"),
        (64.0, 128.0, "double"),
        (87.0, 172.0, "double"),
        (174.0, 87.0, "half"),
        (128.0, 96.0, "other"),
        (120.0, 80.0, "other"),
        (128.0, 134.0, "other"),
    ],
)
def test_compare_bpm(tagged: float, measured: float, relation: str) -> None:
    assert compare_bpm(tagged, measured) == relation


@pytest.mark.parametrize(
    ("tagged", "measured", "relation"),
    [
        ("Am", "Am", "match"),
        ("Am", "C", "relative"),
        ("C", "Am", "relative"),
        ("8A", "8B", "relative"),
        ("Am", "A", "parallel"),
        ("Am", "Em", "fifth"),
        ("Am", "Dm", "fifth"),
        ("C", "G", "fifth"),
        ("8B", "7B", "fifth"),
        ("Am", "C#m", "other"),
        ("Am", "G", "other"),
        ("C", "C#", "other"),
    ],
)
def test_compare_key(tagged: str, measured: str, relation: str) -> None:
    tagged_key, measured_key = parse_key(tagged), parse_key(measured)
    assert tagged_key is not None
    assert measured_key is not None

    assert compare_key(tagged_key, measured_key) == relation


def test_check_tags_reports_each_relation() -> None:
    tags = TrackTags(bpm=64.0, key="8B")

    check = check_tags(tags, bpm=128.2, key=A_MINOR)

    assert check is not None
    assert (check.bpm, check.bpm_tagged, check.bpm_measured) == ("double", 64.0, 128.2)
    assert (check.key, check.key_tagged, check.key_measured) == ("relative", "C major", "A minor")


def test_check_tags_without_anything_to_compare() -> None:
    assert check_tags(None, bpm=120.0, key=A_MINOR) is None
    assert check_tags(TrackTags(title="x"), bpm=120.0, key=A_MINOR) is None
    assert check_tags(TrackTags(bpm=120.0, key="nonsense"), bpm=None, key=A_MINOR) is None
    only_key = check_tags(TrackTags(bpm=120.0, key="Am"), bpm=None, key=A_MINOR)
    assert only_key is not None
    assert (only_key.bpm, only_key.key) == (None, "match")


# --------------------------------------------------------------------------------------------------
# Reading from files


def _tone(rate: int = 44100, seconds: float = 1.0) -> npt.NDArray[np.float32]:
    t = np.arange(round(rate * seconds)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    return np.stack([wave, wave], axis=1)


def test_id3_tags(tmp_path: Path) -> None:
    path = tmp_path / "t.mp3"
    write_audio(path, _tone(), 44100, "mp3")
    tags = id3.ID3()
    for frame in (
        id3.TIT2(encoding=3, text="Song\x01 Title\x07"),
        id3.TPE1(encoding=3, text="Artist"),
        id3.TALB(encoding=3, text="Album"),
        id3.TRCK(encoding=3, text="3/12"),
        id3.TDRC(encoding=3, text="2019-05-01"),
        id3.TCON(encoding=3, text="(17)"),
        id3.TSRC(encoding=3, text="US-RC1-76-07839"),
        id3.TBPM(encoding=3, text="128"),
        id3.TKEY(encoding=3, text="Am"),
    ):
        tags.add(frame)
    tags.save(path)

    read = read_tags(path, codec="mp3", bit_rate=192_000)

    assert read == TrackTags(
        title="Song Title",
        artist="Artist",
        album="Album",
        track_number=3,
        year=2019,
        genre="Rock",
        isrc="USRC17607839",
        bpm=128.0,
        key="Am",
        codec="mp3",
        bitrate_kbps=192,
    )


def test_id3_txxx_initialkey(tmp_path: Path) -> None:
    path = tmp_path / "t.mp3"
    write_audio(path, _tone(), 44100, "mp3")
    tags = id3.ID3()
    tags.add(id3.TXXX(encoding=3, desc="INITIALKEY", text="11B"))
    tags.add(id3.TBPM(encoding=3, text="127.5"))
    tags.save(path)

    read = read_tags(path)

    assert (read.key, read.bpm) == ("11B", 127.5)
    assert read.bitrate_kbps == 192  # from mutagen when the decoder gave none


def test_mp4_tags(tmp_path: Path) -> None:
    path = tmp_path / "t.m4a"
    write_audio(path, _tone(), 44100, "m4a")
    m4a = mp4.MP4(path)
    assert m4a.tags is not None or m4a.add_tags() is None
    m4a["©nam"] = ["Title"]
    m4a["©ART"] = ["Artist"]
    m4a["trkn"] = [(7, 10)]
    m4a["©day"] = ["1999"]
    m4a["tmpo"] = [174]
    m4a["----:com.apple.iTunes:initialkey"] = [mp4.MP4FreeForm(b"8A")]
    m4a["----:com.apple.iTunes:ISRC"] = [mp4.MP4FreeForm(b"GBAYE0000351")]
    m4a.save()

    read = read_tags(path, codec="aac")

    assert (read.title, read.artist, read.track_number, read.year) == ("Title", "Artist", 7, 1999)
    assert (read.bpm, read.key, read.isrc, read.codec) == (174.0, "8A", "GBAYE0000351", "aac")


def test_vorbis_comment_tags(tmp_path: Path) -> None:
    flac_path = tmp_path / "t.flac"
    write_audio(flac_path, _tone(), 44100, "flac")
    flac_file = flac.FLAC(flac_path)
    flac_file["TITLE"] = "Title"
    flac_file["BPM"] = "140,0"
    flac_file["INITIALKEY"] = "Gbm"
    flac_file["TRACKNUMBER"] = "05"
    flac_file["DATE"] = "2021"
    flac_file["GENRE"] = "Techno"
    flac_file.save()
    opus_path = tmp_path / "t.opus"
    write_audio(opus_path, _tone(48000), 48000, "opus")
    opus = oggopus.OggOpus(opus_path)
    opus["initialkey"] = "1m"
    opus["bpm"] = "fast"
    opus.save()

    flac_tags, opus_tags = read_tags(flac_path), read_tags(opus_path)

    assert (flac_tags.title, flac_tags.bpm, flac_tags.key, flac_tags.track_number) == (
        "Title",
        140.0,
        "Gbm",
        5,
    )
    assert (flac_tags.year, flac_tags.genre) == (2021, "Techno")
    assert (opus_tags.key, opus_tags.bpm) == ("1m", None)  # "fast" is not a tempo


def test_asf_tags(tmp_path: Path) -> None:
    path = tmp_path / "t.wma"
    write_audio(path, _tone(), 44100, "wma")
    wma = asf.ASF(path)
    wma["Title"] = ["Title"]
    wma["WM/BeatsPerMinute"] = ["95"]
    wma["WM/InitialKey"] = ["Dm"]
    wma.save()

    read = read_tags(path)

    assert (read.title, read.bpm, read.key) == ("Title", 95.0, "Dm")


def test_broken_tag_is_absent_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.mp3"
    write_audio(path, _tone(seconds=3.0), 44100, "mp3")
    # an ID3v2.4 header whose frames are garbage: a size, then bytes that are no frames
    garbage = np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8).tobytes()
    path.write_bytes(b"ID3\x04\x00\x00\x00\x00\x02\x2c" + garbage + path.read_bytes())

    read = read_tags(path, codec="mp3")

    assert read.codec == "mp3"
    assert (read.title, read.bpm, read.key) == (None, None, None)


def test_file_without_tags(tmp_path: Path) -> None:
    path = tmp_path / "t.wav"
    write_audio(path, _tone(), 44100, "wav")

    assert read_tags(path, codec="pcm_s16le", bit_rate=1_411_200) == TrackTags(
        codec="pcm_s16le", bitrate_kbps=1411
    )


# --------------------------------------------------------------------------------------------------
# Through the engine


def test_engine_returns_tags_and_their_check(tmp_path: Path) -> None:
    song = demo_song(bpm=124.0, tonic=9, mode="minor", seconds=20.0, sample_rate=44100)
    path = tmp_path / "song.mp3"
    write_audio(path, np.stack([song, song], axis=1), 44100, "mp3")
    tags = id3.ID3()
    tags.add(id3.TBPM(encoding=3, text="62"))
    tags.add(id3.TKEY(encoding=3, text="C"))
    tags.add(id3.TIT2(encoding=3, text="Demo"))
    tags.save(path)

    out = analyze_file(path, settings=EngineSettings(), analyses=["bpm", "key"])

    assert out.tags is not None
    assert (out.tags.title, out.tags.bpm, out.tags.key, out.tags.codec) == ("Demo", 62.0, "C", "mp3")
    assert out.tag_check is not None
    assert (out.tag_check.bpm, out.tag_check.key) == ("double", "relative")
    assert out.tag_check.key_measured == "A minor"
    assert "tags" in out.timings_s
