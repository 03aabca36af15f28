"""One asyncio loop in a background thread, so synchronous torch code can await network calls."""
from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, TypeVar

from swarm.event_loop import new_event_loop

T = TypeVar("T")
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def background_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            _loop = new_event_loop()
            threading.Thread(target=_loop.run_forever, name="cocoon-client-loop", daemon=True).start()
        return _loop


def run(coroutine: Awaitable[T], timeout: float | None = None) -> T:
    """Run a coroutine on the background loop and wait for its result."""
    future = asyncio.run_coroutine_threadsafe(coroutine, background_loop())
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise
