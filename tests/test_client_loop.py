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


def test_a_dht_answer_waits_for_the_thread_that_drives_the_loop():
    """A background fetch of the swarm state, answered while the caller computes outside the loop, completes the
    next time the caller runs the loop, in the caller's thread. hivemind's own future, awaited on the loop, had
    its pipe thread run the loop then: a decode step meeting it failed with "this event loop is already running"."""
    from swarm.dht.records import fetch_swarm_state_async, make_dht

    dht = make_dht([])
    try:
        finished_in: list[str] = []

        async def start_fetch() -> asyncio.Task:
            task = asyncio.create_task(fetch_swarm_state_async(dht, "model", 4))
            task.add_done_callback(lambda _: finished_in.append(threading.current_thread().name))
            return task

        task = loop.run(start_fetch())
        time.sleep(1.5)  # torch code between two steps: the DHT answers meanwhile
        assert finished_in == []  # nobody ran the loop

        async def wait_for(task: asyncio.Task):
            return await task

        state = loop.run(wait_for(task))
        assert finished_in == [threading.current_thread().name]
        assert state.num_blocks == 4 and state.servers == {}  # (no server announced itself)
    finally:
        dht.shutdown()


def test_ctrl_c_while_the_main_thread_drives_the_loop_lets_a_generation_clean_up():
    """generate() runs on the caller's thread: Ctrl-C reaches it inside a step, its `finally` (a session closes and
    pays its servers) still gets the loop, and the loop serves the main thread afterwards."""
    import os
    import signal
    main = threading.get_ident()
    seen: dict[str, object] = {}

    def generating() -> None:  # steps through the loop until interrupted; its `finally` must run
        try:
            while True:
                loop.run(asyncio.sleep(0.05))
        except BaseException as e:
            seen["raised"] = type(e)
            raise
        finally:
            seen["closed"] = loop.run(whose_thread())  # the loop still serves the thread as it cleans up

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background `make test &` ignores it)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        started = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            generating()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - started < 3
    assert seen["raised"] is KeyboardInterrupt and seen["closed"] == main
    assert loop.run(whose_thread()) == main  # and the main thread drives the loop again


def test_ctrl_c_at_any_moment_stops_the_call_and_leaves_the_loop_usable():
    """SIGINT lands wherever the main thread happens to be: in a coroutine, between calls, or in the event
    loop's own start-up code. Each time the caller gets KeyboardInterrupt and the next call runs (a
    KeyboardInterrupt inside uvloop's start-up used to leave it "already running" for good: CI saw it once,
    this loop of short calls hit it within two interrupts)."""
    import os
    import random
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    rng = random.Random(1)
    try:
        for _ in range(100):
            timer = threading.Timer(rng.uniform(0.0005, 0.01), os.kill, (os.getpid(), signal.SIGINT))
            with pytest.raises(KeyboardInterrupt):
                timer.start()  # (in the block: the signal may land before start() returns, on a busy machine)
                while True:
                    loop.run(asyncio.sleep(0))
            timer.join()
            assert loop.run(whose_thread()) == threading.get_ident()
    finally:
        signal.signal(signal.SIGINT, previous)
