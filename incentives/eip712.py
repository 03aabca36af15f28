"""EIP-712 typed data: the one way Cocoon signs a record, on chain or off. A record declares its type's name and
members (``EIP712_NAME``, ``EIP712_FIELDS``: member name and Solidity type; the value is the attribute of the
member's snake_case name), and ``sign``/``signer_of`` hash it as EIP-712 does.

Records the settlement contract checks (vouchers, verdicts) are signed under a ``Domain`` that binds them to one
chain id and one contract. Records checked only by peers (receipts, attestations, payer proofs) are signed under
the domain of Cocoon itself (``domain=None``: name and version only), so anyone can re-check them, on any chain.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from routing.addresses import ETH_ADDRESS

if TYPE_CHECKING:
    from eth_account.messages import SignableMessage
    from eth_keys import keys

# eth_account, eth_keys and eth_utils are imported where a record is hashed or signed: together they take about a
# second to import (py_ecc builds its curves, eth_utils its table of networks), which every `cocoon` process
# paid at start, and a free server signs nothing.

DOMAIN_NAME, DOMAIN_VERSION = "Cocoon", "1"


@dataclass(frozen=True)
class Domain:
    chain_id: int
    contract: str

    def to_eip712(self) -> dict:
        return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": self.chain_id,
                "verifyingContract": self.contract}


class Typed:
    """A record signed as EIP-712 typed data."""
    EIP712_NAME: ClassVar[str]
    EIP712_FIELDS: ClassVar[tuple[tuple[str, str], ...]]

    def eip712_message(self) -> dict[str, Any]:
        return {name: getattr(self, _snake(name)) for name, _ in self.EIP712_FIELDS}


def signable(record: Typed, domain: Domain | None = None) -> SignableMessage:
    """What ``eth_account.messages.encode_typed_data`` makes of the record, hashed here directly (a server
    signs an attestation for every reply: the general encoder parses the types anew each time)."""
    from eth_account.messages import SignableMessage
    fields = record.EIP712_FIELDS
    type_hash = _type_hash(record.EIP712_NAME, fields)
    body = _keccak(type_hash + b"".join(_encode(kind, getattr(record, _snake(name)), name) for name, kind in fields))
    return SignableMessage(b"\x01", _domain_separator(domain), body)


def sign(record: Typed, private_key, domain: Domain | None = None) -> bytes:
    """65-byte signature (r, s, v) of ``record`` under ``domain``."""
    from eth_account import Account
    if isinstance(private_key, (bytes, bytearray)):
        private_key = _private_key(bytes(private_key))
    return bytes(Account.sign_message(signable(record, domain), private_key).signature)


def signer_of(record: Typed, signature: bytes, domain: Domain | None = None) -> str:
    from eth_account import Account
    return Account.recover_message(signable(record, domain), signature=signature)


@functools.lru_cache(maxsize=16)
def _type_hash(name: str, fields: tuple[tuple[str, str], ...]) -> bytes:
    return _keccak(f"{name}({','.join(f'{kind} {member}' for member, kind in fields)})".encode())


@functools.lru_cache(maxsize=16)
def _domain_separator(domain: Domain | None) -> bytes:
    name, version = _keccak(DOMAIN_NAME.encode()), _keccak(DOMAIN_VERSION.encode())
    if domain is None:
        return _keccak(_keccak(b"EIP712Domain(string name,string version)") + name + version)
    return _keccak(_keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
                   + name + version + _encode("uint256", domain.chain_id, "chainId")
                   + _encode("address", domain.contract, "verifyingContract"))


def _encode(kind: str, value: Any, name: str) -> bytes:
    if kind == "address" and isinstance(value, str) and ETH_ADDRESS.fullmatch(value):
        return bytes(12) + bytes.fromhex(value[2:])
    if kind == "uint256" and type(value) is int and 0 <= value < 2**256:
        return value.to_bytes(32, "big")
    if kind == "bytes32" and isinstance(value, bytes) and len(value) == 32:
        return value
    if kind == "string" and isinstance(value, str):
        return _keccak(value.encode())
    raise ValueError(f"{name} is not a valid {kind}: {str(value)[:80]}")


def _keccak(data: bytes) -> bytes:
    from eth_utils import keccak
    return keccak(data)


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


@functools.lru_cache(maxsize=8)
def _private_key(key: bytes) -> keys.PrivateKey:
    from eth_keys import keys
    return keys.PrivateKey(key)  # (parsing derives the public key: cached for the key a server signs with)
