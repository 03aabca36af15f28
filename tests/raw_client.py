"""A hand-driven client for tests: streams to a server that send what a well-behaved client never would."""
import asyncio

import torch
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from swarm.client import loop
from swarm.wire.framing import read_frame, write_frame
from swarm.wire.fields import pack_metadata
from swarm.wire.protocol import PROTOCOL_VERSION
from swarm.wire.replies import InfoReply, SpanReply
from swarm.wire.requests import InferenceStep
from swarm.wire.tensors import pack_tensor


class RawStream:
    def __init__(self, client, peer, handler: str = "inference"):
        self.client, self.peer = client, peer
        self.stream = loop.run(client.open_stream(peer, handler))

    def send(self, message: ExpertRequest, timeout: float = 30) -> ExpertResponse:
        return loop.run(self.stream.exchange(message, timeout, 1 << 30))

    def reply(self, message: ExpertRequest, expected=None) -> SpanReply:
        """The parsed reply; an error reply raises RemoteError with the server's code."""
        return SpanReply.parse(self.send(message), expected or [], self.peer)

    def step(self, hidden: torch.Tensor, **fields) -> torch.Tensor:
        request = InferenceStep(hidden, **fields)
        return SpanReply.parse(self.send(request.pack()), request.expected_reply(), self.peer).outputs[0]

    def send_frame(self, message, timeout: float = 30):
        """Any frame (a protobuf or a swarm.wire.compact frame) -> whatever frame comes back."""
        async def go():
            await write_frame(self.stream.writer, message)
            return await asyncio.wait_for(read_frame(self.stream.reader, ExpertResponse, 1 << 20), timeout)
        return loop.run(go())

    def send_bytes(self, data: bytes, timeout: float = 30):
        async def go():
            self.stream.writer.write(data)
            await self.stream.writer.drain()
            return await asyncio.wait_for(read_frame(self.stream.reader, ExpertResponse, 1 << 20), timeout)
        return loop.run(go())

    def close(self):
        loop.call_soon(self.stream.close)


def raw_request(tensors: dict, meta: dict) -> ExpertRequest:
    """A request exactly as given: tensors packed as they are, metadata as is (names added if absent)."""
    meta = {"protocol": PROTOCOL_VERSION, "tensors": list(tensors), "dtype": "float32", **meta}
    return ExpertRequest(tensors=[pack_tensor(t) for t in tensors.values()], metadata=pack_metadata(meta))


def info(client, peer) -> dict:
    return loop.run(client.info(peer))


def reply_error(response: ExpertResponse):
    """(code, message) of an error reply."""
    from swarm.wire.codes import RemoteError
    try:
        InfoReply.parse(response)
    except RemoteError as e:
        return e.code, e.message
    raise AssertionError("not an error reply")
