"""RPC handlers of a server: a streaming ``inference`` with a KV cache per session, stateless
``forward`` and ``backward``, and ``info``. Every request is untrusted: it is validated before it
reaches the span, and a bad one gets an error frame while every other session goes on."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import torch
from hivemind.proto.runtime_pb2 import CompressionType, ExpertRequest, ExpertResponse

from incentives.credit import CreditLimitExceeded, InvalidVoucher, ServerLedger
from incentives.verification import Attestation, array_hash, chain_hash
from incentives.vouchers import Voucher
from shards import BlockSpan
from shards.lora import LoraWeights, applied_lora, lora_layout, lora_numel
from swarm.protocol import (ProtocolError, RemoteError, pack_metadata, pack_tensors, read_frame, unpack_metadata,
                            unpack_tensors, write_error, write_frame)
from swarm.server.lora_cache import LoraCache
from swarm.server.sessions import Session, SessionError, SessionTable

logger = logging.getLogger(__name__)
HANDLERS = ("inference", "forward", "backward", "info", "pay")
LINGER_SECONDS = 10.0  # how long a finished stream waits for its caller to hang up
OPTIONAL_INPUTS = ("position_ids", "attention_mask", "prompts", "lora")


class RequestError(ValueError):
    """The request is well-formed on the wire but not acceptable: the text goes back to the caller."""


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32
    max_tokens_per_request: int = 8192   # batch x new tokens
    max_length: int = 4096               # tokens of one session
    max_lora_rank: int = 64

    def max_numel(self, hidden_size: int) -> int:
        return max(self.max_tokens_per_request * hidden_size, self.max_batch * self.max_length)

    def max_message_bytes(self, hidden_size: int) -> int:
        return 2 * 4 * self.max_numel(hidden_size) + (1 << 20)  # backward carries two float32 tensors


@dataclass
class Inputs:
    hidden: torch.Tensor
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    compression: int
    wire_dtype: torch.dtype
    prompts: torch.Tensor | None = None  # deep prompt tuning: [blocks, batch, prefix, hidden]
    wire_hidden: torch.Tensor | None = None  # the hidden states exactly as received (what attestations hash)
    lora: LoraWeights | None = None  # a client's trainable weights or a served adapter, for these blocks
    lora_trainable: bool = False     # the client's own weights: backward returns their gradient


class SpanHandler:
    def __init__(self, span: BlockSpan, sessions: SessionTable, limits: Limits, info: Callable[[], dict[str, Any]],
                 ledger: ServerLedger | None = None, adapters: dict[str, LoraWeights] | None = None,
                 lora_cache: LoraCache | None = None):
        self.span, self.sessions, self.limits, self.info = span, sessions, limits, info
        self.ledger = ledger  # None: this server works for free
        self.adapters = adapters or {}  # served peft adapters by name, rows for this span's blocks
        self.lora_cache = lora_cache or LoraCache(256 << 20)
        self.hidden_size = span.config.hidden_size
        self.max_bytes = limits.max_message_bytes(self.hidden_size)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="compute")  # torch releases the GIL
        self.accepting = True

    async def add_p2p_handlers(self, p2p) -> None:
        for name in HANDLERS:
            await p2p.add_binary_stream_handler(f"cocoon.{name}", self._stream_handler(name))

    # ------------------------------------------------------------------ streams
    def _stream_handler(self, name: str):
        step = getattr(self, f"_{name}")

        async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state: dict[str, Any] = {}
            try:
                while True:
                    try:
                        request = await read_frame(reader, ExpertRequest, self.max_bytes)
                    except (ProtocolError, RemoteError) as e:  # the frame boundary is lost: answer, then hang up
                        await write_error(writer, str(e))
                        return
                    if request is None:
                        return
                    try:
                        await write_frame(writer, await step(request, state))
                    except (RequestError, ProtocolError, SessionError) as e:
                        await write_error(writer, str(e))
                    if name != "inference":
                        return
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the caller went away
            except Exception as e:
                logger.exception(f"{name} failed")
                await _suppress(write_error(writer, f"internal server error: {type(e).__name__}: {e}"))
            finally:
                if "session" in state:
                    self.sessions.close(state["session"].session_id)
                await _caller_hung_up(reader)
                writer.close()

        return handle

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ------------------------------------------------------------------ inference
    async def _inference(self, request: ExpertRequest, state: dict[str, Any]) -> ExpertResponse:
        meta = unpack_metadata(request.metadata)
        session: Session | None = state.get("session")
        if session is None:
            if not self.accepting:
                raise RequestError("server is shutting down: open the session elsewhere")
            start, end = self._blocks(meta)
            max_length = _int(meta, "max_length", 1, self.limits.max_length)
            # deep prompts, LoRA weights or an adapter come with the first step and hold for the session
            inputs = self._inputs(request, meta, past=0, max_length=max_length, blocks=(start, end))
            session = self.sessions.open(start=start, end=end, batch_size=inputs.hidden.shape[0],
                                         max_length=max_length, cache=self.span.new_cache())
            session.lora = inputs.lora
            state["session"] = session
        else:
            session = self.sessions.get(session.session_id)
            inputs = self._inputs(request, meta, past=session.length, max_length=session.max_length)
            if inputs.hidden.shape[0] != session.batch_size:
                raise RequestError(f"batch of {inputs.hidden.shape[0]} in a session opened with {session.batch_size}")
        if "reorder" in meta:
            order = meta["reorder"]
            if not (isinstance(order, list) and len(order) == session.batch_size
                    and all(isinstance(i, int) and 0 <= i < session.batch_size for i in order)):
                raise RequestError(f"reorder must list {session.batch_size} row indices")
            await self._compute(session.cache.reorder_cache, torch.tensor(order, device=self.span.device))
        payer = self._charge_before(meta)
        inputs.lora = session.lora
        output = await self._compute(self._run, inputs, session.cache, (session.start, session.end))
        session.length += inputs.hidden.shape[1]
        response = _response(output, inputs, {})
        session.input_chain, attestation = self._attest(session.input_chain, inputs, response, session.start,
                                                        session.end)
        return _with_meta(response, {"length": session.length, **attestation,
                                     **self._charge_after(payer, inputs.hidden, session.start, session.end)})

    # ------------------------------------------------------------------ forward / backward / info
    async def _forward(self, request: ExpertRequest, state) -> ExpertResponse:
        meta = unpack_metadata(request.metadata)
        blocks = self._blocks(meta)
        inputs = self._inputs(request, meta, past=0, max_length=self.limits.max_length, blocks=blocks)
        payer = self._charge_before(meta)
        output = await self._compute(self._run, inputs, None, blocks)
        response = _response(output, inputs, {})
        _, attestation = self._attest(b"", inputs, response, *blocks)
        return _with_meta(response, {**attestation, **self._charge_after(payer, inputs.hidden, *blocks)})

    async def _backward(self, request: ExpertRequest, state) -> ExpertResponse:
        meta = unpack_metadata(request.metadata)
        blocks = self._blocks(meta)
        inputs = self._inputs(request, meta, past=0, max_length=self.limits.max_length, grad=True, blocks=blocks)
        payer = self._charge_before(meta)
        grads = await self._compute(self._run_backward, inputs, blocks)
        return _response(grads, inputs, self._charge_after(payer, inputs.hidden[0], *blocks, backward=True))

    async def _info(self, request: ExpertRequest, state) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata(self.info()))

    async def _pay(self, request: ExpertRequest, state) -> ExpertResponse:
        """A voucher sent on its own, e.g. when a client settles at the end of a generation."""
        self._charge_before(unpack_metadata(request.metadata), check_credit=False)
        return ExpertResponse(metadata=pack_metadata({"ok": True}))

    # ------------------------------------------------------------------ payment
    def _charge_before(self, meta: dict, check_credit: bool = True) -> tuple[str, int] | None:
        """Take the voucher a request carries, and refuse work beyond the client's credit."""
        if self.ledger is None:
            return None
        payer = meta.get("payer")
        if not (isinstance(payer, dict) and isinstance(payer.get("client"), str) and isinstance(payer.get("channel"), int)):
            raise RequestError(f"this server charges {self.ledger.prices.forward} wei per token x block: send "
                               f"metadata 'payer' = {{client, channel}} and vouchers (see from_pretrained(wallet=...))")
        if "voucher" in meta:
            try:
                record = dict(meta["voucher"])
                signature = bytes(record.pop("signature"))
                self.ledger.accept_voucher(Voucher.from_wire(record), signature)
            except (InvalidVoucher, ValueError, TypeError, KeyError) as e:
                raise RequestError(f"invalid voucher: {e}") from None
        if check_credit:
            try:
                self.ledger.check_credit(payer["client"], payer["channel"])
            except CreditLimitExceeded as e:
                raise RequestError(str(e)) from None
        return payer["client"], payer["channel"]

    def _attest(self, chain: bytes, inputs: Inputs, response: ExpertResponse, start: int, end: int):
        """Sign the hashes of this request's input (chained onto the session's) and of our output, as the
        values crossed the wire. Servers with no payout key (free ones) sign nothing."""
        if self.ledger is None:
            return chain, {}
        wire_output = unpack_tensors(response.tensors[:1], self.limits.max_numel(self.hidden_size))[0]
        chain = chain_hash(chain, inputs.wire_hidden.float().numpy())
        attestation = Attestation(self.ledger.payout, start, end, chain, array_hash(wire_output.float().numpy()))
        return chain, {"attestation": attestation.signed(self.ledger.signer.key).to_wire()}

    def _charge_after(self, payer, hidden: torch.Tensor, start: int, end: int, backward: bool = False) -> dict:
        if payer is None:
            return {}
        receipt = self.ledger.record(*payer, tokens=hidden.shape[0] * hidden.shape[1], blocks=end - start,
                                     backward=backward)
        return {"receipt": receipt.to_wire()}

    # ------------------------------------------------------------------ compute (in the executor)
    @torch.inference_mode()
    def _run(self, inputs: Inputs, cache, blocks: tuple[int, int]) -> torch.Tensor:
        with self._lora(blocks, inputs.lora):
            return self.span(inputs.hidden, cache=cache, attention_mask=inputs.attention_mask,
                             position_ids=inputs.position_ids, blocks=blocks, prompts=inputs.prompts)

    def _lora(self, blocks: tuple[int, int], lora: LoraWeights | None):
        return contextlib.nullcontext() if lora is None else applied_lora(self.span, blocks, lora)

    def _run_backward(self, inputs: Inputs, blocks: tuple[int, int]) -> list[torch.Tensor]:
        """Gradients w.r.t. the span's input, and w.r.t. the deep prompts and the client's LoRA weights
        when the request has them (a served adapter is frozen)."""
        hidden, grad_output = inputs.hidden
        with torch.enable_grad():
            hidden = hidden.detach().requires_grad_(True)
            prompts = None if inputs.prompts is None else inputs.prompts.detach().requires_grad_(True)
            lora, trained = inputs.lora, None
            if lora is not None and inputs.lora_trainable:
                trained = lora.weights.detach().requires_grad_(True)
                lora = LoraWeights(lora.targets, lora.rank, lora.scale, trained)
            with self._lora(blocks, lora):
                output = self.span(hidden, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                                   blocks=blocks, prompts=prompts)
            leaves = [t for t in (hidden, prompts, trained) if t is not None]
            return list(torch.autograd.grad(output, leaves, grad_output))

    # ------------------------------------------------------------------ validation
    def _blocks(self, meta: dict) -> tuple[int, int]:
        start = _int(meta, "start", self.span.start, self.span.end - 1)
        end = _int(meta, "end", start + 1, self.span.end)
        return start, end

    def _inputs(self, request: ExpertRequest, meta: dict, *, past: int, max_length: int, grad: bool = False,
                blocks: tuple[int, int] | None = None) -> Inputs:
        names = meta.get("tensors", [])
        expected = ["hidden", "grad_output"] if grad else ["hidden"]
        if (not isinstance(names, list) or names[:len(expected)] != expected
                or not set(names[len(expected):]) <= set(OPTIONAL_INPUTS) or len(set(names)) != len(names)):
            raise RequestError(f"metadata 'tensors' must be {expected} followed by any of {list(OPTIONAL_INPUTS)}")
        if len(names) != len(request.tensors):
            raise RequestError(f"metadata names {len(names)} tensors but the request carries {len(request.tensors)}")
        tensors = dict(zip(names, unpack_tensors(request.tensors, self.limits.max_numel(self.hidden_size))))
        hidden = self._hidden(tensors["hidden"], "hidden")
        batch, length = hidden.shape[:2]
        if past + length > max_length:
            raise RequestError(f"{past} + {length} tokens exceed the session's max_length {max_length}")
        position_ids, attention_mask = tensors.get("position_ids"), tensors.get("attention_mask")
        if position_ids is not None:
            _check_ints(position_ids, "position_ids", (batch, length), 0, self.span.config.max_position_embeddings - 1)
        if attention_mask is not None:
            _check_ints(attention_mask, "attention_mask", (batch, past + length), 0, 1)
        device = self.span.device
        position_ids = position_ids.to(device) if position_ids is not None else None
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        compression = request.tensors[0].compression
        wire_dtype = tensors["hidden"].dtype
        if grad:
            grad_output = self._hidden(tensors["grad_output"], "grad_output")
            if grad_output.shape != hidden.shape:
                raise RequestError(f"grad_output shape {list(grad_output.shape)} != hidden shape {list(hidden.shape)}")
            hidden = (hidden, grad_output)
        prompts = tensors.get("prompts")
        if prompts is not None:
            if blocks is None:
                raise RequestError("deep prompts go with forward and backward requests or an inference session's "
                                   "first step")
            shape = (blocks[1] - blocks[0], batch, prompts.shape[2] if prompts.ndim == 4 else -1, self.hidden_size)
            if prompts.ndim != 4 or tuple(prompts.shape) != shape or not 1 <= shape[2] <= length:
                raise RequestError(f"prompts must have shape [blocks {shape[0]}, batch {batch}, prefix <= {length}, "
                                   f"{self.hidden_size}], got {list(prompts.shape)}")
            if not prompts.is_floating_point() or not torch.isfinite(prompts).all():
                raise RequestError("prompts must be finite floating point values")
            prompts = prompts.to(self.span.dtype_).to(self.span.device)
        lora, trainable = self._lora_inputs(tensors.get("lora"), meta, blocks)
        return Inputs(hidden, position_ids, attention_mask, compression, wire_dtype, prompts, tensors["hidden"], lora,
                      trainable)

    def _lora_inputs(self, weights: torch.Tensor | None, meta: dict,
                     blocks: tuple[int, int] | None) -> tuple[LoraWeights | None, bool]:
        """A served adapter picked by name, or a client's LoRA weights [blocks, per-block numel] (laid out as
        shards.lora describes) sent as a tensor or named by the hash of weights sent before."""
        adapter, config = meta.get("adapter"), meta.get("lora")
        if adapter is None and config is None and weights is None:
            return None, False
        if blocks is None:
            raise RequestError("LoRA weights and adapters go with forward and backward requests or an inference "
                               "session's first step")
        if adapter is not None:
            if weights is not None or config is not None:
                raise RequestError("send either an adapter name or LoRA weights, not both")
            served = self.adapters.get(adapter) if isinstance(adapter, str) else None
            if served is None:
                raise RequestError(f"this server does not serve adapter {adapter!r}; it serves "
                                   f"{sorted(self.adapters) or 'none'}")
            rows = served.weights[blocks[0] - self.span.start:blocks[1] - self.span.start]
            return LoraWeights(served.targets, served.rank, served.scale, rows), False
        if not (isinstance(config, dict) and isinstance(config.get("targets"), list) and config["targets"]
                and all(isinstance(t, str) for t in config["targets"])):
            raise RequestError("metadata 'lora' must be {targets: [module names], rank, alpha}")
        rank = _int(config, "rank", 1, self.limits.max_lora_rank)
        alpha = config.get("alpha")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 1e6:
            raise RequestError("metadata 'lora' alpha must be a positive number")
        try:
            layout = lora_layout(self.span, blocks[0], config["targets"])
        except ValueError as e:
            raise RequestError(str(e)) from None
        shape = (blocks[1] - blocks[0], lora_numel(layout, rank, 1))
        if weights is None:
            key = config.get("hash")
            stored = self.lora_cache.get(key) if isinstance(key, str) else None
            if stored is None:
                raise RequestError(f"lora weights not cached: {key!r} is not on this server; send the weights")
        else:
            if not weights.is_floating_point() or not torch.isfinite(weights).all():
                raise RequestError("lora weights must be finite floating point values")
            stored = weights.to(self.span.dtype_).to(self.span.device)
        if tuple(stored.shape) != shape:
            raise RequestError(f"lora weights must have shape {list(shape)} for rank {rank} and targets "
                               f"{config['targets']}, got {list(stored.shape)}")
        if weights is not None:
            self.lora_cache.put(weights, stored)
        return LoraWeights(config["targets"], rank, alpha / rank, stored), True

    def _hidden(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise RequestError(f"{name} must be floating point, got {tensor.dtype}")
        if tensor.ndim != 3 or tensor.shape[-1] != self.hidden_size or tensor.shape[1] < 1:
            raise RequestError(f"{name} must have shape [batch, tokens, {self.hidden_size}], got {list(tensor.shape)}")
        if not 1 <= tensor.shape[0] <= self.limits.max_batch:
            raise RequestError(f"batch of {tensor.shape[0]} is outside 1..{self.limits.max_batch}")
        if tensor.shape[0] * tensor.shape[1] > self.limits.max_tokens_per_request:
            raise RequestError(f"{tensor.shape[0] * tensor.shape[1]} tokens in one request exceed the limit of "
                               f"{self.limits.max_tokens_per_request}")
        if not torch.isfinite(tensor).all():
            raise RequestError(f"{name} contains NaN or inf")
        return tensor.to(self.span.dtype_).to(self.span.device)


def _response(outputs: torch.Tensor | list[torch.Tensor], inputs: Inputs, meta: dict) -> ExpertResponse:
    outputs = [t.to(inputs.wire_dtype).cpu() for t in (outputs if isinstance(outputs, list) else [outputs])]
    compression = inputs.compression if inputs.wire_dtype == torch.float32 else CompressionType.NONE
    return ExpertResponse(tensors=pack_tensors(outputs, compression), metadata=pack_metadata(meta))


def _with_meta(response: ExpertResponse, meta: dict) -> ExpertResponse:
    response.metadata = pack_metadata(meta)
    return response


def _int(meta: dict, key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"metadata {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _check_ints(tensor: torch.Tensor, name: str, shape: tuple[int, int], low: int, high: int) -> None:
    if tensor.dtype != torch.int64 or tuple(tensor.shape) != shape:
        raise RequestError(f"{name} must be int64 of shape {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
    if tensor.numel() and (tensor.min() < low or tensor.max() > high):
        raise RequestError(f"{name} values must lie in [{low}, {high}]")


async def _caller_hung_up(reader: asyncio.StreamReader, seconds: float = LINGER_SECONDS) -> None:
    """Wait (discarding whatever still arrives) until the caller closes its end. When the handler's end closes
    first, p2pd may reset the stream before the last response has crossed it, and the caller sees a bare EOF."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass


async def _suppress(awaitable: Awaitable) -> None:
    try:
        await awaitable
    except Exception:
        pass
