"""Ctrl-C and SIGTERM for the local commands: the first stops the run gracefully, the second at once.

The first signal calls ``on_first`` on the event loop. The second kills every process the command
started (recursively) and ends the command with status 130 right away, from the signal handler, so
it works even while the loop is busy.

A terminal's Ctrl-C goes to the whole foreground process group, so the analysis processes would get
it too and die half-way with a traceback of their own. While :class:`Interrupts` is active, every
process :mod:`multiprocessing` starts is therefore started through ``/bin/sh`` with SIGINT and
SIGTERM ignored (``trap '' INT TERM; exec python ...``: an ignored signal stays ignored across
``exec``, and Python keeps it ignored). They stop only when the command kills them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.util
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

import psutil

#: Exit status after an interruption (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED: Final = 130
SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
_SHOW_CURSOR: Final = b"\x1b[?25h"


def kill_children() -> None:
    """SIGKILL every descendant process of this one."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(children, timeout=2)


#: Runs ``"$0" "$@"`` (the real command) with SIGINT and SIGTERM ignored.
_IGNORING_SHELL: Final = 'trap \'\' INT TERM; exec "$0" "$@"'


class Interrupts:
    """Receives SIGINT/SIGTERM while a command runs (see the module docstring).

    Use as a context manager around the command, in the main thread; ``attach(loop, on_first)`` once
    the loop runs.
    """

    def __init__(self) -> None:
        self.count = 0
        self.signal: int | None = None
        #: Set at the first signal (for work outside the event loop, e.g. searching folders).
        self.event = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_first: Callable[[], None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._old_handlers: dict[int, Any] = {}
        self._spawn: Callable[..., int] | None = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        self._old_handlers = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        if os.path.exists("/bin/sh"):
            self._spawn = multiprocessing.util.spawnv_passfds
            multiprocessing.util.spawnv_passfds = self._spawn_ignoring_signals
        return self

    def __exit__(self, *exc: object) -> None:
        if self._spawn is not None:
            multiprocessing.util.spawnv_passfds = self._spawn
            self._spawn = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def attach(self, loop: asyncio.AbstractEventLoop, on_first: Callable[[], None]) -> None:
        """Call ``on_first`` on ``loop`` at the first signal (soon, if one already came)."""
        self._loop, self._on_first = loop, on_first
        self._ticking()
        if self.count:
            loop.call_soon(on_first)

    def _ticking(self) -> None:
        """Wake the loop a few times a second: a signal that another thread received is handled in
        the main thread only once it runs Python code again."""
        if self._loop is not None:
            self._tick = self._loop.call_later(0.2, self._ticking)

    def detach(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
        self._loop, self._on_first, self._tick = None, None, None

    @property
    def interrupted(self) -> bool:
        return self.count > 0

    def _handle(self, sig: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.signal = sig
        self.event.set()
        if self.count > 1:
            self._abort()
        loop, on_first = self._loop, self._on_first
        if loop is not None and on_first is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the command is finishing anyway
                loop.call_soon_threadsafe(on_first)

    def _spawn_ignoring_signals(self, path: Any, args: Any, passfds: Any) -> int:
        """``multiprocessing.util.spawnv_passfds`` through ``/bin/sh`` ignoring SIGINT and SIGTERM."""
        assert self._spawn is not None
        shell = b"/bin/sh" if isinstance(path, bytes) else "/bin/sh"
        command = ["/bin/sh", "-c", _IGNORING_SHELL, os.fsdecode(path), *list(args)[1:]]
        return self._spawn(shell, command, passfds)

    def _abort(self) -> None:
        """Second signal: kill the children and exit now (no cleanup of this process is awaited)."""
        kill_children()
        message = b"\naborted\n"
        if sys.stderr is not None and sys.stderr.isatty():
            message = _SHOW_CURSOR + message
        try:
            os.write(2, message)
        finally:
            os._exit(EXIT_INTERRUPTED)
