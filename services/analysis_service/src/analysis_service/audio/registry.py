"""Analyzers: named, versioned, pure functions over the shared features.

The built-in analyzers are ``bpm``, ``key`` and ``mood``. A third-party package adds one by
exposing an :class:`Analyzer` in the ``analysis_service.analyzers`` entry-point group::

    [project.entry-points."analysis_service.analyzers"]
    loudness = "my_package.analyzers:LOUDNESS"

Its ``run(features, results)`` receives the shared :class:`~analysis_service.audio.features.Features`
and the results of the analyzers it ``requires``; it returns a JSON-serialisable dict, which
appears under ``extra[<name>]`` in the engine's output. Bumping ``version`` invalidates cached
results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from analysis_service.audio.features import Features
from analysis_service.audio.key import KeyEstimate, estimate_key
from analysis_service.audio.mood import estimate_mood
from analysis_service.audio.tempo import TempoEstimate, estimate_tempo
from analysis_service.errors import UnknownAnalyzer

ENTRY_POINT_GROUP = "analysis_service.analyzers"


@dataclass(frozen=True)
class Analyzer:
    """A named, versioned analysis over the shared features.

    Attributes
    ----------
    name : str
        Unique name; also the key of its result.
    version : str
        Bump when results change; recorded with every result.
    run : callable
        ``run(features, results) -> result``; ``results`` maps each name in ``requires`` to that
        analyzer's result.
    requires : tuple of str
        Analyzers whose results ``run`` needs; they run first.
    """

    name: str
    version: str
    run: Callable[[Features, Mapping[str, Any]], Any]
    requires: tuple[str, ...] = ()


def _mood(features: Features, results: Mapping[str, Any]) -> Any:
    tempo: TempoEstimate = results["bpm"]
    key: KeyEstimate = results["key"]
    return estimate_mood(features, tempo=tempo, key=key)


BUILTIN_ANALYZERS: tuple[Analyzer, ...] = (
    Analyzer("bpm", "1.6.0", lambda f, _r: estimate_tempo(f)),
    Analyzer("key", "1.1.0", lambda f, _r: estimate_key(f)),
    Analyzer("mood", "1.5.0", _mood, requires=("bpm", "key")),
)


def build_registry(extra: Iterable[Analyzer] = (), *, load_entry_points: bool = True) -> dict[str, Analyzer]:
    """The analyzers by name: built-ins, then entry-point plugins, then ``extra``."""
    found = list(BUILTIN_ANALYZERS)
    if load_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            analyzer = ep.load()
            if not isinstance(analyzer, Analyzer):
                raise TypeError(f"entry point {ep.name!r} ({ep.value}) is not an Analyzer: {analyzer!r}")
            found.append(analyzer)
    found.extend(extra)
    return {a.name: a for a in found}


def resolve(registry: Mapping[str, Analyzer], names: Iterable[str] | None) -> list[Analyzer]:
    """The analyzers to run for ``names`` (all when None), dependencies first."""
    wanted = list(registry) if names is None else list(names)
    order: list[Analyzer] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise UnknownAnalyzer(f"analyzer dependency cycle: {' -> '.join((*chain, name))}")
        if any(a.name == name for a in order):
            return
        if name not in registry:
            known = ", ".join(sorted(registry))
            raise UnknownAnalyzer(f"unknown analyzer {name!r} (known: {known})")
        for dep in registry[name].requires:
            visit(dep, (*chain, name))
        order.append(registry[name])

    for name in wanted:
        visit(name, ())
    return order
