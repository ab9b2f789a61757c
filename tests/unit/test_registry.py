"""The analyzer registry: built-ins, dependency order, unknown names, cycles, extras and plugins."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from analysis_service.audio.engine import analyze_file
from analysis_service.audio.features import Features
from analysis_service.audio.registry import (
    BUILTIN_ANALYZERS,
    ENTRY_POINT_GROUP,
    Analyzer,
    build_registry,
    resolve,
)
from analysis_service.audio.synth import demo_song
from analysis_service.audio.tempo import TempoEstimate
from analysis_service.errors import UnknownAnalyzer
from analysis_service.settings import EngineSettings

SR = 22050


def _const(value: object) -> Callable[[Features, Mapping[str, Any]], Any]:
    def run(_features: Features, _results: Mapping[str, Any]) -> Any:
        return value

    return run


def _names(analyzers: list[Analyzer]) -> list[str]:
    return [a.name for a in analyzers]


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6 s song at 120 BPM in A minor."""
    path = tmp_path_factory.mktemp("registry") / "song.wav"
    sf.write(path, demo_song(bpm=120.0, tonic=9, mode="minor", seconds=6.0, sample_rate=SR), SR)
    return path


# --------------------------------------------------------------------------------------------------
# Built-ins and resolution


def test_builtins_are_registered_with_versions() -> None:
    registry = build_registry(load_entry_points=False)

    assert list(registry) == ["bpm", "key", "mood"]
    for name, analyzer in registry.items():
        assert analyzer.name == name
        assert analyzer.version
        assert all(part.isdigit() for part in analyzer.version.split(".")), analyzer.version
    assert registry["mood"].requires == ("bpm", "key")
    assert registry["bpm"].requires == registry["key"].requires == ()


def test_default_registry_contains_the_builtins() -> None:
    registry = build_registry()

    assert {a.name: a for a in BUILTIN_ANALYZERS}.items() <= registry.items()


def test_resolve_all_puts_dependencies_first() -> None:
    order = _names(resolve(build_registry(load_entry_points=False), None))

    assert sorted(order) == ["bpm", "key", "mood"]
    assert order.index("mood") > order.index("bpm")
    assert order.index("mood") > order.index("key")


def test_resolve_only_mood_pulls_in_its_dependencies() -> None:
    assert _names(resolve(build_registry(load_entry_points=False), ["mood"])) == ["bpm", "key", "mood"]


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["bpm"], ["bpm"]),
        (["key", "bpm"], ["key", "bpm"]),
        (["bpm", "bpm", "mood"], ["bpm", "key", "mood"]),
        (["mood", "key"], ["bpm", "key", "mood"]),
        ([], []),
    ],
)
def test_resolve_runs_each_analyzer_once(names: list[str], expected: list[str]) -> None:
    assert _names(resolve(build_registry(load_entry_points=False), names)) == expected


def test_resolve_orders_a_chain_of_extras() -> None:
    registry = build_registry(
        [
            Analyzer("c", "1", _const(3), requires=("b",)),
            Analyzer("b", "1", _const(2), requires=("a", "key")),
            Analyzer("a", "1", _const(1)),
        ],
        load_entry_points=False,
    )

    assert _names(resolve(registry, ["c"])) == ["a", "key", "b", "c"]


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownAnalyzer, match=r"'tempo'.*known: bpm, key, mood") as caught:
        resolve(build_registry(load_entry_points=False), ["bpm", "tempo"])

    assert caught.value.code == "unknown_analyzer"


def test_unknown_dependency_is_refused() -> None:
    registry = build_registry([Analyzer("x", "1", _const(0), requires=("nope",))], load_entry_points=False)

    with pytest.raises(UnknownAnalyzer, match="'nope'"):
        resolve(registry, ["x"])


@pytest.mark.parametrize(
    "extra",
    [
        [Analyzer("a", "1", _const(0), requires=("b",)), Analyzer("b", "1", _const(0), requires=("a",))],
        [Analyzer("a", "1", _const(0), requires=("a",))],
        [
            Analyzer("a", "1", _const(0), requires=("bpm", "b")),
            Analyzer("b", "1", _const(0), requires=("c",)),
            Analyzer("c", "1", _const(0), requires=("a",)),
        ],
    ],
    ids=["two", "self", "three"],
)
def test_dependency_cycle_is_refused(extra: list[Analyzer]) -> None:
    registry = build_registry(extra, load_entry_points=False)

    with pytest.raises(UnknownAnalyzer, match=r"cycle: a -> .*a"):
        resolve(registry, ["a"])
    with pytest.raises(UnknownAnalyzer, match="cycle"):
        resolve(registry, None)


# --------------------------------------------------------------------------------------------------
# Extra analyzers in the engine


def test_extra_analyzer_is_run_by_the_engine(song: Path) -> None:
    seen: dict[str, Any] = {}

    def loudness(features: Features, results: Mapping[str, Any]) -> dict[str, float]:
        seen.update(results)
        return {"peak": round(features.peak, 3), "half_bpm": results["bpm"].bpm / 2}

    registry = build_registry(
        [Analyzer("loudness", "2.1.0", loudness, requires=("bpm",))], load_entry_points=False
    )

    out = analyze_file(song, settings=EngineSettings(), registry=registry)

    assert set(seen) >= {"bpm"}
    assert isinstance(seen["bpm"], TempoEstimate)
    assert out.extra == {"loudness": {"peak": 0.9, "half_bpm": pytest.approx(60.0, rel=0.04)}}
    assert out.analyzer_versions == {"bpm": "1.6.0", "key": "1.1.0", "mood": "1.5.0", "loudness": "2.1.0"}
    assert out.tempo is not None
    assert out.tempo.bpm == pytest.approx(120.0, rel=0.04)
    assert out.timings_s["loudness"] >= 0.0


def test_only_the_extra_asked_for(song: Path) -> None:
    registry = build_registry(
        [Analyzer("twice", "0.3", lambda f, r: 2 * r["bpm"].bpm, requires=("bpm",))], load_entry_points=False
    )

    out = analyze_file(song, settings=EngineSettings(), registry=registry, analyses=["twice"])

    assert out.extra == {"twice": pytest.approx(240.0, rel=0.04)}
    assert out.tempo is None  # bpm ran as a dependency but was not asked for
    assert out.key is None
    assert out.mood is None
    assert out.analyzer_versions == {"bpm": "1.6.0", "twice": "0.3"}


def test_unknown_analysis_is_refused_before_decoding(tmp_path: Path) -> None:
    with pytest.raises(UnknownAnalyzer, match="loudness"):
        analyze_file(tmp_path / "missing.wav", settings=EngineSettings(), analyses=["loudness"])


# --------------------------------------------------------------------------------------------------
# Entry-point plugins


def _install_plugin(
    root: Path, monkeypatch: pytest.MonkeyPatch, *, body: str, attribute: str = "ANALYZER"
) -> tuple[str, str]:
    """A module and a dist-info declaring it in the analyzers group, on ``sys.path``.

    Returns the entry point's name and the module's name (unique, so that nothing is cached).
    """
    module = f"asvc_test_plugin_{uuid.uuid4().hex[:10]}"
    name = f"plugin_{module[-10:]}"
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    dist = root / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {module}:{attribute}\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, module, raising=False)  # and removed again after the test
    return name, module


PLUGIN = """
    from analysis_service.audio.registry import Analyzer

    def _centroid(features, results):
        return {"mean_centroid_hz": float(features.centroid_hz.mean()), "key": results["key"].name}

    ANALYZER = Analyzer("{name}", "4.2.0", _centroid, requires=("key",))
"""


def test_entry_point_plugin_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, song: Path) -> None:
    name, module = _install_plugin(tmp_path, monkeypatch, body=PLUGIN.replace("{name}", "brightness"))

    registry = build_registry()
    out = analyze_file(song, settings=EngineSettings(), registry=registry)

    assert list(registry) == ["bpm", "key", "mood", "brightness"]
    assert registry["brightness"].version == "4.2.0"
    assert registry["brightness"].run.__module__ == module
    assert out.analyzer_versions["brightness"] == "4.2.0"
    assert out.extra["brightness"]["key"] == "A minor"
    assert 100.0 < out.extra["brightness"]["mean_centroid_hz"] < 11025.0
    assert name  # the entry point's own name does not matter, the Analyzer's does


def test_entry_point_plugin_is_used_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, song: Path
) -> None:
    _install_plugin(tmp_path, monkeypatch, body=PLUGIN.replace("{name}", "brightness"))

    out = analyze_file(song, settings=EngineSettings(), analyses=["brightness"])

    assert set(out.extra) == {"brightness"}
    assert out.analyzer_versions == {"key": "1.1.0", "brightness": "4.2.0"}


def test_extra_comes_after_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(tmp_path, monkeypatch, body=PLUGIN.replace("{name}", "brightness"))

    registry = build_registry([Analyzer("brightness", "9.9.9", _const(None))])

    assert registry["brightness"].version == "9.9.9"


def test_entry_point_that_is_not_an_analyzer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name, module = _install_plugin(
        tmp_path, monkeypatch, body="def ANALYZER(features, results):\n    return 1\n"
    )

    with pytest.raises(TypeError, match=rf"'{name}' \({module}:ANALYZER\) is not an Analyzer"):
        build_registry()
    assert list(build_registry(load_entry_points=False)) == ["bpm", "key", "mood"]


def test_analyzers_read_the_tempo_of_the_audio_whatever_range_it_is_reported_in(song: Path) -> None:
    seen: list[float] = []

    def half(_features: Features, results: Mapping[str, Any]) -> float:
        seen.append(results["bpm"].bpm)
        return float(results["bpm"].bpm / 2)

    registry = build_registry([Analyzer("half", "1.0.0", half, requires=("bpm",))], load_entry_points=False)
    plain = analyze_file(song, settings=EngineSettings(), registry=registry)
    ranged = analyze_file(song, settings=EngineSettings(bpm_range=(125.0, 240.0)), registry=registry)

    assert len(seen) == 2
    assert seen[0] == seen[1] == pytest.approx(120.0, rel=0.04)
    assert ranged.extra == plain.extra
    assert ranged.mood == plain.mood  # mood reads the tempo and its confidence: the audio's
    assert plain.tempo is not None
    assert ranged.tempo is not None
    assert plain.tempo.bpm == pytest.approx(120.0, rel=0.04)
    assert ranged.tempo.bpm == pytest.approx(240.0, rel=0.04)
