"""The client's view of the swarm: a DHT peer, a P2P handle, and request/stream calls to servers."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Sequence

import hivemind
from hivemind.p2p import PeerID
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from routing import ChainLink, SwarmState, make_chain
from swarm.client import loop
from swarm.dht_records import fetch_swarm_state
from swarm.protocol import RemoteError, read_frame, write_frame

logger = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 1 << 31


class ServerStream:
    """An open bidirectional stream to one server's handler: one response per request."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer_id, self.reader, self.writer = peer_id, reader, writer

    async def request(self, message: ExpertRequest, timeout: float) -> ExpertResponse:
        await write_frame(self.writer, message)
        response = await asyncio.wait_for(read_frame(self.reader, ExpertResponse, MAX_RESPONSE_BYTES), timeout)
        if response is None:
            raise RemoteError(f"server {self.peer_id} closed the stream")
        return response

    def close(self) -> None:
        self.writer.close()


class SwarmClient:
    def __init__(self, initial_peers: Sequence[str], model_id: str, num_blocks: int, *,
                 request_timeout: float = 60.0, state_ttl: float = 5.0):
        self.model_id, self.num_blocks = model_id, num_blocks
        self.request_timeout, self.state_ttl = request_timeout, state_ttl
        self.dht = hivemind.DHT(initial_peers=list(initial_peers), client_mode=True, start=True)
        self.p2p = loop.run(self.dht.replicate_p2p())
        self._state: SwarmState | None = None
        self._state_time = 0.0
        self.rng = random.Random()

    def swarm_state(self, refresh: bool = False) -> SwarmState:
        if refresh or self._state is None or time.monotonic() - self._state_time > self.state_ttl:
            self._state = fetch_swarm_state(self.dht, self.model_id, self.num_blocks)
            self._state_time = time.monotonic()
        return self._state

    def make_chain(self, start: int = 0, end: int | None = None, banned: Sequence[str] = ()) -> list[ChainLink]:
        return make_chain(self.swarm_state(), start, end, banned=banned, rng=self.rng)

    async def open_stream(self, peer_id: str, handler: str) -> ServerStream:
        _, reader, writer = await asyncio.wait_for(
            self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), f"cocoon.{handler}"),
            self.request_timeout)
        return ServerStream(peer_id, reader, writer)

    async def call(self, peer_id: str, handler: str, message: ExpertRequest) -> ExpertResponse:
        stream = await self.open_stream(peer_id, handler)
        try:
            return await stream.request(message, self.request_timeout)
        finally:
            stream.close()

    def shutdown(self) -> None:
        loop.run(self.p2p.shutdown())
        self.dht.shutdown()
