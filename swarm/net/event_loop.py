"""The asyncio event loop of every Cocoon process: uvloop, unless COCOON_EVENT_LOOP=asyncio.

Each decode step crosses the event loops of the client and of every server of its chain (framing, TLS,
socket reads and writes, futures handed between threads). uvloop runs that machinery in C on libuv,
where the standard loop runs it in Python (its TLS layer included), and hivemind already runs its DHT on
uvloop. COCOON_EVENT_LOOP=asyncio gives the standard loop back, e.g. for asyncio's debug mode."""
from __future__ import annotations

import asyncio
import os
from typing import Awaitable, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("COCOON_EVENT_LOOP", "uvloop") == "asyncio":
        return asyncio.new_event_loop()
    import uvloop
    return uvloop.new_event_loop()


def run(coroutine: Awaitable[T]) -> T:
    """asyncio.run on a loop of new_event_loop()."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)
