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

Waiting costs no CPU: each token file has one daemon thread per process (made on first need),
which, while some wait of that process wants a token, sleeps in the kernel in a blocking ``flock``
on its file. A wait is offered to every file's thread; the release of any file wakes its thread,
which hands the lock to the open wait of the highest priority (the longest waiting among equals),
or gives it straight back when none is. Threads and descriptors are therefore bounded by the
number of tokens, however many waits were cancelled while a file stayed held (a stopped
worker's, say).

A worker with a backlog gives a token back and asks for one in the same instant, before the
waiter the release woke has run; it would win every race. So waiters make themselves known: each
holds a shared flock on ``waiting.lock`` while it waits, and an acquire that finds one there first
yields for ``YIELD_S`` (the woken waiter takes the token meanwhile), then waits like them.

If the folder disappears (a temporary-file cleaner), it is made again on the next open.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Seconds an acquire that finds others waiting lets them go first.
YIELD_S: Final = 0.002
#: Attempts, 1 ms apart, to announce a wait while another process's probe holds ``waiting.lock``.
_ANNOUNCE_TRIES: Final = 10
#: Entries a file's sleeper keeps before it drops the waits already over.
_PRUNE_AT: Final = 64
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
    on_wait : callable, optional
        Called with the seconds each :meth:`acquire` waited (0.0-ish when a token was free).
    """

    def __init__(
        self,
        directory: Path,
        count: int,
        *,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"host CPU tokens need a count of at least 1, got {count}")
        self.directory = directory
        self.count = count
        self.paths = tuple(directory / f"cpu-{i}.lock" for i in range(count))
        self._waiting = directory / "waiting.lock"
        self._sleepers: dict[int, _Sleeper] = {}
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
        on_wait: Callable[[float], None] | None = None,
    ) -> HostCpuTokens:
        """One token per CPU of the set ``cpus``, in its own folder under ``base``.

        The count is the size of the set, not a CPU quota: containers limited to fewer CPUs than
        the host has share the host's cores, and each one's quota bounds its own slots.
        """
        ids = frozenset(cpus)
        return cls(token_dir(base, ids), len(ids), on_wait=on_wait)

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

    async def acquire(self, priority: int = 0) -> CpuToken:
        """Take a token, waiting while none is free or others wait. Give it back with :meth:`release`.

        Among this process's waits, a token that frees goes to the highest ``priority`` first (the
        request's AMQP priority; across processes there is no order). Cancelling the wait leaves
        nothing held.
        """
        started = time.monotonic()
        polite = self._others_waiting()
        token = None if polite else self.try_acquire()
        if token is None:
            token = await self._wait(priority, polite=polite)
        if self._on_wait is not None:
            self._on_wait(time.monotonic() - started)
        return token

    def release(self, token: CpuToken) -> None:
        """Give back a token taken by :meth:`acquire` or :meth:`try_acquire`."""
        self._held.discard(token.index)
        _unlock(token.fd)

    def close(self) -> None:
        """Stop the sleeper threads (a lock one of them takes later is given straight back)."""
        for sleeper in self._sleepers.values():
            sleeper.close()
        self._sleepers.clear()

    async def _wait(self, priority: int, *, polite: bool) -> CpuToken:
        known: int | None = None  # the shared lock on waiting.lock that says this one waits
        woken: asyncio.Future[CpuToken] | None = None
        try:
            if polite:
                await asyncio.sleep(YIELD_S)
            known = await self._announce()
            token = self.try_acquire()
            if token is not None:
                return token
            woken = asyncio.get_running_loop().create_future()
            for index in range(self.count):
                self._sleeper(index).offer(woken, priority)
            try:
                token = await woken
            except BaseException:  # cancelled after the hand-over, before this task resumed
                if woken.done() and not woken.cancelled():
                    _unlock(woken.result().fd)
                raise
            self._held.add(token.index)
            return token
        finally:
            if woken is not None and not woken.done():
                woken.cancel()  # the sleepers skip it: a lock they take later goes back at once
            if known is not None:
                os.close(known)

    def _sleeper(self, index: int) -> _Sleeper:
        loop = asyncio.get_running_loop()
        sleeper = self._sleepers.get(index)
        if sleeper is None or sleeper.loop is not loop:
            if sleeper is not None:
                sleeper.close()
            sleeper = self._sleepers[index] = _Sleeper(self.paths[index], index, loop)
        return sleeper

    def _others_waiting(self) -> bool:
        """Whether a process (this one included) waits for a token: its shared lock blocks ours."""
        fd = _open(self._waiting)
        try:
            return not _lock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)  # and with it the probe's lock

    async def _announce(self) -> int | None:
        """A descriptor holding a shared lock on ``waiting.lock``, or None when a probe kept it
        locked for ``_ANNOUNCE_TRIES`` ms (a process stopped inside its probe: the wait goes on
        unannounced rather than block the event loop)."""
        for _ in range(_ANNOUNCE_TRIES):
            fd = _open(self._waiting)
            if _lock(fd, fcntl.LOCK_SH):
                return fd
            os.close(fd)
            await asyncio.sleep(0.001)
        return None


class _Sleeper:
    """The daemon thread of one token file: while an offered wait is open, it sleeps in a blocking
    ``flock`` on the file and hands the lock to the open wait of the highest priority (on the event loop),
    or gives it straight back when none is left."""

    def __init__(self, path: Path, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._path = path
        self._index = index
        #: Offered waits: a heap of (-priority, arrival, future).
        self._waits: list[tuple[int, int, asyncio.Future[CpuToken]]] = []
        self._arrivals = itertools.count()
        self._wanted = threading.Event()  # some offered wait may still be open
        self._handed = threading.Semaphore(0)  # the loop has dealt with the last lock taken
        self._closed = False
        thread = threading.Thread(target=self._run, name=f"cpu-token-{index}", daemon=True)
        thread.start()

    def offer(self, wait: asyncio.Future[CpuToken], priority: int) -> None:
        """Let ``wait`` have a lock this file's thread takes, by ``priority``, unless it is done by then."""
        if len(self._waits) > _PRUNE_AT:  # waits served by other files while this one stays held
            self._waits = [entry for entry in self._waits if not entry[2].done()]
            heapq.heapify(self._waits)
        heapq.heappush(self._waits, (-priority, next(self._arrivals), wait))
        self._wanted.set()

    def close(self) -> None:
        """Stop the thread; waits still open end cancelled (their tasks then clean up)."""
        self._closed = True
        for _, _, wait in self._waits:
            wait.cancel()
        self._waits.clear()
        self._wanted.set()
        self._handed.release()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed:
                return
            try:
                fd = _open(self._path)
            except OSError:  # the waits still sweep nothing: try again shortly
                time.sleep(0.05)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # sleeps in the kernel until the holder lets go (or dies)
            except OSError:  # e.g. ENOLCK: try again shortly rather than die silently
                os.close(fd)
                time.sleep(0.05)
                continue
            try:
                self.loop.call_soon_threadsafe(self._hand, fd)
            except RuntimeError:  # the event loop is closed: nobody will take it
                _unlock(fd)
                return
            self._handed.acquire()

    def _hand(self, fd: int) -> None:
        """On the loop: the lock on ``fd`` to the first open wait, else back."""
        try:
            while self._waits:
                _, _, wait = heapq.heappop(self._waits)
                if not wait.done() and not self._closed:
                    wait.set_result(CpuToken(self._index, fd))
                    break
            else:
                _unlock(fd)
            if not any(not w.done() for _, _, w in self._waits):
                self._waits.clear()
                self._wanted.clear()
        finally:
            self._handed.release()


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open(path: Path) -> int:
    # Read-only is enough for flock, and lets a process open a file another user created. Python
    # makes the descriptor non-inheritable: no analysis process holds a lock it does not know of.
    try:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except FileNotFoundError:  # the folder was removed (a temporary-file cleaner): make it again
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)


def _lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
