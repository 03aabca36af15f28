"""Reading a signed record from the network (a reply's receipt or attestation, evidence in the DHT) with bounds:
each field by its type and size, no field beyond those the record has. Raises ValueError saying which field."""
from __future__ import annotations

from typing import Any

from routing.addresses import ETH_ADDRESS


def fields_of(record: Any, kind: str, allowed: set[str]) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"malformed {kind}: not a map")
    unknown = set(record) - allowed
    if unknown:
        raise ValueError(f"malformed {kind}: unknown fields {sorted(map(str, unknown))[:4]}")
    return record


def address(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not ETH_ADDRESS.fullmatch(value):
        raise ValueError(f"{key} must be an address (0x and 40 hex digits)")
    return value


def uint(record: dict, key: str, high: int = 2**256 - 1, default: int | None = None) -> int:
    value = record.get(key, default)
    if type(value) is not int or not 0 <= value <= high:
        raise ValueError(f"{key} must be an integer in [0, {high}]")
    return value


def raw(record: dict, key: str, length: int | None = None, max_length: int = 1 << 16, default: bytes | None = None) -> bytes:
    value = record.get(key, default)
    if not isinstance(value, bytes) or (length is not None and len(value) != length) or len(value) > max_length:
        raise ValueError(f"{key} must be {length if length is not None else f'at most {max_length}'} bytes")
    return value


def text(record: dict, key: str, max_length: int, default: str | None = None) -> str:
    value = record.get(key, default)
    if not isinstance(value, str) or len(value) > max_length:
        raise ValueError(f"{key} must be a string of at most {max_length} characters")
    return value


def signature(record: dict, key: str = "signature") -> bytes:
    """65 bytes (r, s, v), or b"" for a record not signed yet."""
    return b"" if record.get(key, b"") == b"" else raw(record, key, 65)
