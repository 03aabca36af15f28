"""The server's compute: one thread, shared fairly between peers.

Each peer has its own queue. The worker runs the queued task with the smallest virtual finish time
(start-time fair queuing, with cost = tokens x blocks of the task): a peer that keeps sending long
prefills or training batches gets its share and no more, and another peer's decode step waits for at
most the task already running. Long prefills are cut into chunks by the handler, each a task of its
own, so that task is short. A peer may have ``max_queued`` tasks waiting; more are refused with
QUOTA_EXCEEDED (the client tries another server and bans nobody).

Tasks that can share a forward (decode steps of different sessions: swarm.server.batching) carry a batch
key. When the worker picks one, it takes every queued task with the same key along, waiting for more while
fewer are queued than sessions are active (no wait with one session): until ``batch_window`` seconds pass
with no new one, and at most WINDOWS_AT_MOST windows in all (clients' steps trickle in: one window from the
first alone would cut a round of sessions into several batches, each reading all the weights). It runs them
as one batch, of at most ``max_batch`` tasks and ``max_batch_cost``. Each peer is still charged the cost
of its own tasks, so batching changes nobody's share, only how much work a second of compute does.

The compute thread waits for work through ``park`` when given one: the engine's decode plan may have its OpenMP
workers sleep meanwhile instead of spinning on cores that the next process of a chain computes on
(shards.openmp).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from swarm.wire.codes import ErrorCode, WireError

logger = logging.getLogger(__name__)
WINDOWS_AT_MOST = 4  # a batch waits a window after its latest step, and this many windows after its first at most


@dataclass(order=True)
class _Task:
    finish: float
    order: int
    start: float = field(compare=False)
    fn: Callable = field(compare=False)
    args: tuple = field(compare=False)
    future: asyncio.Future = field(compare=False)
    batch_key: Any = field(default=None, compare=False)
    cost: float = field(default=0.0, compare=False)


class FairScheduler:
    def __init__(self, max_queued_per_peer: int = 32, *, run_batch: Callable[[list[tuple]], list] | None = None,
                 batch_window: float = 0.0, max_batch: int = 64, max_batch_cost: float = float("inf"),
                 active: Callable[[], int] = lambda: 1, park: Callable[[Callable[[], Any]], Any] | None = None):
        self.max_queued = max_queued_per_peer
        self.run_batch = run_batch  # args of several tasks -> their results, in order
        self.batch_window, self.max_batch, self.active = batch_window, max_batch, active
        self.max_batch_cost = max_batch_cost  # a batch of long steps stays short: others' decode steps wait for it
        self.park = park  # runs the compute thread's waits for work (None: plain waits)
        self.batches: dict[int, int] = {}  # tasks per batch -> how many batches of that size ran
        self.queues: dict[str, deque[_Task]] = {}
        self.finish: dict[str, float] = {}  # each peer's latest virtual finish time
        self.virtual_time = 0.0
        self.busy_seconds: dict[str, float] = {}  # compute each peer has used (for status and tests)
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._stopped = False
        self._running = False  # a task runs (in the compute thread, or inline)
        self._thread = threading.Thread(target=self._work, name="compute", daemon=True)
        self._thread.start()

    async def run(self, peer: str, cost: float, fn: Callable, *args, batch_key: Any = None,
                  inline: bool = False) -> Any:
        """Run ``fn(*args)`` in the compute thread when it is ``peer``'s turn; returns its result. Tasks with
        the same ``batch_key`` may run together, through ``run_batch``. An ``inline`` task (a short one) runs
        right here, in the caller's thread, when nothing else runs or waits: no hand-off to the compute thread and
        back (two thread wake-ups on every decode step of a lone session). The engine asks for it only where the
        caller's thread may compute (swarm.server.engine)."""
        with self._ready:
            if inline and not self._stopped and not self._running and not any(self.queues.values()):
                self._running = True  # the compute thread waits meanwhile
                self.virtual_time = max(self.virtual_time, self.finish.get(peer, 0.0))
                self.finish[peer] = self.virtual_time + max(cost, 1e-9)
                inline_start = time.perf_counter()
            else:
                inline_start = None
        if inline_start is not None:
            try:
                return fn(*args)
            finally:
                with self._ready:
                    self._running = False
                    self.busy_seconds[peer] = self.busy_seconds.get(peer, 0.0) + time.perf_counter() - inline_start
                    self.batches[1] = self.batches.get(1, 0) + 1
                    if any(self.queues.values()):  # else waking the compute thread would only send it back to sleep
                        self._ready.notify()
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
            key = batch_key if self.run_batch is not None else None
            queue.append(_Task(self.finish[peer], next(self._order), start, fn, args, future, key, cost))
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

    def others_waiting(self, peer: str) -> bool:
        """Some other peer has a task queued."""
        return any(queue for p, queue in list(self.queues.items()) if p != peer)

    def _next(self) -> list[tuple[str, _Task]] | None:
        """The next task, with those that share its forward; None once stopped. Waits (parked: see ``park``) for a
        task, and for a batch window for more."""
        return self._pick() if self.park is None else self.park(self._pick)

    def _pick(self) -> list[tuple[str, _Task]] | None:
        with self._ready:
            while not self._stopped and (self._running or not any(self.queues.values())):
                self._ready.wait()
            if self._stopped:
                return None
            self._running = True
            peer = min((p for p, q in self.queues.items() if q), key=lambda p: self.queues[p][0])
            task = self._pop(peer, self.queues[peer][0])
            self.virtual_time = task.start
            group = [(peer, task)]
            if task.batch_key is not None:
                now = time.monotonic()
                deadline, last_call = now + self.batch_window, now + WINDOWS_AT_MOST * self.batch_window
                budget = self.max_batch_cost - task.cost
                while True:
                    taken = self._take_batchable(task.batch_key, self.max_batch - len(group), budget)
                    group += taken
                    budget -= sum(t.cost for _, t in taken)
                    if taken:  # more may be on their way: a window from the latest one
                        deadline = min(last_call, time.monotonic() + self.batch_window)
                    wanted = min(self.active(), self.max_batch)
                    left = deadline - time.monotonic()
                    if len(group) >= wanted or left <= 0 or self._stopped or budget < task.cost:
                        break
                    self._ready.wait(left)  # a new task notifies
            return group

    def _pop(self, peer: str, task: _Task) -> _Task:
        queue = self.queues[peer]
        queue.remove(task)
        if not queue:
            del self.queues[peer]
        return task

    def _take_batchable(self, key: Any, room: int, budget: float) -> list[tuple[str, _Task]]:
        """Queued tasks with ``key``, in their virtual finish order (fairness decides who rides first), at most
        ``room`` of them and ``budget`` of cost."""
        found = []
        for task, peer in sorted((t, p) for p, q in self.queues.items() for t in q if t.batch_key == key):
            if len(found) >= room or task.cost > budget:
                break
            found.append((peer, task))
            budget -= task.cost
        return [(peer, self._pop(peer, task)) for peer, task in found]

    def _work(self) -> None:
        while (group := self._next()) is not None:
            group = [(peer, task) for peer, task in group if not task.future.cancelled()]
            if not group:
                with self._ready:
                    self._running = False
                    self._ready.notify()
                continue
            started = time.perf_counter()
            if len(group) == 1:
                results = [_call(group[0][1].fn, group[0][1].args)]
            else:
                try:
                    results = [(r, None) for r in self.run_batch([task.args for _, task in group])]
                except BaseException:  # one bad request must not fail the others: each alone, with its own error
                    logger.exception("a batch failed; running its tasks one by one")
                    results = [_call(task.fn, task.args) for _, task in group]
            self.batches[len(group)] = self.batches.get(len(group), 0) + 1
            elapsed = (time.perf_counter() - started) / len(group)
            with self._ready:
                self._running = False
                for peer, _ in group:
                    self.busy_seconds[peer] = self.busy_seconds.get(peer, 0.0) + elapsed
            for (peer, task), (result, error) in zip(group, results):
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


def _call(fn: Callable, args: tuple) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args), None
    except BaseException as e:  # handed to the request that asked, which answers its caller
        return None, e


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
