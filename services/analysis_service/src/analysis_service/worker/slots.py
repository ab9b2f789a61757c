"""Analysis slots: one single-process executor per slot, so one analysis can be killed alone.

A task in a ``ProcessPoolExecutor`` cannot be cancelled. A time limit therefore means killing the
process that runs it; with one process per slot that kills exactly the late analysis, and a crash
(OOM kill, segfault in a codec) breaks only its own slot. The slot is then replaced by a fresh,
warmed process.

A slot's process analyses only while it holds one of the pool's CPUs (``size`` of them) and, when
the pool has them, one of the host's CPU tokens (:mod:`~analysis_service.worker.host_cpus`): a
worker never runs more analyses at once than its ``size``, and the workers of one host never more
than its CPUs, whatever their slots. Spare slots (``spare``) are leased like the others: a request
reads its file's header and hashes it (and the worker checks its cache) in its slot while the CPUs
analyse other requests, and waits for a CPU only for its analysis. When an analysis ends, the next
one starts in an already leased, already inspected slot, instead of after that slot's round trips.

Urgent slots are kept beyond those for the urgent queue's requests: such a request runs in an
urgent slot (its lane: it never waits for a running routine analysis to end), which takes no CPU
token and shares the CPUs with the running analyses meanwhile. The slots' processes run nicer, so
the kernel gives the urgent analysis most of a CPU.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import multiprocessing
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import structlog

from analysis_service.errors import AnalysisTimeout, WorkerCrashed
from analysis_service.pool import create_pool, run_analysis_job, warm_up
from analysis_service.settings import EngineSettings
from analysis_service.worker.host_cpus import CpuToken, HostCpuTokens
from service_shared.messages import EngineOutput

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: Times a slot's fresh process may die while warming up before acquiring the slot fails.
_READY_ATTEMPTS = 3


@dataclass
class _Lane:
    """Free slots of one kind, and the leases waiting for one: a heap of (-priority, arrival,
    future), so a freed slot goes to the highest priority first and, within one priority, to the
    longest waiting."""

    idle: list[Slot] = field(default_factory=list)
    waiting: list[tuple[int, int, asyncio.Future[Slot]]] = field(default_factory=list)

    def waiters(self) -> int:
        return sum(1 for _, _, future in self.waiting if not future.done())

    def give(self, slot: Slot) -> None:
        """Hand ``slot`` to the first waiting lease (busy from now on, at its priority), or keep it
        free."""
        while self.waiting:
            priority, _, future = heapq.heappop(self.waiting)
            if not future.done():
                future.set_result(slot)
                slot.busy, slot.priority, slot.phase = True, -priority, Phase.READING
                return
        slot.busy = False
        self.idle.append(slot)


class Phase(StrEnum):
    """Where a leased slot's request is on its way to and through its analysis."""

    #: Reading its file's header and hashing it (or its process starting): not yet at a CPU.
    READING = "reading"
    #: Waiting for one of the pool's CPUs (or, holding one, for a host CPU token).
    WAITING = "waiting"
    #: Holding a CPU: its analysis runs.
    ANALYSING = "analysing"
    #: Its analysis is over (or was stopped); the slot is about to be released.
    ANALYSED = "analysed"


@dataclass
class Slot:
    """One analysis process."""

    index: int
    executor: ProcessPoolExecutor
    busy: bool = False
    #: Leases since its process started (a request's probe + hash and analysis are one): it is
    #: recycled at ``max_tasks_per_child``.
    jobs: int = field(default=0)
    warm: bool = False
    #: The host CPU token held for the current analysis (None: not analysing, or the pool has none).
    cpu_token: CpuToken | None = None
    #: The current lease's phase (meaningful while ``busy``).
    phase: Phase = Phase.READING
    #: The current lease's priority, and its place in the order of leases.
    priority: int = 0
    lease_no: int = 0
    #: Kept for urgent requests; never waits for a host CPU token.
    urgent: bool = False


class SlotPool:
    """``size`` + ``spare`` warmed analysis processes, handed out one per request; ``size`` of them
    analyse at once.

    Parameters
    ----------
    size : int
        Concurrent analyses: the pool's CPUs, which :meth:`call` takes for an analysis.
    spare : int
        Slots beyond ``size``: the requests holding them read their files' headers and hash them
        while the CPUs analyse, then wait for a CPU.
    urgent : int
        Urgent slots beyond ``size + spare``, for urgent leases only (``acquire(urgent=True)``); they take
        no host CPU token.
    nice : int
        Niceness added to the slots' processes (not the urgent ones'): an urgent analysis running
        beside them then gets most of a CPU.
    max_tasks_per_child : int
        Replace a slot's process after this many leases (bounds leaks in codecs). A worker's
        request is one lease: the header probe + hash and the analysis (or the probe alone, for a
        cached or unreadable file).
    progress_queue : multiprocessing queue, optional
        Where pool processes report ``(key, fraction, stage)``.
    cpu_tokens : HostCpuTokens, optional
        The host's CPU tokens, shared with the other workers of the host: an analysis holds one
        (after one of the pool's CPUs) while it runs.
    """

    def __init__(
        self,
        size: int,
        *,
        spare: int = 0,
        urgent: int = 0,
        nice: int = 0,
        max_tasks_per_child: int,
        progress_queue: Any = None,
        cpu_tokens: HostCpuTokens | None = None,
    ) -> None:
        self.size = size
        self.spare = spare
        self.urgent = urgent
        self._cpus_held = 0
        #: Analyses waiting for a CPU: (-priority, lease number, future).
        self._cpu_waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._nice = nice
        self._max_tasks = max_tasks_per_child
        self._progress_queue = progress_queue
        self._tokens = cpu_tokens
        self._cpu_waits = 0
        self._slots: list[Slot] = []
        self._lane = _Lane()
        self._urgent_lane = _Lane()
        self._arrivals = itertools.count()
        self.restarts = 0
        self._closed = False

    async def start(self) -> None:
        """Start and warm every slot's process (the first analysis then pays no import cost)."""
        routine = self.size + self.spare
        for i in range(routine + self.urgent):
            slot = Slot(i, self._new_executor(urgent=i >= routine), urgent=i >= routine)
            self._slots.append(slot)
        await asyncio.gather(*(self._warm(s) for s in self._slots))
        for slot in self._slots:
            self._lane_of(slot.urgent).idle.append(slot)

    def _lane_of(self, urgent: bool) -> _Lane:
        return self._urgent_lane if urgent and self.urgent else self._lane

    def _new_executor(self, *, urgent: bool) -> ProcessPoolExecutor:
        return create_pool(1, progress_queue=self._progress_queue, nice=0 if urgent else self._nice)

    async def _warm(self, slot: Slot) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(slot.executor, warm_up)
        except BrokenProcessPool as exc:  # a crash like any other: the next lease replaces the slot
            raise WorkerCrashed(f"the analysis process died while starting: {exc}") from exc
        slot.warm = True

    @property
    def busy(self) -> int:
        """Slots (not urgent ones) running an analysis now (at most ``size``)."""
        return sum(1 for s in self._slots if s.phase is Phase.ANALYSING and not s.urgent)

    @property
    def leased(self) -> int:
        """Slots (not urgent ones) leased now: analysing, inspecting or waiting for a CPU."""
        return sum(1 for s in self._slots if s.busy and not s.urgent)

    @property
    def urgent_busy(self) -> int:
        """Urgent slots held by a running analysis now."""
        return sum(1 for s in self._slots if s.busy and s.urgent)

    @property
    def waiting(self) -> int:
        """Leases waiting for a free slot (of either kind) now."""
        return self._lane.waiters() + self._urgent_lane.waiters()

    @property
    def waiting_for_cpu(self) -> int:
        """Analyses that have their slot and wait for a CPU (the pool's, or a host CPU token) now."""
        return self._cpu_waits

    def pids(self) -> list[int]:
        """Process ids of the slots' live processes (for memory accounting)."""
        pids: list[int] = []
        for s in self._slots:
            processes = getattr(s.executor, "_processes", None) or {}
            pids.extend(pid for pid, proc in processes.items() if proc.is_alive())
        return pids

    @property
    def healthy(self) -> bool:
        """True when every slot exists and none is broken."""
        complete = len(self._slots) == self.size + self.spare + self.urgent
        return complete and all(not _broken(s.executor) for s in self._slots)

    async def _acquire(self, priority: int, urgent: bool) -> Slot:
        lane = self._lane_of(urgent)
        if lane.idle and not lane.waiters():
            return lane.idle.pop()
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        heapq.heappush(lane.waiting, (-priority, next(self._arrivals), future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # handed a slot as it was cancelled
                self._release(future.result())
            raise

    def _release(self, slot: Slot) -> None:
        self._lane_of(slot.urgent).give(slot)

    async def acquire(self, priority: int = 0, *, urgent: bool = False) -> Slot:
        """Take a free slot, ready to run (replaced if its process died, recycled, warmed).

        While every slot is busy, callers wait; a slot that frees goes to the waiting caller of the
        highest ``priority`` (the request's AMQP priority), the longest waiting first among equals.
        An ``urgent`` lease takes an urgent slot instead (when the pool has any), in the same order
        among urgent leases. The slot's analysis waits for a CPU when it is called (:meth:`call`).
        Give the slot back with :meth:`release`.
        """
        try:
            slot = await self._acquire(priority, urgent)
        finally:  # a waiting lease that gives up, or gets its slot, may unblock a CPU
            self._grant_cpus()
        slot.busy, slot.priority, slot.lease_no = True, priority, next(self._arrivals)
        slot.phase = Phase.READING
        try:
            for attempt in range(1, _READY_ATTEMPTS + 1):
                try:
                    await self._make_ready(slot)
                    slot.jobs += 1  # a lease is one request: its probe + hash and its analysis
                    return slot
                except WorkerCrashed as exc:  # the fresh process died while warming: the slot's
                    if attempt == _READY_ATTEMPTS:  # problem, not the request's
                        raise
                    log.warning("analysis process died while starting: replacing it", error=str(exc))
                    await self._replace(slot, reason="died while starting", warm=False)
        except BaseException:
            self.release(slot)
            raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def heal(self) -> None:
        """Make the free urgent slots ready: replace a process that died while idle (the OOM
        killer), recycle one due for it, warm one left cold (replaced after a cancellation).

        An urgent slot can stay free for hours: it should neither fail the readiness check
        meanwhile nor make its next request wait for a fresh process. The slots are left to their
        next lease, which is soon.
        """
        for slot in list(self._slots):
            if not slot.urgent or slot.busy or slot not in self._urgent_lane.idle:
                continue
            if slot.warm and not _broken(slot.executor) and slot.jobs < self._max_tasks:
                continue
            self._urgent_lane.idle.remove(slot)
            slot.busy = True
            try:
                await self._make_ready(slot)
            except Exception as exc:  # WorkerCrashed, or no process could start: the next round
                log.warning(  # or the next lease tries again
                    "could not make an idle urgent slot ready",
                    slot=slot.index,
                    error=f"{type(exc).__name__}: {exc}",
                )
            finally:
                slot.busy = False
                if not self._closed:
                    self._release(slot)

    async def _make_ready(self, slot: Slot) -> None:
        if _broken(slot.executor):  # its process died while idle (e.g. the OOM killer)
            await self._replace(slot, reason="died while idle")
        elif slot.jobs >= self._max_tasks:
            await self._replace(slot, reason="recycle")
        elif not slot.warm:
            await self._warm(slot)

    def release(self, slot: Slot) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        slot.busy = False
        self._release(slot)
        self._grant_cpus()

    @asynccontextmanager
    async def cpu(self, slot: Slot, priority: int = 0) -> AsyncIterator[None]:
        """Hold one of the pool's CPUs and, with host CPU tokens, a token, for ``slot``'s work.

        A freed CPU goes to the waiting analysis of the highest ``priority`` first (the earliest
        lease among equals). It is kept free instead for a more urgent lease on its way: one
        whose slot is reading its file, or one waiting for the slot that an analysis just ended
        is about to free (:meth:`_kept_for`). So a request that took a spare slot does not run
        ahead of a more urgent one that was already there when the CPU freed. With host CPU
        tokens, the token is waited for after the worker's CPU, in the same priority order within
        the worker (across workers there is none). An urgent slot takes neither: it shares the
        CPUs with the running analyses. Cancelling the wait leaves nothing held.
        """
        if slot.urgent:
            yield
            return
        self._cpu_waits += 1
        slot.phase = Phase.WAITING
        try:
            await self._enter_cpu(slot, priority)
            try:
                if self._tokens is not None:
                    slot.cpu_token = await self._tokens.acquire(priority)
            except BaseException:
                self._leave_cpu()
                raise
        except BaseException:
            slot.phase = Phase.READING  # not analysed; its lease ends
            raise
        finally:
            self._cpu_waits -= 1
        slot.phase = Phase.ANALYSING
        try:
            yield
        finally:
            slot.phase = Phase.ANALYSED
            self._release_token(slot)
            self._leave_cpu()

    async def _enter_cpu(self, slot: Slot, priority: int) -> None:
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._cpu_waiting, (-priority, slot.lease_no, granted))
        self._grant_cpus()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted a CPU as it was cancelled
                self._leave_cpu()
            else:
                granted.cancel()
                self._grant_cpus()  # it may have been what kept a CPU free
            raise

    def _leave_cpu(self) -> None:
        self._cpus_held -= 1
        self._grant_cpus()

    def _grant_cpus(self) -> None:
        """Give the free CPUs to the waiting analyses, highest priority first, except those kept
        for more urgent leases on their way (:meth:`_kept_for`)."""
        waiting = self._cpu_waiting
        while self._cpus_held < self.size:
            while waiting and waiting[0][2].done():  # cancelled waits
                heapq.heappop(waiting)
            if not waiting or self.size - self._cpus_held <= self._kept_for(-waiting[0][0]):
                return
            _, _, granted = heapq.heappop(waiting)
            self._cpus_held += 1
            granted.set_result(None)

    def _kept_for(self, priority: int) -> int:
        """Free CPUs to keep for routine leases of a higher ``priority`` on their way to their
        analysis: those whose slot reads the file (or starts its process), and those waiting for
        a slot, as many as slots that just analysed are about to free (any other slot frees only
        after an analysis, which needs a CPU: keeping one for them could wait forever)."""
        reading = freeing = 0
        for s in self._slots:
            if not s.busy or s.urgent:
                continue
            if s.phase is Phase.ANALYSED:
                freeing += 1
            elif s.phase is Phase.READING and s.priority > priority:
                reading += 1
        slotless = sum(1 for p, _, future in self._lane.waiting if not future.done() and -p > priority)
        return reading + min(slotless, freeing)

    def _release_token(self, slot: Slot) -> None:
        token, slot.cpu_token = slot.cpu_token, None
        if token is not None and self._tokens is not None:
            self._tokens.release(token)

    @asynccontextmanager
    async def lease(self, priority: int = 0, *, urgent: bool = False) -> AsyncIterator[Slot]:
        """Hold a slot (see :meth:`acquire`) for one or more calls of :meth:`call`."""
        slot = await self.acquire(priority, urgent=urgent)
        try:
            yield slot
        finally:
            self.release(slot)

    async def call(
        self,
        slot: Slot,
        fn: Callable[..., _T],
        *args: Any,
        time_limit_s: float,
        path: str,
        cpu_priority: int | None = None,
    ) -> _T:
        """Run ``fn(*args)`` (a module-level function) in ``slot``'s process within ``time_limit_s``.

        With ``cpu_priority`` (an analysis), the call first waits for a CPU at that priority
        (:meth:`cpu`) and holds it while ``fn`` runs; without (a header probe), it runs at once.
        The limit counts from the submission: the waits for the slot and the CPU are over by then.

        Raises
        ------
        AnalysisTimeout
            The limit passed; the slot's process was killed and replaced.
        WorkerCrashed
            The slot's process died (e.g. killed by the OOM killer); it was replaced.
        AnalysisServiceError
            What ``fn`` raised for this input.
        """
        if cpu_priority is None:
            return await self._run(slot, fn, args, time_limit_s=time_limit_s, path=path)
        async with self.cpu(slot, cpu_priority):
            return await self._run(slot, fn, args, time_limit_s=time_limit_s, path=path)

    async def _run(
        self, slot: Slot, fn: Callable[..., _T], args: tuple[Any, ...], *, time_limit_s: float, path: str
    ) -> _T:
        """Submit ``fn(*args)`` to ``slot``'s process and wait for it (see :meth:`call`)."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(slot.executor, fn, *args)
            return await asyncio.wait_for(future, timeout=time_limit_s)
        except TimeoutError:
            await self._replace(slot, reason="timeout")
            raise AnalysisTimeout(
                f"analysis did not finish within its time limit of {time_limit_s:g} s; "
                "its process was killed",
                path=path,
            ) from None
        except BrokenProcessPool as exc:
            await self._replace(slot, reason="crash")
            raise WorkerCrashed(f"the analysis process died: {exc}", path=path) from exc
        except asyncio.CancelledError:
            # The process cannot be interrupted, so it is killed; its successor is warmed on
            # first use, not here, so the cancellation is not held up.
            await self._replace(slot, reason="cancelled", warm=False)
            raise

    async def analyze(
        self,
        path: str,
        *,
        settings: EngineSettings,
        analyses: list[str] | None,
        timeline: bool | None,
        progress_key: str,
        time_limit_s: float,
        bpm_range: tuple[float, float] | None = None,
    ) -> EngineOutput:
        """Run one analysis in a free slot, within ``time_limit_s`` seconds (see :meth:`call`)."""
        async with self.lease() as slot:
            return await self.call(
                slot,
                run_analysis_job,
                path,
                settings,
                analyses,
                timeline,
                progress_key,
                bpm_range,
                time_limit_s=time_limit_s,
                path=path,
                cpu_priority=0,
            )

    async def _replace(self, slot: Slot, *, reason: str, warm: bool = True) -> None:
        _kill(slot.executor)
        slot.warm = False
        if self._closed:
            return
        slot.executor = self._new_executor(urgent=slot.urgent)
        slot.jobs = 0
        self.restarts += 1
        log.warning("analysis process replaced", slot=slot.index, reason=reason)
        if warm:
            await self._warm(slot)

    async def close(self) -> None:
        """Stop every slot's process (running analyses are killed). Idempotent."""
        self._closed = True
        for s in self._slots:
            _kill(s.executor)
            self._release_token(s)  # its process is gone: the other workers may have the CPU
        self._slots.clear()
        if self._tokens is not None:
            self._tokens.close()


def _broken(executor: ProcessPoolExecutor) -> bool:
    return bool(getattr(executor, "_broken", False))


def _kill(executor: ProcessPoolExecutor) -> None:
    """Kill the executor's processes now and drop it (its pending futures fail)."""
    processes: dict[int, multiprocessing.process.BaseProcess] = dict(
        getattr(executor, "_processes", None) or {}
    )
    for proc in processes.values():
        if proc.is_alive():
            proc.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    for proc in processes.values():
        proc.join(timeout=5)
