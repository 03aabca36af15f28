"""The client's view of the swarm: a DHT peer, a P2P handle, bans, round-trip times, and calls to servers."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Sequence

import hivemind
from hivemind.p2p import PeerID
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from routing import BanList, ChainLink, SwarmState, make_chain
from swarm.client import loop
from swarm.dht_records import fetch_swarm_state_async
from swarm.protocol import RemoteError, read_frame, write_frame

logger = logging.getLogger(__name__)
MAX_RESPONSE_BYTES = 1 << 31
RTT_MAX_AGE = 60.0       # seconds before a server's round trip is measured again
RTT_PROBES = 32          # servers probed at most per refresh


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
                 request_timeout: float = 60.0, state_ttl: float = 5.0, max_retries: int = 8):
        self.model_id, self.num_blocks = model_id, num_blocks
        self.request_timeout, self.state_ttl, self.max_retries = request_timeout, state_ttl, max_retries
        self.dht = hivemind.DHT(initial_peers=list(initial_peers), client_mode=True, start=True)
        self.p2p = loop.run(self.dht.replicate_p2p())
        self.bans = BanList()
        self.rtt: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self._state: SwarmState | None = None
        self._state_time = 0.0
        self.rng = random.Random()
        self.payments = None  # swarm.client.payments.Payments when this client pays servers
        self.spot_checker = None  # swarm.client.spot_check.SpotChecker when this client re-checks steps
        self.adapter: str | None = None  # a LoRA adapter served by the servers: only its holders are used
        self.lora_sent: dict[str, list[str]] = {}  # peer -> hashes of LoRA weights it has (latest last)

    # ------------------------------------------------------------------ the swarm snapshot
    def swarm_state(self, refresh: bool = False) -> SwarmState:
        return loop.run(self.state(refresh))

    async def state(self, refresh: bool = False) -> SwarmState:
        """The latest snapshot of the swarm, with this client's round-trip times to its servers."""
        if refresh or self._state is None or time.monotonic() - self._state_time > self.state_ttl:
            state = await fetch_swarm_state_async(self.dht, self.model_id, self.num_blocks)
            await self._measure_rtts(state)
            state.rtt = {peer: seconds for peer, (seconds, _) in self.rtt.items()}
            self._state, self._state_time = state, time.monotonic()
        return self._state

    async def _measure_rtts(self, state: SwarmState) -> None:
        now = time.monotonic()
        stale = [p for p in state.online() if p not in self.rtt or now - self.rtt[p][1] > RTT_MAX_AGE]
        await asyncio.gather(*(self._ping(peer) for peer in self.rng.sample(stale, min(len(stale), RTT_PROBES))))

    async def _ping(self, peer_id: str) -> None:
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.call(peer_id, "info", ExpertRequest()), min(5.0, self.request_timeout))
        except Exception as e:
            logger.info(f"{peer_id} did not answer a ping ({type(e).__name__}: {e}); banned for "
                        f"{self.bans.ban(peer_id):.0f}s")
            return
        self.rtt[peer_id] = (time.perf_counter() - started, time.monotonic())

    async def chain(self, start: int = 0, end: int | None = None, banned: Sequence[str] = (), **kwargs) -> list[ChainLink]:
        """Servers for blocks [start, end), avoiding banned ones (see routing.make_chain)."""
        exclude = self.bans.banned() | set(banned)
        kwargs = {"rng": self.rng, "adapter": self.adapter, **kwargs}
        try:
            return make_chain(await self.state(), start, end, banned=exclude, **kwargs)
        except LookupError:  # maybe a server joined or came back since the last snapshot
            state = await self.state(refresh=True)
        try:
            return make_chain(state, start, end, banned=exclude, **kwargs)
        except LookupError:
            if not self.bans.banned() - set(banned):
                raise
            # a server that failed a moment ago is a better bet than no server at all
            logger.warning(f"only recently failed servers hold blocks {start}:{end}; trying them again")
            return make_chain(state, start, end, banned=set(banned), **kwargs)

    def report_failure(self, peer_id: str, error: BaseException) -> None:
        seconds = self.bans.ban(peer_id)
        logger.warning(f"server {peer_id} failed ({type(error).__name__}: {error}); banned for {seconds:.0f}s, "
                       f"finding a replacement")

    # ------------------------------------------------------------------ calls
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

    def span_meta(self, peer_id: str) -> dict:
        """Metadata of every request that starts work on a span: the adapter, and payment."""
        meta = {"adapter": self.adapter} if self.adapter is not None else {}
        return {**meta, **self.payment_meta(peer_id)}

    # ------------------------------------------------------------------ payment
    def payment_meta(self, peer_id: str) -> dict:
        if self.payments is None:
            return {}
        return self.payments.request_meta(peer_id, self._state.servers.get(peer_id) if self._state else None)

    def record_work(self, peer_id: str, response_meta: dict, tokens: int, blocks: int, backward: bool = False) -> None:
        if self.payments is not None:
            self.payments.record(peer_id, response_meta, tokens, blocks, backward)

    async def settle(self) -> None:
        """Send every priced server a voucher for all the work counted so far."""
        if self.payments is None:
            return
        for peer_id, request in self.payments.settle_requests():
            try:
                await self.call(peer_id, "pay", request)
            except Exception as e:
                logger.warning(f"could not send a voucher to {peer_id}: {e}")

    def shutdown(self) -> None:
        loop.run(self.p2p.shutdown())
        self.dht.shutdown()
