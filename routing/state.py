"""A snapshot of the swarm: which server holds which blocks, how fast, how loaded, at what price."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

from routing.addresses import MAX_DIRECT_ADDRESSES, direct_address, relay_address

PROTOCOL_VERSION = 2  # what this release speaks on the wire: swarm.wire.protocol says what each version changed


class ServerState(str, Enum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass
class ServerInfo:
    """What a server announces in the DHT under each block it holds (msgpack'd as a plain dict)."""
    state: ServerState
    start: int
    end: int
    throughput: float                 # tokens/s through the whole span (decode, batch 1)
    prefill_throughput: float = 0.0   # tokens/s through the whole span for a large batch
    cache_tokens_left: int = 0
    sessions: int = 0
    max_sessions: int = 0
    version: str = ""
    dtype: str = ""
    quant: str = "none"
    adapters: tuple[str, ...] = ()
    public_name: str = ""
    payout_address: str = ""
    price_per_unit: int = 0           # wei per (token x block), inference and forward
    backward_price_per_unit: int = 0  # wei per (token x block) of backward
    credit_limit: int = 0             # wei of work a client may do beyond its latest voucher
    direct: tuple[str, ...] = ()      # "ip:port" where it accepts direct TLS connections (swarm.net.direct)
    relay: str = ""                   # "relay peer id@ip:port": reached only through that relay (swarm.net.relay)
    model_name: str = ""              # what the server calls its model ("SmolLM2-135M-Instruct"): for people only
    contract: str = ""                # a priced server: the settlement contract it redeems through...
    chain_id: int = 0                 # ...on this chain (a paying client skips servers of another one)
    protocol: int = PROTOCOL_VERSION  # the wire protocol it speaks (swarm.wire.protocol; a record without: 1)

    def to_wire(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["state"] = self.state.value
        record["adapters"] = list(self.adapters)
        record["direct"] = list(self.direct)
        return record

    @classmethod
    def from_wire(cls, record: Any) -> "ServerInfo":
        """Parse an untrusted DHT record into bounded values; raises ValueError when it is malformed."""
        if not isinstance(record, dict):
            raise ValueError("a server record must be a map")
        try:
            info = cls(state=ServerState(record.get("state")), start=_int(record, "start", 0, MAX_BLOCKS),
                       end=_int(record, "end", 1, MAX_BLOCKS),
                       throughput=_number(record, "throughput", MAX_THROUGHPUT),
                       prefill_throughput=_number(record, "prefill_throughput", MAX_THROUGHPUT),
                       cache_tokens_left=_int(record, "cache_tokens_left", 0, 2**40),
                       sessions=_int(record, "sessions", 0, 2**20), max_sessions=_int(record, "max_sessions", 0, 2**20),
                       version=_text(record, "version", 32), dtype=_text(record, "dtype", 16),
                       quant=_text(record, "quant", 16) or "none",
                       adapters=tuple(_text({"a": a}, "a", 256) for a in _list(record, "adapters", 64)),
                       public_name=_text(record, "public_name", 64), payout_address=_text(record, "payout_address", 42),
                       price_per_unit=_int(record, "price_per_unit", 0, MAX_PRICE),
                       backward_price_per_unit=_int(record, "backward_price_per_unit", 0, MAX_PRICE),
                       credit_limit=_int(record, "credit_limit", 0, MAX_PRICE),
                       direct=tuple(direct_address(a) for a in _list(record, "direct", MAX_DIRECT_ADDRESSES)),
                       relay=relay_address(record.get("relay", "")), model_name=_text(record, "model_name", 96),
                       contract=_text(record, "contract", 42), chain_id=_int(record, "chain_id", 0, 2**64),
                       protocol=_int(record, "protocol", 1, 2**16))
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed server record: {e}") from None
        if not info.start < info.end:
            raise ValueError(f"malformed server record: span [{info.start}, {info.end})")
        return info


MAX_BLOCKS = 2**16
MAX_THROUGHPUT = 1e6   # tokens/s: anything above is a lie; a client trusts its own measurements anyway
MAX_PRICE = 2**128


def _int(record: dict, key: str, low: int, high: int) -> int:
    value = record.get(key, low)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key} must be an integer in [{low}, {high}]")
    return value


def _number(record: dict, key: str, high: float) -> float:
    value = record.get(key, 0.0)
    if type(value) not in (int, float) or not 0 <= value <= high:  # NaN fails too
        raise ValueError(f"{key} must be a number in [0, {high:g}]")
    return float(value)


def _text(record: dict, key: str, length: int) -> str:
    value = record.get(key, "")
    if not isinstance(value, str) or len(value) > length:
        raise ValueError(f"{key} must be a string of at most {length} characters")
    return value


def _list(record: dict, key: str, length: int) -> list:
    value = record.get(key, [])
    if not isinstance(value, (list, tuple)) or len(value) > length:
        raise ValueError(f"{key} must be a list of at most {length} entries")
    return list(value)


@dataclass
class SwarmState:
    """Servers by peer id, plus the client's own measurements of them."""
    num_blocks: int
    servers: dict[str, ServerInfo] = field(default_factory=dict)
    rtt: dict[str, float] = field(default_factory=dict)  # seconds, measured by this client
    block_seconds: dict[str, float] = field(default_factory=dict)  # per token per block, measured by this client
    _derived: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, name: str, compute: Callable[["SwarmState"], Any]) -> Any:
        """``compute(self)``, once per snapshot: what routing derives from all servers (at 10,000 servers, a pass
        over them costs more than a chain). Whoever changes ``servers`` in place calls ``changed()``."""
        if name not in self._derived:
            self._derived[name] = compute(self)
        return self._derived[name]

    def changed(self) -> None:
        self._derived.clear()

    def online(self) -> dict[str, ServerInfo]:
        return {peer: info for peer, info in self.servers.items() if info.state == ServerState.ONLINE}

    def model_names(self) -> list[str]:
        """The names its servers announce for the model, the most common first (names are for people only)."""
        return [name for name, _ in Counter(i.model_name for i in self.servers.values() if i.model_name).most_common()]

    def holders(self, block: int) -> list[str]:
        return [peer for peer, info in self.online().items() if info.start <= block < info.end]

    def missing_blocks(self) -> list[int]:
        return [block for block in range(self.num_blocks) if not self.holders(block)]
