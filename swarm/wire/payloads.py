"""The typed records nested in a request's metadata: LoRA weights' layout, who pays (with a voucher and a
payer proof), and the routes of server-to-server pushes. Each reads an untrusted map with bounds
(``from_wire``) and writes the map it came from (``to_wire``)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from routing.addresses import ETH_ADDRESS, MAX_DIRECT_ADDRESSES, PEER_ID, ROUTE_ID, direct_address
from swarm.wire.codes import bad
from swarm.wire.fields import read_int, read_map, read_str

HASH = re.compile(r"[0-9a-f]{1,64}")


@dataclass
class LoraSpec:
    """How to read a request's LoRA weights (layout in shards.lora); ``hash`` names weights sent before."""
    targets: list[str]
    rank: int
    alpha: float
    hash: str | None = None

    def to_wire(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_wire(cls, record: dict, max_rank: int) -> "LoraSpec":
        targets = record.get("targets")
        if not (isinstance(targets, list) and 1 <= len(targets) <= 16
                and all(isinstance(t, str) and 0 < len(t) <= 64 for t in targets)):
            raise bad("metadata 'lora_spec' must be {targets: [module names], rank, alpha}")
        rank = read_int(record, "rank", 1, max_rank)
        alpha = record.get("alpha")
        if type(alpha) not in (int, float) or not 0 < alpha <= 1e6:
            raise bad("metadata 'lora_spec' alpha must be a positive number")
        return cls(list(targets), rank, float(alpha), read_str(record, "hash", HASH, required=False))


@dataclass
class Payment:
    """Who pays for a request: ``client``, an address the requesting peer proves it acts for with ``proof``
    ({expires, signature}: incentives.payer.PayerProof), and maybe a voucher (incentives.vouchers.Voucher
    fields + a 65-byte signature). A voucher's integers are uint256 and msgpack's end at 2**64: they cross
    as 32 big-endian bytes."""
    client: str
    channel: int
    voucher: dict | None = None
    proof: dict | None = None

    def to_wire(self) -> dict:
        record = {"client": self.client, "channel": self.channel}
        if self.proof is not None:
            record["proof"] = self.proof
        if self.voucher is not None:
            record["voucher"] = {k: v.to_bytes(32, "big") if k in _UINT256_FIELDS else v
                                 for k, v in self.voucher.items()}
        return record

    @classmethod
    def from_wire(cls, record: dict) -> "Payment":
        voucher = read_map(record, "voucher")
        if voucher is not None:
            parsed = {"client": read_str(voucher, "client", ETH_ADDRESS), "server": read_str(voucher, "server", ETH_ADDRESS)}
            for key in _UINT256_FIELDS:
                value = voucher.get(key)
                if not isinstance(value, bytes) or len(value) != 32:
                    raise bad(f"metadata voucher {key!r} must be a uint256 as 32 big-endian bytes")
                parsed[key] = int.from_bytes(value, "big")
            signature = voucher.get("signature")
            if not isinstance(signature, bytes) or len(signature) != 65:
                raise bad("metadata voucher 'signature' must be 65 bytes (r, s, v)")
            parsed["signature"] = signature
            voucher = parsed
        proof = read_map(record, "proof")
        if proof is not None:
            signature = proof.get("signature")
            if not isinstance(signature, bytes) or len(signature) != 65:
                raise bad("metadata proof 'signature' must be 65 bytes (r, s, v)")
            proof = {"expires": read_int(proof, "expires", 0, 2**40), "signature": signature}
        return cls(read_str(record, "client", ETH_ADDRESS), read_int(record, "channel", 0, 2**64 - 1), voucher, proof)


_UINT256_FIELDS = ("channel", "total_units", "total_amount")


@dataclass(frozen=True)
class Route:
    """Where a server pushes a session's output (swarm.server.push): to peer ``to``, the next server of the
    client's chain, which takes the session's input under route id ``id``; it is reached at ``direct``
    addresses or through the relay at ``relay`` (host:port). ``Route.STOP`` (``{}`` on the wire) stops
    pushing; it is falsy."""
    to: str
    id: str
    direct: tuple[str, ...] = ()
    relay: str = ""

    def __bool__(self) -> bool:
        return bool(self.to)

    def to_wire(self) -> dict:
        if not self:
            return {}
        return {"to": self.to, "id": self.id, "direct": list(self.direct), "relay": self.relay}

    @classmethod
    def from_wire(cls, record: dict) -> "Route":
        if not record:
            return cls.STOP
        if set(record) - {"to", "id", "direct", "relay"}:
            raise bad("metadata 'push' takes only 'to', 'id', 'direct' and 'relay'")
        direct = record.get("direct", [])
        try:
            if not isinstance(direct, list) or len(direct) > MAX_DIRECT_ADDRESSES:
                raise ValueError
            direct = tuple(direct_address(a) for a in direct)
        except ValueError:
            raise bad(f"metadata 'push.direct' must list at most {MAX_DIRECT_ADDRESSES} ip:port addresses") from None
        relay = read_str(record, "relay", required=False) or ""
        try:
            relay and direct_address(relay)
        except ValueError:
            raise bad("metadata 'push.relay' must be the ip:port of the next server's relay") from None
        return cls(read_str(record, "to", PEER_ID), read_str(record, "id", ROUTE_ID), direct, relay)


Route.STOP = Route("", "")


@dataclass(frozen=True)
class Accept:
    """That a server takes a session's input from the previous server of the chain, peer ``sender``, under
    route id ``id``. ``Accept.STOP`` (``{}`` on the wire) stops taking pushes; it is falsy."""
    sender: str
    id: str

    def __bool__(self) -> bool:
        return bool(self.sender)

    def to_wire(self) -> dict:
        return {"from": self.sender, "id": self.id} if self else {}

    @classmethod
    def from_wire(cls, record: dict) -> "Accept":
        if not record:
            return cls.STOP
        if set(record) - {"from", "id"}:
            raise bad("metadata 'accept' takes only 'from' and 'id'")
        return cls(read_str(record, "from", PEER_ID), read_str(record, "id", ROUTE_ID))


Accept.STOP = Accept("", "")
