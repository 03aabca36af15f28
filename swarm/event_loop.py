"""The asyncio event loops of Cocoon processes: uvloop for servers and DHT nodes, the standard loop for a
client; COCOON_EVENT_LOOP=asyncio or =uvloop picks one for all.

Each decode step crosses the event loops of the client and of every server of its chain (framing, TLS,
socket reads and writes, futures handed between threads). uvloop runs that machinery in C on libuv,
where the standard loop runs it in Python, and hivemind already runs its DHT on uvloop. A server's loop runs
for its whole life. A client's is started and stopped around every call by the thread that waits on it
(swarm.client.loop), and uvloop, started in the main thread, sets up its signal handling each time (a
socket pair, the wakeup fd, a reader) and takes it down at the end: measured in a client's decode step, its
loop took 165 us to start a call and 151 us to finish one, the standard loop 59 and 68 us."""
from __future__ import annotations

import asyncio
import os
from typing import Awaitable, TypeVar

T = TypeVar("T")


def new_event_loop(started_per_call: bool = False) -> asyncio.AbstractEventLoop:
    """A loop for a process that runs one for good (uvloop), or for one that starts it for every call."""
    if os.environ.get("COCOON_EVENT_LOOP", "asyncio" if started_per_call else "uvloop") == "asyncio":
        return asyncio.new_event_loop()
    import uvloop
    return uvloop.new_event_loop()


def run(coroutine: Awaitable[T]) -> T:
    """asyncio.run on a loop of new_event_loop()."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)
