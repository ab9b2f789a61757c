"""Write audio files with PyAV's bundled encoders (for the demo, tests and benchmarks).

One function, :func:`write_audio`, covers every format the decoder is tested on: MP3, AAC (ADTS,
and with ALAC in MP4/M4A), Opus and Vorbis in Ogg, FLAC, WAV, RF64, AIFF, WMA, and an audio track beside a
(small, black) video track in MP4 or Matroska. Nothing here needs a system ffmpeg.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import av
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Recipe:
    """How to write one kind of file: container (FFmpeg muxer name), codec and their options."""

    container: str
    codec: str
    bit_rate: int | None = None
    codec_options: Mapping[str, str] = field(default_factory=dict)
    container_options: Mapping[str, str] = field(default_factory=dict)
    video: bool = False


#: Recipes by short name (the usual file extension, or a descriptive name).
RECIPES: Final[Mapping[str, Recipe]] = {
    "mp3": Recipe("mp3", "libmp3lame", bit_rate=192_000),
    "m4a": Recipe("ipod", "aac", bit_rate=128_000),
    "aac": Recipe("adts", "aac", bit_rate=128_000),
    "m4a-faststart": Recipe("ipod", "aac", bit_rate=128_000, container_options={"movflags": "+faststart"}),
    "alac": Recipe("ipod", "alac"),
    "opus": Recipe("ogg", "libopus", bit_rate=96_000),
    "ogg": Recipe("ogg", "vorbis", codec_options={"strict": "experimental"}),
    "flac": Recipe("flac", "flac"),
    "wav": Recipe("wav", "pcm_s16le"),
    "wav-float": Recipe("wav", "pcm_f32le"),
    "rf64": Recipe("wav", "pcm_s16le", container_options={"rf64": "always"}),
    "aiff": Recipe("aiff", "pcm_s16be"),
    "wma": Recipe("asf", "wmav2", bit_rate=128_000),
    "mp4-video": Recipe("mp4", "aac", bit_rate=128_000, video=True),
    "mkv-video": Recipe("matroska", "libopus", bit_rate=96_000, video=True),
}

_VIDEO_FPS = 10
_VIDEO_SIZE = (64, 48)


def write_audio(
    path: str | os.PathLike[str], data: FloatArray, rate: int, kind: str, *, video_extra_s: float = 0.0
) -> None:
    """Encode ``data`` into a file of ``kind`` (a key of :data:`RECIPES`).

    Parameters
    ----------
    path : path-like
        Output file (overwritten).
    data : np.ndarray [shape=(frames, channels), dtype=float32]
        Samples in [-1, 1]; 1 or 2 channels.
    rate : int > 0
        Sample rate in Hz (Opus accepts only 8, 12, 16, 24 and 48 kHz).
    kind : str
        Which recipe to use.
    video_extra_s : float
        For recipes with a video track: how much longer than the audio it lasts (s).
    """
    recipe = RECIPES[kind]
    if data.ndim != 2 or data.shape[1] not in (1, 2):
        raise ValueError(f"data must have shape (frames, 1 or 2), got {data.shape}")
    layout = "mono" if data.shape[1] == 1 else "stereo"
    with av.open(
        os.fspath(path), "w", format=recipe.container, options=dict(recipe.container_options)
    ) as out:
        video = out.add_stream("mpeg4", rate=_VIDEO_FPS) if recipe.video else None
        assert video is None or isinstance(video, av.VideoStream)
        if video is not None:
            video.width, video.height = _VIDEO_SIZE
            video.pix_fmt = "yuv420p"
        stream = out.add_stream(recipe.codec, rate=rate, options=dict(recipe.codec_options))
        assert isinstance(stream, av.AudioStream)
        stream.layout = layout
        if recipe.bit_rate:
            stream.bit_rate = recipe.bit_rate
        sample_format = stream.codec_context.format
        step = 1152 if recipe.codec == "libmp3lame" else 960 if recipe.codec == "libopus" else 1024
        for start in range(0, len(data), step):
            frame = _frame(data[start : start + step], sample_format, layout, rate)
            frame.pts = start
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if video is not None:
            black = np.zeros((_VIDEO_SIZE[1], _VIDEO_SIZE[0], 3), dtype=np.uint8)
            for i in range(int((len(data) / rate + video_extra_s) * _VIDEO_FPS)):
                picture = av.VideoFrame.from_ndarray(black, format="rgb24")
                picture.pts = i
                out.mux(video.encode(picture))
            out.mux(video.encode(None))


def _frame(chunk: FloatArray, sample_format: av.AudioFormat, layout: str, rate: int) -> av.AudioFrame:
    """One PyAV audio frame of ``chunk`` (shape ``(n, channels)``) in the encoder's sample format."""
    planar = np.ascontiguousarray(chunk.T) if sample_format.is_planar else chunk.reshape(1, -1)
    clipped = np.clip(planar, -1.0, 1.0)
    name = sample_format.name
    if name.startswith("s16"):
        frame = av.AudioFrame.from_ndarray(
            np.round(clipped * 32767).astype(np.int16), format=name, layout=layout
        )
    elif name.startswith("s32"):
        ints = np.round(clipped.astype(np.float64) * 2147483647).astype(np.int32)
        frame = av.AudioFrame.from_ndarray(ints, format=name, layout=layout)
    else:
        frame = av.AudioFrame.from_ndarray(clipped.astype(np.float32), format=name, layout=layout)
    frame.sample_rate = rate
    return frame
