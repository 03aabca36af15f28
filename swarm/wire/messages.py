"""The wire contract: every record that crosses between a client and a server, packed in one place and
parsed (and validated) in one place.

A message is a hivemind ``ExpertRequest`` / ``ExpertResponse`` protobuf: tensors in hivemind's
serialization, uncompressed (a tensor's dtype is its wire dtype), and msgpack metadata whose keys are the
records' field names. Each RPC has a request record and a reply record:

    inference   InferenceStep (one per step of a stream)  -> SpanReply (the span's output)
    forward     SpanRequest                               -> SpanReply (the span's output)
    backward    SpanRequest with grad_output              -> SpanReply (gradients: hidden, prompts, lora)
    info        (empty)                                   -> InfoReply
    pay         PayRequest                                -> PayReply
    any of them                                           -> ErrorReply (code, message)

``record.pack()`` builds a message; ``Record.parse(message, ...)`` checks every field of an untrusted one
and raises ``WireError`` with an ``ErrorCode``. A client raises ``RemoteError`` for an ``ErrorReply`` and
``InvalidReply`` for a reply that breaks the contract (wrong shape, dtype, size, NaN): the latter is the
server's fault.

Activations cross in 16 bits by default: bfloat16 and float16 as themselves, float32 as bfloat16 (never
float16: its range ends at 65504, and real models have activation outliers beyond it) or as float32 with
``exact_wire``. The server computes in its own dtype and answers in the dtype the request names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import msgpack
import numpy
import torch
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType, ExpertRequest, ExpertResponse

from swarm.wire.codes import BUSY, CALLER_ERRORS, ErrorCode, InvalidReply, RemoteError, WireError, bad  # noqa: F401
from swarm.wire.limits import Limits

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TENSOR_DTYPES = {**WIRE_DTYPES, "int64": torch.int64}
COMPRESSION = "none"  # the only one: 16-bit activations are sent as 16-bit tensors, not compressed
MAX_DIMS = 4
MAX_METADATA_BYTES = 64 << 10   # metadata is small; tensors carry the bulk
MAX_CONTAINER_LEN = 4096        # longest msgpack array or map in metadata (a beam reorder is one entry per row)
MAX_STR_LEN = 1024
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_HASH = re.compile(r"[0-9a-f]{1,64}")
_ROUTE_ID = re.compile(r"[0-9a-f]{32}")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,64}")  # base58
DIRECT_ADDRESS = re.compile(r"[0-9a-fA-F.:\[\]]{3,47}:[0-9]{1,5}")
MAX_DIRECT_ADDRESSES = 4
UINT256 = 2**256


# ------------------------------------------------------------------ dtypes and tensors
def wire_dtype(dtype: torch.dtype, exact: bool = False) -> torch.dtype:
    """The dtype activations of ``dtype`` cross the network in."""
    if dtype == torch.float32:
        return torch.float32 if exact else torch.bfloat16
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    raise ValueError(f"activations must be float32, bfloat16 or float16, not {dtype}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's values, row-major, as raw bytes."""
    # each torch call costs tens of microseconds on a decode step's cold caches: only the ones needed
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bfloat16
    return raw.numpy().tobytes()


def pack_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    return runtime_pb2.Tensor(buffer=tensor_bytes(tensor), size=tensor.shape, dtype=dtype_name(tensor.dtype),
                              compression=CompressionType.NONE)


def unpack_tensor(proto: runtime_pb2.Tensor, name: str, max_numel: int) -> torch.Tensor:
    """An untrusted tensor: dtype, compression, shape and buffer size are checked before the buffer is read."""
    dtype = _TENSOR_DTYPES.get(proto.dtype)
    if dtype is None:
        raise bad(f"tensor {name!r} has dtype {proto.dtype!r}; allowed: {', '.join(_TENSOR_DTYPES)}")
    if proto.compression != CompressionType.NONE:
        raise bad(f"tensor {name!r} uses compression {proto.compression}; allowed: {COMPRESSION}")
    shape = list(proto.size)
    if len(shape) > MAX_DIMS or any(not 0 <= d <= max_numel for d in shape):
        raise bad(f"tensor {name!r} has shape {shape[:8]}: at most {MAX_DIMS} dimensions of at most {max_numel}")
    numel = math.prod(shape)
    if numel > max_numel:
        raise WireError(ErrorCode.TOO_LARGE, f"tensor {name!r} has {numel} elements; the limit is {max_numel}")
    itemsize = dtype.itemsize
    if len(proto.buffer) != numel * itemsize:
        raise bad(f"tensor {name!r}: buffer of {len(proto.buffer)} bytes does not hold {proto.dtype} {shape}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(proto.buffer), dtype=dtype).view(shape)


_EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def all_finite(tensor: torch.Tensor) -> bool:
    """``torch.isfinite(tensor).all()`` through numpy, at about half the cost on a decode step's cold caches."""
    if tensor.requires_grad or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    if tensor.dtype in _EXPONENT_BITS:
        return finite_values(tensor.view(torch.int16).numpy(), tensor.dtype)
    if tensor.dtype in (torch.float32, torch.float64):
        return finite_values(tensor.numpy(), tensor.dtype)
    return bool(torch.isfinite(tensor).all())


def finite_values(values: numpy.ndarray, dtype: torch.dtype) -> bool:
    """Whether no value is NaN or inf: ``values`` of a float32 or float64 tensor, or the bits (16-bit integers)
    of a bfloat16 or float16 one, which numpy lacks: such a float is NaN or inf when its exponent bits are all
    ones."""
    mask = _EXPONENT_BITS.get(dtype)
    if mask is None:
        return bool(numpy.isfinite(values).all())
    return not ((values & mask) == mask).any()


# ------------------------------------------------------------------ metadata
def pack_metadata(metadata: dict[str, Any]) -> bytes:
    return msgpack.packb(metadata, use_bin_type=True)


def unpack_metadata(data: bytes) -> dict[str, Any]:
    """Untrusted msgpack, bounded apart from tensors: size, container lengths, string lengths."""
    if not data:
        return {}
    if len(data) > MAX_METADATA_BYTES:
        raise WireError(ErrorCode.TOO_LARGE, f"metadata of {len(data)} bytes exceeds the limit of {MAX_METADATA_BYTES}")
    try:
        metadata = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=MAX_STR_LEN,
                                   max_bin_len=MAX_METADATA_BYTES, max_array_len=MAX_CONTAINER_LEN,
                                   max_map_len=64, max_ext_len=0)
    except Exception as e:
        raise bad(f"metadata is not valid msgpack within its limits: {type(e).__name__}") from None
    if not isinstance(metadata, dict):
        raise bad("metadata must be a msgpack map")
    return metadata


def _int(meta: dict, key: str, low: int, high: int, *, required: bool = True) -> int | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if type(value) is not int or not low <= value <= high:
        raise bad(f"metadata {key!r} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def _str(meta: dict, key: str, pattern: re.Pattern | None = None, *, required: bool = True) -> str | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        expected = f"a string matching {pattern.pattern}" if pattern is not None else "a string"
        raise bad(f"metadata {key!r} must be {expected}, got {_short(value)}")
    return value


def _map(meta: dict, key: str, *, required: bool = False) -> dict | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, dict):
        raise bad(f"metadata {key!r} must be a map, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------ parts of a request
@dataclass
class LoraSpec:
    """How to read a request's LoRA weights (layout in shards.lora); ``hash`` names weights sent before."""
    targets: list[str]
    rank: int
    alpha: float
    hash: str | None = None

    def to_wire(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_wire(cls, record: dict, max_rank: int) -> "LoraSpec":
        targets = record.get("targets")
        if not (isinstance(targets, list) and 1 <= len(targets) <= 16
                and all(isinstance(t, str) and 0 < len(t) <= 64 for t in targets)):
            raise bad("metadata 'lora_spec' must be {targets: [module names], rank, alpha}")
        rank = _int(record, "rank", 1, max_rank)
        alpha = record.get("alpha")
        if type(alpha) not in (int, float) or not 0 < alpha <= 1e6:
            raise bad("metadata 'lora_spec' alpha must be a positive number")
        return cls(list(targets), rank, float(alpha), _str(record, "hash", _HASH, required=False))


@dataclass
class Payment:
    """Who pays for a request: ``client``, an address the requesting peer proves it acts for with ``proof``
    ({expires, signature}: incentives.payer.PayerProof), and maybe a voucher (incentives.vouchers.Voucher
    fields + a 65-byte signature). A voucher's integers are uint256 and msgpack's end at 2**64: they cross
    as 32 big-endian bytes."""
    client: str
    channel: int
    voucher: dict | None = None
    proof: dict | None = None

    def to_wire(self) -> dict:
        record = {"client": self.client, "channel": self.channel}
        if self.proof is not None:
            record["proof"] = self.proof
        if self.voucher is not None:
            record["voucher"] = {k: v.to_bytes(32, "big") if k in _UINT256_FIELDS else v
                                 for k, v in self.voucher.items()}
        return record

    @classmethod
    def from_wire(cls, record: dict) -> "Payment":
        voucher = _map(record, "voucher")
        if voucher is not None:
            parsed = {"client": _str(voucher, "client", _ADDRESS), "server": _str(voucher, "server", _ADDRESS)}
            for key in _UINT256_FIELDS:
                value = voucher.get(key)
                if not isinstance(value, bytes) or len(value) != 32:
                    raise bad(f"metadata voucher {key!r} must be a uint256 as 32 big-endian bytes")
                parsed[key] = int.from_bytes(value, "big")
            signature = voucher.get("signature")
            if not isinstance(signature, bytes) or len(signature) != 65:
                raise bad("metadata voucher 'signature' must be 65 bytes (r, s, v)")
            parsed["signature"] = signature
            voucher = parsed
        proof = _map(record, "proof")
        if proof is not None:
            signature = proof.get("signature")
            if not isinstance(signature, bytes) or len(signature) != 65:
                raise bad("metadata proof 'signature' must be 65 bytes (r, s, v)")
            proof = {"expires": _int(proof, "expires", 0, 2**40), "signature": signature}
        return cls(_str(record, "client", _ADDRESS), _int(record, "channel", 0, 2**64 - 1), voucher, proof)


_UINT256_FIELDS = ("channel", "total_units", "total_amount")


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


# ------------------------------------------------------------------ requests
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
    hidden: torch.Tensor
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

    kind: ClassVar[str] = "forward"

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    # -------------------------------------------------------------- client side
    def pack(self) -> ExpertRequest:
        names = [name for name in TENSORS if getattr(self, name) is not None]
        meta = {"dtype": dtype_name(self.dtype), "compression": COMPRESSION, "tensors": names}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in TENSORS or value is None:
                continue
            meta[field.name] = value.to_wire() if hasattr(value, "to_wire") else value
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
        names = meta.get("tensors")
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                or names != [n for n in TENSORS if n in names]):
            raise bad(f"metadata 'tensors' must name distinct tensors in the order {list(TENSORS)}, got "
                      f"{_short(names)}")
        if len(names) != len(message.tensors):
            raise bad(f"metadata names {len(names)} tensors but the request carries {len(message.tensors)}")
        dtype = WIRE_DTYPES.get(meta["dtype"]) if isinstance(meta.get("dtype"), str) else None
        if dtype is None:
            raise bad(f"metadata 'dtype' must be one of {list(WIRE_DTYPES)}, got {_short(meta.get('dtype'))}")
        if meta.get("compression", COMPRESSION) != COMPRESSION:
            raise bad(f"metadata 'compression' must be {COMPRESSION!r}")
        tensors = {name: unpack_tensor(proto, name, bounds.tensor_numel(name))
                   for name, proto in zip(names, message.tensors)}
        for name in ACTIVATIONS:
            if name in tensors and tensors[name].dtype != dtype:
                raise bad(f"tensor {name!r} is {dtype_name(tensors[name].dtype)} but the request's dtype is "
                          f"{dtype_name(dtype)}")
        fields = cls._allowed(opening)
        present = set(tensors) | {k for k in meta if k in _SCALARS}
        if not present <= fields:
            raise bad(f"a {cls.kind} request{'' if opening else ' after the first step'} may not carry "
                      f"{sorted(present - fields)}")
        missing = cls._required(opening) - present
        if missing:
            raise bad(f"a {cls.kind} request{'' if opening else ' after the first step'} must carry {sorted(missing)}")

        if "hidden" not in tensors:
            raise bad("a request must carry 'hidden'")
        hidden = tensors["hidden"]
        _check_activations(hidden, "hidden", bounds)
        batch, length = hidden.shape[:2]
        start = end = None
        if "start" in meta:
            start = _int(meta, "start", bounds.start, bounds.end - 1)
            end = _int(meta, "end", start + 1, bounds.end)
        grad_output = tensors.get("grad_output")
        if grad_output is not None and grad_output.shape != hidden.shape:
            raise bad(f"grad_output shape {list(grad_output.shape)} != hidden shape {list(hidden.shape)}")
        if grad_output is not None and not all_finite(grad_output):
            raise bad("grad_output contains NaN or inf")
        position_ids, attention_mask = tensors.get("position_ids"), tensors.get("attention_mask")
        if position_ids is not None:
            _check_ints(position_ids, "position_ids", (batch, length), 0, bounds.max_position - 1)
        if attention_mask is not None:
            if attention_mask.dtype != torch.int64 or attention_mask.ndim != 2 or attention_mask.shape[0] != batch \
                    or not length <= attention_mask.shape[1] <= bounds.limits.max_length:
                raise bad(f"attention_mask must be int64 of shape [{batch}, past + {length}], got "
                          f"{dtype_name(attention_mask.dtype)} {list(attention_mask.shape)}")
            _check_ints(attention_mask, "attention_mask", tuple(attention_mask.shape), 0, 1)
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
            lora_spec = LoraSpec.from_wire(_map(meta, "lora_spec", required=True), bounds.limits.max_lora_rank)
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
            adapter = _str(meta, "adapter")
            if lora_spec is not None:
                raise bad("send either an adapter name or LoRA weights, not both")
        payment = Payment.from_wire(_map(meta, "payment", required=True)) if "payment" in meta else None
        request = cls(hidden, start, end, grad_output, position_ids, attention_mask, prompts, lora, lora_spec, adapter,
                      payment)
        request._parse_own(meta, opening, bounds)
        return request

    def _parse_own(self, meta: dict, opening: bool, bounds: Bounds) -> None:
        """Fields of a subclass."""

    @classmethod
    def _allowed(cls, opening: bool) -> set[str]:
        base = {"hidden", "start", "end", "position_ids", "attention_mask", "prompts", "lora", "lora_spec",
                "adapter", "payment"}
        return base | {"grad_output"} if cls.kind == "backward" else base

    @classmethod
    def _required(cls, opening: bool) -> set[str]:
        return {"hidden", "start", "end"} | ({"grad_output"} if cls.kind == "backward" else set())


class BackwardRequest(SpanRequest):
    kind: ClassVar[str] = "backward"


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
    swarm.wire.compact's layout, and sends its later decode steps so when the server says it takes them."""
    max_length: int | None = None
    reorder: list[int] | None = None
    position: int | None = None
    push: dict | None = None
    accept: dict | None = None
    route_id: str | None = None
    compact: bool | None = None

    kind: ClassVar[str] = "inference"
    # digest()'s first half, when swarm.wire.compact took it from the frame's bytes (no torch calls); not on the wire
    hidden_digest: ClassVar[str | None] = None

    @classmethod
    def _allowed(cls, opening: bool) -> set[str]:
        if cls.kind == "push":
            return {"hidden", "position_ids", "attention_mask", "reorder", "position", "route_id"}
        route = {"position", "push", "accept"}
        if opening:
            return super()._allowed(True) | {"max_length", "compact"} | route
        return {"hidden", "position_ids", "attention_mask", "reorder", "payment"} | route

    @classmethod
    def _required(cls, opening: bool) -> set[str]:
        if cls.kind == "push":
            return {"hidden", "position", "route_id"}
        return super()._required(True) | {"max_length"} if opening else {"hidden"}

    def _parse_own(self, meta: dict, opening: bool, bounds: Bounds) -> None:
        if opening and self.kind == "inference":
            self.max_length = _int(meta, "max_length", 1, bounds.limits.max_length)
            self.compact = meta.get("compact") is True
        if "reorder" in meta:
            order, batch = meta["reorder"], self.hidden.shape[0]
            if not (isinstance(order, list) and len(order) == batch
                    and all(type(i) is int and 0 <= i < batch for i in order)):
                raise bad(f"reorder must list {batch} row indices in [0, {batch})")
            self.reorder = order
        self.position = _int(meta, "position", 0, bounds.limits.max_length, required=False)
        self.route_id = _str(meta, "route_id", _ROUTE_ID, required=False)
        push = _map(meta, "push")
        if push:
            if set(push) - {"to", "id", "direct", "relay"}:
                raise bad("metadata 'push' takes only 'to', 'id', 'direct' and 'relay'")
            direct = push.get("direct", [])
            if not (isinstance(direct, list) and len(direct) <= MAX_DIRECT_ADDRESSES
                    and all(isinstance(a, str) and DIRECT_ADDRESS.fullmatch(a) for a in direct)):
                raise bad(f"metadata 'push.direct' must list at most {MAX_DIRECT_ADDRESSES} host:port addresses")
            relay = _str(push, "relay", required=False) or ""
            if relay and not DIRECT_ADDRESS.fullmatch(relay):
                raise bad("metadata 'push.relay' must be the host:port of the next server's relay")
            push = {"to": _str(push, "to", _PEER_ID), "id": _str(push, "id", _ROUTE_ID), "direct": direct,
                    "relay": relay}
        accept = _map(meta, "accept")
        if accept:
            if set(accept) - {"from", "id"}:
                raise bad("metadata 'accept' takes only 'from' and 'id'")
            accept = {"from": _str(accept, "from", _PEER_ID), "id": _str(accept, "id", _ROUTE_ID)}
        self.push, self.accept = push, accept

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
    kind: ClassVar[str] = "push"


_SCALARS = {f.name for f in dataclasses.fields(InferenceStep)} - set(TENSORS)


def _check_activations(tensor: torch.Tensor, name: str, bounds: Bounds) -> None:
    limits = bounds.limits
    if tensor.ndim != 3 or tensor.shape[-1] != bounds.hidden_size or tensor.shape[1] < 1:
        raise bad(f"{name} must have shape [batch, tokens, {bounds.hidden_size}], got {list(tensor.shape)}")
    if not 1 <= tensor.shape[0] <= limits.max_batch:
        raise bad(f"batch of {tensor.shape[0]} is outside 1..{limits.max_batch}")
    if tensor.shape[0] * tensor.shape[1] > limits.max_tokens_per_request:
        raise bad(f"{tensor.shape[0] * tensor.shape[1]} tokens in one request exceed the limit of "
                  f"{limits.max_tokens_per_request}")
    if not all_finite(tensor):
        raise bad(f"{name} contains NaN or inf")


def _check_ints(tensor: torch.Tensor, name: str, shape: tuple[int, ...], low: int, high: int) -> None:
    if tensor.dtype != torch.int64 or tuple(tensor.shape) != tuple(shape):
        raise bad(f"{name} must be int64 of shape {list(shape)}, got {dtype_name(tensor.dtype)} {list(tensor.shape)}")
    if tensor.numel() and (tensor.min() < low or tensor.max() > high):
        raise bad(f"{name} values must lie in [{low}, {high}]")


@dataclass
class PayRequest:
    """A voucher sent on its own, e.g. when a client settles at the end of a generation."""
    payment: Payment

    def pack(self) -> ExpertRequest:
        return ExpertRequest(metadata=pack_metadata({"payment": self.payment.to_wire()}))

    @classmethod
    def parse(cls, message: ExpertRequest) -> "PayRequest":
        return cls(Payment.from_wire(_map(unpack_metadata(message.metadata), "payment", required=True)))


# ------------------------------------------------------------------ replies
def _raise_for_error(meta: dict, peer_id: str | None) -> None:
    if "error" in meta:
        code, message = meta.get("error"), meta.get("message")
        try:
            code = ErrorCode(code)
        except ValueError:
            raise InvalidReply(f"server {peer_id} answered an error with unknown code {_short(code)}") from None
        raise RemoteError(code, message if isinstance(message, str) else "", peer_id)


@dataclass
class ErrorReply:
    code: ErrorCode
    message: str

    def pack(self) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata({"error": self.code.value, "message": self.message[:MAX_STR_LEN]}))


@dataclass
class SpanReply:
    """The span's output (forward, inference) or the gradients (backward), with the server's accounting."""
    outputs: list[torch.Tensor]
    length: int | None = None         # inference: the session's length after this step
    attestation: dict | None = None   # incentives.verification.Attestation, from priced servers
    receipt: dict | None = None       # incentives.metering.Receipt, from priced servers
    digest: str | None = None         # inference: set when computed from a pushed step (InferenceStep.digest)
    compact: bool | None = None       # inference, first step: the server takes steps in swarm.wire.compact's layout

    def pack(self) -> ExpertResponse:
        meta = {k: v for k, v in (("length", self.length), ("attestation", self.attestation),
                                  ("receipt", self.receipt), ("digest", self.digest), ("compact", self.compact))
                if v is not None}
        return ExpertResponse(tensors=[pack_tensor(t) for t in self.outputs], metadata=pack_metadata(meta))

    @classmethod
    def parse(cls, message: ExpertResponse, expected: Sequence[tuple[tuple[int, ...], torch.dtype]],
              peer_id: str | None = None) -> "SpanReply":
        """Check a server's reply against the shapes and dtypes it must have; raises InvalidReply (or
        RemoteError for an error reply)."""
        try:
            meta = unpack_metadata(message.metadata)
        except WireError as e:
            raise InvalidReply(f"server {peer_id}: {e.message}") from None
        _raise_for_error(meta, peer_id)
        if len(message.tensors) != len(expected):
            raise InvalidReply(f"server {peer_id} returned {len(message.tensors)} tensors, expected {len(expected)}")
        outputs = []
        for i, (proto, (shape, dtype)) in enumerate(zip(message.tensors, expected)):
            try:
                tensor = unpack_tensor(proto, f"output {i}", math.prod(shape))
            except WireError as e:
                raise InvalidReply(f"server {peer_id}: {e.message}") from None
            if tuple(tensor.shape) != tuple(shape):
                raise InvalidReply(f"server {peer_id} returned shape {list(tensor.shape)}, expected {list(shape)}")
            if tensor.dtype != dtype:
                raise InvalidReply(f"server {peer_id} returned {dtype_name(tensor.dtype)}, expected {dtype_name(dtype)}")
            if not all_finite(tensor):
                raise InvalidReply(f"server {peer_id} returned NaN or inf")
            outputs.append(tensor)
        try:
            length = _int(meta, "length", 1, 1 << 40, required=False)
            return cls(outputs, length, _map(meta, "attestation"), _map(meta, "receipt"),
                       _str(meta, "digest", _HASH, required=False), meta.get("compact") is True)
        except WireError as e:
            raise InvalidReply(f"server {peer_id}: {e.message}") from None

    @staticmethod
    def max_bytes(expected: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> int:
        """The largest frame a reply of these tensors can take (so a client buffers no more than that)."""
        return MAX_METADATA_BYTES + 1024 + sum(math.prod(shape) * dtype.itemsize + 64 for shape, dtype in expected)


@dataclass
class InfoReply:
    """What a server says about itself (its ServerInfo fields and a few more)."""
    info: dict

    def pack(self) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata(self.info))

    @classmethod
    def parse(cls, message: ExpertResponse, peer_id: str | None = None) -> "InfoReply":
        try:
            meta = unpack_metadata(message.metadata)
        except WireError as e:
            raise InvalidReply(f"server {peer_id}: {e.message}") from None
        _raise_for_error(meta, peer_id)
        return cls(meta)


@dataclass
class PayReply:
    accepted: bool = True

    def pack(self) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata({"accepted": self.accepted}))

    @classmethod
    def parse(cls, message: ExpertResponse, peer_id: str | None = None) -> "PayReply":
        meta = InfoReply.parse(message, peer_id).info
        return cls(meta.get("accepted") is True)
