"""Decoding: real files of every supported format, generated into ``tmp_path`` with PyAV's own
encoders (no system ffmpeg), and every bad or hostile input."""

from __future__ import annotations

import builtins
import hashlib
import io
import itertools
import os
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from mutagen.ogg import OggPage

from analysis_service.audio.decode import AudioInfo, content_hash, iter_mono_blocks, probe
from analysis_service.audio.encode import write_audio
from analysis_service.errors import (
    DecoderUnavailable,
    EmptyFile,
    FileMissing,
    FileUnreadable,
    NotAudio,
    TooLong,
    TruncatedAudio,
    UnsupportedAudio,
)
from analysis_service.settings import EngineSettings

FloatArray = npt.NDArray[np.float32]

SETTINGS = EngineSettings()
TARGET = SETTINGS.sample_rate
TONE_HZ = 1000.0
#: kind -> (file name, source rate, format name reported, codec name reported)
KINDS: dict[str, tuple[str, int, str, str]] = {
    "mp3": ("tone.mp3", 44100, "mp3", "mp3"),
    "m4a": ("tone.m4a", 44100, "m4a", "aac"),
    "aac": ("tone.aac", 44100, "aac", "aac"),
    "m4a-faststart": ("tone.m4a", 44100, "m4a", "aac"),
    "alac": ("tone.m4a", 44100, "m4a", "alac"),
    "opus": ("tone.opus", 48000, "opus", "opus"),
    "ogg": ("tone.ogg", 44100, "ogg", "vorbis"),
    "flac": ("tone.flac", 44100, "flac", "flac"),
    "wav": ("tone.wav", 44100, "wav", "pcm_s16le"),
    "rf64": ("tone.wav", 44100, "wav", "pcm_s16le"),
    "aiff": ("tone.aiff", 44100, "aiff", "pcm_s16be"),
    "wma": ("tone.wma", 44100, "wma", "wmav2"),
    "mp4-video": ("clip.mp4", 44100, "mp4", "aac"),
    "mkv-video": ("clip.mkv", 48000, "mkv", "opus"),
}


# --------------------------------------------------------------------------------------------------
# Helpers


def _tone(rate: int, seconds: float, *, channels: int = 1, freq: float = TONE_HZ) -> FloatArray:
    """A 0.5-amplitude sine, shape ``(frames, channels)``; channel ``c`` is scaled by ``1 / (c + 1)``."""
    t = np.arange(round(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def _write(path: Path, data: FloatArray, rate: int, **kwargs: Any) -> Path:
    """Write with libsndfile (WAV/FLAC variants the PyAV muxers do not make)."""
    sf.write(path, data, rate, **kwargs)
    return path


def _make(tmp_path: Path, kind: str, *, seconds: float = 4.0, channels: int = 2) -> Path:
    """A tone file of ``kind`` (a key of :data:`KINDS`), written by PyAV's encoders."""
    name, rate, _, _ = KINDS[kind]
    path = tmp_path / name
    write_audio(path, _tone(rate, seconds, channels=channels), rate, kind)
    return path


def _probe_and_decode(path: Path) -> int:
    """Probe ``path``, then decode it all; the number of samples at the target rate."""
    info = probe(path, settings=SETTINGS)
    return sum(len(block) for block in iter_mono_blocks(info, target_rate=TARGET))


def _decode(path: Path, *, settings: EngineSettings = SETTINGS, block_s: float = 10.0) -> FloatArray:
    info = probe(path, settings=settings)
    blocks = list(iter_mono_blocks(info, target_rate=TARGET, block_s=block_s))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def _peak_hz(signal: FloatArray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.argmax(spectrum) * rate / len(signal))


def _cut(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"cut-{path.name}")
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


def _set_flac_total_samples(path: Path, total: int) -> None:
    """Rewrite the 36-bit total-samples field of a FLAC file's STREAMINFO block."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC"
    assert data[4] & 0x7F == 0  # STREAMINFO comes first
    field = int.from_bytes(data[18:26], "big")
    field = (field & ~((1 << 36) - 1)) | total
    data[18:26] = field.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def _ogg_pages(path: Path) -> list[OggPage]:
    data = path.read_bytes()
    fh = io.BytesIO(data)
    pages = []
    while fh.tell() < len(data):
        pages.append(OggPage(fh))  # type: ignore[no-untyped-call]
    return pages


# --------------------------------------------------------------------------------------------------
# Formats, rates, channels


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_format_decodes_to_its_duration_and_pitch(tmp_path: Path, kind: str) -> None:
    path = _make(tmp_path, kind, seconds=4.0)
    _, rate, fmt, codec = KINDS[kind]

    info = probe(path, settings=SETTINGS)
    signal = np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET)))

    assert (info.format, info.codec, info.sample_rate, info.channels) == (fmt, codec, rate, 2)
    assert info.decoder == ("soundfile" if kind in ("wav", "rf64", "aiff") else "pyav")
    assert info.duration_s == pytest.approx(4.0, abs=0.2 if kind == "aac" else 0.1)  # ADTS: an estimate
    assert signal.dtype == np.float32
    assert signal.ndim == 1
    assert len(signal) / TARGET == pytest.approx(4.0, abs=0.1)
    assert _peak_hz(signal, TARGET) == pytest.approx(TONE_HZ, abs=2.0)
    # channels at 0.5 and 0.25: their mean peaks at 0.375 (FFmpeg's own downmix would give 0.53)
    assert np.abs(signal[TARGET : 3 * TARGET]).max() == pytest.approx(0.375, abs=0.03)


@pytest.mark.parametrize("kind", ["mp4-video", "mkv-video"])
def test_video_outlasting_its_sound_is_not_truncation(tmp_path: Path, kind: str) -> None:
    name, rate, _, _ = KINDS[kind]
    path = tmp_path / name
    write_audio(path, _tone(rate, 3.0, channels=2), rate, kind, video_extra_s=3.0)

    assert len(_decode(path)) / TARGET == pytest.approx(3.0, abs=0.1)


@pytest.mark.parametrize("kind", ["wav", "rf64", "aiff"])
def test_both_decoders_give_the_same_samples(tmp_path: Path, kind: str) -> None:
    info = probe(_make(tmp_path, kind, seconds=3.0), settings=SETTINGS)
    with_pyav = replace(info, decoder="pyav")

    by_soundfile = np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET)))
    by_pyav = np.concatenate(list(iter_mono_blocks(with_pyav, target_rate=TARGET)))

    assert info.decoder == "soundfile"
    np.testing.assert_allclose(by_soundfile, by_pyav, atol=1e-6)


@pytest.mark.parametrize("kind", ["wav", "rf64", "aiff"])
@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.9])
def test_both_decoders_agree_that_a_cut_file_is_truncated(tmp_path: Path, kind: str, fraction: float) -> None:
    path = _cut(_make(tmp_path, kind, seconds=6.0), fraction)

    verdicts = []
    for decoder in ("soundfile", "pyav"):
        try:
            info = replace(probe(path, settings=SETTINGS), decoder=decoder)
            list(iter_mono_blocks(info, target_rate=TARGET))
        except TruncatedAudio as exc:
            verdicts.append(exc.code)

    assert verdicts == ["truncated_audio", "truncated_audio"]


def test_estimated_lengths_are_not_held_against_a_file(tmp_path: Path) -> None:
    # ADTS AAC has no length in its header: estimates from the first frames' bit rate are far off
    # when a quiet start is followed by loud noise (here about 3x too long). Not truncation.
    rate = 44100
    data = 0.001 * _tone(rate, 20.0, channels=2)
    data[rate * 5 :] = np.random.default_rng(8).uniform(-0.5, 0.5, (rate * 15, 2))
    path = tmp_path / "quiet-then-loud.aac"
    write_audio(path, data, rate, "aac")

    info = probe(path, settings=SETTINGS)

    assert info.expected_frames == 0
    assert len(_decode(path)) / TARGET == pytest.approx(20.0, abs=0.1)


def test_a_tempo_survives_lossy_encoding(tmp_path: Path) -> None:
    from analysis_service.audio.engine import analyze_file
    from analysis_service.audio.synth import demo_song

    song = demo_song(bpm=124.0, tonic=9, mode="minor", seconds=20.0, sample_rate=48000)
    path = tmp_path / "song.opus"
    write_audio(path, np.stack([song, song], axis=1), 48000, "opus")

    out = analyze_file(path, settings=SETTINGS, analyses=["bpm", "key"])

    assert out.tempo is not None
    assert out.tempo.bpm == pytest.approx(124.0, abs=1.0)
    assert out.key is not None
    assert out.key.key == "A minor"
    assert out.format == "opus"


@pytest.mark.parametrize("rate", [8000, 22050, 48000, 96000])
def test_source_rates_are_resampled_to_the_target(tmp_path: Path, rate: int) -> None:
    path = _write(tmp_path / "tone.wav", _tone(rate, 3.0), rate, subtype="FLOAT")

    info = probe(path, settings=SETTINGS)
    signal = _decode(path)

    assert info.sample_rate == rate
    assert len(signal) == pytest.approx(3.0 * TARGET, abs=2)
    assert _peak_hz(signal, TARGET) == pytest.approx(TONE_HZ, abs=1.0)
    middle = signal[TARGET // 2 : -TARGET // 2]
    assert np.abs(middle).max() == pytest.approx(0.5, abs=0.01)  # no gain change through soxr


def test_matching_rate_is_passed_through_untouched(tmp_path: Path) -> None:
    data = _tone(TARGET, 2.0)
    path = _write(tmp_path / "tone.wav", data, TARGET, subtype="FLOAT")

    np.testing.assert_array_equal(_decode(path, block_s=0.3), data[:, 0])


def test_stereo_is_averaged_to_mono(tmp_path: Path) -> None:
    left = _tone(TARGET, 2.0)[:, 0]
    path = _write(tmp_path / "stereo.wav", np.stack([left, 0.5 * left], axis=1), TARGET, subtype="FLOAT")

    np.testing.assert_allclose(_decode(path), 0.75 * left, atol=1e-6)


@pytest.mark.parametrize("decoder", ["soundfile", "pyav"])
@pytest.mark.parametrize("kind", ["wav", "flac"])
def test_channels_that_cancel_in_the_average_give_the_loudest_channel(
    tmp_path: Path, decoder: str, kind: str
) -> None:
    # A real tracker render had its right channel the left one inverted: averaged, a loud piece
    # became -73 dBFS and was refused as silent.
    left = 0.5 * _tone(TARGET, 2.0)[:, 0]
    opposed = _write(tmp_path / f"opposed.{kind}", np.stack([left, -left], axis=1), TARGET, subtype="PCM_24")
    partly = _write(
        tmp_path / f"partly.{kind}", np.stack([left, -0.9 * left], axis=1), TARGET, subtype="PCM_24"
    )
    quiet = _write(
        tmp_path / f"quiet.{kind}", np.stack([1e-3 * left, 1e-3 * left], axis=1), TARGET, subtype="PCM_24"
    )

    def decode(path: Path) -> FloatArray:
        info = replace(probe(path, settings=SETTINGS), decoder=decoder)
        return np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET)))

    np.testing.assert_allclose(decode(opposed), left, atol=1e-4)
    np.testing.assert_allclose(decode(partly), 0.05 * left, atol=1e-4)  # 26 dB down: averaged
    np.testing.assert_allclose(decode(quiet), 1e-3 * left, atol=1e-6)  # quiet, not cancelled


@pytest.mark.parametrize("decoder", ["soundfile", "pyav"])
def test_once_channels_cancel_a_residue_near_the_line_keeps_the_channel(tmp_path: Path, decoder: str) -> None:
    # Opposed channels whose residue crosses the 40 dB line (as after lossy coding): -46 dB, then
    # -36 dB, then -46 dB again, each for one libsndfile chunk. Switching between the channel and
    # the residue would put level jumps of 30 dB into the features.
    rng = np.random.default_rng(1)
    left = (0.3 * rng.standard_normal(3 * 65536)).astype(np.float32)
    residue = np.repeat(np.array([0.005, 0.03, 0.005], dtype=np.float32), 65536)
    path = _write(
        tmp_path / "lossy.wav", np.stack([left, -(1 - residue) * left], axis=1), TARGET, subtype="FLOAT"
    )
    info = replace(probe(path, settings=SETTINGS), decoder=decoder)

    np.testing.assert_allclose(
        np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET))), left, atol=1e-6
    )


@pytest.mark.parametrize("decoder", ["soundfile", "pyav"])
def test_a_nan_sample_does_not_break_the_cancellation_check(tmp_path: Path, decoder: str) -> None:
    left = 0.5 * _tone(TARGET, 2.0)[:, 0]
    data = np.stack([left, -left], axis=1)
    data[100, 0] = np.nan
    path = _write(tmp_path / "nan.wav", data, TARGET, subtype="FLOAT")
    info = replace(probe(path, settings=SETTINGS), decoder=decoder)

    assert len(np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET)))) == len(left)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "DOUBLE"])
def test_integer_and_double_samples_are_scaled_to_unit_range(tmp_path: Path, subtype: str) -> None:
    data = _tone(TARGET, 1.0)
    path = _write(tmp_path / "tone.wav", data, TARGET, subtype=subtype)

    np.testing.assert_allclose(_decode(path), data[:, 0], atol=0.01)


def test_flac_of_unknown_length_decodes_to_its_end(tmp_path: Path) -> None:
    # FLAC written to a pipe has no total in STREAMINFO.
    path = _make(tmp_path, "flac", seconds=3.0)
    _set_flac_total_samples(path, 0)

    info = probe(path, settings=SETTINGS)

    assert (info.duration_s, info.expected_frames) == (0.0, 0)  # unknown, not "too long"
    assert len(_decode(path)) == pytest.approx(3.0 * TARGET, abs=2)


def test_wav_with_streaming_sizes_is_not_truncated(tmp_path: Path) -> None:
    # WAV written to a pipe: the RIFF and data sizes cannot be filled in and stay 0xFFFFFFFF.
    path = _make(tmp_path, "wav", seconds=2.0)
    data = bytearray(path.read_bytes())
    data_chunk = data.index(b"data")
    data[4:8] = data[data_chunk + 4 : data_chunk + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))

    assert len(_decode(path)) == pytest.approx(2.0 * TARGET, abs=2)


def test_ogg_vorbis_whose_last_granule_overshoots_is_not_truncated(tmp_path: Path) -> None:
    # A valid Ogg Vorbis file libsndfile refused: the last granule position promises 5,806 frames
    # more than the packets hold. Players (and FFmpeg) decode every packet; that is the file.
    path = _make(tmp_path, "ogg", seconds=6.0)
    pages = _ogg_pages(path)
    pages[-1].position += 5806
    path.write_bytes(b"".join(page.write() for page in pages))  # type: ignore[no-untyped-call]

    signal = _decode(path)

    assert len(signal) / TARGET == pytest.approx(6.0, abs=0.05)


def test_chained_ogg_decodes_every_part(tmp_path: Path) -> None:
    # Ogg files may be concatenated ("chained"); libsndfile reads only the first part.
    first = tmp_path / "first.ogg"
    second = tmp_path / "second.ogg"
    write_audio(first, _tone(44100, 3.0, channels=2), 44100, "ogg")
    write_audio(second, _tone(44100, 2.0, channels=2), 44100, "ogg")
    chained = tmp_path / "chained.ogg"
    chained.write_bytes(first.read_bytes() + second.read_bytes())

    assert len(_decode(chained)) / TARGET == pytest.approx(5.0, abs=0.05)


@pytest.mark.parametrize("kind", ["wav", "m4a"])
def test_blocks_have_a_fixed_bounded_size(tmp_path: Path, kind: str) -> None:
    path = _make(tmp_path, kind, seconds=11.0)
    size = round(2.0 * TARGET)

    blocks = list(iter_mono_blocks(probe(path, settings=SETTINGS), target_rate=TARGET, block_s=2.0))

    assert [len(b) for b in blocks[:-1]] == [size] * (len(blocks) - 1)
    assert 0 < len(blocks[-1]) <= size
    assert sum(len(b) for b in blocks) / TARGET == pytest.approx(11.0, rel=0.01)
    assert all(b.dtype == np.float32 and b.ndim == 1 and b.flags.writeable for b in blocks)
    assert not any(np.shares_memory(a, b) for a, b in itertools.pairwise(blocks))


def test_invalid_block_arguments_are_refused(tmp_path: Path) -> None:
    info = probe(_make(tmp_path, "wav", seconds=1.0), settings=SETTINGS)

    with pytest.raises(ValueError, match="positive"):
        iter_mono_blocks(info, target_rate=0)
    with pytest.raises(ValueError, match="positive"):
        iter_mono_blocks(info, target_rate=TARGET, block_s=0.0)


def test_untagged_vbr_mp3_is_decoded_to_its_end(tmp_path: Path) -> None:
    # A loud, dense start and a simple tone after it, VBR, without a Xing header: the first
    # frame's bit rate is far above the average, so an estimate from it is far too short.
    import av

    rate = 44100
    data = _tone(rate, 30.0)
    data[: rate * 2, 0] = np.random.default_rng(0).uniform(-0.5, 0.5, rate * 2)
    path = tmp_path / "vbr.mp3"
    with av.open(str(path), "w", format="mp3", options={"write_xing": "0"}) as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="mono")
        stream.codec_context.qscale = True  # a fixed quality (VBR), not a bit rate
        stream.codec_context.global_quality = 4 * 118  # LAME -V 4 (FF_QP2LAMBDA = 118)
        for start in range(0, len(data), 1152):
            frame = av.AudioFrame.from_ndarray(
                np.round(data[start : start + 1152].T * 32767).astype(np.int16), format="s16p", layout="mono"
            )
            frame.sample_rate, frame.pts = rate, start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))

    with av.open(str(path)) as container:
        sizes = {packet.size for packet in container.demux(audio=0) if packet.size}
    info = probe(path, settings=SETTINGS)
    signal = np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET)))

    assert len(sizes) > 2  # variable bit rate (a constant rate has two sizes: with and without padding)
    assert info.expected_frames == 0  # no exact count in the header
    assert len(signal) / TARGET == pytest.approx(30.0, rel=0.02)


_QUIET_CHILD = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)  # as a service logging to stderr does
from analysis_service.audio.decode import iter_mono_blocks, probe
from analysis_service.errors import NotAudio
from analysis_service.settings import EngineSettings

settings = EngineSettings()
info = probe(sys.argv[1], settings=settings)
print(sum(len(block) for block in iter_mono_blocks(info, target_rate=settings.sample_rate)))
for name in sys.argv[2:]:
    try:
        probe(name, settings=settings)
    except NotAudio:
        print("not audio")
"""


def test_decoders_write_nothing_to_stderr(tmp_path: Path) -> None:
    # Damaged MP3 frames and non-audio files make FFmpeg log errors; none may reach stderr, even
    # through Python's logging in a process that logs to stderr (the worker's JSON log stream).
    path = _make(tmp_path, "mp3", seconds=6.0)
    damaged = bytearray(path.read_bytes())
    damaged[20000:20400] = np.random.default_rng(5).integers(0, 256, 400, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(damaged))
    others = []
    for name, data in NOT_AUDIO.items():
        (tmp_path / name).write_bytes(data)
        others.append(str(tmp_path / name))

    done = subprocess.run(
        [sys.executable, "-c", _QUIET_CHILD, str(path), *others], capture_output=True, text=True, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[1:-1] == ["not audio"] * len(others)
    assert done.stderr == ""


# --------------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.mp3"

    with pytest.raises(FileMissing) as caught:
        probe(path, settings=SETTINGS)

    assert caught.value.path == str(path)
    assert caught.value.code == "file_not_found"


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(FileUnreadable, match="directory") as caught:
        probe(tmp_path, settings=SETTINGS)

    assert caught.value.path == str(tmp_path)


def test_fifo_is_unreadable_and_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.mp3"
    os.mkfifo(fifo)

    with pytest.raises(FileUnreadable, match="regular"):
        probe(fifo, settings=SETTINGS)


def test_permission_denied_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make(tmp_path, "wav", seconds=1.0)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: make the checks refuse this one file instead
        real_open = builtins.open

        def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        def refusing_av_open(url: str, *args: Any, **kwargs: Any) -> Any:
            raise PermissionError(13, "Permission denied", url)

        monkeypatch.setattr(builtins, "open", refusing_open)
        monkeypatch.setattr("analysis_service.audio.decode.av.open", refusing_av_open)

    with pytest.raises(FileUnreadable, match="permission") as caught:
        probe(path, settings=SETTINGS)

    assert caught.value.path == str(path)


@pytest.mark.parametrize("name", ["empty.wav", "empty.mp3"])
def test_zero_bytes_is_empty(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.touch()

    with pytest.raises(EmptyFile):
        probe(path, settings=SETTINGS)


NOT_AUDIO = {
    "text.mp3": b"this is a text file, not an MP3\n" * 40,
    "text.m4a": b"neither is this an M4A file\n" * 40,
    "random.mp3": np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes(),
    "random.wav": np.random.default_rng(2).integers(0, 256, 100_000, dtype=np.uint8).tobytes(),
    "random.bin": np.random.default_rng(3).integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
    "page.flac": b"<html><body>" + b"x" * 5000 + b"</body></html>",
    "image.mp3": b"\x89PNG\r\n\x1a\n" + bytes(2000),
    "subtitles.mp3": b"1\n00:00:01,000 --> 00:00:02,000\nHello\n\n2\n00:00:03,000 --> 00:00:04,000\nBye\n",
}


@pytest.mark.parametrize("name", sorted(NOT_AUDIO))
def test_non_audio_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(NOT_AUDIO[name])

    with pytest.raises(NotAudio) as caught:
        probe(path, settings=SETTINGS)

    assert caught.value.path == str(path)


def test_audio_codec_without_a_decoder(tmp_path: Path) -> None:
    path = _make(tmp_path, "wav", seconds=1.0)
    data = bytearray(path.read_bytes())
    fmt = data.index(b"fmt ")
    data[fmt + 8 : fmt + 10] = struct.pack("<H", 0x1234)  # a WAVE format tag no codec has
    path.write_bytes(bytes(data))

    with pytest.raises(DecoderUnavailable, match="no decoder"):
        probe(path, settings=SETTINGS)


def test_binary_that_looks_like_mpeg_frames_is_refused(tmp_path: Path) -> None:
    # x86-64 PLT stubs (jmp *rel32; push i; jmp rel32) parse as MPEG layer I headers.
    stubs = b"".join(
        b"\xff\x25" + struct.pack("<I", 0x14FDA - 8 * i) + b"\x68" + struct.pack("<I", i) + b"\xe9"
        + struct.pack("<i", -0x20 - 16 * i)
        for i in range(200)
    )  # fmt: skip
    path = tmp_path / "program.mp3"
    path.write_bytes(b"\x7fELF" + bytes(12340) + stubs + bytes(5000))

    with pytest.raises(NotAudio):
        probe(path, settings=SETTINGS)


# --------------------------------------------------------------------------------------------------
# Hostile inputs: other files, protocols and demuxers are never opened


def _untouched(path: Path) -> Path:
    """Set ``path``'s access time far in the past, so that any read of it moves the time."""
    os.utime(path, (1_000_000, path.stat().st_mtime))
    return path


def _was_read(path: Path) -> bool:
    return path.stat().st_atime != 1_000_000


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A real audio file outside the media folder, whose reading the file system records."""
    folder = tmp_path / "outside"
    folder.mkdir()
    path = _make(folder, "wav", seconds=2.0)
    control = folder / "control.wav"
    control.write_bytes(path.read_bytes())
    _untouched(control)
    _decode(control)
    if not _was_read(control):  # noatime mount: atime cannot witness reads here
        pytest.fail("this file system does not record access times; the test cannot observe reads")
    return _untouched(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("list.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{path}\n#EXT-X-ENDLIST\n"),
        ("list.mp3", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{path}\n#EXT-X-ENDLIST\n"),
        ("live.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\nfile:{path}\n"),
        ("list.ffconcat", "ffconcat version 1.0\nfile '{path}'\n"),
        ("list.wav", "ffconcat version 1.0\nfile '{path}'\n"),
        ("stream.sdp", "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\n"
                       "m=audio 5004 RTP/AVP 0\n"),
        ("playlist.pls", "[playlist]\nFile1={path}\nNumberOfEntries=1\n"),
        ("manifest.mpd", '<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011">'
                         "<BaseURL>{path}</BaseURL></MPD>"),
    ],
)  # fmt: skip
def test_playlists_and_scripts_are_refused_without_opening_what_they_name(
    tmp_path: Path, outside: Path, name: str, text: str
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    path = media / name
    path.write_text(text.format(path=outside))

    with pytest.raises(NotAudio) as caught:
        _probe_and_decode(path)

    assert caught.value.code == "not_audio"
    assert not _was_read(outside), f"{name} made the decoder read {outside}"


# --------------------------------------------------------------------------------------------------
# Truncated, lying and oversized files


@pytest.mark.parametrize("kind", sorted(set(KINDS) - {"m4a", "aac"}))  # ADTS carries no length at all
def test_truncated_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = _cut(_make(tmp_path, kind, seconds=6.0))

    with pytest.raises(TruncatedAudio) as caught:
        _probe_and_decode(path)

    assert caught.value.path == str(path)
    assert caught.value.code == "truncated_audio"


def test_truncated_m4a_without_its_index_fails_at_probe(tmp_path: Path) -> None:
    path = _cut(_make(tmp_path, "m4a", seconds=6.0))  # the 'moov' index is written at the end

    with pytest.raises(TruncatedAudio, match="moov"):
        probe(path, settings=SETTINGS)


def test_flac_header_promising_more_frames_than_it_holds(tmp_path: Path) -> None:
    path = _make(tmp_path, "flac", seconds=2.0)
    _set_flac_total_samples(path, 4 * 44100)
    info = probe(path, settings=SETTINGS)

    with pytest.raises(TruncatedAudio):
        list(iter_mono_blocks(info, target_rate=TARGET))


def test_sparse_rf64_declaring_150_gb_fails_at_once(tmp_path: Path) -> None:
    path = _make(tmp_path, "rf64", seconds=0.02)
    data = bytearray(path.read_bytes())
    ds64 = data.index(b"ds64")
    # ds64: RIFF size, data size, sample count (64-bit each)
    data[ds64 + 8 : ds64 + 32] = struct.pack("<QQQ", 150 << 30, 150 << 30, (150 << 30) // 4)
    path.write_bytes(bytes(data[:4096]))

    with pytest.raises(TruncatedAudio, match="header promises"):
        probe(path, settings=SETTINGS)


@pytest.mark.parametrize("streaming", [False, True], ids=["declared", "streaming-sizes"])
def test_sparse_150_gb_wav_is_too_long_from_its_size(tmp_path: Path, streaming: bool) -> None:
    # A sparse file (4 KB on disk, 150 GB long): whether the header declares the size or leaves
    # the streaming marker, PCM's length follows from the size and nothing is read.
    path = _make(tmp_path, "rf64" if not streaming else "wav", seconds=0.02)
    data = bytearray(path.read_bytes())
    if streaming:
        chunk = data.index(b"data")
        data[4:8] = data[chunk + 4 : chunk + 8] = b"\xff\xff\xff\xff"
    else:
        ds64 = data.index(b"ds64")
        data[ds64 + 8 : ds64 + 32] = struct.pack("<QQQ", 150 << 30, 150 << 30, (150 << 30) // 4)
    path.write_bytes(bytes(data[:4096]))
    os.truncate(path, 150 << 30)

    with pytest.raises(TooLong):
        probe(path, settings=SETTINGS)


def test_too_long_is_refused_from_the_header_without_decoding_it_all(tmp_path: Path) -> None:
    path = _make(tmp_path, "flac", seconds=1.0)
    _set_flac_total_samples(path, 5 * 3600 * 44100)  # the header now claims 5 hours

    with pytest.raises(TooLong, match=r"300\.0 min"):
        probe(path, settings=SETTINGS)


@pytest.mark.parametrize("header_frames", [0, 44100], ids=["no-length", "lying-length"])
def test_frames_are_counted_whatever_the_header_says(tmp_path: Path, header_frames: int) -> None:
    # A FLAC without a total (streamed), and one whose header claims 1 s: 5 s decode all the same.
    flac = _make(tmp_path, "flac", seconds=5.0)
    _set_flac_total_samples(flac, header_frames)
    settings = EngineSettings(max_duration_s=3.0)

    info = probe(flac, settings=settings)
    with pytest.raises(TooLong, match="decode"):
        list(iter_mono_blocks(info, target_rate=TARGET))


@pytest.mark.parametrize("kind", ["wav", "m4a", "opus"])
def test_too_long_against_settings(tmp_path: Path, kind: str) -> None:
    path = _make(tmp_path, kind, seconds=3.0)

    with pytest.raises(TooLong):
        probe(path, settings=EngineSettings(max_duration_s=2.0))


@pytest.mark.parametrize(
    ("rate", "channels", "settings"),
    [
        (4000, 1, SETTINGS),
        (48000, 1, EngineSettings(max_source_rate=44100)),
        (44100, 10, SETTINGS),
        (44100, 2, EngineSettings(max_channels=1)),
    ],
    ids=["rate-too-low", "rate-too-high", "ten-channels", "stereo-when-mono-only"],
)
def test_unsupported_rate_or_channels(
    tmp_path: Path, rate: int, channels: int, settings: EngineSettings
) -> None:
    path = _write(tmp_path / "odd.wav", _tone(rate, 0.5, channels=channels, freq=200.0), rate)

    with pytest.raises(UnsupportedAudio) as caught:
        probe(path, settings=settings)

    assert caught.value.code == "unsupported_audio"


@pytest.mark.parametrize("kind", ["wav", "m4a"])
def test_file_deleted_after_probe(tmp_path: Path, kind: str) -> None:
    path = _make(tmp_path, kind, seconds=1.0)
    info = probe(path, settings=SETTINGS)
    path.unlink()

    with pytest.raises(FileMissing):
        next(iter_mono_blocks(info, target_rate=TARGET))


def test_probe_result_is_plain_data(tmp_path: Path) -> None:
    info = probe(_make(tmp_path, "flac", seconds=2.0), settings=SETTINGS)

    assert isinstance(info, AudioInfo)
    assert info.expected_frames == 2 * 44100
    assert info.max_frames == int(SETTINGS.max_duration_s * 44100) + 1
    assert info.bit_rate > 0


# --------------------------------------------------------------------------------------------------
# content_hash


def test_content_hash_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    data = np.random.default_rng(4).integers(0, 256, 3_000_001, dtype=np.uint8).tobytes()
    path.write_bytes(data)

    digest = content_hash(path)

    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert content_hash(str(path), chunk_bytes=4097) == digest  # chunking does not matter
    assert content_hash(path) == digest  # stable


def test_content_hash_differs_for_different_bytes(tmp_path: Path) -> None:
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"\x00" * 10_000)
    second.write_bytes(b"\x00" * 9_999 + b"\x01")

    assert content_hash(first) != content_hash(second)


def test_content_hash_errors(tmp_path: Path) -> None:
    with pytest.raises(FileMissing):
        content_hash(tmp_path / "missing")
    with pytest.raises(FileUnreadable):
        content_hash(tmp_path)
