"""The stream loop of a server: frames in, replies out, each within its peer's quota, every failure coded.

One loop serves hivemind's streams and direct connections alike. It reads a frame (within the peer's quota
of bytes in flight and the frame deadline), hands it to the RPC's function, and writes the reply in the
layout the caller reads (``pack_reply``: swarm.wire.compact for a session whose client asked for it). Any failure
in handling a request goes back to that caller as a coded error; every other stream goes on. ``inference``
and ``push`` streams carry many requests; the others one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from swarm.wire import compact
from swarm.wire.compact import CompactFrame
from swarm.wire.framing import read_frame, write_frame
from swarm.wire.limits import Quotas
from swarm.server.quotas import PeerUsage
from swarm.server.sessions import Session
from swarm.wire.codes import ErrorCode, WireError, bad
from swarm.wire.replies import ErrorReply, SpanReply

logger = logging.getLogger(__name__)
LINGER_SECONDS = 10.0  # how long a finished stream waits for its caller to hang up
LONG_STREAMS = ("inference", "push")  # streams that carry many requests; the others carry one
COMPACT_STREAMS = LONG_STREAMS  # where compact frames are understood


@dataclass
class Stream:
    """One caller's open stream."""
    peer: str
    writer: asyncio.StreamWriter
    session: Session | None = None  # the inference session this stream opened


Serve = Callable[[Any, Stream], Awaitable[Any]]  # a request, its stream -> a reply (None: answered already)


class StreamLoop:
    def __init__(self, quotas: Quotas, max_bytes: int, on_close: Callable[[Stream], None]):
        self.quotas, self.max_bytes, self.on_close = quotas, max_bytes, on_close
        self.usage = PeerUsage(quotas, max_bytes)
        self.metrics = None  # swarm.server.metrics.ServerMetrics, with --metrics-port

    def handler(self, name: str, serve: Serve):
        """handle(caller, reader, writer) of RPC ``name``: the same for hivemind's streams and direct connections."""
        async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            stream = Stream(str(stream_info.peer_id), writer)
            try:
                with self.usage.stream(stream.peer):
                    while await self._serve_frame(name, serve, reader, stream) and name in LONG_STREAMS:
                        pass
            except WireError as e:  # over the peer's quota of streams
                await write_frame(writer, ErrorReply(e.code, e.message).pack())
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the caller went away
            finally:
                self.on_close(stream)
                await _caller_hung_up(reader)
                writer.close()

        return handle

    async def _serve_frame(self, name: str, serve: Serve, reader: asyncio.StreamReader, stream: Stream) -> bool:
        """Read one request and answer it; False when the stream is over."""
        admitted = 0

        def admit(size: int) -> None:
            nonlocal admitted
            self.usage.admit(stream.peer, size)
            admitted = size

        try:
            try:
                request = await read_frame(reader, ExpertRequest, self.max_bytes, self.quotas.frame_deadline, admit)
            except WireError as e:  # the frame boundary is lost: answer, then hang up
                await write_frame(stream.writer, ErrorReply(e.code, e.message).pack())
                return False
            if request is None:
                return False
            answer = await self._answer(name, serve, request, stream)
            if answer is not None:  # None: a step already answered when it was pushed
                await write_frame(stream.writer, answer)
            return True
        finally:
            self.usage.done(stream.peer, admitted)

    async def _answer(self, name: str, serve: Serve, request: ExpertRequest | CompactFrame, stream: Stream
                      ) -> ExpertResponse | CompactFrame | None:
        started, code = time.perf_counter(), "ok"
        try:
            if isinstance(request, CompactFrame) and name not in COMPACT_STREAMS:
                raise bad(f"{name} takes no compact frames: send a protobuf (swarm.wire.requests)")
            reply = await serve(request, stream)
            return None if reply is None else pack_reply(stream.session, reply)
        except WireError as e:
            code = e.code.value
            return ErrorReply(e.code, e.message).pack()
        except Exception as e:
            logger.exception(f"{name} failed")
            code = ErrorCode.INTERNAL.value
            return ErrorReply(ErrorCode.INTERNAL, f"internal server error: {type(e).__name__}: {e}").pack()
        finally:
            if self.metrics is not None:
                self.metrics.requests.labels(name, code).inc()
                self.metrics.latency.labels(name).observe(time.perf_counter() - started)


def pack_reply(session: Session | None, reply) -> ExpertResponse | CompactFrame:
    """A step's reply in the compact layout when the session's client reads it and the reply fits it."""
    if session is not None and session.compact and isinstance(reply, SpanReply):
        frame = compact.pack_reply(reply)
        if frame is not None:
            return frame
    return reply.pack()


async def _caller_hung_up(reader: asyncio.StreamReader, seconds: float = LINGER_SECONDS) -> None:
    """Wait (discarding whatever still arrives) until the caller closes its end. When the handler's end closes
    first, p2pd may reset the stream before the last response has crossed it, and the caller sees a bare EOF."""
    with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
