"""Frames on a byte stream: hivemind's layout (one marker byte, an 8-byte length, a payload), read with a
size limit, and with a deadline once a frame has begun, so that a peer can make us neither buffer more
than ``max_bytes`` nor hold a half-sent frame open. Frames are opaque here: swarm.wire.codecs says what each
marker's payload is (a protobuf, an error, a compact frame)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from hivemind.p2p import P2P

from swarm.wire import codecs
from swarm.wire.codes import ErrorCode, WireError
SMALL_FRAME = 1 << 20


async def read_frame(reader: asyncio.StreamReader, message_type, max_bytes: int, deadline: float | None = None,
                     admit: Callable[[int], None] | None = None):
    """The next protobuf of ``message_type`` (or a CompactFrame), or None at the end of the stream. Waits for a
    frame's first byte as long as it takes; the rest must arrive within ``deadline`` seconds. ``admit(length)``
    may refuse a frame (by raising) before its payload is buffered. Raises WireError when the frame is too
    large, late or garbage (the frame boundary is then lost: the stream cannot go on)."""
    marker = await reader.read(1)
    if not marker:
        return None
    try:
        # no timer for a frame that has all arrived (a decode step's, nearly always): a uvloop timer handle made and
        # cancelled per read is a measurable part of a step, which meets three such reads (bench/RESULTS.md)
        async with contextlib.nullcontext() if _buffered_whole(reader) else asyncio.timeout(deadline):
            header = await reader.readexactly(P2P.HEADER_LEN)
            length = int.from_bytes(header, P2P.BYTEORDER)
            if length > max_bytes:
                raise WireError(ErrorCode.TOO_LARGE, f"a message of {length} bytes exceeds the limit of {max_bytes} "
                                                     f"bytes")
            if admit is not None:
                admit(length)
            payload = await reader.readexactly(length)
    except TimeoutError:
        raise WireError(ErrorCode.DEADLINE, f"a frame did not arrive within {deadline} s of its first byte") from None
    return codecs.decode(marker, payload, message_type)


def _buffered_whole(reader: asyncio.StreamReader) -> bool:
    """The rest of the frame (its length, then that many bytes) is in the reader's buffer already."""
    buffered = getattr(reader, "_buffer", None)  # asyncio.StreamReader's; another reader: no shortcut
    if not isinstance(buffered, bytearray) or len(buffered) < P2P.HEADER_LEN:
        return False
    return len(buffered) - P2P.HEADER_LEN >= int.from_bytes(buffered[:P2P.HEADER_LEN], P2P.BYTEORDER)


async def write_frame(writer: asyncio.StreamWriter, message) -> None:
    put_frame(writer, message)
    await writer.drain()


def put_frame(writer: asyncio.StreamWriter, message) -> None:
    """write_frame without waiting for the transport's buffer to drain (the caller awaits ``writer.drain()``)."""
    marker, payload = codecs.encode(message)
    head = marker + len(payload).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
    if len(payload) <= SMALL_FRAME:  # one write: one TLS record and one send on a direct connection, not three
        writer.write(head + payload)
    else:
        writer.write(head)
        writer.write(payload)
