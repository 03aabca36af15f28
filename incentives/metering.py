"""Metering: one unit is one token through one block. Inference and forward units are counted apart from
backward units, which are priced separately. Both sides count; the server signs its running tally."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from incentives import fields
from incentives.eip712 import Typed, sign, signer_of


UINT64 = 2**64 - 1  # a receipt crosses in msgpack, whose integers end here (channels are 63-bit ids)


def units(tokens: int, blocks: int) -> int:
    return tokens * blocks


@dataclass(frozen=True)
class Prices:
    """Wei per unit."""
    forward: int = 0
    backward: int = 0


@dataclass
class Tally:
    forward_units: int = 0
    backward_units: int = 0

    def add(self, tokens: int, blocks: int, backward: bool = False) -> None:
        if backward:
            self.backward_units += units(tokens, blocks)
        else:
            self.forward_units += units(tokens, blocks)

    def amount(self, prices: Prices) -> int:
        return self.forward_units * prices.forward + self.backward_units * prices.backward

    @property
    def total_units(self) -> int:
        return self.forward_units + self.backward_units


@dataclass(frozen=True)
class Receipt(Typed):
    """The server's signed statement of what it served this client on this channel, in all."""
    client: str
    server: str
    channel: int
    forward_units: int
    backward_units: int
    signature: bytes = b""

    EIP712_NAME = "Receipt"
    EIP712_FIELDS = (("client", "address"), ("server", "address"), ("channel", "uint256"),
                     ("forwardUnits", "uint256"), ("backwardUnits", "uint256"))

    def signed(self, private_key) -> "Receipt":
        return dataclasses.replace(self, signature=sign(self, private_key))

    def signer(self) -> str:
        return signer_of(self, self.signature)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, record: Any) -> "Receipt":
        try:
            record = fields.fields_of(record, "receipt", {f.name for f in dataclasses.fields(cls)})
            return cls(fields.address(record, "client"), fields.address(record, "server"),
                       fields.uint(record, "channel", UINT64), fields.uint(record, "forward_units", UINT64),
                       fields.uint(record, "backward_units", UINT64), fields.signature(record))
        except ValueError as e:
            raise ValueError(f"malformed receipt: {e}") from None
