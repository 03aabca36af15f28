"""Server-to-server push: a server sends its output for a session straight to the next server of the client's
chain, so that a token crosses the network k + 1 times over k servers instead of 2k.

The route comes from the client, over its own authenticated stream to each server: it tells server i
"push to peer P under route id R" and server i + 1 "take pushes from peer Q under route id R" (R is a random
128-bit id the client picks per server session). A pushed step is taken only from the peer the client named,
under the id the client gave, for the session's next position; anyone else is refused. Server i + 1 answers
a pushed step to the client at once (with the digest of the input it used), and the client still sends its
own copy of each step: when the digests agree the server has nothing more to do, when they differ (the
previous server pushed something other than what it gave the client) the server undoes the pushed step and
computes the client's. So a wrong push costs time, never a wrong token, and the client keeps every
server's input history for failover and spot checks as before. Each pushed step carries the pusher's proof
of what it pushed for which input (swarm.wire.push_proof), which the next server returns with its reply: the
client blames the pusher only on that proof, and the next server when it cannot show one.

A route names a peer, never where to dial: a server pushes only to a peer that its own view of the DHT shows
serving the next block, at the addresses and relay that peer's signed record announces (PushDirectory). A client
cannot turn a server into a dialer of arbitrary addresses.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import sys
import time
from collections import OrderedDict
from typing import Awaitable, Callable

from hivemind.proto.runtime_pb2 import ExpertResponse

from swarm.wire import compact, push_proof

from swarm.net.connector import Connector
from swarm.wire.framing import read_frame, write_frame
from routing import ServerInfo, ServerState, SwarmState
from swarm.wire.codes import InvalidReply, RemoteError
from swarm.wire.payloads import Route
from swarm.wire.replies import PushRefusal
from swarm.wire.requests import InferenceStep, PushStep, piece, piece_bounds

logger = logging.getLogger(__name__)
PUSH_SECONDS = 2.0      # opening a stream and handing it one step; beyond that the route is dropped...
MIN_PUSH_BYTES_PER_S = 125_000  # ...plus its bytes at 1 Mbit/s: a long prompt's push takes its time on the wire
UNSENT_BYTES = 1 << 16  # a push is as good as sent when this much of it is left in the kernel
SIOCOUTQNSD = 0x894B  # Linux: bytes of a TCP socket's send queue not yet sent
SENT_POLL_SECONDS = 0.002
MAX_STREAMS = 64        # next servers with an open push stream (the least recently used is closed)
ACK_BYTES = 1 << 16
DIRECTORY_SECONDS = 15.0  # how long this server's view of the swarm serves for pushes
REFRESH_SECONDS = 2.0     # a peer not in the view (a fresh failover replacement) is looked up again at most this often


class PushDirectory:
    """The servers this server may push to, as its own reading of the DHT shows them."""

    def __init__(self, read_state: Callable[[], Awaitable[SwarmState]]):
        self.read_state = read_state
        self.state: SwarmState | None = None
        self.read_at = -float("inf")
        self._reading = asyncio.Lock()
        self._refreshing: asyncio.Task | None = None

    async def find(self, peer_id: str, block: int) -> ServerInfo | None:
        """The record of ``peer_id`` if it is online and serves ``block``; else None (after one fresh look). An old
        view serves while a fresh one is read in the background: a DHT read over real links takes about half a
        second, which a push waiting for it would add to a token."""
        if time.monotonic() - self.read_at > DIRECTORY_SECONDS:
            if self.state is None:
                await self._refresh()
            elif self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.create_task(self._refresh())
        info = self._lookup(peer_id, block)
        if info is None and time.monotonic() - self.read_at > REFRESH_SECONDS:
            await self._refresh()
            info = self._lookup(peer_id, block)
        return info

    def _lookup(self, peer_id: str, block: int) -> ServerInfo | None:
        info = self.state.servers.get(peer_id) if self.state is not None else None
        if info is None or info.state != ServerState.ONLINE or not info.start <= block < info.end:
            return None
        return info

    async def _refresh(self) -> None:
        async with self._reading:
            if time.monotonic() - self.read_at <= REFRESH_SECONDS:
                return  # another step refreshed it meanwhile
            try:
                self.state = await self.read_state()
            except Exception as e:  # the DHT failed: the old view stands, and unknown peers get no push
                logger.info(f"could not read the swarm for pushes ({type(e).__name__}: {e})")
            self.read_at = time.monotonic()


class _PushStream:
    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, refused: set[str]):
        self.peer_id, self.reader, self.writer = peer_id, reader, writer
        self.lock = asyncio.Lock()
        self.acks = asyncio.create_task(self._read_acks(refused))

    async def _read_acks(self, refused: set[str]) -> None:
        """A pushed step is answered only when it is refused (or malformed): that is logged, and a refusal ends
        pushing on that route."""
        with contextlib.suppress(Exception):
            while True:
                response = await read_frame(self.reader, ExpertResponse, ACK_BYTES)
                if response is None:
                    break
                try:
                    refusal = PushRefusal.parse(response, self.peer_id)
                except (RemoteError, InvalidReply) as e:
                    logger.info(f"{self.peer_id} rejected a pushed step: {e}")
                    continue
                refused.add(refusal.route)
                logger.info(f"{self.peer_id} refused a pushed step: {refusal.reason[:200]}")
        self.writer.close()

    def close(self) -> None:
        self.acks.cancel()
        self.writer.close()


async def _until_sent(writer: asyncio.StreamWriter, frame_bytes: int) -> None:
    """Return once the kernel has sent all but UNSENT_BYTES of a long push (Linux: SIOCOUTQNSD), not only taken it
    into its buffer: a server sends a long output twice, pushed to the next server and answered to the client, on
    one upload, and the next server's input should not share it with the client's copy."""
    sock = writer.get_extra_info("socket")
    if frame_bytes <= UNSENT_BYTES or sock is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        while struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4))[0] > UNSENT_BYTES:
            await asyncio.sleep(SENT_POLL_SECONDS)


def _pushed_steps(route: Route, step: InferenceStep, output, position: int) -> list[PushStep]:
    """``output`` (this server's output for ``step``, at ``position``) as the steps pushed for it: one, or a
    session's first step in pieces (swarm.wire.requests.piece_bounds), each with this server's proof of what it
    pushed for which piece of its input."""
    cuts = piece_bounds(output.shape[1], output.shape[2], position)
    if len(cuts) == 1:
        inputs = [step]
        pushed = [PushStep(output, position_ids=step.position_ids, attention_mask=step.attention_mask,
                           reorder=step.reorder, position=position, route_id=route.id)]
    else:
        inputs = [piece(step, step.hidden, a, b) for a, b in cuts]
        pushed = [piece(step, output, a, b, PushStep, route_id=route.id) for a, b in cuts]
    if route.key:  # what the client will hold this server to, should the next server answer otherwise
        for own, step_pushed in zip(inputs, pushed):
            step_pushed.push_proof = push_proof.make(route.key, route.id, step_pushed.position, own.digest(),
                                                     step_pushed.digest())
    return pushed


class PushSender:
    """The push streams of one server to the next servers of its clients' chains."""

    def __init__(self, p2p, key, directory: PushDirectory):
        self.connector, self.directory = Connector(p2p, key), directory
        self.streams: OrderedDict[str, _PushStream] = OrderedDict()
        self.refused: set[str] = set()  # route ids the next server refused (the route is dropped)
        self._opening: dict[str, asyncio.Lock] = {}

    async def send(self, route: Route, step: InferenceStep, output, position: int, next_block: int) -> bool:
        """Push ``output`` (this server's output for ``step``) along ``route``, to a peer that serves
        ``next_block``; False when the route is dead or names a peer the swarm does not show there."""
        if route.id in self.refused:
            self.refused.discard(route.id)
            return False
        info = await self.directory.find(route.to, next_block)
        if info is None:
            logger.info(f"not pushing to {route.to}: this server's view of the swarm does not show it serving "
                        f"block {next_block}")
            return False
        frames = [compact.pack_step(pushed) or pushed.pack() for pushed in _pushed_steps(route, step, output, position)]
        try:
            async with asyncio.timeout(PUSH_SECONDS + sum(map(len, frames)) / MIN_PUSH_BYTES_PER_S):
                stream = await self._stream(route.to, info)
                async with stream.lock:
                    for frame in frames:
                        await write_frame(stream.writer, frame)
                        await _until_sent(stream.writer, len(frame))  # then the next piece, or the client's copy
            return True
        except Exception as e:  # the next server is gone or slow: the client finds out and fails over
            logger.info(f"push to {route.to} failed ({type(e).__name__}: {e}); not pushing on that route")
            stream = self.streams.pop(route.to, None)
            if stream is not None:
                stream.close()
            return False

    async def _stream(self, peer_id: str, info: ServerInfo) -> _PushStream:
        async with self._opening.setdefault(peer_id, asyncio.Lock()):
            stream = self.streams.get(peer_id)
            if stream is not None and not stream.acks.done():
                self.streams.move_to_end(peer_id)
                return stream
            connection = await self.connector.connect(peer_id, "push", info)
            self.streams[peer_id] = stream = _PushStream(peer_id, connection.reader, connection.writer, self.refused)
            while len(self.streams) > MAX_STREAMS:
                self.streams.popitem(last=False)[1].close()
            if len(self._opening) > 4 * MAX_STREAMS:
                self._opening = {p: lock for p, lock in self._opening.items() if lock.locked() or p in self.streams}
            return stream

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()

