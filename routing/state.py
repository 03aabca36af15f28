"""A snapshot of the swarm: which server holds which blocks, how fast, how loaded, at what price."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


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

    def to_wire(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["state"] = self.state.value
        record["adapters"] = list(self.adapters)
        return record

    @classmethod
    def from_wire(cls, record: Any) -> "ServerInfo":
        """Parse an untrusted DHT record; raises ValueError when it is malformed."""
        if not isinstance(record, dict):
            raise ValueError("a server record must be a map")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        try:
            info = cls(**values)
            info.state = ServerState(info.state)
            info.adapters = tuple(str(a) for a in info.adapters)
            info.start, info.end = int(info.start), int(info.end)
            info.throughput = float(info.throughput)
            info.prefill_throughput = float(info.prefill_throughput)
            info.sessions, info.max_sessions = int(info.sessions), int(info.max_sessions)
        except (TypeError, ValueError) as e:
            raise ValueError(f"malformed server record: {e}") from None
        if not 0 <= info.start < info.end:
            raise ValueError(f"malformed server record: span [{info.start}, {info.end})")
        return info


@dataclass
class SwarmState:
    """Servers by peer id, plus the client's own measurements of them."""
    num_blocks: int
    servers: dict[str, ServerInfo] = field(default_factory=dict)
    rtt: dict[str, float] = field(default_factory=dict)  # seconds, measured by this client

    def online(self) -> dict[str, ServerInfo]:
        return {peer: info for peer, info in self.servers.items() if info.state == ServerState.ONLINE}

    def holders(self, block: int) -> list[str]:
        return [peer for peer, info in self.online().items() if info.start <= block < info.end]

    def missing_blocks(self) -> list[int]:
        return [block for block in range(self.num_blocks) if not self.holders(block)]
