"""Factories for features of synthetic signals with known tempo and key."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from analysis_service.audio.features import Features, compute_features
from analysis_service.audio.synth import demo_song

SR = 22050

FeaturesOf = Callable[..., Features]


def features_of_signal(y: np.ndarray, *, block: int = 65536) -> Features:
    """Features of a mono float32 signal, fed in blocks as the decoder would."""
    return compute_features((y[i : i + block] for i in range(0, len(y), block)), sample_rate=SR)


@pytest.fixture
def song_features() -> FeaturesOf:
    """``song_features(bpm=..., tonic=..., mode=..., seconds=..., **demo_song kwargs)``."""

    def make(**kw: object) -> Features:
        kw.setdefault("seconds", 30.0)
        return features_of_signal(demo_song(sample_rate=SR, **kw))  # type: ignore[arg-type]

    return make
