"""Where requests' files live: paths inside the media root, checked without opening anything."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from analysis_service.errors import FileUnreadable, PathOutsideMediaRoot


def resolve_media_path(media_root: Path, file: str) -> Path:
    """The absolute path of ``file`` inside ``media_root`` (symlinks resolved; nothing is opened).

    Raises
    ------
    PathOutsideMediaRoot
        When the path (relative or absolute, or a symlink in it) leads outside the media root.
    FileUnreadable
        When the path cannot be resolved (a symlink loop, a name too long).
    """
    root = media_root.resolve()
    candidate = Path(file)
    try:
        path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise FileUnreadable(f"the path cannot be resolved: {exc}", path=file) from None
    if not path.is_relative_to(root):
        raise PathOutsideMediaRoot(f"path {file} leads outside the media root {root}", path=file)
    return path


@dataclass(frozen=True)
class FileIdentity:
    """A file's path and ``stat`` identity: when all of it is unchanged, so are its bytes."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        """Stat ``path`` (following symlinks); raises ``OSError`` like :func:`os.stat`."""
        name = os.path.abspath(path)
        st = os.stat(name)
        return cls(name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
