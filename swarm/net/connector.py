"""One way to reach a peer's handler, for a client's requests and for a server's pushes alike: at its direct
addresses (swarm.net.direct), else through the relay a server behind NAT registered with, else through
hivemind's p2p daemon. A server whose relays disagreed announces both (swarm.server.reachability), so a way
that failed is skipped for a while, each address on its own, before it is tried again."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

from hivemind.p2p import PeerID

from routing import ServerInfo
from routing.addresses import split_address
from swarm.net import direct, relay

logger = logging.getLogger(__name__)
DIRECT_RETRY_SECONDS = 60.0  # after a failed direct or relayed connection, hivemind is used this long
CONNECT_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                  direct.HandshakeError, ValueError)


class Connection(NamedTuple):
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    via: str  # "relay", "direct" or "hivemind"


class Connector:
    def __init__(self, p2p, key):
        self.p2p, self.key = p2p, key  # the hivemind P2P handle, and the libp2p key that proves who we are
        self.failed: dict[tuple[str, str], float] = {}  # (peer, address or relay) -> until when it is skipped

    async def connect(self, peer_id: str, handler: str, info: ServerInfo | None) -> Connection:
        """A stream to ``handler`` of ``peer_id``, whose DHT record (``info``) says where it takes direct or
        relayed connections; the peer proved its id on every way but hivemind's (which proves it itself)."""
        ways = [] if info is None else [*info.direct, *([info.relay] if info.relay else [])]
        for way in ways:
            if time.monotonic() < self.failed.get((peer_id, way), 0):
                continue
            try:
                if "@" in way:  # behind NAT: through the relay it registered with (swarm.net.relay)
                    return Connection(*await relay.connect(way.partition("@")[2], peer_id, handler, self.key), "relay")
                return Connection(*await direct.connect(*split_address(way), peer_id, handler, self.key), "direct")
            except direct.ServerBusy as e:  # a refusal for load: hivemind this time, the direct path next time
                logger.debug(f"{e}; through hivemind this time")
                return await self._through_hivemind(peer_id, handler)
            except CONNECT_ERRORS as e:
                logger.debug(f"no connection to {peer_id} by {way}: {e}")
                if len(self.failed) > 4096:  # (peer ids are free to make: forget the oldest)
                    self.failed = dict(list(self.failed.items())[2048:])
                self.failed[(peer_id, way)] = time.monotonic() + DIRECT_RETRY_SECONDS
        return await self._through_hivemind(peer_id, handler)

    async def _through_hivemind(self, peer_id: str, handler: str) -> Connection:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), f"cocoon.{handler}")
        return Connection(reader, writer, "hivemind")
