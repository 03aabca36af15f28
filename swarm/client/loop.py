"""The client's one asyncio loop, driven by the thread that waits on it, so synchronous torch code can await
network calls.

``run(coroutine)`` runs the loop in the calling thread until the coroutine is done: a decode step goes from
the caller's torch code onto the network and back with no hand-off to a loop thread (on a small model that
hand-off, two thread wake-ups per step, was a tenth of what a hop of the chain added). When another thread
already drives the loop (many threads generating at once), the caller sleeps until its result is ready or the
loop is handed to it. Work that must go on while no caller waits (a relay's announcements) asks for
``background_loop()``: a thread of its own then drives the loop for good, and ``run`` waits on it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
import time
from typing import Awaitable, Callable, TypeVar

from shards.openmp import asleep_while
from swarm.net.event_loop import new_event_loop

T = TypeVar("T")
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_driver: int | None = None  # the thread running the loop now
# threads waiting for their result or for the loop, first come first: their wake-up and their future
_waiting: dict[int, tuple[threading.Event, concurrent.futures.Future]] = {}
_background: threading.Thread | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = new_event_loop()
        return _loop


def call_soon(callback: Callable[[], object]) -> None:
    """Run ``callback`` on the loop, from any thread (with the next ``run``, if no thread drives it now)."""
    event_loop().call_soon_threadsafe(callback)


def background_loop() -> asyncio.AbstractEventLoop:
    """The loop, driven from now on by a thread of its own (for tasks that run with no caller waiting)."""
    global _background
    loop = event_loop()
    with _lock:
        if _background is None:
            forever: concurrent.futures.Future = concurrent.futures.Future()
            _background = threading.Thread(target=_drive_until, args=(loop, forever, None), name="cocoon-client-loop",
                                           daemon=True)
            _background.start()
    return loop


def run(coroutine: Awaitable[T], timeout: float | None = None) -> T:
    """Run a coroutine on the loop and wait for its result (at most ``timeout`` seconds: then TimeoutError)."""
    with _CtrlC() as ctrl_c:
        # the caller's OpenMP workers sleep meanwhile: spinning, they would take the cores its servers compute on
        result = asleep_while(lambda: _run(coroutine, timeout, ctrl_c))
        if ctrl_c.pressed:  # the coroutine swallowed its cancellation: the caller still asked to stop
            raise KeyboardInterrupt
        return result


def _run(coroutine: Awaitable[T], timeout: float | None, ctrl_c: _CtrlC) -> T:
    global _driver
    loop = event_loop()
    if _background is None:
        with _lock:
            alone = _driver is None
            if alone:
                _driver = threading.get_ident()
        if alone:  # nobody else drives the loop: run it right here (no thread hand-off: bench/RESULTS.md)
            task = None
            try:
                task = loop.create_task(coroutine if timeout is None else asyncio.wait_for(coroutine, timeout))
                ctrl_c.cancels(lambda: loop.call_soon_threadsafe(task.cancel))
                return loop.run_until_complete(task)
            except BaseException:  # a timeout, or KeyboardInterrupt: the coroutine does not go on by itself
                if task is not None:
                    task.cancel()
                raise
            finally:
                _hand_over()
    future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    ctrl_c.cancels(future.cancel)
    try:
        if _background is not None:
            return future.result(timeout)
        return _drive_until(loop, future, timeout)
    except BaseException:  # a timeout, or KeyboardInterrupt: the coroutine does not go on by itself
        future.cancel()
        raise


class _CtrlC:
    """While the main thread waits in ``run``, Ctrl-C cancels the call instead of raising wherever the thread
    happens to be (as ``asyncio.Runner`` does): a KeyboardInterrupt that lands in the event loop's own code
    leaves it marked as running, and every later call fails with "this event loop is already running".
    The call then raises KeyboardInterrupt."""

    def __init__(self) -> None:
        self.pressed = False
        self._cancel: Callable[[], object] | None = None
        self._installed = threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler

    def cancels(self, cancel: Callable[[], object]) -> None:
        self._cancel = cancel
        if self.pressed:
            cancel()

    def _on_sigint(self, signum, frame) -> None:
        if self.pressed:  # a second Ctrl-C while the call winds down: interrupt at once
            raise KeyboardInterrupt
        self.pressed = True
        if self._cancel is not None:
            self._cancel()

    def __enter__(self) -> _CtrlC:
        if self._installed:
            signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if self._installed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.pressed and kind is not None and issubclass(kind, (asyncio.CancelledError,
                                                                   concurrent.futures.CancelledError)):
            raise KeyboardInterrupt from None
        return False


def _drive_until(loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future, timeout: float | None):
    global _driver
    me = threading.get_ident()
    deadline = None if timeout is None else time.monotonic() + timeout
    wake = threading.Event()
    future.add_done_callback(lambda _: wake.set())
    while not future.done():
        with _lock:
            drive = _driver is None
            if drive:
                _driver = me
            else:
                _waiting[me] = (wake, future)
        if drive:
            try:
                _run_loop(loop, future, me, deadline)
            finally:
                _hand_over()
        else:
            woken = wake.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            wake.clear()  # (the loop condition looks at the future itself)
            with _lock:
                del _waiting[me]
                if _driver is None and (future.done() or not woken):  # we leave: the loop goes to the next one
                    _wake_next()
            if not woken and not future.done():
                raise TimeoutError
        if deadline is not None and time.monotonic() >= deadline and not future.done():
            raise TimeoutError
    return future.result()


def _run_loop(loop: asyncio.AbstractEventLoop, future: concurrent.futures.Future, me: int,
              deadline: float | None) -> None:
    """Run the loop in this thread until ``future`` is done or the deadline passes."""
    def stop(_) -> None:  # called in the thread that completed the future: stop only our own run
        if threading.get_ident() == me:
            loop.stop()

    future.add_done_callback(stop)
    timer = None if deadline is None else loop.call_later(max(0.0, deadline - time.monotonic()), loop.stop)
    try:
        if not future.done():
            loop.run_forever()
    finally:
        if timer is not None:
            timer.cancel()


def _hand_over() -> None:
    """Give up the loop; the first thread still waiting for its result drives it next."""
    global _driver
    with _lock:
        _driver = None
        _wake_next()


def _wake_next() -> None:
    for wake, future in _waiting.values():
        if not future.done():
            wake.set()
            return
