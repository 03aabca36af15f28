"""An open stream to one server's handler, as the client uses it: one reply per request, each bounded in size by
what the request expects before a byte of it is buffered; decode steps and their replies in the compact layout
once the server said it takes them; a reply computed from a pushed step checked against the step's digest."""
from __future__ import annotations

import asyncio

from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from swarm.client.failover import ServerFailure
from swarm.wire import compact
from swarm.wire.codes import InvalidReply, WireError
from swarm.wire.compact import CompactFrame
from swarm.wire.framing import put_frame, read_frame, write_frame
from swarm.wire.replies import SpanReply
from swarm.wire.requests import SpanRequest


class ServerStream:
    """An open bidirectional stream to one server's handler: one reply per request, each bounded in size by
    what the request expects before a byte of it is buffered."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 via: str = "hivemind"):
        self.peer_id, self.reader, self.writer = peer_id, reader, writer
        self.via = via  # "direct" (swarm.net.direct) or "hivemind"
        self.push_differed = False  # it took a pushed step other than ours: the previous server lied to someone
        self.compact = False  # the server said it takes decode steps in swarm.wire.compact's layout

    async def exchange(self, message: ExpertRequest, timeout: float, max_bytes: int) -> ExpertResponse:
        async with asyncio.timeout(timeout):
            await write_frame(self.writer, message)
            response = await self._read(max_bytes)
        if isinstance(response, CompactFrame):
            raise InvalidReply(f"server {self.peer_id} sent a compact frame where none belongs")
        return response

    async def _read(self, max_bytes: int) -> ExpertResponse | CompactFrame:
        try:
            response = await read_frame(self.reader, ExpertResponse, max_bytes)
        except WireError as e:
            raise InvalidReply(f"server {self.peer_id}: {e.message}") from None
        if response is None:
            raise ServerFailure(f"server {self.peer_id} closed the stream")
        return response

    async def span(self, request: SpanRequest, timeout: float, lora_shape: tuple[int, ...] | None = None) -> SpanReply:
        """The server's reply to ``request``. An inference step the server took from a push (swarm.server.push)
        may have been answered before it was sent: that answer counts when it was computed from the same input
        (its digest); else the server computes the client's step and answers again."""
        expected = request.expected_reply(lora_shape)
        max_bytes = SpanReply.max_bytes(expected)
        position = getattr(request, "position", None)
        put_frame(self.writer, (self.compact and compact.pack_step(request)) or request.pack())  # sent: then the timer
        async with asyncio.timeout(timeout):
            await self.writer.drain()
            # what a decode step answered from a push must match, computed while the server works
            digest = request.digest() if position is not None and request.hidden.shape[1] == 1 else None
            while True:
                message = await self._read(max_bytes)
                if isinstance(message, CompactFrame):
                    reply = compact.parse_reply(message, expected, self.peer_id)
                else:
                    reply = SpanReply.parse(message, expected, self.peer_id)
                    self.compact = self.compact or bool(reply.compact)
                if position is not None and reply.length != position + request.hidden.shape[1]:
                    raise InvalidReply(f"server {self.peer_id} answered for length {reply.length}, expected "
                                       f"{position + request.hidden.shape[1]}")
                if reply.digest is None or reply.digest == (digest := digest or request.digest()):
                    return reply
                # it then computes ours and answers again; a different hidden state is the previous server's doing
                self.push_differed = self.push_differed or reply.digest[:32] != digest[:32]

    def close(self) -> None:
        self.writer.close()
