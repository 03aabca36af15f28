"""Where a peer is, checked one way everywhere: a direct address ("ip:port" with an IP literal, never a name
to resolve), a relay ("peer id@ip:port"), a peer id (base58), an Ethereum address, a route id. Standard
library only: the wire (swarm.wire), the server's config and the routing records all check with these."""
from __future__ import annotations

import ipaddress
import re
from typing import Any

PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,64}")  # base58
ROUTE_ID = re.compile(r"[0-9a-f]{32}")
ETH_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
MAX_DIRECT_ADDRESSES = 4
_MAX_ADDRESS_LENGTH = 64


def direct_address(value: Any) -> str:
    """``value`` when it is "ip:port" (IPv6 in brackets or not) with a port in 1..65535; else ValueError."""
    if not isinstance(value, str) or len(value) > _MAX_ADDRESS_LENGTH:
        raise ValueError(f"a direct address must be a string of at most {_MAX_ADDRESS_LENGTH} characters")
    host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP literal and port, like 203.0.113.5:31337") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"direct address {value!r} has no valid port")
    return value


def split_address(address: str) -> tuple[str, int]:
    """A checked direct address as (host, port), for a socket."""
    host, _, port = direct_address(address).rpartition(":")
    return host.strip("[]"), int(port)


def relay_address(value: Any) -> str:
    """``value`` when it is "" (no relay) or "peer id@ip:port"; else ValueError."""
    if value == "":
        return value
    peer, _, address = value.partition("@") if isinstance(value, str) else ("", "", "")
    if not PEER_ID.fullmatch(peer):
        raise ValueError("a relay must be 'peer id@ip:port'")
    direct_address(address)
    return value


def is_peer_id(value: Any) -> bool:
    return isinstance(value, str) and PEER_ID.fullmatch(value) is not None
