"""The server's compute: one thread, shared fairly between peers.

Each peer has its own queue. The worker runs the queued task with the smallest virtual finish time
(start-time fair queuing, with cost = tokens x blocks of the task): a peer that keeps sending long
prefills or training batches gets its share and no more, and another peer's decode step waits for at
most the task already running. Long prefills are cut into chunks by the handler, each a task of its
own, so that task is short. A peer may have ``max_queued`` tasks waiting; more are refused with
QUOTA_EXCEEDED (the client tries another server and bans nobody).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from swarm.wire import ErrorCode, WireError

logger = logging.getLogger(__name__)


@dataclass(order=True)
class _Task:
    finish: float
    order: int
    start: float = field(compare=False)
    fn: Callable = field(compare=False)
    args: tuple = field(compare=False)
    future: asyncio.Future = field(compare=False)


class FairScheduler:
    def __init__(self, max_queued_per_peer: int = 32):
        self.max_queued = max_queued_per_peer
        self.queues: dict[str, deque[_Task]] = {}
        self.finish: dict[str, float] = {}  # each peer's latest virtual finish time
        self.virtual_time = 0.0
        self.busy_seconds: dict[str, float] = {}  # compute each peer has used (for status and tests)
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="compute", daemon=True)
        self._thread.start()

    async def run(self, peer: str, cost: float, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` in the compute thread when it is ``peer``'s turn; returns its result."""
        future = asyncio.get_running_loop().create_future()
        with self._ready:
            if self._stopped:
                raise WireError(ErrorCode.SHUTTING_DOWN, "server is shutting down")
            queue = self.queues.setdefault(peer, deque())
            if len(queue) >= self.max_queued:
                raise WireError(ErrorCode.QUOTA_EXCEEDED, f"{len(queue)} of your requests are waiting for compute on "
                                                          f"this server (its limit per peer): try another server")
            if len(self.finish) > 4 * len(self.queues) + 1024:
                self._forget_idle_peers()
            start = max(self.virtual_time, self.finish.get(peer, 0.0))
            self.finish[peer] = start + max(cost, 1e-9)
            queue.append(_Task(self.finish[peer], next(self._order), start, fn, args, future))
            self._ready.notify()
        try:
            return await future
        except asyncio.CancelledError:
            with self._ready:  # not started yet: it will not be
                if peer in self.queues:
                    self.queues[peer] = deque(t for t in self.queues[peer] if t.future is not future)
            raise

    def _forget_idle_peers(self) -> None:
        """Peers with nothing queued and no credit left behind the virtual clock need no state (many peer ids
        must not grow it without bound)."""
        for peer in [p for p, f in self.finish.items() if p not in self.queues and f <= self.virtual_time]:
            del self.finish[peer]
            self.busy_seconds.pop(peer, None)

    def queued(self, peer: str) -> int:
        return len(self.queues.get(peer, ()))

    def _next(self) -> tuple[str, _Task] | None:
        with self._ready:
            while not self._stopped and not any(self.queues.values()):
                self._ready.wait()
            if self._stopped:
                return None
            peer = min((p for p, q in self.queues.items() if q), key=lambda p: self.queues[p][0])
            task = self.queues[peer].popleft()
            if not self.queues[peer]:
                del self.queues[peer]
            self.virtual_time = task.start
            return peer, task

    def _work(self) -> None:
        import time
        while (picked := self._next()) is not None:
            peer, task = picked
            if task.future.cancelled():
                continue
            started = time.perf_counter()
            try:
                result, error = task.fn(*task.args), None
            except BaseException as e:  # handed to the request that asked, which answers its caller
                result, error = None, e
            self.busy_seconds[peer] = self.busy_seconds.get(peer, 0.0) + time.perf_counter() - started
            task.future.get_loop().call_soon_threadsafe(_settle, task.future, result, error)

    def shutdown(self) -> None:
        """Finish the running task, drop the queued ones (their callers get SHUTTING_DOWN)."""
        with self._ready:
            self._stopped = True
            dropped = [t for q in self.queues.values() for t in q]
            self.queues.clear()
            self._ready.notify_all()
        for task in dropped:
            task.future.get_loop().call_soon_threadsafe(
                _settle, task.future, None, WireError(ErrorCode.SHUTTING_DOWN, "server is shutting down"))
        self._thread.join()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
