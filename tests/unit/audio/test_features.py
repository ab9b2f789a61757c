"""Shared features: streaming gives the same result whatever the block size; rates, pitch and windows."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from analysis_service.audio.features import (
    PITCH_HOP,
    RHYTHM_HOP,
    Features,
    compute_features,
)
from analysis_service.audio.key import fold_chroma
from analysis_service.audio.synth import demo_song
from tests.unit.audio.conftest import SR

FloatArray = npt.NDArray[np.float32]

ARRAYS = ("onset", "loudness_db", "centroid_hz", "chroma36", "bass36")
RHYTHM_ARRAYS = ("onset", "loudness_db", "centroid_hz")
PITCH_ARRAYS = ("chroma36", "bass36")


def _blocks(y: FloatArray, size: int) -> list[FloatArray]:
    return [y[i : i + size] for i in range(0, len(y), size)]


def _sine(freq: float, seconds: float, *, amplitude: float = 0.5, rate: int = SR) -> FloatArray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture(scope="module")
def song() -> FloatArray:
    """About 8 s of a song at 124 BPM in E minor, cut to a multiple of 4096 samples.

    (A multiple of the block sizes compared below, so that no block is shorter than a frame: see
    the xfail tests.)
    """
    y = demo_song(bpm=124.0, tonic=4, mode="minor", seconds=8.0, sample_rate=SR)
    return y[: len(y) // 4096 * 4096]


def _max_diff(a: Features, b: Features, names: tuple[str, ...]) -> dict[str, float]:
    """Largest absolute difference of each array, relative to the array's largest value."""
    assert (a.duration_s, a.onset_rate, a.chroma_rate, a.peak) == (
        b.duration_s,
        b.onset_rate,
        b.chroma_rate,
        b.peak,
    )
    out = {}
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        out[name] = float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-6)
    return out


# --------------------------------------------------------------------------------------------------
# Streaming


def test_rhythm_features_do_not_depend_on_block_size(song: FloatArray) -> None:
    small = compute_features(_blocks(song, 4096), sample_rate=SR)
    large = compute_features(_blocks(song, 65536), sample_rate=SR)
    whole = compute_features([song], sample_rate=SR)

    assert max(_max_diff(small, large, RHYTHM_ARRAYS).values()) < 1e-5
    assert max(_max_diff(whole, large, RHYTHM_ARRAYS).values()) < 1e-5
    assert float(large.onset.max()) > 0.1  # not trivially equal: there is something to compare


def test_irregular_blocks_give_the_same_rhythm_features(song: FloatArray) -> None:
    cuts = np.cumsum([4096, 3000, 70000, 2500, 12288, 40000])
    irregular = [b for b in np.split(song, cuts) if len(b)]

    streamed = compute_features(irregular, sample_rate=SR)

    assert max(_max_diff(streamed, compute_features([song], sample_rate=SR), RHYTHM_ARRAYS).values()) < 1e-5


@pytest.mark.parametrize("size", [4096, 65536])
def test_pitch_features_do_not_depend_on_block_size(song: FloatArray, size: int) -> None:
    streamed = compute_features(_blocks(song, size), sample_rate=SR)

    diff = _max_diff(streamed, compute_features([song], sample_rate=SR), PITCH_ARRAYS)

    assert max(diff.values()) < 1e-3, diff


@pytest.mark.parametrize("case", ["short-last-block", "short-first-block", "empty-block"])
def test_blocks_of_any_size_are_accepted(song: FloatArray, case: str) -> None:
    y = song[: 2 * 65536 + 600]  # a length that is no multiple of the block size
    if case == "short-last-block":
        blocks = _blocks(y, 65536)
        assert [len(b) for b in blocks] == [65536, 65536, 600]
    elif case == "short-first-block":
        blocks = [y[:1000], y[1000:]]
    else:
        blocks = [y[:65536], y[:0], y[65536:]]

    streamed = compute_features(blocks, sample_rate=SR)

    assert max(_max_diff(streamed, compute_features([y], sample_rate=SR), RHYTHM_ARRAYS).values()) < 1e-5


# --------------------------------------------------------------------------------------------------
# Frame rates and shapes


@pytest.mark.parametrize("rate", [SR, 44100, 16000])
def test_frame_rates_and_counts(rate: int) -> None:
    n = round(3.3 * rate)
    y = _sine(440.0, 3.3, rate=rate)

    f = compute_features([y], sample_rate=rate)

    assert f.sample_rate == rate
    assert f.onset_rate == rate / RHYTHM_HOP
    assert f.chroma_rate == rate / PITCH_HOP
    assert f.duration_s == n / rate
    # frames are centred on multiples of the hop, from sample 0 to the last sample
    assert f.onset.shape == (3, n // RHYTHM_HOP + 1)
    assert f.loudness_db.shape == f.centroid_hz.shape == (n // RHYTHM_HOP + 1,)
    assert f.chroma36.shape == f.bass36.shape == (36, n // PITCH_HOP + 1)
    assert f.onset.dtype == f.chroma36.dtype == np.float32
    assert f.peak == pytest.approx(0.5, abs=1e-3)


def test_loudness_and_centroid_of_a_sine() -> None:
    f = compute_features([_sine(1000.0, 3.0, amplitude=0.5)], sample_rate=SR)
    middle = slice(20, -20)  # away from the zero padding at both ends

    # RMS of a 0.5 sine is 0.354: -9.03 dBFS
    np.testing.assert_allclose(f.loudness_db[middle], 20 * np.log10(0.5 / np.sqrt(2)), atol=0.1)
    np.testing.assert_allclose(f.centroid_hz[middle], 1000.0, rtol=0.03)


def test_onset_peaks_at_a_click() -> None:
    y = np.zeros(16 * 4096, dtype=np.float32)
    at = int(1.5 * SR)
    y[at : at + 64] = np.hanning(64).astype(np.float32)

    f = compute_features(_blocks(y, 4096), sample_rate=SR)

    for band in f.onset:
        assert abs(int(np.argmax(band)) / f.onset_rate - 1.5) <= 2 / f.onset_rate


def test_silence_has_no_onsets_and_floor_loudness() -> None:
    f = compute_features([np.zeros(SR * 2, dtype=np.float32)], sample_rate=SR)

    assert f.peak == 0.0
    assert not np.any(f.onset)
    assert not np.any(f.chroma36)
    np.testing.assert_allclose(f.loudness_db, -120.0)
    assert not np.any(f.centroid_hz)


# --------------------------------------------------------------------------------------------------
# Pitch


@pytest.mark.parametrize(
    ("freq", "pitch_class"),
    [(440.0, 9), (261.63, 0), (329.63, 4), (392.0, 7), (880.0, 9), (466.16, 10)],
    ids=["A4", "C4", "E4", "G4", "A5", "Bb4"],
)
def test_a_tone_puts_the_chroma_maximum_on_its_pitch_class(freq: float, pitch_class: int) -> None:
    f = compute_features([_sine(freq, 3.0)], sample_rate=SR)

    profile36 = f.chroma36.sum(axis=1)
    profile12 = fold_chroma(f.chroma36.astype(np.float64)).sum(axis=1)

    assert int(np.argmax(profile36)) == 3 * pitch_class  # bin 3 * pc is centred on the note
    assert int(np.argmax(profile12)) == pitch_class
    assert profile12[pitch_class] > 5 * np.sort(profile12)[-2]


def test_bass_chroma_only_sees_the_bass_register() -> None:
    low = compute_features([_sine(110.0, 3.0)], sample_rate=SR)  # A2: in both ranges
    high = compute_features([_sine(440.0, 3.0)], sample_rate=SR)  # A4: above the bass range

    assert int(np.argmax(low.bass36.sum(axis=1))) == 27
    assert int(np.argmax(low.chroma36.sum(axis=1))) == 27
    assert float(high.bass36.sum()) < 1e-3 * float(high.chroma36.sum())


# --------------------------------------------------------------------------------------------------
# Features.window


@pytest.fixture(scope="module")
def features(song: FloatArray) -> Features:
    return compute_features(_blocks(song, 65536), sample_rate=SR)


@pytest.mark.parametrize(("start", "end"), [(2.0, 5.0), (0.0, 1.3), (0.37, 7.91), (4.0, 4.5)])
def test_window_slices_every_array_alike(features: Features, start: float, end: float) -> None:
    w = features.window(start, end)

    a, b = int(start * features.onset_rate), int(np.ceil(end * features.onset_rate))
    c, d = int(start * features.chroma_rate), int(np.ceil(end * features.chroma_rate))
    assert w.duration_s == pytest.approx(end - start)
    assert (w.sample_rate, w.onset_rate, w.chroma_rate, w.peak) == (
        features.sample_rate,
        features.onset_rate,
        features.chroma_rate,
        features.peak,
    )
    np.testing.assert_array_equal(w.onset, features.onset[:, a:b])
    np.testing.assert_array_equal(w.loudness_db, features.loudness_db[a:b])
    np.testing.assert_array_equal(w.centroid_hz, features.centroid_hz[a:b])
    np.testing.assert_array_equal(w.chroma36, features.chroma36[:, c:d])
    np.testing.assert_array_equal(w.bass36, features.bass36[:, c:d])
    # both frame grids cover the same stretch of time (to within a pitch frame)
    assert w.onset.shape[1] / w.onset_rate == pytest.approx(end - start, abs=2 / w.onset_rate)
    assert w.chroma36.shape[1] / w.chroma_rate == pytest.approx(end - start, abs=2 / w.chroma_rate)


def test_whole_window_is_the_whole_recording(features: Features) -> None:
    w = features.window(0.0, features.duration_s + 1.0)

    assert w.duration_s == features.duration_s
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(w, name), getattr(features, name))


def test_window_end_is_exclusive(features: Features) -> None:
    rate = features.onset_rate
    w = features.window(1.0, features.duration_s)

    # the last onset frame is centred on the last sample: the half-open window ends before it
    assert features.onset.shape[1] - 1 == round(features.duration_s * rate)
    assert w.onset.shape[1] == features.onset.shape[1] - 1 - int(1.0 * rate)
    np.testing.assert_array_equal(w.onset, features.onset[:, int(1.0 * rate) : -1])


def test_window_is_clamped_to_the_recording(features: Features) -> None:
    late = features.window(features.duration_s - 1.0, features.duration_s + 10.0)
    early = features.window(-3.0, 1.0)
    after = features.window(features.duration_s + 1.0, features.duration_s + 2.0)

    assert late.duration_s == pytest.approx(1.0)
    assert late.onset.shape[1] == features.onset.shape[1] - int((features.duration_s - 1.0) * late.onset_rate)
    assert early.duration_s == pytest.approx(1.0)
    assert after.duration_s == 0.0
    assert after.onset.shape == (3, 0)
    assert after.chroma36.shape == (36, 0)


def test_window_features_match_the_excerpt(song: FloatArray) -> None:
    """A window of a recording's features is close to the features of the excerpt itself."""
    whole = compute_features([song], sample_rate=SR)
    start = 2 * PITCH_HOP * 20 / SR  # on both frame grids
    excerpt = compute_features([song[round(start * SR) :]], sample_rate=SR)

    w = whole.window(start, whole.duration_s)

    n, m = w.onset.shape[1], w.chroma36.shape[1]
    assert excerpt.onset.shape[1] - n in (0, 1)
    assert excerpt.chroma36.shape[1] - m in (0, 1)
    inner = slice(8, n - 8)  # away from the edges, where the excerpt's frames see zero padding
    np.testing.assert_allclose(w.loudness_db[inner], excerpt.loudness_db[inner], atol=1e-3)
    np.testing.assert_allclose(w.onset[:, inner], excerpt.onset[:, inner], atol=1e-4)
    np.testing.assert_allclose(
        w.chroma36[:, 3 : m - 3], excerpt.chroma36[:, 3 : m - 3], atol=1e-3 * float(whole.chroma36.max())
    )
