"""Host CPU tokens: the workers of one host share its cores instead of oversubscribing them.

Each worker defaults to one analysis slot per CPU it may use, so two workers on one host would run
twice as many analysis processes as there are cores: each analysis then costs more CPU (caches,
context switches) and more wall time (against its time limit), and two workers are slower than
one. With tokens, a slot's process works for a request only while the slot holds one of the host's
CPU tokens, so the workers sharing them never run more analyses at once than there are CPUs.

A token is an exclusive ``flock`` on one of ``count`` lock files (``cpu-0.lock`` ...) in a folder
named for the CPU set (:func:`token_dir`), so workers pinned to other cores (``taskset``, cpusets)
do not share theirs. The kernel drops a flock when the process holding it dies (SIGKILL, the OOM
killer): a dead worker never keeps a token. Tokens are taken by the worker's main process; its
analysis processes inherit none (Python opens files non-inheritable, i.e. ``O_CLOEXEC``).

Waiting costs no CPU: a waiter sleeps in the kernel, in a blocking ``flock`` on its preferred
token file (a daemon thread per waiting lease; a slot prefers the file of its own index, so the
slots of workers of equal size pair up), and the release of that file wakes it at once. Every
``sweep_s`` it also tries the other files (``LOCK_NB``), so a token that frees where nobody sleeps
is not left idle for long. An abandoned wait (cancelled, or served by the sweep) leaves its thread
blocked; the thread gives the lock back the moment it gets it.

A worker with a backlog gives a token back and asks for one in the same instant, before the
waiter the release woke has run; it would win every race. So waiters make themselves known: each
holds a shared flock on ``waiting.lock`` while it waits, and an acquire that finds one there first
yields for ``YIELD_S`` (the woken waiter takes the token meanwhile), then waits like them.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Seconds between two sweeps of the token files by a waiting acquire (each drawn from 0.5-1.5
#: times this); the release of the file it sleeps on wakes it at once.
SWEEP_S: Final = 0.05
#: Seconds an acquire that finds others waiting lets them go first.
YIELD_S: Final = 0.002
#: CPU sets whose ids, joined, are longer than this name their folder by a hash.
_LONGEST_NAME: Final = 32


def token_dir(base: Path, cpus: Iterable[int]) -> Path:
    """The folder of the tokens of CPU set ``cpus`` under ``base``: ``cpus-0-1``, or a hash for large sets."""
    ids = "-".join(str(cpu) for cpu in sorted(set(cpus)))
    if len(ids) > _LONGEST_NAME:
        ids = hashlib.sha256(ids.encode()).hexdigest()[:16]
    return base / f"cpus-{ids}"


@dataclass(frozen=True)
class CpuToken:
    """One held token: the index of its lock file and the descriptor that holds the lock."""

    index: int
    fd: int


class HostCpuTokens:
    """``count`` CPU tokens in ``directory``, shared with every process that uses the same folder.

    Parameters
    ----------
    directory : Path
        Folder of the lock files (created if missing, with default permissions: the processes
        sharing it must be able to open each other's files).
    count : int
        Number of tokens; every process sharing ``directory`` must use the same (see
        :meth:`for_cpus`, which derives both from the CPU set).
    sweep_s : float
        Mean seconds between two sweeps of every token file while waiting.
    on_wait : callable, optional
        Called with the seconds each :meth:`acquire` waited (0.0-ish when a token was free).
    """

    def __init__(
        self,
        directory: Path,
        count: int,
        *,
        sweep_s: float = SWEEP_S,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"host CPU tokens need a count of at least 1, got {count}")
        self.directory = directory
        self.count = count
        self.paths = tuple(directory / f"cpu-{i}.lock" for i in range(count))
        self._waiting = directory / "waiting.lock"
        self._sweep_s = sweep_s
        self._on_wait = on_wait
        self._held: set[int] = set()
        directory.mkdir(parents=True, exist_ok=True)
        for path in (*self.paths, self._waiting):  # a folder that cannot hold them fails now
            os.close(_open(path))

    @classmethod
    def for_cpus(
        cls,
        base: Path,
        cpus: Iterable[int],
        *,
        sweep_s: float = SWEEP_S,
        on_wait: Callable[[float], None] | None = None,
    ) -> HostCpuTokens:
        """One token per CPU of the set ``cpus``, in its own folder under ``base``.

        The count is the size of the set, not a CPU quota: containers limited to fewer CPUs than
        the host has share the host's cores, and each one's quota bounds its own slots.
        """
        ids = frozenset(cpus)
        return cls(token_dir(base, ids), len(ids), sweep_s=sweep_s, on_wait=on_wait)

    @property
    def held(self) -> int:
        """Tokens this object holds now."""
        return len(self._held)

    def try_acquire(self) -> CpuToken | None:
        """A free token now, or None (waiters elsewhere are not considered)."""
        for index, path in enumerate(self.paths):
            if index in self._held:
                continue
            fd = _open(path)
            if _lock(fd, fcntl.LOCK_EX):
                self._held.add(index)
                return CpuToken(index, fd)
            os.close(fd)
        return None

    async def acquire(self, prefer: int = 0) -> CpuToken:
        """Take a token, waiting while none is free or others wait. Give it back with :meth:`release`.

        ``prefer`` picks the token file a wait sleeps on (modulo the count). Cancelling the wait
        leaves nothing held.
        """
        started = time.monotonic()
        polite = self._others_waiting()
        token = None if polite else self.try_acquire()
        if token is None:
            token = await self._wait(prefer % self.count, polite=polite)
        if self._on_wait is not None:
            self._on_wait(time.monotonic() - started)
        return token

    def release(self, token: CpuToken) -> None:
        """Give back a token taken by :meth:`acquire` or :meth:`try_acquire`."""
        self._held.discard(token.index)
        _unlock(token.fd)

    async def _wait(self, prefer: int, *, polite: bool) -> CpuToken:
        known: int | None = None  # the shared lock on waiting.lock that says this one waits
        sleeper: _Sleeper | None = None
        try:
            if polite:
                await asyncio.sleep(YIELD_S)
            while True:
                if known is None:
                    known = self._announce()
                token = self.try_acquire()
                if token is not None:
                    return token
                if sleeper is None:
                    sleeper = _Sleeper(self.paths[prefer], prefer, asyncio.get_running_loop())
                await asyncio.wait({sleeper.woken}, timeout=self._sweep_s * random.uniform(0.5, 1.5))
                if sleeper.woken.done():
                    token, sleeper = sleeper.woken.result(), None
                    self._held.add(token.index)
                    return token
        finally:
            if sleeper is not None:
                sleeper.abandon()
            if known is not None:
                os.close(known)

    def _others_waiting(self) -> bool:
        """Whether a process (this one included) waits for a token: its shared lock blocks ours."""
        fd = _open(self._waiting)
        try:
            return not _lock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)  # and with it the probe's lock

    def _announce(self) -> int | None:
        """A descriptor holding a shared lock on ``waiting.lock``; None while a probe holds it."""
        fd = _open(self._waiting)
        if _lock(fd, fcntl.LOCK_SH):
            return fd
        os.close(fd)
        return None


class _Sleeper:
    """A daemon thread blocked in ``flock`` on one token file; ``woken`` gets the token it takes.

    Abandoned (:meth:`abandon`), it gives the lock back as soon as it has it.
    """

    def __init__(self, path: Path, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.woken: asyncio.Future[CpuToken] = loop.create_future()
        self._loop = loop
        self._mutex = threading.Lock()
        self._abandoned = False
        thread = threading.Thread(
            target=self._sleep, args=(path, index), name=f"cpu-token-{index}", daemon=True
        )
        thread.start()

    def _sleep(self, path: Path, index: int) -> None:
        fd = _open(path)
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks in the kernel until the holder lets go (or dies)
        with self._mutex:
            wanted = not self._abandoned
        if wanted:
            try:
                self._loop.call_soon_threadsafe(self._deliver, CpuToken(index, fd))
                return
            except RuntimeError:  # the event loop is closed: nobody will take it
                pass
        _unlock(fd)

    def _deliver(self, token: CpuToken) -> None:
        if self.woken.done():  # abandoned after the thread looked
            _unlock(token.fd)
        else:
            self.woken.set_result(token)

    def abandon(self) -> None:
        """Stop waiting: a token already taken is given back, one taken later too."""
        with self._mutex:
            self._abandoned = True
        if self.woken.done() and not self.woken.cancelled():
            _unlock(self.woken.result().fd)
        else:
            self.woken.cancel()


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open(path: Path) -> int:
    # Read-only is enough for flock, and lets a process open a file another user created. Python
    # makes the descriptor non-inheritable: no analysis process holds a lock it does not know of.
    return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)


def _lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
