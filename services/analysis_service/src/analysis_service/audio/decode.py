"""Audio decoding: validate a file, then stream it as mono float32 blocks at the analysis rate.

Decoding is in process. **PyAV** (``av``, the FFmpeg libraries bundled in its wheel) probes every
file and decodes MP3, AAC/M4A, ALAC, Opus, Vorbis, FLAC, WMA, W64 and the audio track of MP4,
Matroska/WebM, AVI, MPEG-TS and FLV files, with no subprocess and no system package.
**libsndfile** (``soundfile``) decodes only what it decodes faster (:data:`SOUNDFILE_CODECS`: PCM
WAV/RF64/AIFF; ``docs/speed.md``); never MP3 (it stops early on VBR files without a frame count and its
mpg123 writes to stderr) nor Ogg (it reads only the first part of a chained file, and refused
valid files as truncated). Both decoders' frame counts are judged by the same rule, below.

What FFmpeg may open is restricted, because the files come from users:

* only the demuxers of :data:`DEMUXERS` (audio formats and the common video containers) may
  read a file; anything else FFmpeg would recognise — HLS and DASH playlists, ``concat``
  scripts, SDP/RTP descriptions, image sequences, subtitles, text — is refused as ``not_audio``
  before its demuxer runs (``format_whitelist``), so a playlist naming other files never opens
  them;
* only the ``file`` protocol is allowed (``protocol_whitelist``): no network, pipes or devices.

FFmpeg's log is silenced at import (``av.logging``): no decoder writes to the process's stderr.

Completeness is judged the same way for every format: the frames decoded are compared with the
count the header promises *exactly* (:attr:`AudioInfo.expected_frames`, read by mutagen: FLAC
STREAMINFO, the WAV/AIFF data size, the MP4 media header, the ASF file properties, the last Ogg
granule, an MP3 Xing/Info/VBRI frame count; or Matroska's per-track duration). Falling short by
more than :data:`SHORT_SLACK_S` (plus 0.5 %) is ``truncated_audio``; decoding more is fine (a
chained Ogg file's header names only its last part). A cut Ogg file gives itself away by an
incomplete last page (mutagen cannot read it in full). Single corrupt packets are skipped, as
players do; more than :data:`MAX_BAD_PACKET_SHARE` of them is ``corrupt_audio``.

Length limits do not trust the header: :func:`iter_mono_blocks` counts decoded frames and stops
with ``too_long`` as soon as they pass ``max_duration_s``, and :func:`probe` refuses a file whose
header promises far more audio than its size can hold (``truncated_audio``, at once).

Channels are averaged to mono, except where they cancel: a stereo file whose right channel is the
left one inverted (a real tracker render was) averages to near silence. Where the average of a
decoded frame is more than :data:`CANCELLED_DB` below its loudest channel, that channel is used,
and from then on in every quiet frame of the file where it is the louder (:func:`_cancelled_channel`);
it is only looked for in frames whose average is quieter than :data:`CANCEL_CHECK_DBFS`, so
ordinary audio pays one dot product per frame.

Nothing here holds a whole file in memory: decoded frames are averaged to mono, gathered into
chunks of :data:`CHUNK_FRAMES`, resampled with a streaming ``soxr`` resampler and handed on in
blocks of a fixed size. Memory is flat in the file's duration.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import av
import av.logging
import mutagen
import mutagen.aiff
import mutagen.asf
import mutagen.flac
import mutagen.monkeysaudio
import mutagen.mp3
import mutagen.mp4
import mutagen.ogg
import mutagen.oggflac
import mutagen.oggopus
import mutagen.oggvorbis
import mutagen.trueaudio
import mutagen.wave
import mutagen.wavpack
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from analysis_service.errors import (
    CorruptAudio,
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

av.logging.set_level(None)  # FFmpeg's log off: nothing reaches stderr, nor Python's logging

#: FFmpeg demuxers allowed to read a file (``format_whitelist``). Audio formats, then the video
#: containers whose audio track is analysed. Playlists, ``concat``, network and image demuxers
#: are deliberately absent.
DEMUXERS: Final = (
    "aac", "ac3", "aiff", "amr", "ape", "asf", "au", "caf", "dsf", "dts", "eac3", "flac", "mp3",
    "mpc", "mpc8", "ogg", "tta", "w64", "wav", "wv",
    "mov", "matroska", "avi", "flv", "mpegts", "mpeg",
)  # fmt: skip
#: FFmpeg options for every open: the allow-lists above, and only local files.
#: ``probesize`` (bytes ``avformat_find_stream_info`` may read, 5 MB by default) at 1 MB: enough
#: for the audio stream's parameters (about 6 s of CD audio, many seconds of interleaved video),
#: and it stops FFmpeg reading 5 MB of a WAV file for nothing (38 ms -> 8 ms).
OPEN_OPTIONS: Final = {
    "format_whitelist": ",".join(DEMUXERS),
    "protocol_whitelist": "file",
    "probesize": str(1 << 20),
}
#: (demuxer, codec prefix) pairs that libsndfile decodes faster than PyAV (``docs/speed.md``):
#: PCM in WAV/RF64/AIFF, where both read exactly the declared data. Not FLAC: libsndfile stops at
#: the count in STREAMINFO, so a header claiming less than the file holds would hide frames from
#: the ``max_duration_s`` count (and it cannot end a stream of unknown length cleanly).
SOUNDFILE_CODECS: Final = (("wav", "pcm_"), ("aiff", "pcm_"))
#: Mono source frames gathered before each ``soxr`` call (fewer Python round trips).
CHUNK_FRAMES: Final = 1 << 16
#: A frame whose channel average is this much (dB) below its loudest channel uses that channel.
CANCELLED_DB: Final = 40.0
#: Channel averages with an RMS level above this (dBFS) are not checked for cancellation.
CANCEL_CHECK_DBFS: Final = -40.0
_QUIET_POWER: Final = 10 ** (CANCEL_CHECK_DBFS / 10)
#: Seconds of audio :func:`probe` decodes to check that the content really is audio.
CHECK_S: Final = 1.5
#: Decoding may fall short of the header's exact count by this much (plus 0.5 %): encoder delay
#: and padding, Opus pre-skip, AAC priming.
SHORT_SLACK_S: Final = 0.25
SHORT_SLACK_SHARE: Final = 0.005
#: Share of packets that may fail to decode (skipped, as players do) before a file is corrupt.
MAX_BAD_PACKET_SHARE: Final = 0.01
MIN_BAD_PACKETS: Final = 4
#: Fewer bytes per second of promised audio than this is impossible for any codec
#: (Opus, the thriftiest, needs at least ~30 B/s even when silent): the header lies.
MIN_BYTES_PER_S: Final = 2.0
_OGG_MAX_PAGE = 27 + 255 + 255 * 255
#: Bytes a PCM file may lack against its declared data size (headers, a last partial block).
_HEADER_SLACK_BYTES = 4096
#: A WAV data size of 0xFFFFFFFF is the "unknown: written to a pipe" marker.
_WAV_STREAMING_BYTES = 0xFFFFFFFF - 8
#: FFmpeg demuxer (first name) -> the mutagen file types whose length is an exact count for it.
_EXACT_LENGTHS: dict[str, tuple[type[Any], ...]] = {
    "flac": (mutagen.flac.FLAC,),
    "wav": (mutagen.wave.WAVE,),
    "aiff": (mutagen.aiff.AIFF,),
    "mov": (mutagen.mp4.MP4,),
    "asf": (mutagen.asf.ASF,),
    "ogg": (mutagen.oggvorbis.OggVorbis, mutagen.oggopus.OggOpus, mutagen.oggflac.OggFLAC),
    "mp3": (mutagen.mp3.MP3,),
    "wv": (mutagen.wavpack.WavPack,),
    "ape": (mutagen.monkeysaudio.MonkeysAudio,),
    "tta": (mutagen.trueaudio.TrueAudio,),
}
#: Demuxer (first name) -> format name reported when the extension does not say better.
_FORMAT_NAMES = {"mov": "mp4", "matroska": "mkv", "asf": "wma"}
#: Extensions that name the demuxer's format more precisely than its first name.
_EXTENSIONS = {
    "mov": ("m4a", "m4b", "mp4", "mov", "3gp", "3g2"),
    "matroska": ("mka", "mkv", "webm"),
    "asf": ("wma", "wmv", "asf"),
    "ogg": ("ogg", "oga", "opus", "ogv"),
    "wav": ("wav", "rf64", "bwf"),
    "aiff": ("aif", "aiff", "aifc"),
}


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says about its audio.

    Attributes
    ----------
    path : str
        The file.
    format : str
        Lower-case format name: ``"mp3"``, ``"m4a"``, ``"ogg"``, ``"opus"``, ``"flac"``, ``"wav"``,
        ``"aiff"``, ``"wma"``, ``"mp4"``, ``"mkv"``... (the extension when it names the container,
        otherwise the demuxer's name).
    sample_rate : int
        Source sample rate in Hz.
    channels : int
        Source channel count.
    duration_s : float
        Duration in seconds according to the header (an estimate for some MP3 and AAC files;
        0.0 when the container does not say).
    decoder : str
        Which decoder :func:`iter_mono_blocks` uses: ``"pyav"``, or ``"soundfile"`` (libsndfile)
        for the formats of :data:`SOUNDFILE_CODECS`.
    codec : str
        FFmpeg's codec name: ``"mp3"``, ``"aac"``, ``"alac"``, ``"opus"``, ``"vorbis"``, ``"flac"``,
        ``"pcm_s16le"``, ``"wmav2"``...
    bit_rate : int
        Bit rate in bit/s (0: unknown).
    expected_frames : int
        Source frames the header promises exactly (0: the header gives no exact count).
    max_frames : int
        Source frames after which decoding stops with ``too_long`` (0: no limit).
    stream_index : int
        Index of the decoded audio stream in the container.
    """

    path: str
    format: str
    sample_rate: int
    channels: int
    duration_s: float
    decoder: str = "pyav"
    codec: str = ""
    bit_rate: int = 0
    expected_frames: int = 0
    max_frames: int = 0
    stream_index: int = 0


# --------------------------------------------------------------------------------------------------
# Public API


def probe(path: str | os.PathLike[str], *, settings: EngineSettings) -> AudioInfo:
    """Read and validate a file's header, and decode its first :data:`CHECK_S` seconds.

    Parameters
    ----------
    path : str or path-like
        The audio file.
    settings : EngineSettings
        Accepted source sample rates (Hz), channel count and duration (s).

    Returns
    -------
    AudioInfo
        Format, codec, source rate (Hz), channels, header duration (s), exact frame count.

    Raises
    ------
    FileMissing
        ``path`` does not exist.
    FileUnreadable
        ``path`` is a directory or another non-regular file, or cannot be read.
    EmptyFile
        The file has zero bytes.
    NotAudio
        No allowed demuxer recognises the content as audio, or its first second does not decode.
    DecoderUnavailable
        The container is known but its audio codec is not (no decoder in the bundled FFmpeg).
    TruncatedAudio
        The header shows the file is cut short (an MP4 without its index, an incomplete last Ogg
        page), or promises far more audio than the file's size can hold.
    UnsupportedAudio
        The sample rate or channel count is outside ``settings``.
    TooLong
        The header duration exceeds ``settings.max_duration_s``.
    """
    name = os.fspath(path)
    size = _check_file(name)
    with _open(name) as container:
        stream = _audio_stream(container, path=name)
        info = _header_info(container, stream, path=name)
        demuxer = container.format.name
        if demuxer.startswith("matroska"):
            declared = _matroska_seconds(container, stream)
        else:  # PCM: FFmpeg's count comes from the data size (clamped to the file's at worst)
            declared = _declared_seconds(name, demuxer=demuxer) or (
                info.duration_s if _pcm_bits(info.codec) else 0.0
            )
        # Where the container states lengths exactly, no exact length means "unknown" (0.0), not
        # FFmpeg's guess from the bit rate; MP3 and ADTS files have only guesses, kept as such.
        states_length = demuxer.split(",")[0] in _EXACT_LENGTHS and demuxer != "mp3"
        info = replace(
            info,
            expected_frames=round(declared * info.sample_rate),
            duration_s=declared or (0.0 if states_length else info.duration_s),
            max_frames=int(settings.max_duration_s * info.sample_rate) + 1,
        )
        _check_size(info, size=size)
        _check_limits(info, settings=settings)
        _check_decodes(container, stream, info)
    if any(demuxer == d and info.codec.startswith(c) for d, c in SOUNDFILE_CODECS):
        info = replace(info, decoder="soundfile")
    return info


def iter_mono_blocks(info: AudioInfo, *, target_rate: int, block_s: float = 10.0) -> Iterator[FloatArray]:
    """Decode a probed file incrementally into mono float32 blocks at ``target_rate``.

    Channels are averaged; the result is resampled with a streaming ``soxr`` resampler (``"HQ"``,
    skipped when the rates match). At most :data:`CHUNK_FRAMES` source frames and one output block
    are in memory at any time, whatever the file's duration.

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
        The file holds fewer frames than its header promises.
    CorruptAudio
        Too many packets fail to decode.
    TooLong
        More than ``info.max_frames`` frames decode (whatever the header said).
    NotAudio
        Nothing decodes.
    FileMissing, FileUnreadable
        The file disappeared or became unreadable since :func:`probe`.
    ValueError
        ``target_rate`` or ``block_s`` is not positive.
    """
    if target_rate <= 0 or not block_s > 0:
        raise ValueError(f"target_rate and block_s must be positive, got {target_rate} and {block_s}")
    size = max(1, round(block_s * target_rate))
    source = _soundfile_decoded(info) if info.decoder == "soundfile" else _decoded(info)
    return _rebuffer(_resampled(source, out_rate=target_rate), size=size)


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
# File checks


def _check_file(path: str) -> int:
    """Raise unless ``path`` is a non-empty regular file; its size in bytes."""
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
    return st.st_size


def _os_error(path: str, exc: OSError) -> FileMissing | FileUnreadable:
    """Translate an ``OSError`` met while opening ``path``."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return FileMissing("no such file", path=path)
    if isinstance(exc, IsADirectoryError):
        return FileUnreadable("is a directory, not an audio file", path=path)
    if isinstance(exc, PermissionError):
        return FileUnreadable("permission denied", path=path)
    return FileUnreadable(f"cannot read the file: {exc.strerror or exc}", path=path)


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


def _check_size(info: AudioInfo, *, size: int) -> None:
    """Raise ``TruncatedAudio`` when the header promises more audio than ``size`` bytes can hold.

    For PCM the bytes per second are exact (a WAV or RF64 data size larger than the file); for
    other codecs the floor is :data:`MIN_BYTES_PER_S`. This is what stops a 4 KB file that claims
    150 GB of samples before anything reads it.
    """
    if not info.expected_frames:
        return
    seconds = info.expected_frames / info.sample_rate
    bits = _pcm_bits(info.codec)
    needed = seconds * (info.sample_rate * info.channels * bits / 8 if bits else MIN_BYTES_PER_S)
    if size + _HEADER_SLACK_BYTES < needed:
        raise TruncatedAudio(
            f"the header promises {seconds / 60:.1f} min of audio, which needs at least {needed:,.0f} "
            f"bytes, but the file has {size:,} bytes: it is truncated or its header is wrong",
            path=info.path,
        )


def _pcm_bits(codec: str) -> int:
    """Bits per sample of a PCM codec (``pcm_s24le`` -> 24); 0 for other codecs."""
    if not codec.startswith("pcm_"):
        return 0
    digits = "".join(c for c in codec.removeprefix("pcm_") if c.isdigit())
    return int(digits) if digits else 0


# --------------------------------------------------------------------------------------------------
# PyAV


def _open(path: str) -> Any:
    """Open ``path`` with PyAV under the allow-lists; translate failures into the service's errors."""
    try:
        return av.open("file:" + os.path.abspath(path), options=dict(OPEN_OPTIONS))
    except av.error.FileNotFoundError as exc:
        raise FileMissing("no such file", path=path) from exc
    except (av.error.PermissionError, av.error.IsADirectoryError) as exc:
        _check_file(path)
        raise FileUnreadable("permission denied", path=path) from exc
    except av.error.FFmpegError as exc:
        _check_file(path)  # gone or unreadable since the last check?
        if _starts_mp4(path):
            raise TruncatedAudio(
                "an MP4/M4A file whose index ('moov' box) is missing or unreadable: the file is truncated",
                path=path,
            ) from exc
        raise NotAudio(
            "not a recognised audio format (or a playlist, script or other file type that is not read)",
            path=path,
        ) from exc
    except OSError as exc:
        raise _os_error(path, exc) from exc


def _starts_mp4(path: str) -> bool:
    """Whether the file begins with an ISO-BMFF ``ftyp`` box (an MP4/M4A/MOV file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8)[4:8] == b"ftyp"
    except OSError as exc:
        raise _os_error(path, exc) from exc


def _audio_stream(container: Any, *, path: str) -> Any:
    """The container's best audio stream; ``NotAudio`` when it has none."""
    if not container.streams.audio:
        raise NotAudio(f"the {container.format.name} file has no audio stream", path=path)
    best = container.streams.best("audio")
    return best if best is not None else container.streams.audio[0]


def _header_info(container: Any, stream: Any, *, path: str) -> AudioInfo:
    """An :class:`AudioInfo` from what PyAV read of the header."""
    ctx = stream.codec_context
    if ctx is None:  # FFmpeg knows no decoder for the stream's codec
        tag = stream.codec_tag if hasattr(stream, "codec_tag") else "?"
        raise DecoderUnavailable(
            f"the {container.format.name} file's audio codec ({tag!s}) has no decoder in the bundled FFmpeg",
            path=path,
        )
    rate, channels = int(ctx.sample_rate or 0), int(ctx.channels or 0)
    if rate <= 0 or channels <= 0:
        raise NotAudio(f"no playable audio stream ({ctx.name}, {rate} Hz, {channels} channels)", path=path)
    duration = 0.0
    if stream.duration and stream.time_base:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    return AudioInfo(
        path=path,
        format=_format_name(container.format.name, path, codec=ctx.name),
        sample_rate=rate,
        channels=channels,
        duration_s=max(0.0, duration),
        codec=ctx.name.removesuffix("float").removesuffix("_fixed"),
        bit_rate=int(ctx.bit_rate or container.bit_rate or 0),
        stream_index=int(stream.index),
    )


def _format_name(demuxer: str, path: str, *, codec: str) -> str:
    """A short format name: the extension when it names the demuxer's format, else the demuxer's."""
    first = demuxer.split(",")[0]
    extension = Path(path).suffix.lower().lstrip(".")
    if extension in _EXTENSIONS.get(first, ()) or extension in demuxer.split(","):
        return "wav" if extension in ("rf64", "bwf") else extension
    if first == "ogg" and codec == "opus":
        return "opus"
    return _FORMAT_NAMES.get(first, first)


def _check_decodes(container: Any, stream: Any, info: AudioInfo) -> None:
    """Raise ``NotAudio`` unless the first :data:`CHECK_S` seconds (or the whole, if shorter) decode.

    FFmpeg's MP3 demuxer takes random bytes or an executable's code for MPEG frames when it finds a
    few frame headers in a row; the decoder then fails on most packets, or delivers far less audio
    than the header's estimate. Real audio decodes.
    """
    want = CHECK_S if not info.duration_s else min(CHECK_S, info.duration_s)
    good = bad = frames = 0
    try:
        for packet in container.demux(stream):
            try:
                frames += sum(frame.samples for frame in packet.decode())
                good += 1
            except av.error.FFmpegError:
                bad += 1
            if frames >= want * info.sample_rate or bad > 2 * good + 8:
                break
    except av.error.FFmpegError as exc:
        if frames == 0:
            raise NotAudio(f"nothing in it decodes as {info.codec} audio ({exc})", path=info.path) from exc
    if bad > good or frames < 0.5 * want * info.sample_rate:
        raise NotAudio(
            f"not {info.codec} audio: {bad} of the first {good + bad} packets fail to decode and "
            f"{frames / info.sample_rate:.2f} s of the first {want:.2f} s decode",
            path=info.path,
        )


# --------------------------------------------------------------------------------------------------
# Declared length (mutagen)


def _declared_seconds(path: str, *, demuxer: str) -> float:
    """Seconds of audio the header promises exactly (0.0: it gives no exact count).

    mutagen reads the exact counts: FLAC STREAMINFO, the WAV/AIFF data chunk's declared size
    (FFmpeg clamps it to the file's size), the MP4 audio track's media header, the ASF file
    properties, the last Ogg granule (after checking that the last page is complete), an MP3's
    Xing/Info/VBRI frame count, the WavPack/APE/TTA headers. Only when mutagen read the file as
    the format FFmpeg's ``demuxer`` found (:data:`_EXACT_LENGTHS`): other lengths from mutagen
    are estimates (ADTS AAC, AC-3, an MP3 without a VBR header). (Matroska's comes from PyAV.)
    A file mutagen cannot parse has no exact count.
    """
    exact = _EXACT_LENGTHS.get(demuxer.split(",")[0])
    if exact is None:
        return 0.0
    try:
        parsed = mutagen.File(path)
    except (mutagen.MutagenError, ValueError, IndexError, KeyError, EOFError, OverflowError) as exc:
        if isinstance(exc, mutagen.ogg.error) and "full data" in str(exc):
            raise TruncatedAudio("the last Ogg page is incomplete: the file is truncated", path=path) from exc
        return 0.0
    if not isinstance(parsed, exact) or parsed.info is None:
        return 0.0
    if isinstance(parsed, mutagen.ogg.OggFileType):
        _check_last_ogg_page(path)
    if (
        isinstance(parsed.info, mutagen.mp3.MPEGInfo)
        and parsed.info.bitrate_mode is mutagen.mp3.BitrateMode.UNKNOWN
    ):
        return 0.0  # no Xing/Info/VBRI header: the length is an estimate from the bit rate
    length = float(getattr(parsed.info, "length", 0.0) or 0.0)
    if isinstance(parsed, mutagen.wave.WAVE) and length * parsed.info.bitrate / 8 >= _WAV_STREAMING_BYTES:
        return 0.0  # sizes left at 0xFFFFFFFF by a writer that could not seek back
    return length


def _matroska_seconds(container: Any, stream: Any) -> float:
    """The audio track's duration in a Matroska/WebM file (0.0: unknown).

    The track's own ``DURATION`` tag (written by FFmpeg and mkvmerge) when it has one; else the
    segment's duration, but only when there is no video track (the segment lasts as long as its
    longest track, and a video may outlast its sound).
    """
    tagged = _hms_seconds(str(stream.metadata.get("DURATION", "")))
    if tagged:
        return tagged
    if container.streams.video or not container.duration:
        return 0.0
    return float(container.duration / av.time_base)


def _hms_seconds(text: str) -> float:
    """``"00:03:25.120000000"`` in seconds (0.0: not that form)."""
    match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d(?:\.\d+)?)", text.strip())
    if match is None:
        return 0.0
    return int(match.group(1)) * 3600 + int(match.group(2)) * 60 + float(match.group(3))


def _check_last_ogg_page(path: str) -> None:
    """Raise ``TruncatedAudio`` when the file's last Ogg page is cut short (mutagen cannot read it).

    The last page starts within the last :data:`_OGG_MAX_PAGE` bytes (an Ogg page's largest size).
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - _OGG_MAX_PAGE))
            tail = fh.read()
    except OSError as exc:
        raise _os_error(path, exc) from exc
    start = tail.rfind(b"OggS")
    if start < 0:
        return
    try:
        mutagen.ogg.OggPage(io.BytesIO(tail[start:]))  # type: ignore[no-untyped-call]
    except (mutagen.ogg.error, EOFError) as exc:
        raise TruncatedAudio("the last Ogg page is incomplete: the file is truncated", path=path) from exc


# --------------------------------------------------------------------------------------------------
# Decoding


def _decoded(info: AudioInfo) -> Iterator[tuple[int, FloatArray]]:
    """``(source rate, mono chunk)`` pairs of about :data:`CHUNK_FRAMES` frames, decoded with PyAV.

    Checks, as it goes, the frame limit, and at the end the frame count against the header's.
    """
    _check_file(info.path)  # gone or unreadable since probe()?
    decoded = good = bad = filled = 0
    chosen: int | None = None  # the channel used where the channels cancel (see _cancelled_channel)
    buffer = np.empty(CHUNK_FRAMES, dtype=np.float32)  # reused: no allocation per decoded frame
    rate = info.sample_rate
    with _open(info.path) as container:
        stream = container.streams[info.stream_index]
        stream.codec_context.thread_count = 1  # one core per analysis, as in the process pool
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    bad += 1
                    continue
                good += 1
                for frame in frames:
                    n = frame.samples
                    if filled and (frame.sample_rate != rate or filled + n > len(buffer)):
                        yield rate, buffer[:filled].copy()
                        filled = 0
                    if n > len(buffer):
                        buffer = np.empty(n, dtype=np.float32)
                    rate = frame.sample_rate
                    chosen = _downmix_into(frame, buffer[filled : filled + n], chosen)
                    filled += n
                    decoded += n
                    if info.max_frames and decoded > info.max_frames:
                        raise _too_long(info)
        except av.error.FFmpegError as exc:
            if decoded == 0:
                raise NotAudio(f"nothing in it decodes ({exc})", path=info.path) from exc
            bad += 1  # the demuxer met an error part way: judged below like a cut file
    if filled:
        yield rate, buffer[:filled].copy()
    _check_complete(info, decoded=decoded, good=good, bad=bad)


def _soundfile_decoded(info: AudioInfo) -> Iterator[tuple[int, FloatArray]]:
    """``(source rate, mono chunk)`` pairs of :data:`CHUNK_FRAMES` frames, decoded with libsndfile.

    Same checks as :func:`_decoded`: the frame limit as it goes, the header's count at the end.
    A file libsndfile reads differently from FFmpeg (another rate or channel count) is decoded
    with PyAV instead.
    """
    _check_file(info.path)  # gone or unreadable since probe()?
    try:
        f = sf.SoundFile(info.path)
    except (sf.LibsndfileError, RuntimeError):
        yield from _decoded(info)
        return
    with f:
        if (f.samplerate, f.channels) != (info.sample_rate, info.channels):
            f.close()
            yield from _decoded(info)
            return
        buffer = np.empty((CHUNK_FRAMES, info.channels), dtype=np.float32)
        decoded = bad = 0
        chosen: int | None = None
        while True:
            try:
                n = int(f.buffer_read_into(buffer, dtype="float32"))
            except (sf.LibsndfileError, RuntimeError):
                bad = 1  # a read error part way: judged below like a cut file
                break
            if n == 0:
                break
            decoded += n
            if info.max_frames and decoded > info.max_frames:
                raise _too_long(info)
            mono = buffer[:n, 0].copy()
            for channel in range(1, info.channels):
                mono += buffer[:n, channel]
            if info.channels > 1:
                mono *= np.float32(1.0 / info.channels)
                columns = [buffer[:n, c] for c in range(info.channels)]
                loudest = _cancelled_channel(mono, columns, chosen=chosen)
                if loudest is not None:
                    chosen = loudest
                    mono = buffer[:n, loudest].copy()
            yield info.sample_rate, mono
    _check_complete(info, decoded=decoded, good=max(1, decoded // CHUNK_FRAMES), bad=bad)


def _too_long(info: AudioInfo) -> TooLong:
    return TooLong(
        f"more than {info.max_frames / info.sample_rate / 60:.1f} min of audio decode (the limit), "
        "whatever the header says",
        path=info.path,
    )


def _check_complete(info: AudioInfo, *, decoded: int, good: int, bad: int) -> None:
    """Raise if nothing decoded, too many packets were corrupt, or the header promised more."""
    if decoded == 0:
        raise NotAudio(f"no {info.codec} audio decodes ({bad} packets failed)", path=info.path)
    if bad > max(MIN_BAD_PACKETS, MAX_BAD_PACKET_SHARE * (good + bad)):
        raise CorruptAudio(
            f"{bad} of {good + bad} packets failed to decode: the file is corrupt", path=info.path
        )
    expected = info.expected_frames
    slack = SHORT_SLACK_S * info.sample_rate + SHORT_SLACK_SHARE * expected
    if expected and decoded + slack < expected:
        raise TruncatedAudio(
            f"the header promises {expected / info.sample_rate:.2f} s of audio but only "
            f"{decoded / info.sample_rate:.2f} s decode: the file is truncated",
            path=info.path,
        )


#: numpy dtype and scale to [-1, 1) of each FFmpeg sample format (planar or not).
_SAMPLES: dict[str, tuple[type[np.generic], float]] = {
    "u8": (np.uint8, 1 / 128),
    "s16": (np.int16, 1 / 32768),
    "s32": (np.int32, 1 / 2147483648),
    "s64": (np.int64, 1 / 9223372036854775808),
    "flt": (np.float32, 1.0),
    "dbl": (np.float64, 1.0),
}


def _downmix_into(frame: Any, out: FloatArray, chosen: int | None = None) -> int | None:
    """Average a decoded PyAV frame over its channels into ``out`` (float32, ``frame.samples`` long).

    Where the channels cancel, one channel instead (:func:`_cancelled_channel`; ``chosen`` is the
    channel an earlier frame of the file used, and the return value the one to pass on).

    The planes are read in place (``np.frombuffer``; ``AudioFrame.to_ndarray`` stacks them first,
    which costs more than decoding MP3's small frames) and summed into ``out`` without
    temporaries; unlike a matrix product this never starts BLAS threads.
    """
    fmt = frame.format
    n, channels = frame.samples, frame.layout.nb_channels
    dtype, scale = _SAMPLES[fmt.name.removesuffix("p")]
    planes = frame.planes
    if fmt.is_planar:
        columns = [np.frombuffer(plane, dtype, n) for plane in planes[:channels]]
    else:
        packed = np.frombuffer(planes[0], dtype, n * channels).reshape(n, channels)
        columns = [packed[:, c] for c in range(channels)]
    np.copyto(out, columns[0], casting="unsafe")
    for column in columns[1:]:
        np.add(out, column, out=out, casting="unsafe")
    if dtype is np.uint8:
        out -= np.float32(128 * channels)
    factor = scale / channels
    if factor != 1.0:
        out *= np.float32(factor)
    if channels > 1 and np.dot(out, out) < _QUIET_POWER * n:  # inline: this runs for every frame
        offset = 128.0 if dtype is np.uint8 else 0.0
        loudest = _cancelled_channel(out, columns, scale=scale, offset=offset, chosen=chosen)
        if loudest is not None:
            np.copyto(out, columns[loudest], casting="unsafe")
            if dtype is np.uint8:
                out -= np.float32(128)
            if scale != 1.0:
                out *= np.float32(scale)
            return loudest
    return chosen


def _cancelled_channel(
    mono: FloatArray,
    columns: list[Any],
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    chosen: int | None = None,
) -> int | None:
    """Index of a loudest channel when the channels cancel in ``mono`` (their average), else None.

    ``columns`` are the channels' raw samples; ``(sample - offset) * scale`` is their value in
    [-1, 1]. They cancel when ``mono``'s RMS is below ``CANCEL_CHECK_DBFS`` and more than
    ``CANCELLED_DB`` below the loudest channel's. Once they have (``chosen``, from an earlier frame
    of the same file), every quiet frame in which that channel is louder than the average keeps
    it: lossy-coded opposed channels leave a residue that wanders across the 40 dB line, and
    switching between a channel and the residue would put false onsets into the features.
    """
    n = len(mono)
    if n == 0:
        return None
    power = float(np.dot(mono, mono)) / n
    if not power < _QUIET_POWER:  # loud enough, or NaN (left as it is, as before)
        return None
    powers = [float(np.mean(np.square((np.asarray(c, np.float64) - offset) * scale))) for c in columns]
    if chosen is not None and powers[chosen] > power:
        return chosen
    loudest = max(powers)
    if not np.isfinite(loudest) or loudest <= power * 10 ** (CANCELLED_DB / 10):
        return None
    # The first channel within 3 dB of the loudest: channels of equal level (L = -R) give the same
    # one in every frame, whatever the rounding, so the signal never flips sign between frames.
    return next((i for i, p in enumerate(powers) if p >= 0.5 * loudest), None)


def _resampled(chunks: Iterable[tuple[int, FloatArray]], *, out_rate: int) -> Iterator[FloatArray]:
    """Resample a stream of ``(rate, mono chunk)`` pairs to ``out_rate`` Hz with ``soxr`` (HQ).

    A change of source rate part way (concatenated MP3 files) starts a new resampler.
    """
    stream: Any = None
    in_rate = 0
    for rate, chunk in chunks:
        if rate != in_rate:
            if stream is not None:
                yield from _flush(stream)
            in_rate = rate
            stream = (
                None
                if rate == out_rate
                else soxr.ResampleStream(rate, out_rate, 1, dtype="float32", quality="HQ")
            )
        if stream is None:
            yield chunk
            continue
        out: FloatArray = stream.resample_chunk(chunk)
        if out.size:
            yield out
    if stream is not None:
        yield from _flush(stream)


def _flush(stream: Any) -> Iterator[FloatArray]:
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
