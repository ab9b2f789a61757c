"""Closing the progress queue when an analysis process died holding its write lock.

Seen in CI: after a test killed an analysis process mid-write, the test run printed its summary
and then never exited (the interpreter's exit joined the queue's feeder thread, which waited for
the lock forever). Each case runs in a fresh interpreter, since the hang is at exit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, multiprocessing, threading
    from analysis_service.pool import close_progress_queue

    queue = multiprocessing.get_context("spawn").Queue()
    queue.put(("warm", 0.0, "x"))  # the feeder thread exists and is idle
    if {locked}:
        queue._wlock.acquire()  # what a process killed while writing leaves behind
    pump = threading.Thread(target=lambda: [None for _ in iter(queue.get, None)], daemon=True)
    pump.start()
    asyncio.run(close_progress_queue(queue, pump, wait_s=0.5))
    print("closed", pump.is_alive())
    """
)


def run(locked: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT.format(locked=locked)], capture_output=True, text=True, timeout=60
    )


def test_the_process_exits_although_a_dead_writer_holds_the_queue_lock() -> None:
    done = run(locked=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["closed", "True"]  # the reader never got its None: left behind


def test_an_orderly_close_ends_the_reader() -> None:
    done = run(locked=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["closed", "False"]
