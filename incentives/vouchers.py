"""What the settlement contract checks: cumulative reservations of escrow and payment vouchers (client ->
server), and fraud verdicts (verifiers), EIP-712 typed data (incentives.eip712) under a domain that binds
every signature to one chain id and one settlement contract."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from incentives import fields
from incentives.eip712 import Domain, Typed, sign, signer_of

__all__ = ["Domain", "Reservation", "Verdict", "Voucher", "sign", "signer_of"]


@dataclass(frozen=True)
class Voucher(Typed):
    """The client owes ``server`` ``total_amount`` wei for ``total_units`` units, in all, on ``channel``."""
    client: str
    server: str
    channel: int
    total_units: int
    total_amount: int

    EIP712_NAME = "Voucher"
    EIP712_FIELDS = (("client", "address"), ("server", "address"), ("channel", "uint256"),
                     ("totalUnits", "uint256"), ("totalAmount", "uint256"))

    def as_tuple(self) -> tuple:
        return (self.client, self.server, self.channel, self.total_units, self.total_amount)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, record: Any) -> "Voucher":
        try:
            record = fields.fields_of(record, "voucher", {f.name for f in dataclasses.fields(cls)})
            return cls(fields.address(record, "client"), fields.address(record, "server"),
                       fields.uint(record, "channel"), fields.uint(record, "total_units"),
                       fields.uint(record, "total_amount"))
        except ValueError as e:
            raise ValueError(f"malformed voucher: {e}") from None


@dataclass(frozen=True)
class Reservation(Typed):
    """The client sets aside up to ``total`` wei of its escrow, in all, for ``server`` on ``channel``: the only
    money that channel's vouchers are paid from."""
    client: str
    server: str
    channel: int
    total: int

    EIP712_NAME = "Reservation"
    EIP712_FIELDS = (("client", "address"), ("server", "address"), ("channel", "uint256"), ("total", "uint256"))

    def as_tuple(self) -> tuple:
        return (self.client, self.server, self.channel, self.total)


@dataclass(frozen=True)
class Verdict(Typed):
    """Verifiers' statement that ``server`` computed wrongly, with ``evidence`` the hash of the proof; it can
    be used on chain until ``deadline`` (a unix time)."""
    server: str
    evidence: bytes
    reporter: str
    deadline: int

    EIP712_NAME = "Verdict"
    EIP712_FIELDS = (("server", "address"), ("evidence", "bytes32"), ("reporter", "address"),
                     ("deadline", "uint256"))
