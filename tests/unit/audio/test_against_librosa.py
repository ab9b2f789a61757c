"""librosa as an independent reference: its click tracks, tones and note names."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from analysis_service.audio.key import NOTE_NAMES, fold_chroma
from analysis_service.audio.tempo import estimate_tempo
from tests.unit.audio.conftest import SR, features_of_signal


@pytest.mark.parametrize("bpm", [90.0, 105.0, 128.0, 140.0])
def test_tempo_of_a_librosa_click_track(bpm: float) -> None:
    beats = np.arange(0.0, 30.0, 60.0 / bpm)
    accents = librosa.clicks(times=beats[::2], sr=SR, click_freq=120.0, length=30 * SR)  # "kick"
    backbeat = librosa.clicks(times=beats[1::2], sr=SR, click_freq=1500.0, length=30 * SR)  # "snare"
    est = estimate_tempo(features_of_signal((accents + 0.7 * backbeat).astype(np.float32)))
    assert est.bpm == pytest.approx(bpm, rel=0.04)


@pytest.mark.parametrize("midi", [45, 52, 57, 61, 64, 66, 70, 74, 79])
def test_pitch_class_matches_librosa_note_names(midi: int) -> None:
    tone = librosa.tone(librosa.midi_to_hz(midi), sr=SR, duration=4.0).astype(np.float32)
    f = features_of_signal(0.5 * tone)
    chroma = fold_chroma(f.chroma36).sum(axis=1)
    name = librosa.midi_to_note(midi, octave=False, unicode=False)
    enharmonic = {"C#": "C#", "D#": "Eb", "F#": "F#", "G#": "Ab", "A#": "Bb"}
    assert NOTE_NAMES[int(np.argmax(chroma))] == enharmonic.get(name, name)
