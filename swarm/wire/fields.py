"""Msgpack metadata from the network, read with bounds: its size, its containers and strings, and each field
by its type and range (``WireError`` with a code for anything else)."""
from __future__ import annotations

import re
from typing import Any

import msgpack

from swarm.wire.codes import ErrorCode, WireError, bad

MAX_METADATA_BYTES = 64 << 10   # metadata is small; tensors carry the bulk
MAX_CONTAINER_LEN = 4096        # longest msgpack array or map in metadata (a beam reorder is one entry per row)
MAX_STR_LEN = 1024


def pack_metadata(metadata: dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def unpack_metadata(data: bytes) -> dict[str, Any]:
    """Untrusted msgpack, bounded apart from tensors: size, container lengths, string lengths."""
    if not data:
        return {}
    if len(data) > MAX_METADATA_BYTES:
        raise WireError(ErrorCode.TOO_LARGE, f"metadata of {len(data)} bytes exceeds the limit of {MAX_METADATA_BYTES}")
    try:
        metadata = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=MAX_STR_LEN,
                                   max_bin_len=MAX_METADATA_BYTES, max_array_len=MAX_CONTAINER_LEN,
                                   max_map_len=64, max_ext_len=0)
    except Exception as e:
        raise bad(f"metadata is not valid msgpack within its limits: {type(e).__name__}") from None
    if not isinstance(metadata, dict):
        raise bad("metadata must be a msgpack map")
    return metadata


def read_int(meta: dict, key: str, low: int, high: int, *, required: bool = True) -> int | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or not low <= value <= high:
        raise bad(f"metadata {key!r} must be an integer in [{low}, {high}], got {short(value)}")
    return value


def read_str(meta: dict, key: str, pattern: re.Pattern | None = None, *, required: bool = True) -> str | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        expected = f"a string matching {pattern.pattern}" if pattern is not None else "a string"
        raise bad(f"metadata {key!r} must be {expected}, got {short(value)}")
    return value


def read_map(meta: dict, key: str, *, required: bool = False) -> dict | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise bad(f"metadata {key!r} must be a map, got {short(value)}")
    return value


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
