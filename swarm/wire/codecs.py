"""What a frame's payload is, by its marker byte, both ways: a protobuf (hivemind's message marker), hivemind's
error frame (an empty one ends the stream), or a compact frame (swarm.wire.compact). swarm.wire.framing moves
frames without looking inside; this registry is the one place that says how each kind is written and read."""
from __future__ import annotations

from typing import Callable

from hivemind.p2p import P2P
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.wire.codes import ErrorCode, WireError
from swarm.wire.compact import CompactFrame

MESSAGE, ERROR, COMPACT = P2P.MESSAGE_MARKER, P2P.ERROR_MARKER, b"\x02"


def _protobuf(payload: bytes, message_type):
    message = message_type()
    try:
        message.ParseFromString(payload)
    except Exception:
        raise WireError(ErrorCode.BAD_REQUEST, "garbage on the stream: the frame is not a valid protobuf") from None
    return message


def _error(payload: bytes, message_type) -> None:
    error = RPCError()
    try:
        error.ParseFromString(payload)
    except Exception:
        raise WireError(ErrorCode.BAD_REQUEST, "garbage on the stream: an unreadable error frame") from None
    if error.message:
        raise WireError(ErrorCode.BAD_REQUEST, f"the peer sent an error frame: {error.message[:200]}")
    return None  # hivemind's END_OF_STREAM is an empty error frame


# marker -> how a payload of that kind is read (the protobuf type the reader expects is passed along)
DECODERS: dict[bytes, Callable] = {MESSAGE: _protobuf, ERROR: _error, COMPACT: lambda payload, _: CompactFrame(payload)}


def encode(message) -> tuple[bytes, bytes]:
    """(marker, payload) of a protobuf, an RPCError or a CompactFrame."""
    if isinstance(message, CompactFrame):
        return COMPACT, message
    return (ERROR if isinstance(message, RPCError) else MESSAGE), message.SerializeToString()


def decode(marker: bytes, payload: bytes, message_type):
    """The frame's message: a ``message_type`` protobuf, a CompactFrame, or None for the end of the stream."""
    decoder = DECODERS.get(marker)
    if decoder is None:
        raise WireError(ErrorCode.BAD_REQUEST, "garbage on the stream: unknown frame marker")
    return decoder(payload, message_type)
