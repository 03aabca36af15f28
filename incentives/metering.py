"""Metering: one unit is one token through one block. Inference and forward units are counted apart from
backward units, which are priced separately. Both sides count; the server signs its running tally."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from eth_account import Account
from eth_account.messages import encode_defunct


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
class Receipt:
    """The server's signed statement of what it served this client on this channel, in all."""
    client: str
    server: str
    channel: int
    forward_units: int
    backward_units: int
    signature: bytes = b""

    def _message(self):
        text = f"cocoon-receipt:{self.client}:{self.server}:{self.channel}:{self.forward_units}:{self.backward_units}"
        return encode_defunct(text=text.lower())

    def signed(self, private_key) -> "Receipt":
        signature = bytes(Account.sign_message(self._message(), private_key).signature)
        return Receipt(self.client, self.server, self.channel, self.forward_units, self.backward_units, signature)

    def signer(self) -> str:
        return Account.recover_message(self._message(), signature=self.signature)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, record: dict) -> "Receipt":
        try:
            return cls(**record)
        except TypeError as e:
            raise ValueError(f"malformed receipt: {e}") from None
