"""An open stream to one server's handler, as the client uses it: one reply per request, each bounded in size by
what the request expects before a byte of it is buffered; decode steps and their replies in the compact layout
once the server said it takes them; a reply computed from a pushed step checked against the step's digest,
and when it differs, judged by the pusher's proof (swarm.wire.push_proof)."""
from __future__ import annotations

import asyncio

from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from swarm.client.failover import ServerFailure
from swarm.client.push import PushOrigin
from swarm.wire import compact
from swarm.wire.codes import InvalidReply, RemoteError, WireError
from swarm.wire.push_proof import Blame
from swarm.wire.compact import CompactFrame
from swarm.wire.framing import put_frame, read_frame, write_frame
from swarm.wire.replies import SpanReply, reply_metadata
from swarm.wire.requests import SpanRequest


class ServerStream:
    """An open bidirectional stream to one server's handler: one reply per request, each bounded in size by
    what the request expects before a byte of it is buffered."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 via: str = "hivemind"):
        self.peer_id, self.reader, self.writer = peer_id, reader, writer
        self.via = via  # "direct" (swarm.net.direct) or "hivemind"
        self.push_differed = False  # it took a pushed step other than ours, proven the previous server's doing
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

    async def span(self, request: SpanRequest, timeout: float, lora_shape: tuple[int, ...] | None = None,
                   origin: PushOrigin | None = None) -> SpanReply:
        """The server's reply to ``request``. An inference step the server took from a push (swarm.server.push)
        may have been answered before it was sent: that answer counts when it was computed from the same input
        (its digest); else the server computes the client's step and answers again, and the differing answer
        is judged (``origin``: the push the client set up for this server; see swarm.wire.push_proof)."""
        put_frame(self.writer, (self.compact and compact.pack_step(request)) or request.pack())  # sent: then the timer
        return await self.answer(request, timeout, lora_shape, origin)

    async def answer(self, request: SpanRequest, timeout: float, lora_shape: tuple[int, ...] | None = None,
                     origin: PushOrigin | None = None) -> SpanReply:
        """The server's reply to ``request``: the step just sent, or the step it was told to take by push (the
        client's equivalent of it: the input it will be held to)."""
        expected = request.expected_reply(lora_shape)
        max_bytes = SpanReply.max_bytes(expected)
        position = getattr(request, "position", None)
        async with asyncio.timeout(timeout):
            await self.writer.drain()
            # what a decode step answered from a push must match, computed while the server works
            digest = request.digest() if position is not None and request.hidden.shape[1] == 1 else None
            while True:
                message = await self._read(max_bytes)
                try:
                    if isinstance(message, CompactFrame):
                        reply = compact.parse_reply(message, expected, self.peer_id)
                    else:
                        reply = SpanReply.parse(message, expected, self.peer_id)
                        self.compact = self.compact or bool(reply.compact)
                except InvalidReply:  # an answer to a pushed step of another shape than ours is judged, not refused
                    pushed, proof = compact.reply_from_push(message) if isinstance(message, CompactFrame) else \
                        _reply_from_push(message)
                    if position is None or pushed is None or pushed == (digest := digest or request.digest()):
                        raise
                    self._judge(origin, position, pushed, proof, digest)
                    continue  # it computes ours next and answers again
                if position is not None and reply.digest is not None and \
                        reply.digest != (digest := digest or request.digest()):
                    self._judge(origin, position, reply.digest, reply.push_proof, digest)
                    continue
                if position is not None and reply.length != position + request.hidden.shape[1]:
                    raise InvalidReply(f"server {self.peer_id} answered for length {reply.length}, expected "
                                       f"{position + request.hidden.shape[1]}")
                return reply

    def _judge(self, origin: PushOrigin | None, position: int, pushed: str, proof: bytes | None, own: str) -> None:
        """A reply computed from a push other than our step: the pusher is to blame when its own proof says it
        pushed that for the input we sent it (and the hidden states differ, not only the extras every server
        gets from us); this server when it cannot show the pusher's proof; nobody for a stale push."""
        if origin is None:
            return  # no push was set up here (a route just changed): the server computes ours next
        blame = origin.judge(position, pushed, proof)
        if blame is Blame.RECEIVER:
            raise InvalidReply(f"server {self.peer_id} answered a pushed step without the previous server's proof "
                               f"of it")
        if blame is Blame.PUSHER and pushed[:32] != own[:32]:
            self.push_differed = True

    def close(self) -> None:
        self.writer.close()


def _reply_from_push(message: ExpertResponse) -> tuple[str | None, bytes | None]:
    """A full-format reply's digest and push proof, read before its tensors are checked (an error reply is left
    for SpanReply.parse to raise)."""
    try:
        meta = reply_metadata(message, None)
    except (RemoteError, InvalidReply, WireError):
        return None, None
    digest, proof = meta.get("digest"), meta.get("push_proof")
    return (digest if isinstance(digest, str) else None), (proof if isinstance(proof, bytes) else None)
