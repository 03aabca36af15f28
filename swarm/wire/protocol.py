"""The protocol version a peer speaks. Volunteer swarms always mix releases, so every place where two peers
meet says it: each record a server or relay announces in the DHT, the hello of a direct connection, and the
metadata of every full request. A peer of another version is refused with a message that names both versions
and what to do, never met with a parse error halfway through a generation.

    1   until 2026-12: untyped push routes, unknown request fields ignored, no version said anywhere
    2   typed push routes (swarm.wire.payloads.Route), unknown request fields refused, versions said
"""
from __future__ import annotations

from typing import Any

from routing.state import PROTOCOL_VERSION  # (a server's DHT record says it: routing reads those records)
from swarm.wire.codes import ErrorCode, WireError

__all__ = ["PROTOCOL_VERSION", "UNSAID", "check_protocol", "mismatch", "protocol_of"]
UNSAID = 1  # a peer that says no version speaks the one before versions were said


def protocol_of(value: Any) -> int:
    """The version a peer said (``None``: it said none), as an int; anything else is a version nobody speaks."""
    if value is None:
        return UNSAID
    return value if type(value) is int else -1


def mismatch(theirs: int, who: str) -> str:
    return (f"{who} speaks cocoon protocol {theirs} and this peer speaks {PROTOCOL_VERSION}: both sides need a "
            f"release of the same protocol (pip install -U cocoon-swarm on the older one)")


def check_protocol(value: Any, who: str) -> None:
    """Raise WireError(VERSION_MISMATCH) unless ``value`` (what a peer said) is this peer's version."""
    theirs = protocol_of(value)
    if theirs != PROTOCOL_VERSION:
        raise WireError(ErrorCode.VERSION_MISMATCH, mismatch(theirs, who))
