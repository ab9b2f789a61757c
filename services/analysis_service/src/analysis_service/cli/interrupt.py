"""Ctrl-C and SIGTERM for the local commands: the first stops the run gracefully, the second at once.

SIGINT and SIGTERM are blocked in the calling thread and received by a ``sigwait`` thread instead.
A blocked signal stays blocked in every thread and process started afterwards, so the analysis
processes do not see the terminal's Ctrl-C (which goes to the whole foreground process group):
they cannot die half-way with a traceback of their own, and stop only when the command kills them.

The first signal calls ``on_first`` on the event loop. The second kills every process the command
started (recursively) and ends the command with status 130 right away, from the signal thread, so it
works even while the loop is busy.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Final

import psutil

#: Exit status after an interruption (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED: Final = 130
SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM})
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


class Interrupts:
    """Receives SIGINT/SIGTERM while a command runs (see the module docstring).

    Use as a context manager around the command; ``attach(loop, on_first)`` once the loop runs.
    """

    def __init__(self) -> None:
        self.count = 0
        #: Set at the first signal (for work outside the event loop, e.g. searching folders).
        self.event = threading.Event()
        self.signal: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_first: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._old_mask: set[int | signal.Signals] = set()

    def __enter__(self) -> Interrupts:
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        self._thread = threading.Thread(target=self._wait, name="signals", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        if self._thread is not None and self._thread.ident is not None:
            signal.pthread_kill(self._thread.ident, signal.SIGTERM)  # wakes its sigwait
            self._thread.join(timeout=2)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def attach(self, loop: asyncio.AbstractEventLoop, on_first: Callable[[], None]) -> None:
        """Call ``on_first`` on ``loop`` at the first signal (at once if one already came)."""
        with self._lock:
            self._loop, self._on_first = loop, on_first
            pending = self.count > 0
        if pending:
            loop.call_soon(on_first)

    def detach(self) -> None:
        with self._lock:
            self._loop, self._on_first = None, None

    @property
    def interrupted(self) -> bool:
        return self.count > 0

    def _wait(self) -> None:
        while True:
            sig = signal.sigwait(SIGNALS)
            if self._closing:
                return
            with self._lock:
                self.count += 1
                self.signal = sig
                self.event.set()
                first, loop, on_first = self.count == 1, self._loop, self._on_first
            if not first:
                self._abort()
            if loop is not None and on_first is not None:
                try:
                    loop.call_soon_threadsafe(on_first)
                except RuntimeError:  # the loop has closed: the command is finishing anyway
                    continue

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
