"""Counting what each peer takes of a server (see swarm.wire.limits.Quotas): open streams and bytes in flight."""
from __future__ import annotations

import contextlib

from swarm.wire.codes import ErrorCode, WireError
from swarm.wire.limits import Quotas


class PeerUsage:
    """Streams and in-flight bytes of each peer, within its quota."""

    def __init__(self, quotas: Quotas, max_message_bytes: int):
        self.quotas = quotas
        self.max_inflight = int(quotas.max_inflight_mb_per_peer * 2**20) or 2 * max_message_bytes
        self.streams: dict[str, int] = {}
        self.inflight: dict[str, int] = {}

    @contextlib.contextmanager
    def stream(self, peer: str):
        if self.streams.get(peer, 0) >= self.quotas.max_streams_per_peer:
            raise WireError(ErrorCode.QUOTA_EXCEEDED, f"{self.streams[peer]} streams open from your peer (the limit "
                                                      f"per peer): close some or use another server")
        self.streams[peer] = self.streams.get(peer, 0) + 1
        try:
            yield
        finally:
            self._release(self.streams, peer, 1)

    def admit(self, peer: str, size: int) -> None:
        """A frame of ``size`` bytes is about to be read: refuse it if the peer's in-flight bytes would pass
        the quota (then it must be released with ``done``)."""
        if self.inflight.get(peer, 0) + size > self.max_inflight:
            raise WireError(ErrorCode.QUOTA_EXCEEDED, f"{self.inflight.get(peer, 0)} bytes of your requests are in "
                                                      f"flight here; {size} more would pass the limit per peer of "
                                                      f"{self.max_inflight}")
        self.inflight[peer] = self.inflight.get(peer, 0) + size

    def done(self, peer: str, size: int) -> None:
        self._release(self.inflight, peer, size)

    @staticmethod
    def _release(counts: dict[str, int], peer: str, amount: int) -> None:
        left = counts.get(peer, 0) - amount
        if left > 0:
            counts[peer] = left
        else:
            counts.pop(peer, None)
