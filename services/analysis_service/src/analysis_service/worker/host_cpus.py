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

Waiting is polling (``LOCK_NB`` on each file, then a jittered ``poll_s`` sleep), so it can be
cancelled at any point and costs nothing while tokens are free. A poller would lose every race to
a worker that gives a token back and asks for one in the same instant (its next lease, when it has
a backlog), so waiters make themselves known: each holds a shared flock on ``waiting.lock`` while
it waits, and an acquire that finds one there (its exclusive probe fails) does not take a free
token at once but polls with them. Among waiters the first to poll after a release wins: no strict
order (nor priority), but no one starves.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Seconds between two attempts of a waiting acquire (each drawn from 0.5-1.5 times this).
POLL_S: Final = 0.005
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
    poll_s : float
        Mean seconds between two attempts while waiting.
    on_wait : callable, optional
        Called with the seconds each :meth:`acquire` waited (0.0-ish when a token was free).
    """

    def __init__(
        self,
        directory: Path,
        count: int,
        *,
        poll_s: float = POLL_S,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"host CPU tokens need a count of at least 1, got {count}")
        self.directory = directory
        self.count = count
        self.paths = tuple(directory / f"cpu-{i}.lock" for i in range(count))
        self._waiting = directory / "waiting.lock"
        self._poll_s = poll_s
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
        poll_s: float = POLL_S,
        on_wait: Callable[[float], None] | None = None,
    ) -> HostCpuTokens:
        """One token per CPU of the set ``cpus``, in its own folder under ``base``.

        The count is the size of the set, not a CPU quota: containers limited to fewer CPUs than
        the host has share the host's cores, and each one's quota bounds its own slots.
        """
        ids = frozenset(cpus)
        return cls(token_dir(base, ids), len(ids), poll_s=poll_s, on_wait=on_wait)

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

    async def acquire(self) -> CpuToken:
        """Take a token, waiting while none is free or others wait. Give it back with :meth:`release`.

        Cancelling the wait leaves nothing held.
        """
        started = time.monotonic()
        token = None if self._others_waiting() else self.try_acquire()
        if token is None:
            token = await self._wait()
        if self._on_wait is not None:
            self._on_wait(time.monotonic() - started)
        return token

    def release(self, token: CpuToken) -> None:
        """Give back a token taken by :meth:`acquire` or :meth:`try_acquire`."""
        self._held.discard(token.index)
        try:
            fcntl.flock(token.fd, fcntl.LOCK_UN)
        finally:
            os.close(token.fd)

    async def _wait(self) -> CpuToken:
        known: int | None = None  # the shared lock on waiting.lock that says this one waits
        try:
            while True:
                if known is None:
                    known = self._announce()
                await asyncio.sleep(self._poll_s * random.uniform(0.5, 1.5))
                token = self.try_acquire()
                if token is not None:
                    return token
        finally:
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
