"""The client's view of the swarm: a DHT peer, a P2P handle, bans, round-trip times, the chain it picks, and calls
to servers (over swarm.client.server_stream's streams), with what it pays and checks."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from typing import Sequence

from hivemind.proto.runtime_pb2 import ExpertRequest

from routing import BanList, ChainLink, NoChainError, ServerInfo, ServerState, SwarmState, make_chain
from swarm.net.connector import Connector
from swarm.client import loop
from swarm.client.attestations import check_attestation
from swarm.client.config import ClientConfig
from swarm.client.payments import Payments
from swarm.client.server_stream import ServerStream
from swarm.client.spot_check import SpotChecker
from swarm.dht.records import fetch_swarm_state_async, make_dht
from swarm.wire.payloads import Payment
from swarm.wire.replies import InfoReply, PayReply, SpanReply
from swarm.wire.requests import PayRequest, SpanRequest

logger = logging.getLogger(__name__)
INFO_REPLY_BYTES = 1 << 20
RTT_MAX_AGE = 60.0       # seconds before a server's round trip is measured again
RTT_PROBES = 32          # servers probed at most per refresh
STALE_SECONDS = 30.0     # a snapshot up to this much older than state_ttl serves while a fresh one is fetched
# a server this client has not measured yet gets this long for a step, plus margins on its round trip and on the
# work it announces, not the whole request timeout: a tarpit that announces blocks and never answers costs seconds
FIRST_STEP_SECONDS = 1.5
SLOW_UPLOAD_BYTES_PER_S = 250_000  # 2 Mbit/s: a long prompt's bytes take their time before a first answer


class SwarmClient:
    """The client's view of one model's swarm: its servers (swarm state, round trips, chain choice), the
    connections to them, and what it pays and checks, all built from a ClientConfig (or a list of initial
    peers, for the defaults)."""

    def __init__(self, config: ClientConfig | Sequence[str], model_id: str, num_blocks: int, *,
                 local_blocks=None, state_ttl: float | None = None):
        config = config if isinstance(config, ClientConfig) else ClientConfig(initial_peers=config)
        if state_ttl is not None:
            config = dataclasses.replace(config, state_ttl=state_ttl)
        self.config, self.model_id, self.num_blocks = config, model_id, num_blocks
        self.request_timeout, self.state_ttl, self.max_retries = config.request_timeout, config.state_ttl, \
            config.max_retries
        self.adapter, self.push, self.codec = config.active_adapter, config.push, config.wire_codec
        self.dht = make_dht(config.initial_peers, client_mode=True)
        self.p2p = loop.run(self.dht.replicate_p2p())
        self.connector = Connector(self.p2p, self.dht.private_key)
        self.bans = BanList()
        self.rtt: dict[str, tuple[float, float]] = {}  # peer -> (seconds, measured at)
        self.block_seconds: dict[str, float] = {}  # peer -> seconds per token per block of its decode steps
        self._state: SwarmState | None = None
        self._state_time = 0.0
        self._refreshing: asyncio.Task | None = None  # a fetch of the swarm state in the background
        self.rng = random.Random()
        self.lora_sent: dict[str, list[str]] = {}  # peer -> hashes of LoRA weights it has (latest last)
        self._foreign: set[str] = set()  # priced servers of another settlement contract, skipped (logged once)
        self._budgets: dict[str, float] = {}  # peer -> the budget of its last step before it was measured
        self.payments = Payments.from_config(config, str(self.p2p.peer_id)) if config.wallet is not None else None
        self.spot_checker = None  # swarm.client.spot_check.SpotChecker when this client re-checks steps
        if config.spot_check_rate > 0:
            self.spot_checker = SpotChecker(self, config.spot_check_rate, config.spot_check_seed, local_blocks)

    # ------------------------------------------------------------------ the swarm snapshot
    @property
    def known_state(self) -> SwarmState | None:
        """The latest snapshot of the swarm this client has, without fetching one (None before the first)."""
        return self._state

    def swarm_state(self, refresh: bool = False) -> SwarmState:
        return loop.run(self.state(refresh))

    async def state(self, refresh: bool = False) -> SwarmState:
        """The latest snapshot of the swarm, with this client's round-trip times to its servers. One older than
        ``state_ttl`` (by less than STALE_SECONDS) is used while a fresh one is fetched in the background: a
        generate() does not wait for the DHT and for pings every ``state_ttl``."""
        age = time.monotonic() - self._state_time
        if not refresh and self._state is not None and 0 < self.state_ttl < age <= self.state_ttl + STALE_SECONDS:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh_quietly())
            return self._state
        if refresh or self._state is None or age > self.state_ttl:
            await self._refresh()
        return self._state

    async def _refresh(self) -> None:
        state = await fetch_swarm_state_async(self.dht, self.model_id, self.num_blocks)
        await self._measure_rtts(state)
        state.rtt = {peer: seconds for peer, (seconds, _) in self.rtt.items()}
        state.block_seconds = self.block_seconds
        if self.payments is not None:
            self._skip_other_contracts(state)
        for peer in self.bans.banned() & set(state.servers):
            if state.servers[peer].state == ServerState.OFFLINE:
                self.bans.forgive(peer)  # it left cleanly: a leave is no failure (offline, it is not chosen anyway)
        self._state, self._state_time = state, time.monotonic()

    def _skip_other_contracts(self, state: SwarmState) -> None:
        """A paying client pays through the contract of its own configuration: a priced server that redeems through
        another contract (or chain) could not be paid by its vouchers, so it is not used."""
        ours = self.payments.domain
        for peer, info in list(state.servers.items()):
            priced = info.price_per_unit or info.backward_price_per_unit
            if priced and (info.contract.lower() != ours.contract.lower() or info.chain_id != ours.chain_id):
                del state.servers[peer]
                if peer not in self._foreign:
                    self._foreign.add(peer)
                    logger.warning(f"skipping server {peer}: it is paid through contract {info.contract or '(none)'} "
                                   f"on chain {info.chain_id}, this client pays through {ours.contract} on chain "
                                   f"{ours.chain_id}")

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh()
        except Exception as e:  # the next state() that finds the snapshot too old fetches it itself
            logger.info(f"refreshing the swarm state failed ({type(e).__name__}: {e})")

    async def _measure_rtts(self, state: SwarmState) -> None:
        now = time.monotonic()
        stale = [p for p in state.online() if p not in self.rtt or now - self.rtt[p][1] > RTT_MAX_AGE]
        await asyncio.gather(*(self._ping(peer) for peer in self.rng.sample(stale, min(len(stale), RTT_PROBES))))

    async def _ping(self, peer_id: str) -> None:
        started = time.perf_counter()
        try:
            await self.info(peer_id, timeout=min(5.0, self.request_timeout))
        except Exception as e:
            logger.info(f"{peer_id} did not answer a ping ({type(e).__name__}: {e}); banned for "
                        f"{self.bans.ban(peer_id):.0f}s")
            return
        self.rtt[peer_id] = (time.perf_counter() - started, time.monotonic())

    async def chain(self, start: int = 0, end: int | None = None, *, avoid: Sequence[str] = (),
                    include_banned: bool = False, **kwargs) -> list[ChainLink]:
        """Servers for blocks [start, end) without banned ones (unless ``include_banned``) and ``avoid``
        (see routing.make_chain). NoChainError with ``excluded`` set when only those hold some block."""
        exclude = set(avoid) | (set() if include_banned else self.bans.banned())
        kwargs = {"rng": self.rng, "adapter": self.adapter, **kwargs}
        state = await self.state()
        for attempt in range(2):
            try:
                return make_chain(state, start, end, banned=exclude, **kwargs)
            except NoChainError as error:
                missing = error
            if attempt == 0:  # maybe a server joined or came back since the last snapshot
                state = await self.state(refresh=True)
        try:
            make_chain(state, start, end, **kwargs)
        except NoChainError:
            raise missing from None
        missing.excluded = exclude
        raise missing

    def measured_step(self, peer_id: str, seconds: float, blocks: int) -> None:
        """A decode step took ``seconds`` on ``peer_id`` for ``blocks`` blocks: routing trusts this over what the
        server advertises (an average over recent steps)."""
        rtt = self.rtt.get(peer_id, (0.0, 0.0))[0]
        per_block = max(seconds - rtt, 0.0) / blocks
        previous = self.block_seconds.get(peer_id)
        self.block_seconds[peer_id] = per_block if previous is None else 0.8 * previous + 0.2 * per_block

    def step_timeout(self, peer_id: str, tokens: int, blocks: int, wire_bytes: int = 0) -> float:
        """How long an inference step of ``tokens`` tokens (``wire_bytes`` of hidden states) through ``blocks`` of a
        server's blocks may take: the request timeout once this client has measured the server's decode steps;
        before that, a budget from its round trip, the work it announces, at the swarm's typical speed where it
        announces less (a server cannot buy itself a longer budget by announcing itself slow), and the bytes
        (to the server, pushed on, answered) over a slow home upload."""
        if peer_id in self.block_seconds:
            return self.request_timeout
        state = self._state
        info = state.servers.get(peer_id) if state is not None else None
        work = 0.0
        if info is not None:
            speeds = sorted(_block_speed(i, tokens) for i in state.online().values())
            typical = speeds[len(speeds) // 2] if speeds else 0.0
            speed = max(_block_speed(info, tokens), typical)  # tokens x blocks per second
            work = tokens * blocks / speed if speed > 0 else self.request_timeout
        budget = FIRST_STEP_SECONDS + 4 * self.rtt.get(peer_id, (0.0, 0.0))[0] + 4 * work + \
            3 * wire_bytes / SLOW_UPLOAD_BYTES_PER_S
        budget = min(budget, self.request_timeout)
        if len(self._budgets) > 4096:
            self._budgets.clear()
        self._budgets[peer_id] = budget
        return budget

    def report_failure(self, peer_id: str, error: BaseException) -> None:
        # a ban at least as long as the step's budget: tarpits cannot take turns at holding a client up
        seconds = self.bans.ban(peer_id, at_least=self._budgets.get(peer_id, 0.0))
        self._state_time = 0.0  # the next choice reads the swarm again: the server may have left (then it is forgiven)
        logger.warning(f"server {peer_id} failed ({type(error).__name__}: {error}); banned for {seconds:.0f}s, "
                       f"finding a replacement")

    # ------------------------------------------------------------------ calls
    async def open_stream(self, peer_id: str, handler: str) -> ServerStream:
        """A stream to a server's handler: through its relay or at its direct addresses when it offers them and
        this client can reach it, else through hivemind (swarm.net.connector)."""
        info = self._state.servers.get(peer_id) if self._state is not None else None
        async with asyncio.timeout(self.request_timeout):
            connection = await self.connector.connect(peer_id, handler, info)
        return ServerStream(peer_id, connection.reader, connection.writer, via=connection.via)

    def direct_addresses(self, peer_id: str) -> dict:
        """Where a server takes direct connections: {"direct": (ip:port, ...)}, or {"relay": ip:port} of its relay
        (the keywords of a push Route)."""
        info = self._state.servers.get(peer_id) if self._state is not None else None
        if info is not None and info.relay:
            return {"direct": (), "relay": info.relay.partition("@")[2]}
        return {"direct": tuple(info.direct) if info is not None else ()}

    async def call_span(self, peer_id: str, handler: str, request: SpanRequest,
                        lora_shape: tuple[int, ...] | None = None) -> SpanReply:
        """A forward or backward; a forward's reply from a server this client pays must be attested."""
        stream = await self.open_stream(peer_id, handler)
        try:
            reply = await stream.span(request, self.request_timeout, lora_shape)
        finally:
            stream.close()
        paid = self.paid_server(peer_id)
        if paid is not None and handler == "forward":
            check_attestation(reply.attestation, paid.payout_address, request.start, request.end, b"", request.hidden,
                              reply.outputs[0], paid.dtype)
        return reply

    async def info(self, peer_id: str, timeout: float | None = None) -> dict:
        stream = await self.open_stream(peer_id, "info")
        try:
            response = await stream.exchange(ExpertRequest(), timeout or self.request_timeout, INFO_REPLY_BYTES)
            return InfoReply.parse(response, peer_id).info
        finally:
            stream.close()

    async def pay(self, peer_id: str, request: PayRequest) -> bool:
        stream = await self.open_stream(peer_id, "pay")
        try:
            response = await stream.exchange(request.pack(), self.request_timeout, INFO_REPLY_BYTES)
            return PayReply.parse(response, peer_id).accepted
        finally:
            stream.close()

    # ------------------------------------------------------------------ payment
    def payment(self, peer_id: str) -> Payment | None:
        """Who pays this request to ``peer_id`` (and now and then a voucher), or None for free servers."""
        if self.payments is None:
            return None
        return self.payments.payment(peer_id, self._state.servers.get(peer_id) if self._state else None)

    def paid_server(self, peer_id: str):
        """The record of a server this client pays (whose replies must carry attestations), else None."""
        if self.payments is None or self._state is None or peer_id not in self._state.servers:
            return None
        info = self._state.servers[peer_id]
        return info if self.payments.channel(peer_id, info) is not None else None

    def stake_of(self, payout: str) -> int | None:
        """A server's stake on chain when this client reads the chain (for weighting checkers), else None."""
        return self.payments.stake_of(payout) if self.payments is not None else None

    def record_work(self, peer_id: str, reply: SpanReply, tokens: int, blocks: int, backward: bool = False) -> None:
        if self.payments is not None:
            self.payments.record(peer_id, reply, tokens, blocks, backward)

    async def settle(self) -> None:
        """Send every priced server a voucher for all the work counted so far."""
        if self.payments is None:
            return
        for peer_id, request in self.payments.settle_requests():
            try:
                await self.pay(peer_id, request)
            except Exception as e:
                logger.warning(f"could not send a voucher to {peer_id}: {e}")

    def shutdown(self) -> None:
        if self._refreshing is not None:
            loop.call_soon(self._refreshing.cancel)
        loop.run(self.p2p.shutdown())
        self.dht.shutdown()


def _block_speed(info: ServerInfo, tokens: int) -> float:
    """Tokens x blocks per second a server announces: its prefill throughput for a prefill, else its decode."""
    per_span = info.prefill_throughput if tokens > 1 and info.prefill_throughput > 0 else info.throughput
    return per_span * (info.end - info.start)
