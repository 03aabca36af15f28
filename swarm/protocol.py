"""What crosses the wire between client and server, and how it is framed.

A message is a hivemind ``ExpertRequest``/``ExpertResponse`` protobuf: tensors serialized by hivemind
(16-bit on the wire by default) and msgpack metadata. Frames use hivemind's layout (one marker byte,
an 8-byte length, the payload) but are read with a size limit: a peer cannot make us buffer more than
``max_bytes``, and garbage is answered with an error instead of an exception deep in a handler.
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.proto.runtime_pb2 import CompressionType

MESSAGE, ERROR = P2P.MESSAGE_MARKER, P2P.ERROR_MARKER
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}
_WIRE_ITEMSIZE = {CompressionType.NONE: None, CompressionType.FLOAT16: 2}


class ProtocolError(ValueError):
    """The peer sent something that is not a valid message: the caller gets this text back."""


class RemoteError(RuntimeError):
    """The server refused or failed a request; the message says why."""


class ServerFullError(RemoteError):
    """The server has no room for another session right now: try another server."""


class CreditLimitError(RemoteError):
    """The server wants a newer voucher before it does more work."""


class LoraNotCachedError(RemoteError):
    """The server no longer holds the LoRA weights a request named by hash: send them again."""


# ------------------------------------------------------------------ tensors
def wire_compression(dtype: torch.dtype, exact: bool) -> int:
    """16-bit on the wire unless the tensor is float32 and the user asked for exactness."""
    if dtype == torch.float32 and not exact:
        return CompressionType.FLOAT16
    return CompressionType.NONE


def pack_tensors(tensors: Sequence[torch.Tensor], compression: int = CompressionType.NONE) -> list[runtime_pb2.Tensor]:
    return [serialize_torch_tensor(t.detach().cpu(), compression if t.is_floating_point() else CompressionType.NONE)
            for t in tensors]


def unpack_tensors(serialized: Sequence[runtime_pb2.Tensor], max_numel: int) -> list[torch.Tensor]:
    """Deserialize untrusted tensors, checking dtype, compression and size before touching the buffer."""
    tensors = []
    for i, proto in enumerate(serialized):
        if proto.dtype not in _ITEMSIZE:
            raise ProtocolError(f"tensor {i} has dtype {proto.dtype!r}; allowed: {', '.join(_ITEMSIZE)}")
        if proto.compression not in _WIRE_ITEMSIZE:
            raise ProtocolError(f"tensor {i} uses unsupported compression {proto.compression}")
        numel = 1
        for dim in proto.size:
            numel *= dim
        if numel > max_numel:
            raise ProtocolError(f"tensor {i} has {numel} elements; the limit is {max_numel}")
        itemsize = _WIRE_ITEMSIZE[proto.compression] or _ITEMSIZE[proto.dtype]
        if proto.compression == CompressionType.FLOAT16 and proto.dtype not in ("float32", "float16"):
            raise ProtocolError(f"tensor {i}: float16 compression of {proto.dtype} is not allowed")
        if len(proto.buffer) != numel * itemsize:
            raise ProtocolError(f"tensor {i}: buffer of {len(proto.buffer)} bytes does not hold shape {list(proto.size)}")
        tensors.append(deserialize_torch_tensor(proto))
    return tensors


# ------------------------------------------------------------------ metadata
def pack_metadata(metadata: dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def unpack_metadata(data: bytes) -> dict[str, Any]:
    if not data:
        return {}
    try:
        metadata = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:
        raise ProtocolError(f"metadata is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(metadata, dict):
        raise ProtocolError("metadata must be a msgpack map")
    return metadata


# ------------------------------------------------------------------ framing
async def read_frame(reader: asyncio.StreamReader, message_type, max_bytes: int):
    """One protobuf from the stream; None at end of stream. Raises ProtocolError for anything else."""
    marker = await reader.readexactly(1)
    header = await reader.readexactly(P2P.HEADER_LEN)
    length = int.from_bytes(header, P2P.BYTEORDER)
    if length > max_bytes:
        raise ProtocolError(f"message of {length} bytes exceeds this server's limit of {max_bytes} bytes")
    payload = await reader.readexactly(length)
    if marker == ERROR:
        error = RPCError()
        error.ParseFromString(payload)
        if not error.message:  # hivemind's END_OF_STREAM is an empty error frame
            return None
        raise_for_error(error.message)
    if marker != MESSAGE:
        raise ProtocolError("garbage on the stream: unknown frame marker")
    message = message_type()
    try:
        message.ParseFromString(payload)
    except Exception:
        raise ProtocolError("garbage on the stream: the frame is not a valid protobuf") from None
    return message


async def write_frame(writer: asyncio.StreamWriter, message) -> None:
    await P2P.send_protobuf(message, writer)


async def write_error(writer: asyncio.StreamWriter, text: str) -> None:
    await P2P.send_protobuf(RPCError(message=text), writer)


def raise_for_error(text: str) -> None:
    """Turn an error text from a server into the matching exception type."""
    if text.startswith("server full"):
        raise ServerFullError(text)
    if text.startswith("credit limit reached"):
        raise CreditLimitError(text)
    if text.startswith("lora weights not cached"):
        raise LoraNotCachedError(text)
    raise RemoteError(text)
