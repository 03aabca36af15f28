"""Requests, as the client builds them and as a server checks them. Each RPC's request is a record:

    inference   InferenceStep (one per step of a stream)     forward   SpanRequest
    push        PushStep (server to server)                  backward  BackwardRequest (with grad_output)
    pay         PayRequest

A message is a hivemind ``ExpertRequest``: tensors (swarm.wire.tensors) and msgpack metadata whose keys are
the record's field names (swarm.wire.fields). ``record.pack()`` builds one; ``Record.parse(message, bounds)``
checks every field of an untrusted one against what the record allows and requires (as data: ``ALLOWED``,
``REQUIRED``, and for a session's later steps ``LATER_ALLOWED``, ``LATER_REQUIRED``) and raises ``WireError``
with an ``ErrorCode``. Fields whose metadata names ``COMPACT`` kinds are those swarm.wire.compact's layout
carries for those kinds: a step with any other field set goes as a full frame.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from hivemind.proto.runtime_pb2 import ExpertRequest

from routing.addresses import ROUTE_ID
from swarm.wire import int8_rows, push_proof
from swarm.wire.codes import bad
from swarm.wire.fields import pack_metadata, read_int, read_map, read_str, short, unpack_metadata
from swarm.wire.limits import Limits
from swarm.wire.payloads import Accept, LoraSpec, Payment, Route
from swarm.wire.protocol import PROTOCOL_VERSION, check_protocol
from swarm.wire.tensors import (COMPRESSION, WIRE_DTYPES, all_finite, dtype_name, pack_tensor, tensor_bytes,
                                unpack_tensor)

COMPACT = "compact"  # field metadata: the kinds of step (InferenceStep.kind) whose compact frame carries the field


@dataclass(frozen=True)
class Bounds:
    """What a server checks a request against: its limits and what it serves."""
    limits: Limits
    hidden_size: int
    start: int               # the server's span [start, end)
    end: int
    max_position: int        # the model's max_position_embeddings

    @property
    def max_numel(self) -> int:
        return self.limits.max_numel(self.hidden_size)

    def tensor_numel(self, name: str) -> int:
        """The most elements tensor ``name`` of a request may have (per-block tensors: for every block)."""
        blocks = self.end - self.start
        if name == "prompts":
            return blocks * self.limits.max_tokens_per_request * self.hidden_size
        if name == "lora":  # rank x (in + out) per target, for at most 16 targets 8 x hidden_size wide
            return blocks * self.limits.max_lora_rank * 16 * 8 * self.hidden_size
        return self.max_numel


ACTIVATIONS = ("hidden", "grad_output", "prompts")   # in the request's wire dtype
TENSORS = ("hidden", "grad_output", "position_ids", "attention_mask", "prompts", "lora")  # wire order


@dataclass
class SpanRequest:
    """Work on blocks [start, end) of a server: ``forward``, ``backward`` (with ``grad_output``), and the
    steps of an ``inference`` stream (see InferenceStep). Tensors are on the CPU in their wire dtype.

    hidden          [batch, tokens, hidden_size]
    position_ids    int64 [batch, tokens]          (default: continuing positions, no padding)
    attention_mask  int64 [batch, past + tokens]   1 = attend, 0 = padding
    prompts         [blocks, batch, prefix, hidden_size]: deep prompts added before each block
    lora            [blocks, per-block numel]: a client's LoRA weights (layout in shards.lora)
    """
    hidden: torch.Tensor = field(metadata={COMPACT: ("inference", "push")})
    start: int | None = None
    end: int | None = None
    grad_output: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    lora: torch.Tensor | None = None
    lora_spec: LoraSpec | None = None
    adapter: str | None = None
    payment: Payment | None = None
    codec: str | None = None  # "int8": the client takes long outputs in 8-bit rows (swarm.wire.int8_rows)

    kind: ClassVar[str] = "forward"
    # the fields a request may carry and those it must, in a session's first step and in its later ones
    ALLOWED: ClassVar[frozenset[str]] = frozenset({"hidden", "start", "end", "position_ids", "attention_mask",
                                                   "prompts", "lora", "lora_spec", "adapter", "payment", "codec"})
    REQUIRED: ClassVar[frozenset[str]] = frozenset({"hidden", "start", "end"})
    LATER_ALLOWED: ClassVar[frozenset[str]] = ALLOWED
    LATER_REQUIRED: ClassVar[frozenset[str]] = REQUIRED

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    # -------------------------------------------------------------- client side
    def pack(self) -> ExpertRequest:
        names = [name for name in TENSORS if getattr(self, name) is not None]
        meta = {"protocol": PROTOCOL_VERSION, "dtype": dtype_name(self.dtype), "compression": COMPRESSION,
                "tensors": names}
        for name in (f.name for f in dataclasses.fields(self)):
            value = getattr(self, name)
            if name in TENSORS or value is None:
                continue
            meta[name] = value.to_wire() if hasattr(value, "to_wire") else value
        return ExpertRequest(tensors=[pack_tensor(getattr(self, n)) for n in names], metadata=pack_metadata(meta))

    def expected_reply(self, lora_shape: tuple[int, ...] | None = None) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the reply's tensors, so that a client bounds the reply before reading it. A
        backward returns the gradient of hidden, then of the prompts and of the LoRA weights (of
        ``lora_shape`` when they are named by hash; in float32: they are a client's trainable weights)."""
        expected = [(tuple(self.hidden.shape), self.dtype)]
        if self.grad_output is not None:
            if self.prompts is not None:
                expected.append((tuple(self.prompts.shape), self.dtype))
            if self.lora is not None or lora_shape is not None:
                expected.append((tuple(self.lora.shape if self.lora is not None else lora_shape), torch.float32))
        return expected

    # -------------------------------------------------------------- server side
    @classmethod
    def parse(cls, message: ExpertRequest, bounds: Bounds, *, opening: bool = True) -> "SpanRequest":
        """Check an untrusted request; ``opening`` is False for an inference stream's later steps."""
        meta = unpack_metadata(message.metadata)
        if opening or "protocol" in meta:  # (a session's later steps were checked when it opened)
            check_protocol(meta.get("protocol"), "the client")
        names = meta.get("tensors")
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                or names != [n for n in TENSORS if n in names]):
            raise bad(f"metadata 'tensors' must name distinct tensors in the order {list(TENSORS)}, got "
                      f"{short(names)}")
        if len(names) != len(message.tensors):
            raise bad(f"metadata names {len(names)} tensors but the request carries {len(message.tensors)}")
        dtype = WIRE_DTYPES.get(meta["dtype"]) if isinstance(meta.get("dtype"), str) else None
        if dtype is None:
            raise bad(f"metadata 'dtype' must be one of {list(WIRE_DTYPES)}, got {short(meta.get('dtype'))}")
        if meta.get("compression", COMPRESSION) != COMPRESSION:
            raise bad(f"metadata 'compression' must be {COMPRESSION!r}")
        tensors = {name: unpack_tensor(proto, name, bounds.tensor_numel(name))
                   for name, proto in zip(names, message.tensors)}
        for name in ACTIVATIONS:
            if name in tensors and tensors[name].dtype != dtype:
                raise bad(f"tensor {name!r} is {dtype_name(tensors[name].dtype)} but the request's dtype is "
                          f"{dtype_name(dtype)}")
        allowed, required = (cls.ALLOWED, cls.REQUIRED) if opening else (cls.LATER_ALLOWED, cls.LATER_REQUIRED)
        present = set(tensors) | (set(meta) - _FRAMING)  # a field this version does not know is refused
        if not present <= allowed:
            raise bad(f"a {cls.kind} request{'' if opening else ' after the first step'} may not carry "
                      f"{sorted(present - allowed)}")
        missing = required - present
        if missing:
            raise bad(f"a {cls.kind} request{'' if opening else ' after the first step'} must carry {sorted(missing)}")

        if "hidden" not in tensors:
            raise bad("a request must carry 'hidden'")
        hidden = tensors["hidden"]
        by_push = opening and meta.get("by_push") is not None and "by_push" in cls.ALLOWED  # (its input comes later)
        check_activations(hidden, "hidden", bounds, min_tokens=0 if by_push else 1)
        batch, length = hidden.shape[:2]
        start = end = None
        if "start" in meta:
            start = read_int(meta, "start", bounds.start, bounds.end - 1)
            end = read_int(meta, "end", start + 1, bounds.end)
        grad_output = tensors.get("grad_output")
        if grad_output is not None and grad_output.shape != hidden.shape:
            raise bad(f"grad_output shape {list(grad_output.shape)} != hidden shape {list(hidden.shape)}")
        if grad_output is not None and not all_finite(grad_output):
            raise bad("grad_output contains NaN or inf")
        position_ids, attention_mask = tensors.get("position_ids"), tensors.get("attention_mask")
        if position_ids is not None:
            check_ints(position_ids, "position_ids", (batch, length), 0, bounds.max_position - 1)
        if attention_mask is not None:
            if attention_mask.dtype != torch.int64 or attention_mask.ndim != 2 or attention_mask.shape[0] != batch \
                    or not length <= attention_mask.shape[1] <= bounds.limits.max_length:
                raise bad(f"attention_mask must be int64 of shape [{batch}, past + {length}], got "
                          f"{dtype_name(attention_mask.dtype)} {list(attention_mask.shape)}")
            check_ints(attention_mask, "attention_mask", tuple(attention_mask.shape), 0, 1)
        prompts = tensors.get("prompts")
        if prompts is not None:
            prefix = prompts.shape[2] if prompts.ndim == 4 else -1
            if prompts.ndim != 4 or tuple(prompts.shape) != (end - start, batch, prefix, bounds.hidden_size) \
                    or not 1 <= prefix <= length:
                raise bad(f"prompts must have shape [blocks {end - start}, batch {batch}, prefix <= {length}, "
                          f"{bounds.hidden_size}], got {list(prompts.shape)}")
            if not all_finite(prompts):
                raise bad("prompts must be finite")
        lora, lora_spec, adapter = tensors.get("lora"), None, None
        if "lora_spec" in meta:
            lora_spec = LoraSpec.from_wire(read_map(meta, "lora_spec", required=True), bounds.limits.max_lora_rank)
        if lora is not None:
            if lora_spec is None:
                raise bad("LoRA weights need metadata 'lora_spec' = {targets, rank, alpha}")
            if not lora.is_floating_point() or lora.ndim != 2 or lora.shape[0] != end - start:
                raise bad(f"lora weights must be floating point [blocks {end - start}, per-block numel], "
                          f"got {dtype_name(lora.dtype)} {list(lora.shape)}")
            if not all_finite(lora):
                raise bad("lora weights must be finite")
        elif lora_spec is not None and lora_spec.hash is None:
            raise bad("metadata 'lora_spec' without weights must name weights sent before by 'hash'")
        if "adapter" in meta:
            adapter = read_str(meta, "adapter")
            if lora_spec is not None:
                raise bad("send either an adapter name or LoRA weights, not both")
        payment = Payment.from_wire(read_map(meta, "payment", required=True)) if "payment" in meta else None
        codec = read_str(meta, "codec", required=False)
        if codec not in (None, int8_rows.NAME):
            raise bad(f"metadata 'codec' must be {int8_rows.NAME!r} or absent, got {short(codec)}")
        request = cls(hidden, start, end, grad_output, position_ids, attention_mask, prompts, lora, lora_spec, adapter,
                      payment, codec)
        request._parse_own(meta, opening, bounds)
        return request

    def _parse_own(self, meta: dict, opening: bool, bounds: Bounds) -> None:
        """Fields of a subclass."""


class BackwardRequest(SpanRequest):
    kind: ClassVar[str] = "backward"
    ALLOWED: ClassVar[frozenset[str]] = SpanRequest.ALLOWED | {"grad_output"}
    REQUIRED: ClassVar[frozenset[str]] = SpanRequest.REQUIRED | {"grad_output"}


@dataclass
class InferenceStep(SpanRequest):
    """One step of an inference stream. The first step opens the session on blocks [start, end) for at most
    ``max_length`` tokens, with the session's deep prompts, LoRA weights or adapter; later steps carry only
    the new tokens (and, in beam search, the order of rows to ``reorder`` the KV cache by first).

    Server-to-server push (swarm.server.push): ``push`` tells this server to send its output from now on to
    the next server of the client's chain ({to: peer id, id: route id, direct: [host:port]}, or {} to stop);
    ``accept`` tells it to take this session's input from the previous server ({from: peer id, id: route
    id}, or {} to stop). ``position`` is the session's length before the step, so that a step the server
    already took from a push is recognised. A pushed step (kind "push", on a server's ``push`` stream) names
    the receiving session by ``route_id``. ``compact`` (first step only): the client reads replies in
    swarm.wire.compact's layout, and sends its later decode steps so when the server says it takes them.
    ``by_push`` (first step only): the step's ``by_push`` tokens will come pushed from the server ``accept``
    names, and ``hidden`` carries none; the server answers each piece of them once it has computed it (a long
    prompt then crosses each hop once, as a push, instead of from the client to every server: ``piece_bounds``)."""
    max_length: int | None = None
    reorder: list[int] | None = None
    position: int | None = field(default=None, metadata={COMPACT: ("inference", "push")})
    push: Route | None = None
    accept: Accept | None = None
    route_id: str | None = field(default=None, metadata={COMPACT: ("push",)})
    compact: bool | None = None
    by_push: int | None = None  # first step only: this many tokens come pushed from the previous server (hidden: none)
    # a pushed step: the pusher's proof of what it pushed, for which of its inputs (swarm.wire.push_proof)
    push_proof: bytes | None = field(default=None, metadata={COMPACT: ("push",)})

    kind: ClassVar[str] = "inference"
    # digest()'s first half, when swarm.wire.compact took it from the frame's bytes (no torch calls); not on the wire
    hidden_digest: ClassVar[str | None] = None

    ALLOWED: ClassVar[frozenset[str]] = SpanRequest.ALLOWED | {"max_length", "compact", "position", "push", "accept",
                                                                "by_push"}
    REQUIRED: ClassVar[frozenset[str]] = SpanRequest.REQUIRED | {"max_length"}
    LATER_ALLOWED: ClassVar[frozenset[str]] = frozenset({"hidden", "position_ids", "attention_mask", "reorder",
                                                         "payment", "position", "push", "accept"})
    LATER_REQUIRED: ClassVar[frozenset[str]] = frozenset({"hidden"})

    def _parse_own(self, meta: dict, opening: bool, bounds: Bounds) -> None:
        if opening and "max_length" in self.REQUIRED:
            self.max_length = read_int(meta, "max_length", 1, bounds.limits.max_length)
            self.compact = meta.get("compact") is True
            self.by_push = read_int(meta, "by_push", 1, self.max_length, required=False)
        if (self.hidden.shape[1] == 0) != bool(self.by_push) or (self.by_push and "accept" not in meta):
            raise bad("a step's hidden states carry no tokens exactly when they come by push: 'by_push' on a first "
                      "step, with 'accept' naming the previous server")
        if "reorder" in meta:
            order, batch = meta["reorder"], self.hidden.shape[0]
            if not (isinstance(order, list) and len(order) == batch
                    and all(type(i) is int and 0 <= i < batch for i in order)):
                raise bad(f"reorder must list {batch} row indices in [0, {batch})")
            self.reorder = order
        self.position = read_int(meta, "position", 0, bounds.limits.max_length, required=False)
        self.route_id = read_str(meta, "route_id", ROUTE_ID, required=False)
        self.push_proof = push_proof.read(meta)
        push, accept = read_map(meta, "push"), read_map(meta, "accept")
        self.push = Route.from_wire(push) if push is not None else None
        self.accept = Accept.from_wire(accept) if accept is not None else None

    def digest(self) -> str:
        """What the step's output depends on besides the KV cache, so that a server tells a pushed step from the
        client's own by comparing digests: 32 hex digits for ``hidden`` (what the previous server answers
        for), then 32 for the rest (what the client sends every server)."""
        hidden = self.hidden_digest or hidden_state_digest(self.hidden.dtype, self.hidden.shape,
                                                           tensor_bytes(self.hidden))
        if self.position_ids is None and self.attention_mask is None and self.reorder is None:
            return hidden + _PLAIN_STEP  # a decode step's
        rest = hashlib.blake2b(digest_size=16)
        for tensor in (self.position_ids, self.attention_mask):
            rest.update(b"-" if tensor is None else dtype_name(tensor.dtype).encode() + repr(tuple(tensor.shape))
                        .encode() + tensor_bytes(tensor))
        rest.update(repr(self.reorder).encode())
        return hidden + rest.hexdigest()


def hidden_state_digest(dtype: torch.dtype, shape: Sequence[int], raw) -> str:
    """InferenceStep.digest()'s first half: of the hidden states, given their raw bytes (as tensor_bytes has them)."""
    h = hashlib.blake2b(dtype_name(dtype).encode() + repr(tuple(shape)).encode(), digest_size=16)
    h.update(raw)
    return h.hexdigest()


_PLAIN_STEP = hashlib.blake2b(b"--" + repr(None).encode(), digest_size=16).hexdigest()  # no ids, mask, reorder


class PushStep(InferenceStep):
    """A step pushed by the previous server of a client's chain, onto the session that took route ``route_id``."""
    kind: ClassVar[str] = "push"
    ALLOWED: ClassVar[frozenset[str]] = frozenset({"hidden", "position_ids", "attention_mask", "reorder", "position",
                                                   "route_id", "push_proof"})
    REQUIRED: ClassVar[frozenset[str]] = frozenset({"hidden", "position", "route_id"})
    LATER_ALLOWED: ClassVar[frozenset[str]] = ALLOWED
    LATER_REQUIRED: ClassVar[frozenset[str]] = REQUIRED


PIECE_BYTES = 128 << 10  # a session's first step is pushed along a chain in pieces of about this many 16-bit bytes...
MIN_PIECE_TOKENS = 64    # ...and at least this many tokens (fewer would cost a server more steps than bytes)


def piece_bounds(tokens: int, hidden_size: int, position: int) -> list[tuple[int, int]]:
    """Where a step of ``tokens`` at ``position`` is cut when pushed (swarm.server.push): a session's first step in
    pieces, so that each server of a chain computes and pushes on one piece while the previous one pushes it the
    next; every later step whole (the client sends its own copy of those, a step at a time)."""
    size = max(MIN_PIECE_TOKENS, PIECE_BYTES // (2 * hidden_size)) if position == 0 else tokens
    return [(a, min(a + size, tokens)) for a in range(0, tokens, size)]


def piece(step: InferenceStep, hidden: torch.Tensor, a: int, b: int, cls: type[InferenceStep] = InferenceStep,
          **fields) -> InferenceStep:
    """Tokens [a, b) of ``step`` (which starts at ``step.position``), with ``hidden`` for the step's hidden states
    (its input, or a server's output for it): what both ends of a push hash for that piece."""
    ids, mask, tokens = step.position_ids, step.attention_mask, hidden.shape[1]
    return cls(int8_rows.token_slice(hidden, a, b), position_ids=None if ids is None else ids[:, a:b],
               attention_mask=None if mask is None else mask[:, :mask.shape[1] - tokens + b],
               reorder=step.reorder if a == 0 else None, position=(step.position or 0) + a, **fields)


_FRAMING = {"protocol", "dtype", "compression", "tensors"}  # metadata about the message, not a field of the record


def check_activations(tensor: torch.Tensor, name: str, bounds: Bounds, min_tokens: int = 1) -> None:
    limits = bounds.limits
    if tensor.ndim != 3 or tensor.shape[-1] != bounds.hidden_size or tensor.shape[1] < min_tokens:
        raise bad(f"{name} must have shape [batch, tokens, {bounds.hidden_size}], got {list(tensor.shape)}")
    if not 1 <= tensor.shape[0] <= limits.max_batch:
        raise bad(f"batch of {tensor.shape[0]} is outside 1..{limits.max_batch}")
    if tensor.shape[0] * tensor.shape[1] > limits.max_tokens_per_request:
        raise bad(f"{tensor.shape[0] * tensor.shape[1]} tokens in one request exceed the limit of "
                  f"{limits.max_tokens_per_request}")
    if not all_finite(tensor):
        raise bad(f"{name} contains NaN or inf")


def check_ints(tensor: torch.Tensor, name: str, shape: tuple[int, ...], low: int, high: int) -> None:
    if tensor.dtype != torch.int64 or tuple(tensor.shape) != tuple(shape):
        raise bad(f"{name} must be int64 of shape {list(shape)}, got {dtype_name(tensor.dtype)} {list(tensor.shape)}")
    if tensor.numel() and (tensor.min() < low or tensor.max() > high):
        raise bad(f"{name} values must lie in [{low}, {high}]")


@dataclass
class PayRequest:
    """A voucher sent on its own, e.g. when a client settles at the end of a generation."""
    payment: Payment

    def pack(self) -> ExpertRequest:
        return ExpertRequest(metadata=pack_metadata({"protocol": PROTOCOL_VERSION, "payment": self.payment.to_wire()}))

    @classmethod
    def parse(cls, message: ExpertRequest) -> "PayRequest":
        meta = unpack_metadata(message.metadata)
        check_protocol(meta.get("protocol"), "the client")
        return cls(Payment.from_wire(read_map(meta, "payment", required=True)))
