"""EIP-712 typed data of Cocoon: cumulative payment vouchers (client -> server) and fraud verdicts
(verifiers). The domain binds every signature to one chain id and one settlement contract."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from eth_account import Account
from eth_account.messages import encode_typed_data

DOMAIN_NAME, DOMAIN_VERSION = "Cocoon", "1"
_DOMAIN_TYPE = [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"}, {"name": "verifyingContract", "type": "address"}]
_VOUCHER_TYPE = [{"name": "client", "type": "address"}, {"name": "server", "type": "address"},
                 {"name": "channel", "type": "uint256"}, {"name": "totalUnits", "type": "uint256"},
                 {"name": "totalAmount", "type": "uint256"}]
_VERDICT_TYPE = [{"name": "server", "type": "address"}, {"name": "evidence", "type": "bytes32"},
                 {"name": "reporter", "type": "address"}, {"name": "deadline", "type": "uint256"}]


@dataclass(frozen=True)
class Domain:
    chain_id: int
    contract: str

    def to_eip712(self) -> dict:
        return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": self.chain_id,
                "verifyingContract": self.contract}


@dataclass(frozen=True)
class Voucher:
    """The client owes ``server`` ``total_amount`` wei for ``total_units`` units, in all, on ``channel``."""
    client: str
    server: str
    channel: int
    total_units: int
    total_amount: int

    def message(self, domain: Domain):
        return encode_typed_data(full_message={
            "types": {"EIP712Domain": _DOMAIN_TYPE, "Voucher": _VOUCHER_TYPE}, "primaryType": "Voucher",
            "domain": domain.to_eip712(),
            "message": {"client": self.client, "server": self.server, "channel": self.channel,
                        "totalUnits": self.total_units, "totalAmount": self.total_amount}})

    def as_tuple(self) -> tuple:
        return (self.client, self.server, self.channel, self.total_units, self.total_amount)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, record: dict) -> "Voucher":
        try:
            voucher = cls(**{k: record[k] for k in ("client", "server", "channel", "total_units", "total_amount")})
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed voucher: {e}") from None
        if not all(isinstance(getattr(voucher, k), int) and getattr(voucher, k) >= 0
                   for k in ("channel", "total_units", "total_amount")):
            raise ValueError("malformed voucher: channel, total_units and total_amount must be non-negative integers")
        return voucher


@dataclass(frozen=True)
class Verdict:
    """Verifiers' statement that ``server`` computed wrongly, with ``evidence`` the hash of the proof; it can
    be used on chain until ``deadline`` (a unix time)."""
    server: str
    evidence: bytes
    reporter: str
    deadline: int

    def message(self, domain: Domain):
        return encode_typed_data(full_message={
            "types": {"EIP712Domain": _DOMAIN_TYPE, "Verdict": _VERDICT_TYPE}, "primaryType": "Verdict",
            "domain": domain.to_eip712(),
            "message": {"server": self.server, "evidence": self.evidence, "reporter": self.reporter,
                        "deadline": self.deadline}})


def sign(typed, private_key, domain: Domain) -> bytes:
    """65-byte signature (r, s, v) of a Voucher or Verdict under ``domain``."""
    return bytes(Account.sign_message(typed.message(domain), private_key).signature)


def signer_of(typed, signature: bytes, domain: Domain) -> str:
    return Account.recover_message(typed.message(domain), signature=signature)
