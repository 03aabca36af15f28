"""A server: loads a span, measures its throughput, announces it in the DHT and serves RPCs until stopped."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal

from hivemind import DHT

import swarm
from routing import ServerInfo, ServerState
from routing.placement import choose_span, should_move
from shards import BlockSpan, Checkpoint
from shards.decode_paths import DecodePlan
from shards.lora import LoraWeights, load_adapter, resolve_adapter
from shards.openmp import compute_elsewhere
from shards.throughput import Throughput, cached_throughput, get_throughput
from swarm.dht.records import (DHT_SECONDS, DHTStopped, announce, announce_relay, fetch_evidence, fetch_swarm_state,
                                fetch_swarm_state_async, make_dht, replicate_p2p)
from swarm.net import event_loop
from swarm.net.direct import DirectServer
from swarm.net.relay import RelayService
from swarm.server.config import ServerConfig
from swarm.server.engine import Engine
from swarm.server.handler import SpanHandler
from swarm.server import reachability
from swarm.server.push import PushDirectory, PushSender
from swarm.server.loading import ServerStartError, blocks_that_fit, load_span, model_name, return_freed_buffers
from swarm.server.lora_cache import LoraCache
from swarm.server.memory_budget import MemoryClaims
from swarm.server.payments import ServerPayments
from swarm.server.sessions import SessionTable
from swarm.processes import exit_on_termination, reap_children

logger = logging.getLogger(__name__)
# a stopping server leaves within --shutdown-grace plus these: what it cannot tell the DHT or the chain by then
# stays undone (its records expire; its vouchers wait in the ledger for `cocoon redeem` or its next start)
LEAVING_DHT_SECONDS, LEAVING_CHAIN_SECONDS = 3.0, 6.0
AUTO_BATCH_WINDOW = 0.020  # seconds, the most a batch waits by default


class Server:
    """A server's life: ``_start`` (in the calling thread: join the DHT, load and measure a span) sets what it
    serves; ``_serve`` (on the event loop) sets how it serves it, until it stops."""

    def __init__(self, config: ServerConfig):
        self.config = config
        # set by _start
        self.dht: DHT | None = None
        self.memory_claims: MemoryClaims | None = None  # --num-blocks auto: memory held until the span is loaded
        self.checkpoint: Checkpoint | None = None
        self.model_id = self.peer_id = ""
        self.info: ServerInfo | None = None  # what it announces
        self.span: BlockSpan | None = None
        self.plan: DecodePlan | None = None
        self.adapters: dict[str, LoraWeights] = {}
        self.per_block: Throughput | None = None  # measured throughput, per block
        self.sessions: SessionTable | None = None
        self.payments: ServerPayments | None = None
        # set by _serve
        self.stop: asyncio.Event | None = None
        self.engine: Engine | None = None
        self.handler: SpanHandler | None = None
        self.metrics = None
        self.p2p = None
        self.direct: DirectServer | None = None
        self.relaying = None  # its relay service (reachable: it relays for others) or registration (behind NAT)
        self.direct_addresses: tuple[str, ...] = ()  # where it takes direct connections, announced or not

    def run(self) -> None:
        """Start (SIGTERM or SIGINT abort this part at once: swarm.processes), then serve until SIGTERM or SIGINT,
        which stop the server gracefully: announce offline, let open sessions finish, redeem, leave."""
        try:
            self._start()
            compute_elsewhere()  # the compute thread's OpenMP team must be the only one (shards.openmp)
            event_loop.run(self._serve())
        except DHTStopped:
            if self.stop is None or not self.stop.is_set():
                raise
            print("Server stopped (signalled while starting)", flush=True)  # the group's signal stopped the DHT first
        finally:
            if self.dht is not None:
                self.dht.shutdown()
            exit_on_termination()  # asyncio put the default handlers back

    def _start(self) -> None:
        """Load the span, measure it, set up payments; announce the server as joining."""
        config = self.config
        return_freed_buffers()
        self.checkpoint = checkpoint = Checkpoint(config.model, revision=config.revision, token=config.token)
        self.model_id = config.model_id or checkpoint.model_id
        total_blocks = checkpoint.config.num_hidden_layers
        if config.blocks is not None and not 0 <= config.blocks[0] < config.blocks[1] <= total_blocks:
            from shards import SpanOutOfRangeError
            raise SpanOutOfRangeError(f"--blocks {config.blocks[0]}:{config.blocks[1]} is outside the model's "
                                      f"{total_blocks} blocks: use 0 <= A < B <= {total_blocks}")
        announce_maddrs = list(config.announce_maddrs)
        if config.public_ip and not announce_maddrs:
            if not config.port or (config.direct and not config.direct_port):
                raise ServerStartError("--public-ip needs --port and --direct-port: the ports forwarded to this machine")
            announce_maddrs = [f"/ip4/{config.public_ip}/tcp/{config.port}"]
        print(f"Joining the swarm through {len(config.initial_peers)} DHT peer(s)", flush=True)
        self.dht = make_dht(config.initial_peers, identity_path=config.identity_path, sign=True,
                            host_maddrs=[f"/ip4/{config.host}/tcp/{config.port}"],
                            announce_maddrs=announce_maddrs or None, use_relay=config.relay,
                            use_auto_relay=config.relay)
        self.peer_id = str(self.dht.peer_id)
        if config.blocks or config.num_blocks:
            num_blocks = config.num_blocks
        else:  # --num-blocks auto: the memory of the blocks it chose stays claimed until they are loaded
            num_blocks, self.memory_claims = blocks_that_fit(config, checkpoint, total_blocks)
        start, end = config.blocks or self._choose_span(total_blocks, num_blocks)
        self.info = ServerInfo(ServerState.JOINING, start, end, throughput=0.0, version=swarm.__version__,
                               public_name=config.public_name, max_sessions=config.max_sessions,
                               model_name=model_name(config.model))
        announce(self.dht, self.model_id, self.peer_id, self.info, expiration=3 * config.announce_period)
        print(f"Loading blocks [{start}, {end}) of {total_blocks}", flush=True)
        self.span, self.plan = load_span(config, checkpoint, start, end, plan=None)
        if self.memory_claims is not None:  # loaded: what is left to allocate is the KV budget
            self.memory_claims.update(self.span.cache_bytes_per_token() * config.cache_tokens)
        self.adapters = self._load_adapters(self.span)
        print("Measuring throughput (once per machine and model; cached after)", flush=True)
        self.per_block = get_throughput(self.span, self.model_id)  # through the plan's path, with its threads
        self._set_throughput()
        self.info.dtype = str(self.span.dtype_).removeprefix("torch.")
        self.info.quant = config.quant
        self.sessions = SessionTable(cache_tokens=config.cache_tokens, max_sessions=config.max_sessions,
                                     max_length=config.limits.max_length, timeout=config.session_timeout,
                                     max_sessions_per_peer=config.quotas.max_sessions_per_peer)
        self.payments = self._payments()

    async def _serve(self) -> None:
        config, loop = self.config, asyncio.get_running_loop()
        self.stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signalled, sig)
        self.engine = Engine(self.span, self.plan, self.sessions, config.quotas,
                             prefill_rate=self.per_block.prefill_tokens_per_s,
                             batch_window=self._batch_window(), max_batch_sessions=config.max_batch_sessions)
        self.handler = SpanHandler(self.engine, self.sessions, config.limits, info=self.describe,
                                   payments=self.payments, adapters=self.adapters,
                                   lora_cache=LoraCache(config.lora_cache_bytes), quotas=config.quotas)
        self.metrics = self._metrics()
        self.p2p = await replicate_p2p(self.dht)
        await self.handler.add_p2p_handlers(self.p2p)
        total = self.checkpoint.config.num_hidden_layers
        self.handler.pushes = PushSender(self.p2p, self.dht.private_key, PushDirectory(
            lambda: fetch_swarm_state_async(self.dht, self.model_id, total)))
        self.direct = await self._start_direct() if config.direct else None
        self.direct_addresses = self.info.direct
        self.relaying = await self._check_reachability() if config.direct else None
        self.info.state = ServerState.ONLINE
        self._announce()
        print(f"Server ready: blocks [{self.info.start}, {self.info.end}) of {self.model_id}, {self.plan}, "
              f"as peer {self.peer_id}", flush=True)
        next_balance, next_recheck = loop.time() + self._balance_delay(), loop.time() + config.recheck_period
        # redemption runs on its own: a chain that fails or hangs never holds up serving or announcing
        redeeming = asyncio.create_task(self.payments.redeem_forever()) if self.payments else None
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=min(config.announce_period, config.session_timeout / 4))
            except asyncio.TimeoutError:
                for session_id in self.sessions.expire():
                    logger.info(f"session {session_id} expired")
                # the DHT's round trips (milliseconds, seconds where a peer does not answer) and the process
                # count run in a worker thread: the sessions served here do not wait for them
                if self.metrics is not None:
                    self.metrics.evidence.set(await asyncio.to_thread(self._evidence_against_me))
                if self.relaying is not None and not isinstance(self.relaying, RelayService) and \
                        loop.time() >= next_recheck:
                    next_recheck = loop.time() + config.recheck_period
                    if await reachability.recheck(self):
                        self._announce()
                if config.blocks is None and loop.time() >= next_balance:
                    await self._maybe_move(self.checkpoint)
                    next_balance = loop.time() + self._balance_delay()
                await asyncio.to_thread(self._announce, self._snapshot())
        await self._shutdown(redeeming)

    async def _start_direct(self) -> DirectServer:
        """Listen for direct connections and announce where: the address it listens on, or with 0.0.0.0 the
        IPv4 addresses of its p2p listeners."""
        direct = DirectServer(self.dht.private_key, self.handler.stream_handlers())
        port = await direct.start(self.config.host, self.config.direct_port)
        hosts = [self.config.host] if self.config.host not in ("0.0.0.0", "::") else sorted({
            str(maddr).split("/")[2] for maddr in await self.p2p.get_visible_maddrs()
            if str(maddr).startswith("/ip4/")})
        public = [f"{self.config.public_ip}:{port}"] if self.config.public_ip else []
        self.info.direct = tuple((self.config.announce_direct or public)[:4]) or tuple(f"{h}:{port}" for h in hosts[:4])
        logger.info(f"direct connections at {', '.join(self.info.direct)}")
        return direct

    async def _check_reachability(self):
        """Ask a relay to dial this server back; print what it found. Unreachable: say what to try, and leave.
        Returns this server's relay service (when it relays for others) or registration (when relayed)."""
        port = int(self.info.direct[0].rpartition(":")[2]) if self.info.direct else self.config.direct_port
        found = await reachability.check(self.dht, self.peer_id, self.direct, list(self.info.direct), port,
                                         self.config.relay)
        print(found.line, flush=True)
        if found.status == "unreachable":
            self.info.state = ServerState.OFFLINE
            self._announce()
            raise ServerStartError("nobody can reach this server: see the line above for what to try")
        if found.status in ("relay", "relay and direct"):
            self.info.relay = found.relay
            if found.status == "relay":
                self.info.direct = ()
            return found.registration
        if not self.config.relay or not self.info.direct:
            return None
        return await reachability.offer_relay(self.dht, self.peer_id, self.direct, list(self.info.direct),
                                              self.config.host, 3 * self.config.announce_period)

    def _choose_span(self, total_blocks: int, num_blocks: int | None) -> tuple[int, int]:
        num_blocks = min(num_blocks or total_blocks, total_blocks)
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

    def _payments(self) -> ServerPayments | None:
        """What clients owe, on disk and on chain (None when this server works for free)."""
        config = self.config
        if config.price == 0:
            return None
        if not (config.wallet and config.chain_rpc and config.contract):
            raise ServerStartError("a priced server needs --payout, --chain-rpc and --contract (see `cocoon chain deploy`)")
        from web3 import Web3

        from incentives.contract import Settlement
        from incentives.credit import ServerLedger
        from incentives.ledger_file import ledger_path
        from incentives.metering import Prices
        from incentives.wallet import load_wallet
        account = load_wallet(config.wallet, config.passphrase)
        w3 = Web3(Web3.HTTPProvider(config.chain_rpc, request_kwargs={"timeout": 10}))
        settlement = Settlement(w3, config.contract)
        prices = Prices(config.price, config.price if config.backward_price is None else config.backward_price)
        ledger = ServerLedger(account.address, prices, settlement.domain, config.credit_limit, account)
        self.info.payout_address = account.address
        self.info.price_per_unit, self.info.backward_price_per_unit = prices.forward, prices.backward
        self.info.credit_limit = config.credit_limit
        self.info.contract, self.info.chain_id = settlement.domain.contract, settlement.domain.chain_id
        print(f"Ledger of what clients owe: {ledger_path(account.address)} (`cocoon earnings` reads it)", flush=True)
        return ServerPayments(ledger, settlement, account, self.peer_id, redeem_period=config.redeem_period)

    def _metrics(self):
        if self.config.metrics_port is None:
            return None
        from swarm.server.metrics import ServerMetrics
        metrics = ServerMetrics()
        port = metrics.serve(self.config.metrics_port, self.config.host)
        metrics.track_sessions(self.sessions)
        metrics.track_drafts(self.handler.steps.drafts)
        metrics.decode_plan.info({"path": self.plan.path, "batch_path": self.plan.path_for(2),
                                  "prompt_path": self.plan.prompt_path, "threads": str(self.plan.threads),
                                  "policy": "park" if self.plan.park_idle else "spin",
                                  "step_ms": f"{self.plan.step_ms:.3f}"})
        self.handler.metrics = metrics
        if self.payments is not None:
            self.payments.metrics = metrics
        print(f"Metrics: http://{self.config.host}:{port}/metrics", flush=True)
        return metrics

    def _evidence_against_me(self) -> int:
        return sum(not isinstance(evidence, str) and evidence.peer_id == self.peer_id
                   for _, evidence, _ in fetch_evidence(self.dht, self.model_id))

    def _batch_window(self) -> float:
        """Seconds a batch waits for more steps: as set, else one decode step of this span (waiting longer for a
        partner costs the waiting step more than sharing a forward saves; a peer that keeps sessions looking
        busy must not add 20 ms to every step of a 2 ms span), at most AUTO_BATCH_WINDOW."""
        if self.config.batch_window_ms is not None:
            return self.config.batch_window_ms / 1000
        return min(AUTO_BATCH_WINDOW, self.plan.step_ms / 1000 or AUTO_BATCH_WINDOW)

    def _balance_delay(self) -> float:
        return self.config.balance_period * random.uniform(0.5, 1.5)  # servers must not all move at once

    async def _maybe_move(self, checkpoint: Checkpoint) -> None:
        state = await asyncio.to_thread(fetch_swarm_state, self.dht, self.model_id, checkpoint.config.num_hidden_layers)
        state.servers[self.peer_id] = self.info
        target = should_move(state, self.peer_id, self.config.balance_threshold)
        if target is None:
            return
        start, end = target
        print(f"Moving from blocks [{self.info.start}, {self.info.end}) to [{start}, {end}): the swarm needs them more",
              flush=True)
        self.info.state = ServerState.JOINING
        await asyncio.to_thread(self._announce, self._snapshot())  # old span, no longer usable: clients fail over
        new_span, _ = load_span(self.config, checkpoint, start, end, self.plan)
        new_adapters = self._load_adapters(new_span)

        def swap():  # in the compute thread, so no request runs on a half-swapped span
            self.sessions.sessions.clear()
            self.engine.use_span(new_span)
            self.span = new_span
            self.handler.adapters = self.adapters = new_adapters

        await self.engine.call(self.peer_id, swap)
        old = (self.info.start, self.info.end)
        self.info.start, self.info.end = start, end
        self._set_throughput()
        self.info.state = ServerState.ONLINE
        await asyncio.to_thread(announce, self.dht, self.model_id, self.peer_id,
                                ServerInfo(ServerState.OFFLINE, *old, throughput=0.0),
                                expiration=self.config.announce_period)
        await asyncio.to_thread(self._announce, self._snapshot())
        print(f"Server ready: blocks [{start}, {end}) of {self.model_id} as peer {self.peer_id}", flush=True)

    def _set_throughput(self) -> None:
        span = self.per_block.for_blocks(self.info.end - self.info.start)
        self.info.throughput = span.decode_tokens_per_s
        self.info.prefill_throughput = span.prefill_tokens_per_s

    def describe(self) -> dict:
        self.info.sessions = len(self.sessions.sessions)
        self.info.cache_tokens_left = self.sessions.tokens_left
        serving = self.handler is not None
        batches = self.engine.scheduler.batches if serving else {}  # tasks per batch: how many ran
        return {"model_id": self.model_id, "peer_id": self.peer_id, **self.info.to_wire(),
                "cache_tokens": self.config.cache_tokens, "max_length": self.config.limits.max_length,
                "lora_cache_bytes": self.handler.lora_cache.bytes if serving else 0,
                "batches": {str(size): n for size, n in batches.items()},
                "pushes": dict(self.handler.steps.push_counts) if serving else {},
                "drafts": dict(self.handler.steps.drafts) if serving else {},
                "decode_path": self.plan.spec if self.plan else ""}

    def _snapshot(self) -> ServerInfo:
        """This server's record as it stands now, for _announce in another thread."""
        self.describe()
        return dataclasses.replace(self.info)

    def _signalled(self, sig: int) -> None:
        """The first SIGTERM or SIGINT stops the server gracefully; another one stops it at once."""
        if not self.stop.is_set():
            self.stop.set()
            return
        print(f"{signal.Signals(sig).name} again: stopping now", flush=True)
        reap_children(grace=1.0)
        os._exit(128 + sig)

    def _announce(self, info: ServerInfo | None = None) -> None:
        """Store this server's records in the DHT (``info``: a _snapshot(); by default, one taken now). A DHT that
        fails or has stopped is logged: serving goes on, and so does a shutdown."""
        info = info if info is not None else self._snapshot()
        try:
            if isinstance(self.relaying, RelayService):
                announce_relay(self.dht, self.peer_id, self.relaying.control, self.relaying.splice,
                               3 * self.config.announce_period)
            announce(self.dht, self.model_id, self.peer_id, info, expiration=3 * self.config.announce_period,
                     num_blocks=self.checkpoint.config.num_hidden_layers,
                     timeout=LEAVING_DHT_SECONDS if info.state == ServerState.OFFLINE else DHT_SECONDS)
        except (DHTStopped, TimeoutError) as e:
            logger.warning(f"could not announce this server ({e})")

    async def _shutdown(self, redeeming: asyncio.Task | None) -> None:
        """Stop announcing, refuse new sessions, let open ones finish for a grace period, redeem, then leave."""
        print(f"Leaving: announcing this server offline; open sessions may finish within {self.config.shutdown_grace:g} s "
              f"(a second SIGTERM or SIGINT stops it at once)", flush=True)
        self.handler.accepting = False
        self.info.state = ServerState.OFFLINE
        self._announce(dataclasses.replace(self.info))
        deadline = asyncio.get_running_loop().time() + self.config.shutdown_grace
        while self.sessions.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.direct is not None:
            self.direct.close()
        if self.relaying is not None:
            self.relaying.close()
        if self.handler.pushes is not None:
            self.handler.pushes.close()
        self.engine.scheduler.shutdown()
        if redeeming is not None:
            redeeming.cancel()  # it may be waiting out its period; the last redemption is right here
            with contextlib.suppress(asyncio.CancelledError):
                await redeeming
            try:  # a last redemption; if the chain is down, the ledger on disk keeps every voucher
                await asyncio.wait_for(self.payments.redeem(), timeout=LEAVING_CHAIN_SECONDS)
            except asyncio.TimeoutError:
                print("The chain did not answer: vouchers left to redeem are in the ledger "
                      "(`cocoon redeem`, or the next start of this server)", flush=True)
        await self.p2p.shutdown()
        print("Server stopped", flush=True)
