"""The client's event loop (swarm.client.loop): run by the thread that waits on it, handed between threads."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from swarm.client import loop


async def whose_thread(delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return threading.get_ident()


def test_a_lone_caller_runs_the_loop_itself_and_many_threads_share_it():
    assert loop.run(whose_thread()) == threading.get_ident()  # no hand-off to another thread

    results: dict[int, list] = {}
    barrier = threading.Barrier(8)

    def caller(i: int) -> None:
        barrier.wait()
        results[i] = [loop.run(asyncio.sleep(0.01 * (i % 3), result=(i, k))) for k in range(5)]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)  # nobody was left waiting for a loop nobody drove
    assert results == {i: [(i, k) for k in range(5)] for i in range(8)}


def test_a_timeout_cancels_the_coroutine_and_the_loop_goes_on():
    cancelled = threading.Event()

    async def slow():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        loop.run(slow(), timeout=0.2)
    assert time.perf_counter() - started < 2
    loop.run(asyncio.sleep(0))  # (lets the cancellation run if it has not yet)
    assert cancelled.is_set()
    assert loop.run(whose_thread()) == threading.get_ident()


def test_an_error_reaches_the_caller():
    async def fails():
        raise ValueError("from the coroutine")

    with pytest.raises(ValueError, match="from the coroutine"):
        loop.run(fails())
    assert loop.run(asyncio.sleep(0, result=7)) == 7


def test_a_background_loop_runs_with_no_caller_waiting():
    # in a process of its own: from then on, that process's loop is driven by a thread for good
    import subprocess
    import sys
    script = """
import asyncio, threading, time
from swarm.client import loop
ticks = []
async def tick():
    while True:
        ticks.append(1)
        await asyncio.sleep(0.01)
asyncio.run_coroutine_threadsafe(tick(), loop.background_loop())
time.sleep(0.5)
assert len(ticks) > 10, len(ticks)
async def whose(): return threading.get_ident()
assert loop.run(whose()) != threading.get_ident()  # the loop's own thread runs it now
print("ok", len(ticks))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
