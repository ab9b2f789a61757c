"""Where requests' files live: paths inside the media root, checked without opening anything."""

from __future__ import annotations

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
