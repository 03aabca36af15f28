"""RPC handlers of a server: a streaming ``inference`` with a KV cache per session, stateless ``forward``
and ``backward``, ``info`` and ``pay``. Requests are parsed and checked by swarm.wire; what is left here is
the stream loop, what depends on this server's state (sessions, LoRA weights, payment), and compute. Any
failure in handling a request goes back to that caller as a coded error; every other stream goes on."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
from typing import Any, Callable

import torch
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from incentives.verification import Attestation, array_hash, chain_hash
from shards import BlockSpan
from shards.lora import LoraWeights, applied_lora, lora_layout, lora_numel
from shards.packed_linears import packed_linears
from swarm import compact
from swarm.compact import CompactFrame
from swarm.framing import read_frame, write_frame
from swarm.server import threads
from swarm.server.batching import can_batch, run_batched
from swarm.server.lora_cache import LoraCache
from swarm.server.payments import ServerPayments
from swarm.server.push import PushSender
from swarm.limits import Limits, Quotas
from swarm.server.quotas import PeerUsage
from swarm.server.scheduler import FairScheduler
from swarm.server.sessions import Session, SessionTable
from swarm.wire import (BackwardRequest, Bounds, ErrorCode, ErrorReply, InferenceStep, InfoReply, Payment, dtype_name,
                        PayReply, PayRequest, PushStep, SpanReply, SpanRequest, WireError, bad)

logger = logging.getLogger(__name__)
HANDLERS = ("inference", "push", "forward", "backward", "info", "pay")
LINGER_SECONDS = 10.0  # how long a finished stream waits for its caller to hang up
BATCH_TOKENS = 128  # tokens of one batch of steps at most (a batch of prefills runs for ~8 chunks' time)


class SpanHandler:
    def __init__(self, span: BlockSpan, sessions: SessionTable, limits: Limits, info: Callable[[], dict[str, Any]],
                 payments: ServerPayments | None = None, adapters: dict[str, LoraWeights] | None = None,
                 lora_cache: LoraCache | None = None, quotas: Quotas = Quotas(), prefill_rate: float = 1e4,
                 batch_window: float = 0.01, max_batch_sessions: int = 64):
        self.span, self.sessions, self.limits, self.info = span, sessions, limits, info
        self.payments = payments  # None: this server works for free
        self.adapters = adapters or {}  # served peft adapters by name, rows for this span's blocks
        self.lora_cache = lora_cache or LoraCache(256 << 20)
        self.quotas = quotas
        self.max_bytes = limits.max_message_bytes(span.config.hidden_size)
        self.usage = PeerUsage(quotas, self.max_bytes)
        # one compute thread, fair between peers; decode steps of several sessions run as one batch
        self.scheduler = FairScheduler(quotas.max_queued_per_peer, batch_window=batch_window,
                                       max_batch=max_batch_sessions, active=sessions.decoding,
                                       max_batch_cost=BATCH_TOKENS * (span.end - span.start),
                                       run_batch=self._run_batch if max_batch_sessions > 1 and can_batch(span) else None)
        self.metrics = None  # swarm.server.metrics.ServerMetrics, with --metrics-port
        self.prefill_rate = prefill_rate  # tokens x blocks per second of prefill, learned from the chunks run
        self.accepting = True
        self.routes: dict[str, Session] = {}  # route id -> the session that takes pushes under it
        self.pushes: PushSender | None = None  # set once the server has its p2p handle
        self.threads = torch.get_num_threads()  # torch threads to compute with (swarm.server.threads)
        # steps pushed on, taken from a push, answered from a push, pushed steps refused, differing from the client's
        self.push_counts = dict.fromkeys(("sent", "taken", "answered", "refused", "differed"), 0)

    @property
    def bounds(self) -> Bounds:  # a property: the span changes when the server moves
        config = self.span.config
        return Bounds(self.limits, config.hidden_size, self.span.start, self.span.end, config.max_position_embeddings)

    def stream_handlers(self) -> dict[str, Callable]:
        """name -> handle(caller, reader, writer): the same for hivemind's streams and direct connections."""
        return {name: self._stream_handler(name) for name in HANDLERS}

    async def add_p2p_handlers(self, p2p) -> None:
        for name, handle in self.stream_handlers().items():
            await p2p.add_binary_stream_handler(f"cocoon.{name}", handle)

    # ------------------------------------------------------------------ streams
    def _stream_handler(self, name: str):
        serve = getattr(self, f"_{name}")

        async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = str(stream_info.peer_id)
            state: dict[str, Any] = {"peer": peer, "writer": writer}
            try:
                with self.usage.stream(peer):
                    while await self._serve_frame(serve, reader, writer, state, name) and name in ("inference", "push"):
                        pass
            except WireError as e:  # over the peer's quota of streams
                await write_frame(writer, ErrorReply(e.code, e.message).pack())
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the caller went away
            finally:
                if "session" in state:
                    self.sessions.close(state["session"].session_id)
                    self._set_accept(state["session"], {})
                await _caller_hung_up(reader)
                writer.close()

        return handle

    async def _serve_frame(self, serve, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict,
                           name: str) -> bool:
        """Read one request and answer it; False when the stream is over."""
        peer, admitted = state["peer"], 0

        def admit(size: int) -> None:
            nonlocal admitted
            self.usage.admit(peer, size)
            admitted = size

        try:
            try:
                request = await read_frame(reader, ExpertRequest, self.max_bytes, self.quotas.frame_deadline, admit)
            except WireError as e:  # the frame boundary is lost: answer, then hang up
                await write_frame(writer, ErrorReply(e.code, e.message).pack())
                return False
            if request is None:
                return False
            answer = await self._answer(serve, request, state, name)
            if answer is not None:  # None: a step already answered when it was pushed
                await write_frame(writer, answer)
            return True
        finally:
            self.usage.done(peer, admitted)

    async def _answer(self, serve, request: ExpertRequest | CompactFrame, state: dict, name: str
                      ) -> ExpertResponse | CompactFrame | None:
        started, code = time.perf_counter(), "ok"
        try:
            if isinstance(request, CompactFrame) and name not in ("inference", "push"):
                raise bad(f"{name} takes no compact frames: send a protobuf (swarm.wire)")
            reply = await serve(request, state)
            if reply is None:
                return None
            return self._pack_reply(state.get("session"), reply)
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

    @staticmethod
    def _pack_reply(session: Session | None, reply) -> ExpertResponse | CompactFrame:
        """A step's reply in the compact layout when the session's client reads it and the reply fits it."""
        if session is not None and session.compact and isinstance(reply, SpanReply) and reply.compact is None:
            frame = compact.pack_reply(reply)
            if frame is not None:
                return frame
        return reply.pack()

    def _count(self, rpc: str, hidden: torch.Tensor, blocks: int) -> None:
        if self.metrics is not None:
            tokens = hidden.shape[0] * hidden.shape[1]
            self.metrics.tokens.labels(rpc).inc(tokens)
            self.metrics.block_tokens.labels(rpc).inc(tokens * blocks)

    async def _compute(self, peer: str, cost: float, fn, *args, batch_key=None):
        # a lone session's decode step runs on the event loop when the compute thread has nothing to do (a
        # longer step there would hold up every other caller of this server: pings, new sessions, their prompts)
        inline = batch_key is not None and self._lone_decode(batch_key[1])
        return await self.scheduler.run(peer, cost, fn, *args, batch_key=batch_key, inline=inline)

    def _lone_decode(self, length: int) -> bool:
        """A decode step of the only session decoding here: it runs inline (see _compute)."""
        return length == 1 and self.sessions.decoding() <= 1

    # ------------------------------------------------------------------ inference
    async def _inference(self, message: ExpertRequest | CompactFrame, state: dict[str, Any]) -> SpanReply | None:
        session: Session | None = state.get("session")
        if not isinstance(message, CompactFrame):
            step = InferenceStep.parse(message, self.bounds, opening=session is None)
        elif session is None:
            raise bad("a session opens with a full step (swarm.wire), not a compact frame")
        else:
            step = compact.parse_step(message, self.bounds, push=False)
        batch, length = step.hidden.shape[:2]
        payer = await self._charge_before(state["peer"], step.payment)  # before a session opens: no free ride
        if session is None:
            if not self.accepting:
                raise WireError(ErrorCode.SHUTTING_DOWN, "server is shutting down: open the session elsewhere")
            lora = self._lora(step)  # deep prompts, LoRA weights or an adapter hold for the whole session
            session = self.sessions.open(peer=state["peer"], start=step.start, end=step.end, batch_size=batch,
                                         max_length=step.max_length, cache=self.span.new_cache())
            session.lora, session.writer, session.compact = lora, state["writer"], bool(step.compact)
            state["session"] = session
        else:
            self.sessions.check_open(session)
            if batch != session.batch_size:
                raise bad(f"batch of {batch} in a session opened with {session.batch_size}")
        if step.payment is not None:
            session.payment = dataclasses.replace(step.payment, voucher=None)
        if step.push is not None:
            session.push = step.push or None
        if step.accept is not None:
            self._set_accept(session, step.accept)
        async with session.lock:
            pushed = session.pushed
            if pushed is not None and step.position == pushed[0] and session.length == pushed[0] + length:
                session.pushed = None  # let go of the cache as it was before the pushed step
                if pushed[1] == step.digest():
                    self.push_counts["answered"] += 1
                    return None  # taken from the push and answered then
                self.push_counts["differed"] += 1
                # the previous server pushed something else than what it gave the client: the client's counts
                session.length, session.input_chain = pushed[0], pushed[2]
                session.cache.layers[:] = pushed[3]
                logger.info(f"a pushed step of a session of {session.peer} differed from the client's: recomputed")
            session.pushed = None
            if step.position is not None and step.position != session.length:
                raise bad(f"a step at position {step.position} in a session of length {session.length}")
            reply = await self._step(session, step, state["peer"], payer)
            if step.compact:
                reply.compact = True  # the client may send its later decode steps compact
            return reply

    async def _step(self, session: Session, step: InferenceStep, peer: str, payer, digest: str | None = None
                    ) -> SpanReply:
        length = step.hidden.shape[1]
        if session.length + length > session.max_length:
            raise bad(f"{session.length} + {length} tokens exceed the session's max_length {session.max_length}")
        _check_mask_length(step, session.length)
        if step.reorder is not None:
            await self._compute(peer, 0, session.cache.reorder_cache,
                                torch.tensor(step.reorder, device=self.span.device))
        output = await self._span_output(peer, step, session.cache, (session.start, session.end),
                                         session.lora, past=session.length)
        position, session.length = session.length, session.length + length
        if session.push is not None and self.pushes is not None:  # the next server's input first
            if await self.pushes.send(session.push, step, output, position):
                self.push_counts["sent"] += 1
            else:
                session.push = None
        self.sessions.touch(session)  # only a step that succeeds keeps a session alive
        self._count("inference", step.hidden, session.end - session.start)
        reply = SpanReply([output], length=session.length, digest=digest)
        session.input_chain, reply.attestation = self._attest(session.input_chain, step.hidden, output,
                                                              session.start, session.end)
        reply.receipt = self._charge_after(payer, step.hidden, session.start, session.end)
        return reply

    # ------------------------------------------------------------------ push (swarm.server.push)
    def _set_accept(self, session: Session, accept: dict) -> None:
        if session.accept is not None and self.routes.get(session.accept["id"]) is session:
            del self.routes[session.accept["id"]]
        session.accept = accept or None
        if accept:
            if self.routes.get(accept["id"], session) is not session:
                session.accept = None
                raise bad(f"route id {accept['id']} is taken: pick another")
            self.routes[accept["id"]] = session

    async def _push(self, message: ExpertRequest | CompactFrame, state: dict[str, Any]) -> InfoReply | None:
        """A step pushed by the previous server of a client's chain, computed and answered to the client: at once
        for a lone session, else in the background (pushes of many sessions share one stream). Only a refusal
        is answered on the push stream: acknowledging every step would wake the pusher once more per token."""
        if isinstance(message, CompactFrame):
            step = compact.parse_step(message, self.bounds, push=True)
        else:
            step = PushStep.parse(message, self.bounds, opening=False)
        session = self.routes.get(step.route_id)
        if session is None or session.accept["from"] != state["peer"] or \
                session.session_id not in self.sessions.sessions:
            self.push_counts["refused"] += 1
            return InfoReply({"route": step.route_id, "accepted": False,
                              "reason": f"no session here takes pushes from you under route {step.route_id}"})
        if step.hidden.shape[0] != session.batch_size:
            raise bad(f"batch of {step.hidden.shape[0]} in a session opened with {session.batch_size}")
        if step.position == session.length and (session.push_task is None or session.push_task.done()):
            if session.pushed is None and self._lone_decode(step.hidden.shape[1]):
                await self._pushed_step(session, step)  # it runs inline, holding the loop anyway
            else:  # one at a time, and after the client's copy of the last pushed step when that is waiting too
                session.push_task = asyncio.create_task(self._pushed_step(session, step))
        return None

    async def _pushed_step(self, session: Session, step: PushStep) -> None:
        async with session.lock:
            if step.position != session.length or session.pushed is not None or \
                    session.session_id not in self.sessions.sessions:
                return  # the client's own step came first, or its copy of the last pushed step is still to come
            before = (step.position, step.digest(), session.input_chain, [copy.copy(l) for l in session.cache.layers])
            try:
                payer = await self._charge_before(session.peer, session.payment)
                reply = await self._step(session, step, session.peer, payer, digest=before[1])
            except Exception as e:  # the client's own copy of the step will meet the error
                logger.info(f"a pushed step failed ({type(e).__name__}: {e}); waiting for the client's")
                session.length, session.input_chain, session.cache.layers[:] = step.position, before[2], before[3]
                return
            session.pushed = before
            self.push_counts["taken"] += 1
            with contextlib.suppress(ConnectionError):
                await write_frame(session.writer, self._pack_reply(session, reply))

    # ------------------------------------------------------------------ forward / backward / info / pay
    async def _forward(self, message: ExpertRequest, state) -> SpanReply:
        request = SpanRequest.parse(message, self.bounds)
        _check_mask_length(request, 0)
        lora = self._lora(request)
        payer = await self._charge_before(state["peer"], request.payment)
        blocks = (request.start, request.end)
        output = await self._span_output(state["peer"], request, None, blocks, lora, past=0)
        self._count("forward", request.hidden, blocks[1] - blocks[0])
        _, attestation = self._attest(b"", request.hidden, output, *blocks)
        return SpanReply([output], attestation=attestation,
                         receipt=self._charge_after(payer, request.hidden, *blocks))

    async def _backward(self, message: ExpertRequest, state) -> SpanReply:
        request = BackwardRequest.parse(message, self.bounds)
        _check_mask_length(request, 0)
        lora = self._lora(request)
        payer = await self._charge_before(state["peer"], request.payment)
        blocks = (request.start, request.end)
        cost = 3 * request.hidden.shape[0] * request.hidden.shape[1] * (blocks[1] - blocks[0])
        grads = await self._compute(state["peer"], cost, self._run_backward, request, blocks, lora)
        self._count("backward", request.hidden, blocks[1] - blocks[0])
        return SpanReply(grads, receipt=self._charge_after(payer, request.hidden, *blocks, backward=True))

    async def _info(self, message: ExpertRequest, state) -> InfoReply:
        return InfoReply(self.info())

    async def _pay(self, message: ExpertRequest, state) -> PayReply:
        await self._charge_before(state["peer"], PayRequest.parse(message).payment, check_credit=False)
        return PayReply(True)

    # ------------------------------------------------------------------ payment
    async def _charge_before(self, peer: str, payment: Payment | None, check_credit: bool = True):
        """Who pays for this request (swarm.server.payments); None on a free server."""
        if self.payments is None:
            return None
        return await self.payments.admit(peer, payment, check_credit)

    def _attest(self, chain: bytes, wire_input: torch.Tensor, wire_output: torch.Tensor, start: int, end: int):
        """Sign the hashes of this request's input (chained onto the session's) and of our output, as the
        values crossed the wire. Servers with no payout key (free ones) sign nothing."""
        if self.payments is None:
            return chain, None
        ledger = self.payments.ledger
        chain = chain_hash(chain, wire_input.float().numpy())
        attestation = Attestation(ledger.payout, start, end, chain, array_hash(wire_output.float().numpy()),
                                  dtype_name(self.span.dtype_), dtype_name(wire_output.dtype))
        return chain, attestation.signed(ledger.signer.key).to_wire()

    def _charge_after(self, payer, hidden: torch.Tensor, start: int, end: int, backward: bool = False) -> dict | None:
        if payer is None:
            return None
        return self.payments.record(payer, hidden.shape[0] * hidden.shape[1], end - start, backward)

    # ------------------------------------------------------------------ compute (in the scheduler's thread)
    def _to_span(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        dtype = self.span.dtype_ if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.span.device, dtype=dtype)

    async def _span_output(self, peer: str, request: SpanRequest, cache, blocks: tuple[int, int],
                           lora: LoraWeights | None, past: int) -> torch.Tensor:
        """The span's output for a request, computed in the span's dtype and returned in the request's (on the
        CPU). A long prefill runs as chunks, each a task of its own for the scheduler, so that other peers'
        decode steps go between them; a stateless forward keeps a KV cache of its own across its chunks."""
        batch, length = request.hidden.shape[:2]
        blocks_count = blocks[1] - blocks[0]
        chunk = max(1, self._chunk_tokens(blocks_count) // batch)
        prefix = request.prompts.shape[2] if request.prompts is not None else 0
        if length <= chunk or prefix > chunk:  # the deep prompts' prefix must lie in one chunk
            run = self._timed_run if batch * length >= 64 else self._run  # decode steps say nothing of prefill
            # a step of a session can share a forward with other sessions' steps of as many tokens: decode steps,
            # and the prompts of clients that start together (swarm.server.batching)
            batchable = lora is None and request.prompts is None and cache is not None
            return await self._compute(peer, batch * length * blocks_count, run, request, cache, blocks, lora,
                                       batch_key=(blocks, length) if batchable else None)
        cache = self.span.new_cache() if cache is None else cache
        outputs, first = [], 0
        while first < length:
            last = min(first + chunk, length)
            part = dataclasses.replace(
                request, hidden=request.hidden[:, first:last],
                position_ids=None if request.position_ids is None else request.position_ids[:, first:last],
                attention_mask=None if request.attention_mask is None else request.attention_mask[:, :past + last],
                prompts=request.prompts if first == 0 else None)
            outputs.append(await self._compute(peer, batch * (last - first) * blocks_count, self._timed_run,
                                               part, cache, blocks, lora))
            first, chunk = last, max(1, self._chunk_tokens(blocks_count) // batch)
        return torch.cat(outputs, dim=1)

    def _chunk_tokens(self, blocks: int) -> int:
        """Tokens of a prefill chunk that takes about --prefill-chunk-ms of compute (at least 16)."""
        return max(16, int(self.prefill_rate * self.quotas.prefill_chunk_ms / 1000 / blocks))

    def _timed_run(self, request: SpanRequest, cache, blocks: tuple[int, int], lora: LoraWeights | None):
        started = time.perf_counter()
        output = self._run(request, cache, blocks, lora)
        work = request.hidden.shape[0] * request.hidden.shape[1] * (blocks[1] - blocks[0])
        rate = work / max(time.perf_counter() - started, 1e-6)
        self.prefill_rate = 0.5 * self.prefill_rate + 0.5 * rate  # later chunks attend to more: slower
        return output

    @torch.inference_mode()
    def _run(self, request: SpanRequest, cache, blocks: tuple[int, int], lora: LoraWeights | None) -> torch.Tensor:
        threads.use(self.threads)
        # a decode step through the packed weights on a CPU (shards.packed_linears); prompts through the plain ones
        packed = packed_linears(self.span) if cache is not None and request.hidden.shape[1] == 1 else \
            contextlib.nullcontext()
        with self._lora_applied(blocks, lora), packed:  # positions default to continuing the cache, chunks included
            output = self.span(self._to_span(request.hidden), cache=cache,
                               position_ids=self._to_span(request.position_ids),
                               attention_mask=self._to_span(request.attention_mask), blocks=blocks,
                               prompts=self._to_span(request.prompts))
        return output.to(device="cpu", dtype=request.dtype)

    def _run_batch(self, tasks: list[tuple]) -> list[torch.Tensor]:
        """The arguments of several ``_run`` decode steps (same blocks, no LoRA) -> their outputs."""
        threads.use(self.threads)
        return run_batched(self.span, [(request, cache, blocks) for request, cache, blocks, _ in tasks],
                           self._to_span)

    def _lora_applied(self, blocks: tuple[int, int], lora: LoraWeights | None):
        return contextlib.nullcontext() if lora is None else applied_lora(self.span, blocks, lora)

    def _run_backward(self, request: SpanRequest, blocks: tuple[int, int], lora: LoraWeights | None
                      ) -> list[torch.Tensor]:
        """Gradients w.r.t. the span's input, and w.r.t. the deep prompts and the client's LoRA weights when
        the request has them (a served adapter is frozen)."""
        threads.use(self.threads)
        with torch.enable_grad():
            hidden = self._to_span(request.hidden).requires_grad_(True)
            prompts = self._to_span(request.prompts)
            prompts = None if prompts is None else prompts.requires_grad_(True)
            trained = None
            if lora is not None and request.adapter is None:
                trained = lora.weights.detach().requires_grad_(True)
                lora = LoraWeights(lora.targets, lora.rank, lora.scale, trained)
            with self._lora_applied(blocks, lora):
                output = self.span(hidden, attention_mask=self._to_span(request.attention_mask),
                                   position_ids=self._to_span(request.position_ids), blocks=blocks, prompts=prompts)
            leaves = [t for t in (hidden, prompts, trained) if t is not None]
            grads = list(torch.autograd.grad(output, leaves, self._to_span(request.grad_output)))
        dtypes = [request.dtype] * (len(grads) - (trained is not None)) + [torch.float32] * (trained is not None)
        return [g.to(device="cpu", dtype=dtype) for g, dtype in zip(grads, dtypes)]

    # ------------------------------------------------------------------ LoRA
    def _lora(self, request: SpanRequest) -> LoraWeights | None:
        """A served adapter picked by name, or a client's LoRA weights [blocks, per-block numel] (laid out as
        shards.lora describes) sent as a tensor or named by the hash of weights sent before."""
        blocks = (request.start, request.end)
        if request.adapter is not None:
            served = self.adapters.get(request.adapter)
            if served is None:
                raise bad(f"this server does not serve adapter {request.adapter!r}; it serves "
                          f"{sorted(self.adapters) or 'none'}")
            rows = served.weights[blocks[0] - self.span.start:blocks[1] - self.span.start]
            return LoraWeights(served.targets, served.rank, served.scale, rows)
        spec = request.lora_spec
        if spec is None:
            return None
        try:
            layout = lora_layout(self.span, blocks[0], spec.targets)
        except ValueError as e:
            raise bad(str(e)) from None
        shape = (blocks[1] - blocks[0], lora_numel(layout, spec.rank, 1))
        if request.lora is None:
            stored = self.lora_cache.get(spec.hash)
            if stored is None:
                raise WireError(ErrorCode.LORA_NOT_CACHED,
                                f"lora weights not cached: {spec.hash!r} is not on this server; send the weights")
        else:
            stored = self._to_span(request.lora)
        if tuple(stored.shape) != shape:
            raise bad(f"lora weights must have shape {list(shape)} for rank {spec.rank} and targets {spec.targets}, "
                      f"got {list(stored.shape)}")
        if request.lora is not None:
            self.lora_cache.put(request.lora, stored)
        return LoraWeights(spec.targets, spec.rank, spec.alpha / spec.rank, stored)


def _check_mask_length(request: SpanRequest, past: int) -> None:
    mask, length = request.attention_mask, request.hidden.shape[1]
    if mask is not None and mask.shape[1] != past + length:
        raise bad(f"attention_mask must cover the {past} past and {length} new tokens, got {mask.shape[1]} columns")


async def _caller_hung_up(reader: asyncio.StreamReader, seconds: float = LINGER_SECONDS) -> None:
    """Wait (discarding whatever still arrives) until the caller closes its end. When the handler's end closes
    first, p2pd may reset the stream before the last response has crossed it, and the caller sees a bare EOF."""
    with contextlib.suppress(TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
