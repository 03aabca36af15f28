"""A server: loads a span, measures its throughput, announces it in the DHT and serves RPCs until stopped."""
from __future__ import annotations

import asyncio
import logging
import random
import signal
from dataclasses import dataclass, field
from typing import Sequence

import hivemind

import swarm
from routing import ServerInfo, ServerState
from routing.placement import choose_span, should_move
from shards import BlockSpan, Checkpoint
from shards.lora import LoraWeights, load_adapter, resolve_adapter
from shards.throughput import cached_throughput, get_throughput
from swarm.dht_records import announce, fetch_swarm_state
from swarm.server.handler import SpanHandler
from swarm.server.lora_cache import LoraCache
from swarm.server.sessions import SessionTable
from swarm.wire import Limits

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model: str
    initial_peers: Sequence[str] = ()
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    host: str = "127.0.0.1"
    port: int = 0
    dtype: str = "auto"
    quant: str = "none"
    device: str | None = None
    max_sessions: int = 64
    cache_tokens: int = 16384
    session_timeout: float = 120.0
    public_name: str = ""
    model_id: str | None = None
    identity_path: str | None = None
    announce_period: float = 15.0
    balance_period: float = 120.0     # how often a --num-blocks server considers moving (randomised +-50%)
    balance_threshold: float = 1.1    # move only if the swarm's throughput grows by more than this factor
    shutdown_grace: float = 5.0
    limits: Limits = field(default_factory=Limits)
    adapters: Sequence[str] = ()      # peft LoRA adapter directories (or hub repo ids) clients may pick by name
    lora_cache_bytes: int = 256 << 20  # clients' LoRA weights kept by hash between a forward and its backward
    # payment: free when price is 0
    price: int = 0                    # wei per token x block
    backward_price: int | None = None  # default: the same as price
    wallet: str | None = None         # keystore of the payout key (signs receipts, sends redemptions)
    passphrase: str = ""
    chain_rpc: str | None = None
    contract: str | None = None
    credit_limit: int = 10**15        # wei a client may owe beyond its latest voucher
    redeem_period: float = 60.0


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.stop = asyncio.Event()

    def run(self) -> None:
        asyncio.run(self.serve())

    async def serve(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)

        checkpoint = Checkpoint(config.model)
        self.model_id = config.model_id or checkpoint.model_id
        total_blocks = checkpoint.config.num_hidden_layers
        if config.blocks is not None and not 0 <= config.blocks[0] < config.blocks[1] <= total_blocks:
            from shards import SpanOutOfRangeError
            raise SpanOutOfRangeError(f"--blocks {config.blocks[0]}:{config.blocks[1]} is outside the model's "
                                      f"{total_blocks} blocks: use 0 <= A < B <= {total_blocks}")
        dht_kwargs = {"identity_path": config.identity_path} if config.identity_path else {}
        self.dht = hivemind.DHT(initial_peers=list(config.initial_peers), start=True,
                                host_maddrs=[f"/ip4/{config.host}/tcp/{config.port}"], **dht_kwargs)
        self.peer_id = str(self.dht.peer_id)
        try:
            start, end = config.blocks or self._choose_span(total_blocks)
            self.info = ServerInfo(ServerState.JOINING, start, end, throughput=0.0, version=swarm.__version__,
                                   public_name=config.public_name, max_sessions=config.max_sessions)
            announce(self.dht, self.model_id, self.peer_id, self.info, expiration=3 * config.announce_period)
            self.span = BlockSpan.from_pretrained(checkpoint, start, end, dtype=config.dtype, quant=config.quant,
                                                  device=config.device, progress=True)
            self.adapters = self._load_adapters(self.span)
            self.per_block = get_throughput(self.span, self.model_id)
            self._set_throughput()
            self.info.dtype = str(self.span.dtype_).removeprefix("torch.")
            self.info.quant = config.quant
            self.sessions = SessionTable(cache_tokens=config.cache_tokens, max_sessions=config.max_sessions,
                                         max_length=config.limits.max_length, timeout=config.session_timeout)
            self.ledger, self.redeemer = self._payments()
            self.handler = SpanHandler(self.span, self.sessions, config.limits, info=self.describe, ledger=self.ledger,
                                       adapters=self.adapters, lora_cache=LoraCache(config.lora_cache_bytes))
            self.p2p = await self.dht.replicate_p2p()
            await self.handler.add_p2p_handlers(self.p2p)
            self.info.state = ServerState.ONLINE
            self._announce()
            print(f"Server ready: blocks [{start}, {end}) of {self.model_id} as peer {self.peer_id}", flush=True)
            loop = asyncio.get_running_loop()
            next_balance = loop.time() + self._balance_delay()
            next_redeem = loop.time() + config.redeem_period
            while not self.stop.is_set():
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=min(config.announce_period, config.session_timeout / 4))
                except asyncio.TimeoutError:
                    for session_id in self.sessions.expire():
                        logger.info(f"session {session_id} expired")
                    if self.redeemer and loop.time() >= next_redeem:
                        await self._redeem()
                        next_redeem = loop.time() + config.redeem_period
                    if config.blocks is None and loop.time() >= next_balance:
                        await self._maybe_move(checkpoint)
                        next_balance = loop.time() + self._balance_delay()
                    self._announce()
            await self._shutdown()
        finally:
            self.dht.shutdown()

    def _choose_span(self, total_blocks: int) -> tuple[int, int]:
        num_blocks = min(self.config.num_blocks or total_blocks, total_blocks)
        state = fetch_swarm_state(self.dht, self.model_id, total_blocks)
        # our own throughput, if measured before on this hardware; else the swarm's typical server
        known = cached_throughput(self.model_id, self.config.dtype, self.config.quant, self.config.device)
        others = [info.throughput for info in state.online().values()]
        estimate = known.for_blocks(num_blocks).decode_tokens_per_s if known else (
            sum(others) / len(others) if others else 1.0)
        return choose_span(state, num_blocks, estimate)

    def _load_adapters(self, span: BlockSpan) -> dict[str, LoraWeights]:
        adapters = {}
        for name_or_path in self.config.adapters:
            name, path = resolve_adapter(name_or_path)
            adapters[name] = load_adapter(path, span)
            print(f"Loaded adapter {name!r} for blocks [{span.start}, {span.end}) from {path}", flush=True)
        self.info.adapters = tuple(adapters)
        return adapters

    def _payments(self):
        """The ledger of what clients owe and the redeemer that settles it on chain (None, None when free)."""
        config = self.config
        if config.price == 0:
            return None, None
        if not (config.wallet and config.chain_rpc and config.contract):
            raise SystemExit("a priced server needs --payout, --chain-rpc and --contract (see `cocoon chain deploy`)")
        from web3 import Web3

        from incentives.contract import Settlement
        from incentives.credit import ServerLedger
        from incentives.metering import Prices
        from incentives.redeemer import Redeemer
        from incentives.wallet import load_wallet
        account = load_wallet(config.wallet, config.passphrase)
        settlement = Settlement(Web3(Web3.HTTPProvider(config.chain_rpc)), config.contract)
        prices = Prices(config.price, config.price if config.backward_price is None else config.backward_price)
        ledger = ServerLedger(account.address, prices, settlement.domain, config.credit_limit, account)
        self.info.payout_address = account.address
        self.info.price_per_unit, self.info.backward_price_per_unit = prices.forward, prices.backward
        return ledger, Redeemer(settlement, account, ledger)

    async def _redeem(self) -> None:
        received = await asyncio.get_running_loop().run_in_executor(None, self.redeemer.redeem_new)
        from incentives.ledger_file import write_ledger
        write_ledger(self.ledger)
        if received:
            print(f"Redeemed {received} wei (total paid to {self.info.payout_address}: "
                  f"{sum(self.redeemer.redeemed.values())} wei)", flush=True)

    def _balance_delay(self) -> float:
        return self.config.balance_period * random.uniform(0.5, 1.5)  # servers must not all move at once

    async def _maybe_move(self, checkpoint: Checkpoint) -> None:
        state = fetch_swarm_state(self.dht, self.model_id, checkpoint.config.num_hidden_layers)
        state.servers[self.peer_id] = self.info
        target = should_move(state, self.peer_id, self.config.balance_threshold)
        if target is None:
            return
        start, end = target
        print(f"Moving from blocks [{self.info.start}, {self.info.end}) to [{start}, {end}): the swarm needs them more",
              flush=True)
        self.info.state = ServerState.JOINING
        self._announce()  # old span, no longer usable: clients fail over
        new_span = BlockSpan.from_pretrained(checkpoint, start, end, dtype=self.config.dtype, quant=self.config.quant,
                                             device=self.config.device, progress=True)

        new_adapters = self._load_adapters(new_span)

        def swap():  # in the compute thread, so no request runs on a half-swapped span
            self.sessions.sessions.clear()
            self.handler.span = self.span = new_span
            self.handler.adapters = self.adapters = new_adapters

        await self.handler._compute(swap)
        old = (self.info.start, self.info.end)
        self.info.start, self.info.end = start, end
        self._set_throughput()
        self.info.state = ServerState.ONLINE
        announce(self.dht, self.model_id, self.peer_id, ServerInfo(ServerState.OFFLINE, *old, throughput=0.0),
                 expiration=self.config.announce_period)
        self._announce()
        print(f"Server ready: blocks [{start}, {end}) of {self.model_id} as peer {self.peer_id}", flush=True)

    def _set_throughput(self) -> None:
        span = self.per_block.for_blocks(self.info.end - self.info.start)
        self.info.throughput = span.decode_tokens_per_s
        self.info.prefill_throughput = span.prefill_tokens_per_s

    def describe(self) -> dict:
        self.info.sessions = len(self.sessions.sessions)
        self.info.cache_tokens_left = self.sessions.tokens_left
        return {"model_id": self.model_id, "peer_id": self.peer_id, **self.info.to_wire(),
                "cache_tokens": self.config.cache_tokens, "max_length": self.config.limits.max_length,
                "lora_cache_bytes": self.handler.lora_cache.bytes if hasattr(self, "handler") else 0}

    def _announce(self) -> None:
        self.describe()
        announce(self.dht, self.model_id, self.peer_id, self.info, expiration=3 * self.config.announce_period)

    async def _shutdown(self) -> None:
        """Stop announcing, refuse new sessions, let open ones finish for a grace period, then leave."""
        logger.info("shutting down")
        self.handler.accepting = False
        self.info.state = ServerState.OFFLINE
        announce(self.dht, self.model_id, self.peer_id, self.info, expiration=self.config.announce_period)
        deadline = asyncio.get_running_loop().time() + self.config.shutdown_grace
        while self.sessions.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        self.handler.executor.shutdown(wait=True)
        if self.redeemer:
            await self._redeem()
        await self.p2p.shutdown()
        print("Server stopped", flush=True)
