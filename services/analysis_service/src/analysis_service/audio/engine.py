"""The engine: one file in, one :class:`~service_shared.messages.EngineOutput` out.

``analyze_file`` is a module-level, keyword-only, pure function of a path and small picklable
arguments, so it can run in a process pool; it returns a pydantic model that pickles back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from analysis_service.audio.decode import AudioInfo, iter_mono_blocks, probe
from analysis_service.audio.features import FeatureExtractor, Features
from analysis_service.audio.key import NOTE_NAMES, KeyEstimate
from analysis_service.audio.mood import MoodEstimate
from analysis_service.audio.registry import Analyzer, build_registry, resolve
from analysis_service.audio.tags import MusicalKey, check_tags, read_tags
from analysis_service.audio.tempo import BpmRange, TempoEstimate, reported_in_range
from analysis_service.audio.timeline import estimate_timeline, reconcile
from analysis_service.errors import SilentAudio, TooLong, TooShort
from analysis_service.settings import EngineSettings
from service_shared.messages import EngineOutput, KeyResult, MoodResult, Segment, TempoResult, TrackTags

#: ``progress(fraction, stage)``: fraction of the work done in [0, 1] and the current stage name.
ProgressCallback = Callable[[float, str], None]

#: Below this peak level (dBFS) a recording counts as silence.
SILENCE_PEAK_DBFS = -70.0
MIN_DURATION_S = 2.0
#: Share of the progress bar given to decoding + features (the rest is analysis).
_DECODE_SHARE = 0.85


def _noop(_fraction: float, _stage: str) -> None:
    return None


def analyze_file(
    path: str | os.PathLike[str],
    *,
    settings: EngineSettings,
    analyses: Iterable[str] | None = None,
    timeline: bool | None = None,
    progress: ProgressCallback | None = None,
    registry: Mapping[str, Analyzer] | None = None,
    info: AudioInfo | None = None,
    bpm_range: BpmRange | None = None,
) -> EngineOutput:
    """Decode ``path`` once, compute the shared features once, and run the analyzers over them.

    Parameters
    ----------
    path : path-like
        The audio file.
    settings : EngineSettings
        Analysis rate and input limits.
    analyses : iterable of str, optional
        Analyzer names to report (default: all registered). Dependencies run as needed.
    timeline : bool, optional
        Force or suppress the segment timeline; by default only files longer than
        ``settings.timeline_threshold_s`` get one.
    progress : callable, optional
        Called with ``(fraction, stage)`` as work proceeds (at least once per decoded block).
    registry : mapping, optional
        Analyzers by name (default: :func:`build_registry`).
    info : AudioInfo, optional
        What :func:`~analysis_service.audio.decode.probe` returned for this file, unchanged since,
        with these ``settings`` (the file is then not probed again). By default it is probed here.
    bpm_range : (float, float), optional
        ``(low, high)``: the tempo (and each timeline segment's) is reported at the metrical level
        within this range (:func:`~analysis_service.audio.tempo.reported_in_range`), as DJ
        applications do. It changes how the tempo is reported, not what the analyzers read (mood
        and plugins see the tempo a listener most likely taps). Default: ``settings.bpm_range``.

    Raises
    ------
    analysis_service.errors.AudioInputError
        A subclass naming what is wrong with the input (missing, not audio, silent, too long...).
    ValueError
        ``info`` describes another path.
    """
    if info is not None and info.path != os.fspath(path):
        raise ValueError(f"info describes {info.path!r}, not {os.fspath(path)!r}")
    report = progress or _noop
    registry = build_registry() if registry is None else registry
    plan = resolve(registry, analyses)
    wanted = set(registry) if analyses is None else set(analyses)
    timings: dict[str, float] = {}
    bpm_range = bpm_range if bpm_range is not None else settings.bpm_range

    t0 = time.perf_counter()
    if info is None:
        info = probe(path, settings=settings)
    report(0.0, "decode")
    features, features_s = _extract(
        info_blocks=iter_mono_blocks(info, target_rate=settings.sample_rate),
        sample_rate=settings.sample_rate,
        expected_s=info.duration_s,
        report=report,
        max_s=settings.max_duration_s,
        path=str(path),
    )
    timings["decode"] = round(time.perf_counter() - t0 - features_s, 4)  # (probe) + decode + resample
    timings["features"] = round(features_s, 4)
    _check_signal(features, path=str(path))
    t = time.perf_counter()
    tags = read_tags(path, codec=info.codec, bit_rate=info.bit_rate)
    timings["tags"] = round(time.perf_counter() - t, 4)

    results: dict[str, Any] = {}
    for i, analyzer in enumerate(plan):
        report(_DECODE_SHARE + (1 - _DECODE_SHARE) * i / (len(plan) + 1), analyzer.name)
        t = time.perf_counter()
        results[analyzer.name] = analyzer.run(features, results)
        timings[analyzer.name] = round(time.perf_counter() - t, 4)

    tempo = results.get("bpm")
    if bpm_range is not None and isinstance(tempo, TempoEstimate):
        # How the tempo is reported, not what the analyzers read: mood saw the tempo of the audio.
        t = time.perf_counter()
        results["bpm"] = reported_in_range(features, tempo, bpm_range)
        timings["bpm"] = round(timings.get("bpm", 0.0) + time.perf_counter() - t, 4)
    segments = None
    if timeline if timeline is not None else features.duration_s > settings.timeline_threshold_s:
        report(_DECODE_SHARE + (1 - _DECODE_SHARE) * len(plan) / (len(plan) + 1), "timeline")
        t = time.perf_counter()
        found = estimate_timeline(features, bpm_range=bpm_range)
        if isinstance(results.get("bpm"), TempoEstimate) and isinstance(results.get("key"), KeyEstimate):
            # One response must not contradict itself: the file's tempo and key are the timeline's.
            results["bpm"], results["key"], found = reconcile(results["bpm"], results["key"], found)
        segments = [Segment(start_s=s.start_s, end_s=s.end_s, bpm=s.bpm, key=s.key) for s in found]
        timings["timeline"] = round(time.perf_counter() - t, 4)
    timings["total"] = round(time.perf_counter() - t0, 4)
    report(1.0, "done")
    return _output(info, features, results, wanted, plan, segments, timings, tags)


def _extract(
    *,
    info_blocks: Iterable[np.ndarray],
    sample_rate: int,
    expected_s: float,
    report: ProgressCallback,
    max_s: float,
    path: str,
) -> tuple[Features, float]:
    """Stream decoded blocks through the feature extractor; return the features and their seconds.

    Decoding stops with ``TooLong`` once more than ``max_s`` seconds decoded, whatever the header
    said (a streamed FLAC or an MP3 without a length declares none).
    """
    fx = FeatureExtractor(sample_rate=sample_rate)
    expected = max(expected_s * sample_rate, 1.0)
    done = 0
    features_s = 0.0
    for block in info_blocks:
        if done + len(block) > max_s * sample_rate:
            raise TooLong(
                f"more than {max_s / 60:.1f} min of audio decoded (the limit); the header said "
                + (f"{expected_s / 60:.1f} min" if expected_s > 0 else "nothing about its length"),
                path=path,
            )
        t = time.perf_counter()
        fx.push(block)
        features_s += time.perf_counter() - t
        done += len(block)
        report(min(done / expected, 1.0) * _DECODE_SHARE, "decode")
    t = time.perf_counter()
    features = fx.finish()
    return features, features_s + time.perf_counter() - t


def _check_signal(features: Features, *, path: str) -> None:
    if features.duration_s < MIN_DURATION_S:
        raise TooShort(
            f"audio is {features.duration_s:.2f} s long; at least {MIN_DURATION_S:.0f} s is needed", path=path
        )
    peak_db = 20 * np.log10(max(features.peak, 1e-12))
    if peak_db < SILENCE_PEAK_DBFS:
        raise SilentAudio(
            f"audio is silent (peak {peak_db:.1f} dBFS, threshold {SILENCE_PEAK_DBFS:.0f} dBFS)", path=path
        )


def _output(
    info: Any,
    features: Features,
    results: Mapping[str, Any],
    wanted: set[str],
    plan: list[Analyzer],
    segments: list[Segment] | None,
    timings: dict[str, float],
    tags: TrackTags,
) -> EngineOutput:
    tempo = results.get("bpm") if "bpm" in wanted else None
    key = results.get("key") if "key" in wanted else None
    mood = results.get("mood") if "mood" in wanted else None
    builtin = {"bpm", "key", "mood"}
    measured_key = (
        MusicalKey(NOTE_NAMES.index(key.tonic), "minor" if key.mode == "minor" else "major")
        if isinstance(key, KeyEstimate) and key.tonic in NOTE_NAMES
        else None
    )
    return EngineOutput(
        duration_s=round(features.duration_s, 3),
        source_sample_rate=info.sample_rate,
        source_channels=info.channels,
        format=info.format,
        tempo=_tempo(tempo) if isinstance(tempo, TempoEstimate) else None,
        key=_key(key) if isinstance(key, KeyEstimate) else None,
        mood=_mood(mood) if isinstance(mood, MoodEstimate) else None,
        timeline=segments,
        extra={name: results[name] for name in results if name in wanted and name not in builtin},
        analyzer_versions={a.name: a.version for a in plan},
        timings_s=timings,
        tags=tags,
        tag_check=check_tags(
            tags, bpm=tempo.bpm if isinstance(tempo, TempoEstimate) else None, key=measured_key
        ),
    )


def _tempo(t: TempoEstimate) -> TempoResult:
    return TempoResult(bpm=t.bpm, confidence=t.confidence)


def _key(k: KeyEstimate) -> KeyResult:
    return KeyResult(key=k.name, tonic=k.tonic, mode=k.mode, camelot=k.camelot, confidence=k.confidence)


def _mood(m: MoodEstimate) -> MoodResult:
    return MoodResult(
        energy=m.energy,
        valence=m.valence,
        danceability=m.danceability,
        label=m.label,
        confidence=m.confidence,
    )
