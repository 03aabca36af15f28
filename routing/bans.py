"""Servers that failed this client, banned for a time that doubles with each failure in a row."""
from __future__ import annotations

import time
from typing import Callable


class BanList:
    def __init__(self, base_seconds: float = 5.0, max_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.base, self.max, self.clock = base_seconds, max_seconds, clock
        self._until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def ban(self, peer_id: str, at_least: float = 0.0) -> float:
        """Record a failure; returns how many seconds the peer is banned for (``at_least`` that long)."""
        failures = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = failures
        seconds = min(max(self.base * 2.0 ** min(failures - 1, 60), at_least), self.max)  # (a bounded exponent)
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), self.clock() + seconds)  # forever stays forever
        return seconds

    def ban_forever(self, peer_id: str) -> None:
        """For a server proven to compute wrongly: never chosen again by this client."""
        self._until[peer_id] = float("inf")

    def succeeded(self, peer_id: str) -> None:
        """A successful request resets the backoff (the ban itself, if any, has already expired)."""
        self._failures.pop(peer_id, None)

    def forgive(self, peer_id: str) -> None:
        """A server that left cleanly (it announced itself offline) did not fail: no ban, no backoff, so that it is
        used again as soon as it is back online. A ban for good stays."""
        if self._until.get(peer_id) != float("inf"):
            self._until.pop(peer_id, None)
            self._failures.pop(peer_id, None)

    def failures(self, peer_id: str) -> int:
        """Failures in a row (since its last success), whether or not its ban has expired."""
        return self._failures.get(peer_id, 0)

    def is_banned(self, peer_id: str) -> bool:
        return self._until.get(peer_id, 0.0) > self.clock()

    def banned(self) -> set[str]:
        now = self.clock()
        return {peer for peer, until in self._until.items() if until > now}
