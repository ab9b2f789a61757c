"""Shared time-frequency features, computed once per file in a single streaming pass.

The analyzers (tempo, key, mood, timeline) never see audio samples: they read a :class:`Features`
object. It is built block by block from the decoder's output, so memory depends on the number of
feature frames (a few MB per hour), not on the number of samples.

Two short-time Fourier transforms run over the same mono signal:

* a rhythm STFT (``n_fft=1024``, ``hop=256`` at 22050 Hz, about 86 frames per second) giving
  band-wise spectral flux (onset strength) and frame loudness and brightness;
* a pitch STFT (``n_fft=8192``, ``hop=2048``, about 10.8 frames per second, 2.7 Hz resolution)
  giving 36-bin (third-of-a-semitone) pitch-class profiles for the whole spectrum and for the bass
  register, from which the key analyzer takes a tuning-corrected 12-bin chroma.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.fft
from scipy.ndimage import uniform_filter1d

FloatArray = npt.NDArray[np.float32]

RHYTHM_N_FFT = 1024
RHYTHM_HOP = 256
PITCH_N_FFT = 8192
PITCH_HOP = 2048
BINS_PER_SEMITONE = 3
#: Onset bands (Hz): kick/bass, snare body/chords, hats/noise.
ONSET_BANDS_HZ: tuple[tuple[float, float], ...] = ((25.0, 200.0), (200.0, 2000.0), (2000.0, 11000.0))
#: Pitch range of the full chroma and of the bass chroma (Hz).
CHROMA_RANGE_HZ = (80.0, 1200.0)
BASS_RANGE_HZ = (27.0, 160.0)
PEAK_NEIGHBOURHOOD_BINS = 15
PEAK_OVER_MEAN = 2.0


@dataclass(frozen=True)
class Features:
    """Frame-wise features of one recording.

    Attributes
    ----------
    sample_rate : int
        Analysis sample rate in Hz.
    duration_s : float
        Duration of the analysed signal in seconds.
    onset_rate : float
        Frames per second of ``onset``, ``loudness_db`` and ``centroid_hz``.
    onset : np.ndarray, shape (n_bands, n_frames)
        Half-wave rectified log-spectral flux per band (see ``ONSET_BANDS_HZ``).
    loudness_db : np.ndarray, shape (n_frames,)
        Frame RMS level in dBFS.
    centroid_hz : np.ndarray, shape (n_frames,)
        Spectral centroid in Hz (0 for silent frames).
    chroma_rate : float
        Frames per second of ``chroma36`` and ``bass36``.
    chroma36 : np.ndarray, shape (36, n_chroma_frames)
        Pitch-class energy in thirds of a semitone, bin 0 centred on C at A4 = 440 Hz.
    bass36 : np.ndarray, shape (36, n_chroma_frames)
        The same for the bass register only (``BASS_RANGE_HZ``).
    peak : float
        Largest absolute sample value seen.
    """

    sample_rate: int
    duration_s: float
    onset_rate: float
    onset: FloatArray
    loudness_db: FloatArray
    centroid_hz: FloatArray
    chroma_rate: float
    chroma36: FloatArray
    bass36: FloatArray
    peak: float

    def window(self, start_s: float, end_s: float) -> Features:
        """The features of the excerpt ``[start_s, end_s)`` (seconds)."""
        a, b = int(start_s * self.onset_rate), int(np.ceil(end_s * self.onset_rate))
        c, d = int(start_s * self.chroma_rate), int(np.ceil(end_s * self.chroma_rate))
        return Features(
            sample_rate=self.sample_rate,
            duration_s=max(0.0, min(end_s, self.duration_s) - max(0.0, start_s)),
            onset_rate=self.onset_rate,
            onset=self.onset[:, a:b],
            loudness_db=self.loudness_db[a:b],
            centroid_hz=self.centroid_hz[a:b],
            chroma_rate=self.chroma_rate,
            chroma36=self.chroma36[:, c:d],
            bass36=self.bass36[:, c:d],
            peak=self.peak,
        )


class _Framer:
    """Cuts a stream of blocks into centred, overlapping, windowed frames."""

    def __init__(self, n_fft: int, hop: int) -> None:
        self.n_fft, self.hop = n_fft, hop
        self.window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
        self._buf = np.zeros(n_fft // 2, dtype=np.float32)  # centre the first frame on sample 0

    def push(self, block: FloatArray, *, last: bool = False) -> FloatArray:
        buf = np.concatenate([self._buf, block])
        if last:
            buf = np.concatenate([buf, np.zeros(self.n_fft // 2, dtype=np.float32)])
        if len(buf) < self.n_fft:
            self._buf = buf
            return np.zeros((0, self.n_fft), dtype=np.float32)
        n = (len(buf) - self.n_fft) // self.hop + 1
        frames = np.lib.stride_tricks.sliding_window_view(buf, self.n_fft)[:: self.hop][:n]
        self._buf = buf[n * self.hop :]
        return frames * self.window


def _pitch_class_matrix(freqs: npt.NDArray[np.float64], lo: float, hi: float) -> FloatArray:
    """Map FFT bins in ``[lo, hi]`` Hz onto 36 pitch-class bins with triangular weights."""
    out = np.zeros((36, len(freqs)), dtype=np.float32)
    sel = np.flatnonzero((freqs >= lo) & (freqs <= hi))
    pos = (BINS_PER_SEMITONE * (12 * np.log2(freqs[sel] / 440.0) + 9)) % 36  # 0 = C
    base = np.floor(pos).astype(int)
    frac = (pos - base).astype(np.float32)
    out[base % 36, sel] += 1 - frac
    out[(base + 1) % 36, sel] += frac
    # Low bins are wide in semitones: weight them down so one bass partial does not smear.
    return out


def _median3(prev: FloatArray, x: FloatArray, nxt: FloatArray) -> FloatArray:
    """Element-wise median of three equally shaped arrays."""
    return np.asarray(np.maximum(np.minimum(prev, x), np.minimum(np.maximum(prev, x), nxt)), dtype=np.float32)


class _StreamingMedian3:
    """Median over each frame and its two neighbours in time, across block boundaries.

    A frame is released once its successor has arrived (one frame of delay); the first frame's
    missing predecessor and, at the end, the last frame's missing successor repeat the frame itself.
    """

    def __init__(self) -> None:
        self._before: FloatArray | None = None  # the frame before the held one
        self._held: FloatArray | None = None  # a frame waiting for its successor

    def push(self, mag: FloatArray, *, last: bool = False) -> FloatArray:
        frames = mag if self._held is None else np.concatenate([self._held, mag])
        if not len(frames):
            return frames
        ready = frames if last else frames[:-1]
        self._held = None if last else frames[-1:]
        if not len(ready):
            return ready
        before = self._before if self._before is not None else ready[:1]
        prev = np.concatenate([before, ready[:-1]])
        nxt = frames[1 : len(ready) + 1]
        if len(nxt) < len(ready):  # the last frame of the stream
            nxt = np.concatenate([nxt, ready[-1:]])
        self._before = ready[-1:]
        return _median3(prev, ready, nxt)


def _harmonic_peaks(mag: FloatArray) -> FloatArray:
    """Keep the spectral peaks of (time-median filtered) pitch frames (rows), zero elsewhere.

    The caller first takes the median over three frames (0.28 s), which removes drum transients
    (a note lasts longer than a hit). A bin is kept if it is a local maximum across frequency and
    stands above the local spectral average (``PEAK_OVER_MEAN`` times a 1/6-octave neighbourhood
    mean), which drops broadband noise such as cymbals.
    """
    local = uniform_filter1d(mag, size=PEAK_NEIGHBOURHOOD_BINS, axis=1, mode="nearest")
    is_peak = (mag[:, 1:-1] >= mag[:, :-2]) & (mag[:, 1:-1] >= mag[:, 2:])
    keep = np.zeros_like(mag, dtype=bool)
    keep[:, 1:-1] = is_peak & (mag[:, 1:-1] > PEAK_OVER_MEAN * local[:, 1:-1])
    return np.where(keep, mag, 0.0).astype(np.float32)


class FeatureExtractor:
    """Incremental builder of :class:`Features` from consecutive mono blocks.

    Parameters
    ----------
    sample_rate : int
        Rate of the blocks in Hz (the analysis rate).
    """

    def __init__(self, *, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._rhythm = _Framer(RHYTHM_N_FFT, RHYTHM_HOP)
        self._pitch = _Framer(PITCH_N_FFT, PITCH_HOP)
        rf = np.fft.rfftfreq(RHYTHM_N_FFT, 1.0 / sample_rate).astype(np.float64)
        # Band means of the flux as one matrix product: (n_bins, n_bands), columns sum to 1.
        bands = np.stack([((rf >= lo) & (rf < hi)).astype(np.float32) for lo, hi in ONSET_BANDS_HZ], axis=1)
        self._band_matrix = bands / bands.sum(axis=0, keepdims=True)
        self._rfreqs = rf.astype(np.float32)
        pf = np.fft.rfftfreq(PITCH_N_FFT, 1.0 / sample_rate).astype(np.float64)
        self._chroma_map = _pitch_class_matrix(pf, *CHROMA_RANGE_HZ)
        self._bass_map = _pitch_class_matrix(pf, *BASS_RANGE_HZ)
        hi_bin = int(np.searchsorted(pf, CHROMA_RANGE_HZ[1])) + 1
        self._pitch_bins = hi_bin
        self._chroma_map = self._chroma_map[:, :hi_bin]
        self._bass_map = self._bass_map[:, :hi_bin]
        self._prev_log: FloatArray | None = None
        self._median = _StreamingMedian3()
        self._onset: list[FloatArray] = []
        self._loud: list[FloatArray] = []
        self._cent: list[FloatArray] = []
        self._chroma: list[FloatArray] = []
        self._bass: list[FloatArray] = []
        self._n_samples = 0
        self._peak = 0.0

    def push(self, block: FloatArray, *, last: bool = False) -> None:
        """Add the next block of samples (float32, mono, at ``sample_rate``)."""
        self._n_samples += len(block)
        if len(block):
            self._peak = max(self._peak, float(np.max(np.abs(block))))
        self._rhythm_frames(self._rhythm.push(block, last=last))
        self._pitch_frames(self._pitch.push(block, last=last), last=last)

    def _rhythm_frames(self, frames: FloatArray) -> None:
        if not len(frames):
            return
        mag = np.abs(scipy.fft.rfft(frames, axis=1))
        power = np.square(mag)
        total = power.sum(axis=1)
        rms = np.sqrt(total * 2.0 / (RHYTHM_N_FFT * float(np.sum(np.square(self._rhythm.window)))))
        self._loud.append((20 * np.log10(np.maximum(rms, 1e-6))).astype(np.float32))
        self._cent.append(
            np.where(total > 1e-10, power @ self._rfreqs / np.maximum(total, 1e-10), 0).astype(np.float32)
        )
        logmag = np.log(np.float32(100.0) * mag + np.float32(1.0))
        prev = logmag[:1] if self._prev_log is None else self._prev_log
        diff = np.maximum(np.diff(np.concatenate([prev, logmag]), axis=0), 0.0)
        self._prev_log = logmag[-1:]
        self._onset.append((diff @ self._band_matrix).T.astype(np.float32, copy=False))

    def _pitch_frames(self, frames: FloatArray, *, last: bool) -> None:
        mag = (
            np.abs(scipy.fft.rfft(frames, axis=1)[:, : self._pitch_bins])
            if len(frames)
            else np.zeros((0, self._pitch_bins), dtype=np.float32)
        )
        mag = self._median.push(mag, last=last)
        if not len(mag):
            return
        peaks = _harmonic_peaks(mag)
        self._chroma.append(self._chroma_map @ peaks.T)
        self._bass.append(self._bass_map @ peaks.T)

    def finish(self) -> Features:
        """Flush the framers and return the features."""
        self.push(np.zeros(0, dtype=np.float32), last=True)

        def cat(parts: list[FloatArray], shape: tuple[int, ...]) -> FloatArray:
            # One feature at a time, releasing its blocks: the peak is the features plus one
            # array, not the features twice.
            out = np.concatenate(parts, axis=-1) if parts else np.zeros(shape, dtype=np.float32)
            parts.clear()
            return out

        return Features(
            sample_rate=self.sample_rate,
            duration_s=self._n_samples / self.sample_rate,
            onset_rate=self.sample_rate / RHYTHM_HOP,
            onset=cat(self._onset, (len(ONSET_BANDS_HZ), 0)),
            loudness_db=cat(self._loud, (0,)),
            centroid_hz=cat(self._cent, (0,)),
            chroma_rate=self.sample_rate / PITCH_HOP,
            chroma36=cat(self._chroma, (36, 0)),
            bass36=cat(self._bass, (36, 0)),
            peak=self._peak,
        )


def compute_features(blocks: Iterable[FloatArray], *, sample_rate: int) -> Features:
    """Compute :class:`Features` from an iterable of mono float32 blocks at ``sample_rate`` Hz."""
    fx = FeatureExtractor(sample_rate=sample_rate)
    for block in blocks:
        fx.push(block)
    return fx.finish()
