"""Audio decoding: validate a file's header, then stream it as mono float32 blocks at the analysis rate.

Two decoders are used, in this order:

* **libsndfile** (through :mod:`soundfile`) reads WAV, FLAC, Ogg (Vorbis, Opus), MP3 (libsndfile 1.1
  or later), AIFF, CAF and a few rarer formats, in process and fast;
* **ffmpeg** (a subprocess, probed with ``ffprobe``) reads everything else (M4A/AAC/ALAC, WMA, WebM,
  Matroska, APE...). It pipes raw interleaved 32-bit float samples, already at the target rate.

Nothing here holds a whole file in memory: :func:`iter_mono_blocks` reads a bounded number of frames
at a time, averages the channels, resamples with a streaming ``soxr`` resampler (libsndfile path)
and hands the samples on in blocks of a fixed size. Memory is flat in the file's duration.

Every failure is reported as one of the :mod:`analysis_service.errors` types, naming what is wrong
(missing, unreadable, empty, not audio, truncated, unsupported, too long, no decoder).

Quirks of libsndfile handled here:

* its MPEG decoder accepts some non-audio files (ELF executables: their PLT stubs look like MPEG
  layer I headers) and reports a frame count estimated from the file size; :func:`probe` decodes
  the first second or so and refuses files that do not deliver it;
* for an MP3 without a Xing/Info/VBRI header the frame count is estimated from the first frame's
  bit rate and decoding *stops* there, which silently cuts variable-bit-rate files short; such
  files are decoded with ffmpeg when it is installed;
* a WAV file cut short is opened without complaint, its frame count clamped to the data present;
  the RIFF header is parsed here to notice the difference;
* a truncated Ogg file reports the frame count of its last page, so only the missing
  end-of-stream flag reveals the truncation;
* a FLAC file without a total sample count (written to a pipe) reports ``2**63 - 1`` frames:
  its duration is taken as unknown (0.0).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Literal

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

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

#: Source frames read from libsndfile per call (bounded memory, few Python round trips).
READ_FRAMES: Final = 1 << 16
#: Frames (at the target rate) read from the ffmpeg pipe per call.
PIPE_FRAMES: Final = 1 << 16
#: Frames :func:`probe` decodes from an MP3 to check that it really is one (about 1.5 s).
MP3_CHECK_FRAMES: Final = 1 << 16
#: ffprobe's lowest confidence in a format guess that is taken seriously (AVPROBE_SCORE_RETRY);
#: random bytes named ``.mp3`` come back as MP3 with a score of 1.
MIN_PROBE_SCORE: Final = 25
#: Seconds ``ffprobe`` may take to read a header.
FFPROBE_TIMEOUT_S: Final = 30.0

_HEAD_BYTES = 4096
_MAX_ID3_TAGS = 4
_MAX_RIFF_CHUNKS = 64
#: A WAV data chunk may fall short of its declared size by this much before it counts as truncated.
_WAV_SLACK_BYTES = 4096
#: Largest possible Ogg page (27 + 255 + 255 * 255 bytes), rounded up.
_OGG_TAIL_BYTES = 1 << 16
#: Decoded frames may fall short of an Ogg granule position or an MP3 Xing count by this much.
_FRAME_SLACK = {"ogg": 4096, "opus": 4096, "mp3": 4 * 1152}
_STREAMING_SIZES = (0, 0xFFFFFFFF)
#: libsndfile frame counts from here up (``SF_COUNT_MAX`` is 2**63 - 1) mean "unknown".
_UNKNOWN_FRAMES = 1 << 62
_SF_FORMAT_NAMES = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "W64": "w64", "MP3": "mp3", "OGG": "ogg"}
_SF_HAS_MP3: Final = "MP3" in sf.available_formats()
_RAW_READ: Final = hasattr(sf, "_ffi") and hasattr(sf, "_snd")
#: ffmpeg containers whose header duration is exact, so that a short decode means truncation.
_FFMPEG_EXACT_DURATION = frozenset(
    {"m4a", "mp4", "m4b", "mov", "3gp", "3g2", "mj2", "matroska", "mka", "webm", "asf", "wma"}
)
#: The only ffmpeg demuxers (audio containers) and protocol (local files) ffprobe and ffmpeg may use:
#: no playlist (hls), concat, image or device demuxer, nor a network protocol, can make them read
#: files outside the media root or anything remote.
_FFMPEG_DEMUXERS: Final = (
    "mov,mp4,m4a,3gp,3g2,mj2,asf,matroska,webm,amr,amrnb,amrwb,ape,wv,tta,mpc,mpc8,aac,ac3,eac3,"
    "dsf,iff,rm,caf,mp3,ogg,flac,wav,w64,aiff,au,dts,truehd,mlp,xwma,voc,shn,tak,loas"
)
_FFMPEG_INPUT_OPTIONS: Final = ("-protocol_whitelist", "file", "-format_whitelist", _FFMPEG_DEMUXERS)
#: File extensions whose ffmpeg demuxer has another name.
_FFMPEG_ALIASES = {"wma": "asf", "mka": "matroska", "opus": "ogg", "oga": "ogg"}
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"fLaC", "flac"),
    (b"OggS", "ogg"),
    (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "wma"),
    (b"\x1a\x45\xdf\xa3", "matroska"),
    (b"#!AMR", "amr"),
    (b"MAC ", "ape"),
    (b"wvpk", "wv"),
    (b"TTA1", "tta"),
    (b"MPCK", "mpc"),
    (b"MP+", "mpc"),
    (b"ADIF", "aac"),
    (b"\x0b\x77", "ac3"),
    (b"DSD ", "dsf"),
    (b"FRM8", "dff"),
    (b".RMF", "rm"),
    (b"caff", "caf"),
)


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says about its audio.

    Attributes
    ----------
    path : str
        The file.
    format : str
        Lower-case container or codec name: ``"wav"``, ``"flac"``, ``"ogg"``, ``"mp3"``, ``"m4a"``...
    sample_rate : int
        Source sample rate in Hz.
    channels : int
        Source channel count.
    duration_s : float
        Duration in seconds according to the header (an estimate for some MP3 and AAC files;
        0.0 when the container does not say).
    decoder : str
        ``"soundfile"`` or ``"ffmpeg"``: which decoder :func:`iter_mono_blocks` will use.
    """

    path: str
    format: str
    sample_rate: int
    channels: int
    duration_s: float
    decoder: str


# --------------------------------------------------------------------------------------------------
# Public API


def probe(path: str | os.PathLike[str], *, settings: EngineSettings) -> AudioInfo:
    """Read and validate a file's header, without decoding the audio (beyond a first check for MP3).

    Parameters
    ----------
    path : str or path-like
        The audio file.
    settings : EngineSettings
        Accepted source sample rates (Hz), channel count and duration (s).

    Returns
    -------
    AudioInfo
        Format, source rate (Hz), channels, header duration (s) and the decoder to use.

    Raises
    ------
    FileMissing
        ``path`` does not exist.
    FileUnreadable
        ``path`` is a directory or another non-regular file, or cannot be read.
    EmptyFile
        The file has zero bytes.
    NotAudio
        No decoder recognises the content as audio.
    TruncatedAudio
        The header itself shows the file is cut short (an MP4 without its index).
    DecoderUnavailable
        The file looks like audio that only ffmpeg decodes, and ffmpeg is not installed.
    UnsupportedAudio
        The sample rate or channel count is outside ``settings``.
    TooLong
        The header duration exceeds ``settings.max_duration_s``.
    """
    name = os.fspath(path)
    _check_file(name)
    head = _audio_head(name)
    info = _probe_soundfile(name, head=head)
    if info is None:
        info = _probe_ffmpeg(name, head=head)
    _check_limits(info, settings=settings)
    return info


def iter_mono_blocks(info: AudioInfo, *, target_rate: int, block_s: float = 10.0) -> Iterator[FloatArray]:
    """Decode a probed file incrementally into mono float32 blocks at ``target_rate``.

    Channels are averaged; the result is resampled with a streaming ``soxr`` resampler (``"HQ"``,
    skipped when the rates match), or by ffmpeg itself for files ffmpeg decodes. At most
    ``READ_FRAMES`` source frames (or ``PIPE_FRAMES`` output frames) and one output block are in
    memory at any time, whatever the file's duration.

    Parameters
    ----------
    info : AudioInfo
        What :func:`probe` returned for the file.
    target_rate : int > 0
        Output sample rate in Hz.
    block_s : float > 0
        Duration of each block in seconds.

    Yields
    ------
    block : np.ndarray [shape=(n,), dtype=float32]
        Consecutive, fresh (writable, unshared) blocks of exactly ``round(block_s * target_rate)``
        samples, except the last, which may be shorter. Nothing is yielded for a file without
        samples.

    Raises
    ------
    TruncatedAudio
        The file holds fewer frames than its header promises, or decoding fails part way.
    NotAudio
        The decoder cannot read the file at all.
    FileMissing, FileUnreadable
        The file disappeared or became unreadable since :func:`probe`.
    DecoderUnavailable
        ffmpeg was needed and is no longer installed.
    ValueError
        ``target_rate`` or ``block_s`` is not positive.
    """
    if target_rate <= 0 or not block_s > 0:
        raise ValueError(f"target_rate and block_s must be positive, got {target_rate} and {block_s}")
    size = max(1, round(block_s * target_rate))
    if info.decoder == "ffmpeg":
        source = _ffmpeg_blocks(info, target_rate=target_rate)
    else:
        source = _resampled(_soundfile_blocks(info), in_rate=info.sample_rate, out_rate=target_rate)
    return _rebuffer(source, size=size)


def content_hash(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Hash a file's bytes, reading them in chunks.

    Parameters
    ----------
    path : str or path-like
        The file.
    chunk_bytes : int > 0
        Bytes read per call.

    Returns
    -------
    str
        ``"sha256:"`` followed by 64 lower-case hex digits.

    Raises
    ------
    FileMissing
        ``path`` does not exist.
    FileUnreadable
        ``path`` is a directory or cannot be read.
    """
    name = os.fspath(path)
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(max(1, chunk_bytes)))
    try:
        with open(name, "rb", buffering=0) as fh:
            while n := fh.readinto(buffer):
                digest.update(buffer[:n])
    except OSError as exc:
        raise _os_error(name, exc) from exc
    return f"sha256:{digest.hexdigest()}"


# --------------------------------------------------------------------------------------------------
# File checks and header sniffing


def _check_file(path: str) -> None:
    """Raise unless ``path`` is a non-empty regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    if stat.S_ISDIR(st.st_mode):
        raise FileUnreadable("is a directory, not an audio file", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise FileUnreadable("is not a regular file", path=path)
    if st.st_size == 0:
        raise EmptyFile("file is empty (0 bytes)", path=path)


def _os_error(path: str, exc: OSError) -> FileMissing | FileUnreadable:
    """Translate an ``OSError`` met while opening ``path``."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return FileMissing("no such file", path=path)
    if isinstance(exc, IsADirectoryError):
        return FileUnreadable("is a directory, not an audio file", path=path)
    if isinstance(exc, PermissionError):
        return FileUnreadable("permission denied", path=path)
    return FileUnreadable(f"cannot read the file: {exc.strerror or exc}", path=path)


def _audio_head(path: str) -> bytes:
    """First bytes of the file after any ID3v2 tags (where an MP3's first frame starts)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
            offset = 0
            for _ in range(_MAX_ID3_TAGS):
                tag = _id3v2_size(head)
                if not tag:
                    break
                offset += tag
                fh.seek(offset)
                head = fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise _os_error(path, exc) from exc
    return head


def _id3v2_size(head: bytes) -> int:
    """Size in bytes of the ID3v2 tag ``head`` starts with (0: none)."""
    if len(head) < 10 or head[:3] != b"ID3" or any(b >= 0x80 for b in head[6:10]):
        return 0
    size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
    footer = 10 if head[5] & 0x10 else 0
    return 10 + size + footer


def _mpeg_sync(head: bytes) -> int:
    """Offset of the first plausible MPEG audio frame header in ``head`` (-1: none)."""
    i = head.find(b"\xff")
    while 0 <= i < len(head) - 2:
        b1, b2 = head[i + 1], head[i + 2]
        # sync bits; MPEG version not "reserved"; layer not "reserved"; bit rate and sample rate valid
        if b1 & 0xE0 == 0xE0 and b1 & 0x18 != 0x08 and b1 & 0x06 and b2 >> 4 != 0xF and b2 & 0x0C != 0x0C:
            return i
        i = head.find(b"\xff", i + 1)
    return -1


def _has_vbr_tag(head: bytes) -> bool:
    """Whether the first MPEG frame carries a Xing, Info or VBRI header (an exact frame count)."""
    start = _mpeg_sync(head)
    window = head[start + 4 : start + 4 + 48] if start >= 0 else b""
    return any(tag in window for tag in (b"Xing", b"Info", b"VBRI"))


def _sniff(head: bytes) -> str | None:
    """Name the audio container ``head`` starts with, from its magic bytes (None: not recognised)."""
    if head[4:8] == b"ftyp":
        return "m4a"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "aac"  # ADTS
    return "mp3" if _mpeg_sync(head[:4]) == 0 else None


def _check_limits(info: AudioInfo, *, settings: EngineSettings) -> None:
    """Raise if the rate, channel count or duration is outside what ``settings`` accept."""
    lo, hi = settings.min_source_rate, settings.max_source_rate
    if not lo <= info.sample_rate <= hi:
        raise UnsupportedAudio(
            f"sample rate {info.sample_rate} Hz is outside the accepted range {lo}-{hi} Hz", path=info.path
        )
    if not 1 <= info.channels <= settings.max_channels:
        raise UnsupportedAudio(
            f"{info.channels} channels; between 1 and {settings.max_channels} are accepted", path=info.path
        )
    if info.duration_s > settings.max_duration_s:
        raise TooLong(
            f"audio is {info.duration_s / 60:.1f} min long; "
            f"the limit is {settings.max_duration_s / 60:.1f} min",
            path=info.path,
        )


# --------------------------------------------------------------------------------------------------
# libsndfile


def _probe_soundfile(path: str, *, head: bytes) -> AudioInfo | None:
    """Probe with libsndfile; None when it does not recognise the file."""
    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError):
        return None  # not a format libsndfile reads: ffmpeg's turn
    with f:
        if f.format == "MP3":
            _check_mp3_decodes(f, path=path)
        rate, channels, frames = int(f.samplerate), int(f.channels), _known_frames(f)
        fmt = _sf_format_name(f.format, f.subtype)
    info = AudioInfo(path, fmt, rate, channels, frames / rate if rate > 0 else 0.0, "soundfile")
    if fmt == "mp3" and not _has_vbr_tag(head) and _ffmpeg_tools() is not None:
        # No exact frame count: libsndfile would stop decoding at its estimate from the first frame.
        try:
            return _probe_ffmpeg(path, head=head)
        except NotAudio:
            return info
    return info


def _known_frames(f: Any) -> int:
    """libsndfile's frame count, or 0 when it does not know it.

    A FLAC file written to a pipe has no total in its STREAMINFO; libsndfile then reports
    ``SF_COUNT_MAX`` frames.
    """
    frames = int(f.frames)
    return frames if 0 < frames < _UNKNOWN_FRAMES else 0


def _sf_format_name(major: str, subtype: str) -> str:
    if major == "OGG" and subtype == "OPUS":
        return "opus"
    return _SF_FORMAT_NAMES.get(major, major.lower())


def _check_mp3_decodes(f: Any, *, path: str) -> None:
    """Raise ``NotAudio`` unless the first second or so of what libsndfile calls MP3 decodes."""
    frames, channels = int(f.frames), int(f.channels)
    if frames <= 0 or channels <= 0:
        raise NotAudio("no MPEG audio frames found", path=path)
    want = min(frames, MP3_CHECK_FRAMES)
    buffer = np.empty((want, channels), dtype=np.float32)
    try:
        got = _read_into(f, buffer)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise NotAudio(f"not decodable as MPEG audio ({exc})", path=path) from exc
    if got < want // 2:
        raise NotAudio(
            f"not MPEG audio: only {got} of the first {want} frames decode (stray bytes?)", path=path
        )


def _open_soundfile(path: str) -> Any:
    try:
        return sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError) as exc:
        _check_file(path)  # gone or unreadable since probe()?
        raise NotAudio(f"libsndfile cannot open it ({exc})", path=path) from exc


def _soundfile_blocks(info: AudioInfo) -> Iterator[FloatArray]:
    """Mono float32 blocks at the source rate, read ``READ_FRAMES`` at a time with libsndfile."""
    with _open_soundfile(info.path) as f:
        fmt = _sf_format_name(f.format, f.subtype)
        rate, channels = int(f.samplerate), int(f.channels)
        _check_container_complete(info.path, fmt=fmt)
        expected = _exact_frames(info.path, fmt=fmt, frames=_known_frames(f))
        buffer = np.empty((READ_FRAMES, channels), dtype=np.float32)
        decoded = 0
        while True:
            try:
                n = _read_into(f, buffer)
            except (sf.LibsndfileError, RuntimeError) as exc:
                raise TruncatedAudio(
                    f"decoding failed {decoded / rate:.2f} s into the audio ({exc}): truncated or corrupt",
                    path=info.path,
                ) from exc
            if n == 0:
                break
            decoded += n
            yield _downmix(buffer[:n])
    if expected is not None and decoded + _FRAME_SLACK.get(fmt, 0) < expected:
        raise TruncatedAudio(
            f"the header promises {expected / rate:.2f} s of audio but only {decoded / rate:.2f} s decode: "
            "the file is truncated",
            path=info.path,
        )


def _read_into(f: Any, buffer: FloatArray) -> int:
    """Decode up to ``len(buffer)`` frames into ``buffer`` (shape ``(n, channels)``); the count read.

    python-soundfile's read methods seek to the position they expect after every read. At the end
    of a FLAC stream of unknown length that seek fails ("Internal psf_fseek() failed") although
    every sample was read, so libsndfile's ``sf_readf_float`` is called directly when soundfile
    exposes it (its cffi handles are private, hence the fallback to the public method).
    """
    if not _RAW_READ:
        return int(f.buffer_read_into(buffer, dtype="float32"))
    pointer = sf._ffi.cast("float *", sf._ffi.from_buffer(buffer))
    read = int(sf._snd.sf_readf_float(f._file, pointer, len(buffer)))
    code = int(sf._snd.sf_error(f._file))
    if code:
        raise sf.LibsndfileError(code)
    return read


def _downmix(frames: FloatArray) -> FloatArray:
    """Average ``frames`` (shape ``(n, channels)``) over channels into a new 1-D array.

    Column sums beat ``frames.mean(axis=1)`` by about 30x, and unlike a matrix product they never
    start BLAS threads (which would oversubscribe a process pool).
    """
    mono: FloatArray = frames[:, 0].copy()
    for channel in range(1, frames.shape[1]):
        mono += frames[:, channel]
    if frames.shape[1] > 1:
        mono *= np.float32(1.0 / frames.shape[1])
    return mono


def _exact_frames(path: str, *, fmt: str, frames: int) -> int | None:
    """Frames the header promises when that count is exact (None: unknown or an estimate)."""
    if frames <= 0:
        return None
    if fmt in ("wav", "flac", "ogg", "opus"):
        return frames
    if fmt == "mp3" and _has_vbr_tag(_audio_head(path)):
        return frames
    return None


def _check_container_complete(path: str, *, fmt: str) -> None:
    """Raise ``TruncatedAudio`` when a WAV or Ogg container shows it was cut short."""
    try:
        with open(path, "rb") as fh:
            if fmt == "wav":
                _check_riff_data(fh, path=path)
            elif fmt in ("ogg", "opus"):
                _check_ogg_end(fh, path=path)
    except OSError as exc:
        raise _os_error(path, exc) from exc


def _check_riff_data(fh: IO[bytes], *, path: str) -> None:
    """Compare a RIFF/WAVE ``data`` chunk's declared size with the bytes present."""
    located = _riff_data_chunk(fh)
    if located is None:
        return
    offset, declared = located
    available = fh.seek(0, os.SEEK_END) - offset
    if declared not in _STREAMING_SIZES and declared - available > _WAV_SLACK_BYTES:
        raise TruncatedAudio(
            f"the WAV header promises {declared} bytes of samples but the file holds {available}: "
            "the file is truncated",
            path=path,
        )


def _riff_data_chunk(fh: IO[bytes]) -> tuple[int, int] | None:
    """Offset and declared size of the ``data`` chunk of a RIFF/WAVE file (None: not found).

    RF64 and BW64 files give the size of a large ``data`` chunk in their ``ds64`` chunk.
    """
    header = fh.read(12)
    if len(header) < 12 or header[:4] not in (b"RIFF", b"RIFX", b"RF64", b"BW64") or header[8:12] != b"WAVE":
        return None
    order: Literal["little", "big"] = "big" if header[:4] == b"RIFX" else "little"
    position = 12
    ds64_data_size: int | None = None
    for _ in range(_MAX_RIFF_CHUNKS):
        fh.seek(position)
        chunk = fh.read(8)
        if len(chunk) < 8:
            return None
        size = int.from_bytes(chunk[4:], order)
        if chunk[:4] == b"ds64":
            sizes = fh.read(16)  # riffSize, dataSize (64-bit each)
            if len(sizes) == 16:
                ds64_data_size = int.from_bytes(sizes[8:], "little")
        if chunk[:4] == b"data":
            if size == 0xFFFFFFFF and ds64_data_size is not None:
                size = ds64_data_size
            return position + 8, size
        position += 8 + size + (size & 1)
    return None


def _check_ogg_end(fh: IO[bytes], *, path: str) -> None:
    """Raise unless the last Ogg page carries the end-of-stream flag."""
    end = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, end - _OGG_TAIL_BYTES))
    tail = fh.read()
    last = tail.rfind(b"OggS")
    if last < 0 or last + 6 > len(tail) or tail[last + 4] != 0:
        return  # no page header in the tail: nothing to judge by
    if not tail[last + 5] & 0x04:
        raise TruncatedAudio(
            "the last Ogg page lacks the end-of-stream flag: the file is truncated", path=path
        )


def _resampled(blocks: Iterable[FloatArray], *, in_rate: int, out_rate: int) -> Iterator[FloatArray]:
    """Resample a stream of mono blocks from ``in_rate`` to ``out_rate`` Hz with ``soxr`` (HQ)."""
    if in_rate == out_rate:
        yield from blocks
        return
    stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")
    for block in blocks:
        out: FloatArray = stream.resample_chunk(block)
        if out.size:
            yield out
    tail: FloatArray = stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
    if tail.size:
        yield tail


def _rebuffer(pieces: Iterable[FloatArray], *, size: int) -> Iterator[FloatArray]:
    """Regroup a stream of 1-D arrays into fresh arrays of ``size`` samples (the last may be shorter)."""
    out = np.empty(size, dtype=np.float32)
    filled = 0
    for piece in pieces:
        used = 0
        while used < len(piece):
            n = min(size - filled, len(piece) - used)
            out[filled : filled + n] = piece[used : used + n]
            filled += n
            used += n
            if filled == size:
                yield out
                out = np.empty(size, dtype=np.float32)
                filled = 0
    if filled:
        yield out[:filled]


# --------------------------------------------------------------------------------------------------
# ffmpeg


def _ffmpeg_tools() -> tuple[str, str] | None:
    """Paths of ``ffmpeg`` and ``ffprobe`` on ``PATH`` (None unless both are installed)."""
    ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    return (ffmpeg, ffprobe) if ffmpeg and ffprobe else None


def _ffmpeg_input(path: str) -> str:
    """``path`` as an ffmpeg input URL (immune to leading dashes and colons in names)."""
    return "file:" + os.path.abspath(path)


def _no_decoder(path: str, *, head: bytes) -> NotAudio | DecoderUnavailable:
    """The error for a file libsndfile cannot read when ffmpeg is not installed."""
    kind = _sniff(head)
    if kind is None or (kind == "mp3" and _SF_HAS_MP3):
        return NotAudio("not a recognised audio format", path=path)
    return DecoderUnavailable(
        f"{kind} audio needs ffmpeg, which is not installed: install ffmpeg (e.g. `apt-get install ffmpeg`) "
        f"to analyse {kind} files",
        path=path,
    )


def _probe_ffmpeg(path: str, *, head: bytes) -> AudioInfo:
    """Probe with ``ffprobe``: the first audio stream's rate, channels and duration."""
    tools = _ffmpeg_tools()
    if tools is None:
        raise _no_decoder(path, head=head)
    data = _run_ffprobe(tools[1], path, head=head)
    streams = data.get("streams") or []
    container = data.get("format") or {}
    if not streams:
        raise NotAudio("the file has no audio stream", path=path)
    stream = streams[0]
    rate = int(_as_float(stream.get("sample_rate")))
    if rate <= 0 or _as_float(container.get("probe_score")) < MIN_PROBE_SCORE:
        raise NotAudio("not a recognised audio format (ffprobe only guesses at it)", path=path)
    return AudioInfo(
        path=path,
        format=_ffmpeg_format_name(str(container.get("format_name") or ""), path),
        sample_rate=rate,
        channels=int(stream.get("channels") or 0),
        duration_s=_as_float(stream.get("duration")) or _as_float(container.get("duration")),
        decoder="ffmpeg",
    )


def _run_ffprobe(ffprobe: str, path: str, *, head: bytes) -> dict[str, Any]:
    """Run ``ffprobe`` on ``path``; its JSON, or the error explaining why it failed."""
    command = [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    command += ["-select_streams", "a:0", *_FFMPEG_INPUT_OPTIONS, _ffmpeg_input(path)]
    try:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, timeout=FFPROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise NotAudio(f"ffprobe did not read the header in {FFPROBE_TIMEOUT_S:.0f} s", path=path) from exc
    except OSError as exc:
        raise DecoderUnavailable(f"cannot run ffprobe: {exc}", path=path) from exc
    message = _last_line(done.stderr).replace(f"{_ffmpeg_input(path)}: ", "")
    if done.returncode != 0:
        if _sniff(head) == "m4a" and b"moov atom not found" in done.stderr:
            raise TruncatedAudio("the MP4 index ('moov' atom) is missing: the file is truncated", path=path)
        raise NotAudio(f"not a recognised audio format (ffprobe: {message or done.returncode})", path=path)
    try:
        data = json.loads(done.stdout)
    except ValueError as exc:
        raise NotAudio(f"ffprobe gave unreadable output ({exc})", path=path) from exc
    return data if isinstance(data, dict) else {}


def _as_float(value: object) -> float:
    """``value`` (an ffprobe string such as ``"180.000"`` or ``"N/A"``) as a float; 0.0 if it is none."""
    if not isinstance(value, str | int | float):
        return 0.0
    try:
        return float(value)
    except ValueError:
        return 0.0


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else ""


def _ffmpeg_format_name(format_name: str, path: str) -> str:
    """A short format name from ffprobe's demuxer list (``"mov,mp4,m4a,..."``) and the file's extension."""
    names = [name for name in format_name.split(",") if name]
    extension = Path(path).suffix.lower().lstrip(".")
    if extension and (extension in names or _FFMPEG_ALIASES.get(extension) in names):
        return extension
    return names[0] if names else (extension or "unknown")


def _ffmpeg_command(ffmpeg: str, path: str, *, channels: int, target_rate: int) -> list[str]:
    """Decode the first audio stream to raw interleaved float32 at ``target_rate`` Hz on stdout.

    The channels are kept (``-ac 1`` would mix stereo to mono at -3 dB per channel, not as their
    mean like the libsndfile path) and averaged by the caller.
    """
    return [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *_FFMPEG_INPUT_OPTIONS,
        "-i", _ffmpeg_input(path),
        "-map", "0:a:0", "-ac", str(channels), "-ar", str(target_rate), "-f", "f32le", "-",
    ]  # fmt: skip


def _ffmpeg_blocks(info: AudioInfo, *, target_rate: int) -> Iterator[FloatArray]:
    """Mono float32 blocks at ``target_rate``, streamed from an ``ffmpeg`` subprocess."""
    tools = _ffmpeg_tools()
    if tools is None:
        raise DecoderUnavailable(
            f"{info.format} audio needs ffmpeg, which is not installed: install ffmpeg", path=info.path
        )
    _check_file(info.path)  # gone or unreadable since probe()?
    channels = max(1, info.channels)
    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(
                _ffmpeg_command(tools[0], info.path, channels=channels, target_rate=target_rate),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        except OSError as exc:
            raise DecoderUnavailable(f"cannot run ffmpeg: {exc}", path=info.path) from exc
        decoded = yield from _read_pipe(process, channels=channels)
        errors.seek(0)
        message = _last_line(errors.read())
    _check_ffmpeg_result(info, process.returncode, message, decoded / target_rate)


def _read_pipe(process: subprocess.Popen[bytes], *, channels: int) -> Generator[FloatArray, None, int]:
    """Yield ``process``'s interleaved float32 output, downmixed to mono, until EOF; return the frame count.

    The process is always reaped, and killed first if the consumer stops early.
    """
    stdout = process.stdout
    assert stdout is not None
    frame_bytes = 4 * channels
    decoded = 0
    try:
        while chunk := stdout.read(PIPE_FRAMES * frame_bytes):
            frames = np.frombuffer(chunk, dtype="<f4", count=len(chunk) // frame_bytes * channels)
            decoded += len(frames) // channels
            yield _downmix(frames.reshape(-1, channels))
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stdout.close()
    return decoded


def _check_ffmpeg_result(info: AudioInfo, returncode: int, message: str, decoded_s: float) -> None:
    """Raise if ffmpeg failed, or stopped well short of a duration its container states exactly."""
    if returncode != 0 and decoded_s == 0:
        raise NotAudio(f"ffmpeg cannot decode it: {message or f'exit status {returncode}'}", path=info.path)
    if returncode != 0:
        raise TruncatedAudio(
            f"ffmpeg failed {decoded_s:.2f} s into the audio ({message or returncode}): truncated or corrupt",
            path=info.path,
        )
    expected = info.duration_s if info.format in _FFMPEG_EXACT_DURATION else 0.0
    if decoded_s < expected * 0.99 - 0.25:
        raise TruncatedAudio(
            f"the header promises {expected:.2f} s of audio but only {decoded_s:.2f} s decode"
            f"{f' ({message})' if message else ''}: the file is truncated",
            path=info.path,
        )
