"""How a client joins the swarm, pays servers and checks them: one field each, like petals' ClientConfig.
``from_pretrained`` takes these as keyword arguments and maps them onto a ClientConfig; ``SwarmClient`` builds
its payments, spot checker and pushes from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class ClientConfig:
    # multiaddrs of DHT peers of the swarm (`cocoon dht` and `cocoon serve` print theirs)
    initial_peers: Sequence[str] = field(default_factory=list)
    # seconds a server may take to answer one request before another holder of its blocks is tried
    request_timeout: float = 60.0
    # a LoRA adapter the servers serve (`cocoon serve --adapters`): only servers holding it are used
    active_adapter: str | None = None
    # each server of an inference chain sends its output straight to the next one (k + 1 network crossings
    # for k servers instead of 2k); the client still checks every server's output
    push: bool = True
    # an eth_account LocalAccount: pay priced servers with vouchers redeemable from its escrow...
    wallet: Any = None
    # ...in this settlement contract...
    contract: str | None = None
    # ...on this chain (read from chain_rpc when not given)
    chain_id: int | None = None
    # a node of that chain: the chain id, and servers' stakes (spot checks weight checkers by stake)
    chain_rpc: str | None = None
    # the fraction of inference steps re-run on other servers holding the same blocks (e.g. 0.05)
    spot_check_rate: float = 0.0
    # which steps are checked, reproducibly (None: at random)
    spot_check_seed: int | None = None
    # settle a disagreement with this machine's copy of the blocks (None: when the checkpoint's files are here),
    # else by three independent checkers
    spot_check_local: bool | None = None
    # seconds a snapshot of the swarm is used before a fresh one is fetched (in the background)
    state_ttl: float = 5.0
    # failures of one request (each on another server) before the client gives up
    max_retries: int = 8
    # "int8": prefills, forwards and backwards of at least 16 tokens cross in 8-bit rows, about half the bytes of
    # 16 bits at 0.3-1% of a row's norm (swarm.wire.int8_rows), for links where upload is the bottleneck; decode
    # steps stay in 16 bits. It applies to 16-bit bfloat16 activations (float32 models' default wire)
    wire_codec: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.initial_peers, str):
            self.initial_peers = [self.initial_peers]
        self.initial_peers = list(self.initial_peers)
        if self.wallet is not None and (self.contract is None or (self.chain_id is None and self.chain_rpc is None)):
            raise ValueError("paying servers needs the settlement contract address, and its chain id or a node of "
                             "its chain (chain_rpc)")
        if self.wire_codec not in (None, "int8"):
            raise ValueError(f"wire_codec must be None or 'int8', got {self.wire_codec!r}")
        if not 0.0 <= self.spot_check_rate <= 1.0:
            raise ValueError(f"spot_check_rate must lie in [0, 1], got {self.spot_check_rate}")
