"""Finding the files to analyse: folders walked recursively, with globs, hidden files and symlinks."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

#: Extensions picked up when a folder is given (explicit files are analysed whatever their name).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff", ".wma", ".mp4"}
)


class Interrupted(Exception):
    """The search was stopped (Ctrl-C) before it finished."""


@dataclass(frozen=True)
class Selection:
    """Which files under a folder are taken.

    Attributes
    ----------
    include : tuple of str
        Globs; when given, a file found in a folder is taken only if its name or its path relative to
        that folder matches one (instead of having an audio extension).
    exclude : tuple of str
        Globs; a file or folder whose name or relative path matches one is skipped, also when given
        explicitly.
    hidden : bool
        Take files and folders whose name starts with a dot (found in folders).
    follow_symlinks : bool
        Follow symbolic links found in folders (each file and folder is still visited once).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    hidden: bool = False
    follow_symlinks: bool = True
    stop: threading.Event = field(default_factory=threading.Event, compare=False)
    #: Folders that could not be read, with the reason (filled during the search).
    warnings: list[str] = field(default_factory=list, compare=False)

    def excluded(self, relative: PurePosixPath) -> bool:
        return any(_matches(relative, glob) for glob in self.exclude)

    def included(self, relative: PurePosixPath) -> bool:
        if self.include:
            return any(_matches(relative, glob) for glob in self.include)
        return relative.suffix.lower() in AUDIO_EXTENSIONS


def _matches(relative: PurePosixPath, glob: str) -> bool:
    return fnmatchcase(relative.name, glob) or fnmatchcase(relative.as_posix(), glob)


def expand_paths(paths: Iterable[Path], selection: Selection | None = None) -> Iterator[Path]:
    """Files as given, and the files selected under folders (sorted by name, each file once).

    Raises
    ------
    Interrupted
        When ``selection.stop`` is set during the search.
    """
    sel = selection or Selection()
    seen: set[str] = set()
    for p in paths:
        if p.is_dir():
            for found in _walk(p, sel, PurePosixPath(), visited=set()):
                key = os.path.realpath(found)
                if key not in seen:
                    seen.add(key)
                    yield found
        elif not sel.excluded(PurePosixPath(p.name)):
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                yield p


def _walk(folder: Path, sel: Selection, relative: PurePosixPath, *, visited: set[str]) -> Iterator[Path]:
    if sel.stop.is_set():
        raise Interrupted("stopped while searching for files")
    real = os.path.realpath(folder)
    if real in visited:  # a symlink loop
        return
    visited.add(real)
    try:
        entries: Sequence[os.DirEntry[str]] = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        sel.warnings.append(f"cannot read folder {folder}: {exc.strerror or exc}")
        return
    for entry in entries:
        rel = relative / entry.name
        if (not sel.hidden and entry.name.startswith(".")) or sel.excluded(rel):
            continue
        if entry.is_symlink() and not sel.follow_symlinks:
            continue
        try:
            is_dir = entry.is_dir()
            is_file = entry.is_file()
        except OSError as exc:
            sel.warnings.append(f"cannot read {entry.path}: {exc.strerror or exc}")
            continue
        if is_dir:
            yield from _walk(Path(entry.path), sel, rel, visited=visited)
        elif is_file and sel.included(rel):
            yield Path(entry.path)
