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
from swarm.wire.push_proof import KEY_BYTES

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
        if set(record) - {"targets", "rank", "alpha", "hash"}:
            raise bad("metadata 'lora_spec' takes only targets, rank, alpha and hash")
        targets = record.get("targets")
        if not (isinstance(targets, list) and 1 <= len(targets) <= 16
                and all(isinstance(t, str) and 0 < len(t) <= 64 for t in targets)):
            raise bad("metadata 'lora_spec' must be {targets: [module names], rank, alpha}")
        rank = read_int(record, "rank", 1, max_rank)
        alpha = record.get("alpha")
        if type(alpha) not in (int, float) or not 0 < alpha <= 1e6:
            raise bad("metadata 'lora_spec' alpha must be a positive number")
        return cls(list(targets), rank, float(alpha), read_str(record, "hash", HASH, required=False))


@dataclass(frozen=True)
class SignedVoucher:
    """A voucher (incentives.vouchers.Voucher's fields) and the client's 65-byte signature of it. Its integers
    are uint256 and msgpack's end at 2**64: they cross as 32 big-endian bytes."""
    client: str
    server: str
    channel: int
    total_units: int
    total_amount: int
    signature: bytes

    def to_wire(self) -> dict:
        return {**{k: getattr(self, k) for k in ("client", "server", "signature")},
                **{k: getattr(self, k).to_bytes(32, "big") for k in _UINT256_FIELDS}}

    @classmethod
    def from_wire(cls, record: dict) -> "SignedVoucher":
        if set(record) - {"client", "server", "signature", *_UINT256_FIELDS}:
            raise bad("metadata 'voucher' takes only client, server, channel, total_units, total_amount, signature")
        numbers = {}
        for key in _UINT256_FIELDS:
            value = record.get(key)
            if not isinstance(value, bytes) or len(value) != 32:
                raise bad(f"metadata voucher {key!r} must be a uint256 as 32 big-endian bytes")
            numbers[key] = int.from_bytes(value, "big")
        return cls(read_str(record, "client", ETH_ADDRESS), read_str(record, "server", ETH_ADDRESS), **numbers,
                   signature=_signature(record, "voucher"))


@dataclass(frozen=True)
class PayerSignature:
    """The client's proof that the requesting peer pays for its address (incentives.payer.PayerProof): when it
    expires (unix time) and its 65-byte signature; the peers and the address it covers are the request's."""
    expires: int
    signature: bytes

    def to_wire(self) -> dict:
        return {"expires": self.expires, "signature": self.signature}

    @classmethod
    def from_wire(cls, record: dict) -> "PayerSignature":
        if set(record) - {"expires", "signature"}:
            raise bad("metadata 'proof' takes only 'expires' and 'signature'")
        return cls(read_int(record, "expires", 0, 2**40), _signature(record, "proof"))


@dataclass(frozen=True)
class SignedReservation:
    """The client's signed incentives.vouchers.Reservation of escrow for the receiving server on the request's
    channel: ``total`` wei in all; the client, server and channel it covers are the request's."""
    total: int
    signature: bytes

    def to_wire(self) -> dict:
        return {"total": self.total.to_bytes(32, "big"), "signature": self.signature}

    @classmethod
    def from_wire(cls, record: dict) -> "SignedReservation":
        if set(record) - {"total", "signature"}:
            raise bad("metadata 'reservation' takes only 'total' and 'signature'")
        total = record.get("total")
        if not isinstance(total, bytes) or len(total) != 32:
            raise bad("metadata reservation 'total' must be a uint256 as 32 big-endian bytes")
        return cls(int.from_bytes(total, "big"), _signature(record, "reservation"))


@dataclass
class Payment:
    """Who pays for a request: ``client``, an address the requesting peer proves it acts for with ``proof``, on
    payment channel ``channel``; the escrow reserved for this server on that channel, and now and then a
    voucher for all the work on that channel so far."""
    client: str
    channel: int
    voucher: SignedVoucher | None = None
    proof: PayerSignature | None = None
    reservation: SignedReservation | None = None

    def to_wire(self) -> dict:
        record = {"client": self.client, "channel": self.channel}
        for key in ("proof", "voucher", "reservation"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key).to_wire()
        return record

    @classmethod
    def from_wire(cls, record: dict) -> "Payment":
        if set(record) - {"client", "channel", "voucher", "proof", "reservation"}:
            raise bad("metadata 'payment' takes only client, channel, voucher, proof and reservation")
        voucher, proof, reservation = (read_map(record, key) for key in ("voucher", "proof", "reservation"))
        return cls(read_str(record, "client", ETH_ADDRESS), read_int(record, "channel", 0, 2**64 - 1),
                   SignedVoucher.from_wire(voucher) if voucher is not None else None,
                   PayerSignature.from_wire(proof) if proof is not None else None,
                   SignedReservation.from_wire(reservation) if reservation is not None else None)


_UINT256_FIELDS = ("channel", "total_units", "total_amount")


def _signature(record: dict, what: str) -> bytes:
    signature = record.get("signature")
    if not isinstance(signature, bytes) or len(signature) != 65:
        raise bad(f"metadata {what} 'signature' must be 65 bytes (r, s, v)")
    return signature


@dataclass(frozen=True)
class Route:
    """Where a server pushes a session's output (swarm.server.push): to peer ``to``, the next server of the
    client's chain, which takes the session's input under route id ``id``; it is reached at ``direct``
    addresses or through the relay at ``relay`` (host:port). ``key``: what the pusher proves its pushes with
    (swarm.wire.push_proof). ``Route.STOP`` (``{}`` on the wire) stops pushing; it is falsy."""
    to: str
    id: str
    direct: tuple[str, ...] = ()
    relay: str = ""
    key: bytes = b""

    def __bool__(self) -> bool:
        return bool(self.to)

    def to_wire(self) -> dict:
        if not self:
            return {}
        return {"to": self.to, "id": self.id, "direct": list(self.direct), "relay": self.relay, "key": self.key}

    @classmethod
    def from_wire(cls, record: dict) -> "Route":
        if not record:
            return cls.STOP
        if set(record) - {"to", "id", "direct", "relay", "key"}:
            raise bad("metadata 'push' takes only 'to', 'id', 'direct', 'relay' and 'key'")
        key = record.get("key", b"")
        if not isinstance(key, bytes) or len(key) not in (0, KEY_BYTES):
            raise bad(f"metadata 'push.key' must be {KEY_BYTES} bytes")
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
        return cls(read_str(record, "to", PEER_ID), read_str(record, "id", ROUTE_ID), direct, relay, key)


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
