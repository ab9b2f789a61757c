from __future__ import annotations

import pytest

from analysis_service.audio.key import NOTE_NAMES, camelot, estimate_key
from tests.unit.audio.conftest import FeaturesOf


@pytest.mark.parametrize(
    ("pc", "mode", "code"),
    [
        (9, "minor", "8A"),
        (0, "major", "8B"),
        (7, "major", "9B"),
        (4, "minor", "9A"),
        (6, "major", "2B"),
        (5, "minor", "4A"),
    ],
)
def test_camelot_codes(pc: int, mode: str, code: str) -> None:
    assert camelot(pc, mode) == code


@pytest.mark.parametrize(
    ("tonic", "mode"), [(0, "major"), (9, "minor"), (7, "major"), (4, "minor"), (10, "major"), (1, "minor")]
)
def test_key_of_a_cadential_progression(song_features: FeaturesOf, tonic: int, mode: str) -> None:
    est = estimate_key(song_features(bpm=110, tonic=tonic, mode=mode))
    assert (est.tonic, est.mode) == (NOTE_NAMES[tonic], mode)
    assert est.camelot == camelot(tonic, mode)
    assert 0.0 < est.confidence <= 1.0


def test_drums_only_give_no_key_confidence(song_features: FeaturesOf) -> None:
    est = estimate_key(song_features(bpm=110, tonic=0, mode="major", harmony=0.0))
    assert est.confidence < 0.3
