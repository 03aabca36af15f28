"""One way to reach a peer's handler, for a client's requests and for a server's pushes alike: through the relay
a server behind NAT registered with, else at its direct addresses (swarm.net.direct), else through hivemind's
p2p daemon. A peer whose relay and direct addresses all failed is reached through hivemind for a while before
they are tried again."""
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
        self.direct_failed: dict[str, float] = {}  # peer -> until when its relay and direct addresses are skipped

    async def connect(self, peer_id: str, handler: str, info: ServerInfo | None) -> Connection:
        """A stream to ``handler`` of ``peer_id``, whose DHT record (``info``) says where it takes direct or
        relayed connections; the peer proved its id on every way but hivemind's (which proves it itself)."""
        if info is not None and (info.direct or info.relay) and time.monotonic() >= self.direct_failed.get(peer_id, 0):
            if info.relay:  # behind NAT: through the relay it registered with (swarm.net.relay)
                try:
                    return Connection(*await relay.connect(info.relay.partition("@")[2], peer_id, handler, self.key),
                                      "relay")
                except CONNECT_ERRORS as e:
                    logger.debug(f"no relayed connection to {peer_id} through {info.relay}: {e}")
            for address in info.direct:
                try:
                    return Connection(*await direct.connect(*split_address(address), peer_id, handler, self.key),
                                      "direct")
                except direct.ServerBusy as e:  # a refusal for load: hivemind this time, the direct path next time
                    logger.debug(f"{e}; through hivemind this time")
                    return await self._through_hivemind(peer_id, handler)
                except CONNECT_ERRORS as e:
                    logger.debug(f"no direct connection to {peer_id} at {address}: {e}")
            if len(self.direct_failed) > 4096:  # (peer ids are free to make: forget the oldest)
                self.direct_failed = dict(list(self.direct_failed.items())[2048:])
            self.direct_failed[peer_id] = time.monotonic() + DIRECT_RETRY_SECONDS
        return await self._through_hivemind(peer_id, handler)

    async def _through_hivemind(self, peer_id: str, handler: str) -> Connection:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), f"cocoon.{handler}")
        return Connection(reader, writer, "hivemind")
