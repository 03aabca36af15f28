"""The RPCs of a server, by name, each handed to the part of the server that owns it.

``inference`` (a stream of steps with a KV cache per session) and ``push`` go to the session steps
(swarm.server.session_steps); stateless ``forward`` and ``backward`` to the engine (swarm.server.engine);
``info`` and ``pay`` are answered here. Requests are parsed and checked by swarm.wire.requests; the stream loop
(swarm.server.streams) reads them within each peer's quota and answers any failure as a coded error.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from hivemind.proto.runtime_pb2 import ExpertRequest

from shards.lora import LoraWeights
from swarm.wire.limits import Limits, Quotas
from swarm.server.billing import Billing
from swarm.server.engine import Engine
from swarm.server.lora_cache import LoraCache, request_lora
from swarm.server.payments import ServerPayments
from swarm.server.push import PushSender
from swarm.server.session_steps import SessionSteps, check_mask_length
from swarm.server.sessions import SessionTable
from swarm.server.streams import Stream, StreamLoop
from swarm.wire import int8_rows
from swarm.wire.payloads import Accept
from swarm.wire.replies import InfoReply, PayReply, SpanReply
from swarm.wire.requests import BackwardRequest, Bounds, PayRequest, SpanRequest
from swarm.wire.tensors import dtype_name

HANDLERS = ("inference", "push", "forward", "backward", "info", "pay")


class SpanHandler:
    def __init__(self, engine: Engine, sessions: SessionTable, limits: Limits, info: Callable[[], dict[str, Any]],
                 payments: ServerPayments | None = None, adapters: dict[str, LoraWeights] | None = None,
                 lora_cache: LoraCache | None = None, quotas: Quotas = Quotas()):
        self.engine, self.sessions, self.limits, self.describe = engine, sessions, limits, info
        span = engine.span
        self.billing = Billing(payments, span.quant if span.quant != "none" else dtype_name(span.dtype_))
        self.adapters = adapters or {}  # served peft adapters by name, rows for this span's blocks
        self.lora_cache = lora_cache or LoraCache(256 << 20)
        self.steps = SessionSteps(self)
        self.streams = StreamLoop(quotas, limits.max_message_bytes(engine.span.config.hidden_size), self._closed)
        self.accepting = True
        self.pushes: PushSender | None = None  # set once the server has its p2p handle

    @property
    def bounds(self) -> Bounds:  # a property: the span changes when the server moves
        config, span = self.engine.span.config, self.engine.span
        return Bounds(self.limits, config.hidden_size, span.start, span.end, config.max_position_embeddings)

    @property
    def metrics(self):
        return self.streams.metrics

    @metrics.setter
    def metrics(self, metrics) -> None:  # swarm.server.metrics.ServerMetrics, with --metrics-port
        self.streams.metrics = metrics

    def stream_handlers(self) -> dict[str, Callable]:
        """name -> handle(caller, reader, writer): the same for hivemind's streams and direct connections."""
        serve = {"inference": self.steps.inference, "push": self.steps.push, "forward": self.forward,
                 "backward": self.backward, "info": self.info, "pay": self.pay}
        return {name: self.streams.handler(name, serve[name]) for name in HANDLERS}

    async def add_p2p_handlers(self, p2p) -> None:
        for name, handle in self.stream_handlers().items():
            await p2p.add_binary_stream_handler(f"cocoon.{name}", handle)

    def _closed(self, stream: Stream) -> None:
        if stream.session is not None:
            self.sessions.close(stream.session.session_id)
            self.steps.set_accept(stream.session, Accept.STOP)

    def lora(self, request: SpanRequest) -> LoraWeights | None:
        return request_lora(self.engine.span, self.adapters, self.lora_cache, request)

    def count(self, rpc: str, hidden: torch.Tensor, blocks: int) -> None:
        if self.metrics is not None:
            tokens = hidden.shape[0] * hidden.shape[1]
            self.metrics.tokens.labels(rpc).inc(tokens)
            self.metrics.block_tokens.labels(rpc).inc(tokens * blocks)

    # ------------------------------------------------------------------ stateless RPCs
    async def forward(self, message: ExpertRequest, stream: Stream) -> SpanReply:
        request = SpanRequest.parse(message, self.bounds)
        check_mask_length(request, 0)
        lora = self.lora(request)
        payer = await self.billing.admit(stream.peer, request.payment, request.hidden, request.end - request.start)
        blocks = (request.start, request.end)
        output = await self.engine.span_output(stream.peer, request, None, blocks, lora, past=0)
        output = int8_rows.maybe_round(request.codec, output)  # before its attestation: what the client gets
        self.count("forward", request.hidden, blocks[1] - blocks[0])
        _, attestation = self.billing.attest(b"", request.hidden, output, *blocks)
        return SpanReply([output], attestation=attestation, receipt=self.billing.receipt(payer, request.hidden, *blocks))

    async def backward(self, message: ExpertRequest, stream: Stream) -> SpanReply:
        request = BackwardRequest.parse(message, self.bounds)
        check_mask_length(request, 0)
        lora = self.lora(request)
        payer = await self.billing.admit(stream.peer, request.payment, request.hidden, request.end - request.start,
                                         backward=True)
        blocks = (request.start, request.end)
        grads = await self.engine.backward(stream.peer, request, blocks, lora)
        grads[0] = int8_rows.maybe_round(request.codec, grads[0])  # the gradient of hidden (not prompts' or LoRA's)
        self.count("backward", request.hidden, blocks[1] - blocks[0])
        return SpanReply(grads, receipt=self.billing.receipt(payer, request.hidden, *blocks, backward=True))

    async def info(self, message: ExpertRequest, stream: Stream) -> InfoReply:
        return InfoReply(self.describe())

    async def pay(self, message: ExpertRequest, stream: Stream) -> PayReply:
        await self.billing.admit(stream.peer, PayRequest.parse(message).payment)
        return PayReply(True)
