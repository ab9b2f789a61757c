"""Decoding: real files of every supported format, generated into ``tmp_path``, and every bad input.

Tests that need ffmpeg skip when it is not installed, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf

from analysis_service.audio.decode import AudioInfo, content_hash, iter_mono_blocks, probe
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


# --------------------------------------------------------------------------------------------------
# Helpers


def _tone(rate: int, seconds: float, *, channels: int = 1, freq: float = TONE_HZ) -> FloatArray:
    """A 0.5-amplitude sine, shape ``(frames, channels)``; channel ``c`` is scaled by ``1 / (c + 1)``."""
    t = np.arange(round(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([wave / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def _write(path: Path, data: FloatArray, rate: int, **kwargs: Any) -> Path:
    """Write with libsndfile, in chunks (one large Vorbis write segfaults libsndfile 1.2)."""
    with sf.SoundFile(path, "w", rate, data.shape[1], **kwargs) as f:
        for start in range(0, len(data), 1 << 14):
            f.write(data[start : start + (1 << 14)])
    return path


def _ffmpeg() -> str:
    """ffmpeg's path; skip the test when ffmpeg or ffprobe is missing (fail under CI)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg and shutil.which("ffprobe"):
        return ffmpeg
    if os.environ.get("CI"):
        pytest.fail("ffmpeg and ffprobe are required under CI", pytrace=False)
    pytest.skip("ffmpeg/ffprobe are not installed")


def _encode(source: Path, target: Path, *args: str) -> Path:
    subprocess.run([_ffmpeg(), "-y", "-v", "error", "-i", str(source), *args, str(target)], check=True)
    return target


def _make(tmp_path: Path, fmt: str, *, rate: int = 44100, seconds: float = 4.0, channels: int = 2) -> Path:
    """A tone file of ``fmt`` (``wav``, ``flac``, ``ogg``, ``mp3``, ``m4a``, ``m4a-faststart``)."""
    data = _tone(rate, seconds, channels=channels)
    if fmt in ("wav", "flac"):
        return _write(tmp_path / f"tone.{fmt}", data, rate)
    if fmt == "ogg":
        return _write(tmp_path / "tone.ogg", data, rate, format="OGG", subtype="VORBIS")
    if fmt == "mp3":  # libsndfile writes a Xing header: an exact frame count
        return _write(tmp_path / "tone.mp3", data, rate, format="MP3", subtype="MPEG_LAYER_III")
    source = _write(tmp_path / "source.wav", data, rate, subtype="FLOAT")
    extra = ["-movflags", "+faststart"] if fmt == "m4a-faststart" else []
    return _encode(source, tmp_path / "tone.m4a", "-c:a", "aac", "-b:a", "128k", *extra)


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


def _without_ffmpeg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


# --------------------------------------------------------------------------------------------------
# Formats, rates, channels


@pytest.mark.parametrize(
    ("fmt", "decoder"),
    [
        ("wav", "soundfile"),
        ("flac", "soundfile"),
        ("ogg", "soundfile"),
        ("mp3", "soundfile"),
        ("m4a", "ffmpeg"),
    ],
)
def test_each_format_decodes_to_its_duration_and_pitch(tmp_path: Path, fmt: str, decoder: str) -> None:
    path = _make(tmp_path, fmt, seconds=4.0)

    info = probe(path, settings=SETTINGS)
    signal = np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET)))

    assert info == AudioInfo(str(path), fmt, 44100, 2, info.duration_s, decoder)
    assert info.duration_s == pytest.approx(4.0, rel=0.02)
    assert signal.dtype == np.float32
    assert signal.ndim == 1
    assert len(signal) / TARGET == pytest.approx(4.0, rel=0.02)
    assert _peak_hz(signal, TARGET) == pytest.approx(TONE_HZ, abs=2.0)


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
    opposed = _write(tmp_path / "opposed.wav", np.stack([left, -left], axis=1), TARGET, subtype="FLOAT")

    np.testing.assert_allclose(_decode(path), 0.75 * left, atol=1e-6)
    assert np.abs(_decode(opposed)).max() < 1e-6


def test_stereo_is_averaged_the_same_way_by_ffmpeg(tmp_path: Path) -> None:
    source = _write(tmp_path / "stereo.wav", _tone(44100, 2.0, channels=2), 44100, subtype="FLOAT")
    alac = _encode(source, tmp_path / "stereo.m4a", "-c:a", "alac")

    signal = _decode(alac)

    assert probe(alac, settings=SETTINGS).decoder == "ffmpeg"
    # channels at 0.5 and 0.25: their mean is 0.375 (ffmpeg's own ``-ac 1`` would give 0.53)
    assert np.abs(signal[1000:-1000]).max() == pytest.approx(0.375, abs=0.005)


def test_flac_of_unknown_length_decodes_to_its_end(tmp_path: Path) -> None:
    # FLAC written to a pipe has no total in STREAMINFO; libsndfile then says 2**63 - 1 frames and
    # python-soundfile's read-then-seek fails on the last read.
    path = _make(tmp_path, "flac", seconds=3.0)
    _set_flac_total_samples(path, 0)

    info = probe(path, settings=SETTINGS)

    assert info.duration_s == 0.0  # unknown, not "too long"
    assert len(_decode(path)) == pytest.approx(3.0 * TARGET, abs=2)


def test_wav_with_streaming_sizes_is_not_truncated(tmp_path: Path) -> None:
    # WAV written to a pipe: the RIFF and data sizes cannot be filled in and stay 0xFFFFFFFF.
    path = _make(tmp_path, "wav", seconds=2.0)
    data = bytearray(path.read_bytes())
    data_chunk = data.index(b"data")
    data[4:8] = data[data_chunk + 4 : data_chunk + 8] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))

    assert len(_decode(path)) == pytest.approx(2.0 * TARGET, abs=2)


@pytest.mark.parametrize("fmt", ["wav", "m4a"])
def test_blocks_have_a_fixed_bounded_size(tmp_path: Path, fmt: str) -> None:
    path = _make(tmp_path, fmt, seconds=11.0)
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


def test_closing_the_stream_early_stops_ffmpeg(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    path = _make(tmp_path, "m4a", seconds=20.0)
    blocks = iter_mono_blocks(probe(path, settings=SETTINGS), target_rate=TARGET, block_s=1.0)

    next(blocks)
    assert any("ffmpeg" in child.name() for child in psutil.Process().children())
    blocks.close()  # type: ignore[attr-defined]

    assert not any("ffmpeg" in child.name() for child in psutil.Process().children())


def test_untagged_vbr_mp3_is_decoded_to_its_end(tmp_path: Path) -> None:
    # A loud, dense start and a simple tone after it: the first frame's bit rate is far above the
    # average, so libsndfile's frame-count estimate (and where it stops decoding) is far too short.
    rate = 44100
    data = _tone(rate, 30.0)
    data[: rate * 2, 0] = np.random.default_rng(0).uniform(-0.5, 0.5, rate * 2)
    source = _write(tmp_path / "source.wav", data, rate, subtype="FLOAT")
    path = _encode(source, tmp_path / "vbr.mp3", "-c:a", "libmp3lame", "-q:a", "4", "-write_xing", "0")

    info = probe(path, settings=SETTINGS)
    signal = np.concatenate(list(iter_mono_blocks(info, target_rate=TARGET)))

    assert sf.info(str(path)).frames < 0.8 * len(data)  # the libsndfile quirk this works around
    assert (info.format, info.decoder) == ("mp3", "ffmpeg")
    assert len(signal) / TARGET == pytest.approx(30.0, rel=0.02)


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


def test_permission_denied_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make(tmp_path, "wav", seconds=1.0)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: make open() refuse this one file instead
        real_open = builtins.open

        def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)

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
}


@pytest.mark.parametrize("ffmpeg", [True, False], ids=["with-ffmpeg", "without-ffmpeg"])
@pytest.mark.parametrize("name", sorted(NOT_AUDIO))
def test_non_audio_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, ffmpeg: bool
) -> None:
    if ffmpeg:
        _ffmpeg()
    else:
        _without_ffmpeg(monkeypatch, tmp_path)
    path = tmp_path / name
    path.write_bytes(NOT_AUDIO[name])

    with pytest.raises(NotAudio) as caught:
        probe(path, settings=SETTINGS)

    assert caught.value.path == str(path)


def test_binary_that_libsndfile_takes_for_mp3_is_refused(tmp_path: Path) -> None:
    # x86-64 PLT stubs (jmp *rel32; push i; jmp rel32) parse as MPEG layer I headers: libsndfile opens
    # any ELF executable as an MP3 with a frame count estimated from the file size, then decodes
    # next to nothing.
    stubs = b"".join(
        b"\xff\x25" + struct.pack("<I", 0x14FDA - 8 * i) + b"\x68" + struct.pack("<I", i) + b"\xe9"
        + struct.pack("<i", -0x20 - 16 * i)
        for i in range(200)
    )  # fmt: skip
    path = tmp_path / "program.mp3"
    path.write_bytes(b"\x7fELF" + bytes(12340) + stubs + bytes(5000))

    with pytest.raises(NotAudio):
        probe(path, settings=SETTINGS)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3", "m4a-faststart"])
def test_truncated_file_fails_while_decoding(tmp_path: Path, fmt: str) -> None:
    path = _cut(_make(tmp_path, fmt, seconds=6.0))
    info = probe(path, settings=SETTINGS)

    with pytest.raises(TruncatedAudio) as caught:
        list(iter_mono_blocks(info, target_rate=TARGET))

    assert caught.value.path == str(path)


def test_truncated_m4a_without_its_index_fails_at_probe(tmp_path: Path) -> None:
    path = _cut(_make(tmp_path, "m4a", seconds=6.0))  # ffmpeg writes the 'moov' index at the end

    with pytest.raises(TruncatedAudio, match="moov"):
        probe(path, settings=SETTINGS)


def test_flac_header_promising_more_frames_than_it_holds(tmp_path: Path) -> None:
    path = _make(tmp_path, "flac", seconds=2.0)
    _set_flac_total_samples(path, 4 * 44100)
    info = probe(path, settings=SETTINGS)

    with pytest.raises(TruncatedAudio):
        list(iter_mono_blocks(info, target_rate=TARGET))


def test_too_long_is_refused_from_the_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _make(tmp_path, "flac", seconds=1.0)
    _set_flac_total_samples(path, 5 * 3600 * 44100)  # the header now claims 5 hours

    def no_decoding(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("probe() decoded audio")

    monkeypatch.setattr(sf.SoundFile, "buffer_read_into", no_decoding)
    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)

    with pytest.raises(TooLong, match=r"300\.0 min"):
        probe(path, settings=SETTINGS)


@pytest.mark.parametrize("fmt", ["wav", "m4a"])
def test_too_long_against_settings(tmp_path: Path, fmt: str) -> None:
    path = _make(tmp_path, fmt, seconds=3.0)

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


def test_ffmpeg_only_format_without_ffmpeg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_ffmpeg(monkeypatch, tmp_path)
    path = tmp_path / "song.m4a"
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(4000))

    with pytest.raises(DecoderUnavailable, match=r"m4a.*install ffmpeg") as caught:
        probe(path, settings=SETTINGS)

    assert caught.value.path == str(path)


def test_ffmpeg_removed_after_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = probe(_make(tmp_path, "m4a", seconds=1.0), settings=SETTINGS)
    _without_ffmpeg(monkeypatch, tmp_path)

    with pytest.raises(DecoderUnavailable, match="ffmpeg"):
        next(iter_mono_blocks(info, target_rate=TARGET))


@pytest.mark.parametrize("fmt", ["wav", "m4a"])
def test_file_deleted_after_probe(tmp_path: Path, fmt: str) -> None:
    path = _make(tmp_path, fmt, seconds=1.0)
    info = probe(path, settings=SETTINGS)
    path.unlink()

    with pytest.raises(FileMissing):
        next(iter_mono_blocks(info, target_rate=TARGET))


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
