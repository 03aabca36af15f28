"""Compact frames: the steady-state decode step, its push and its reply in a fixed binary layout.

After a session's first step, almost every step of a generation is the same record: the hidden states of one
new token, the position they go to, and (pushed on, or answered) a length and a digest. This fixed layout packs
and parses in a fraction of the time a protobuf with msgpack metadata takes on the cold caches a decode step
meets (bench/RESULTS.md, "fifth pass"). A step that carries
anything more (a payment, a route change, a reorder, position ids, a mask) and every reply with an
attestation or receipt keeps the full format (swarm.wire.requests, replies); both peers agree on compact frames when a session
opens (InferenceStep.compact, SpanReply.compact). A push is always sent compact: a client sets up pushes only
to a next server that said it takes compact frames.

    header  <BBHIIQB32s: kind, dtype, batch, tokens, hidden size, position (a step) or length (a reply),
            flags, 32 bytes (a push: its route id in the first 16; a reply: its digest when flags & 1)
    then    when flags & 2 (a push, or a reply computed from one): the push proof (swarm.wire.push_proof)
    then    the hidden states (or the output), batch x tokens x hidden size, little-endian, as the dtype says
            (code 3: bfloat16 values in 8-bit rows, swarm.wire.int8_rows)
"""
from __future__ import annotations

import dataclasses
import functools
import struct
from typing import Sequence

import numpy
import torch

from swarm.wire import int8_rows
from swarm.wire.codes import ErrorCode, InvalidReply, WireError, bad
from swarm.wire.push_proof import PROOF_BYTES
from swarm.wire.replies import SpanReply
from swarm.wire.requests import COMPACT, Bounds, InferenceStep, PushStep, hidden_state_digest
from swarm.wire.tensors import dtype_name, finite_values, tensor_bytes

HEADER = struct.Struct("<BBHIIQB32s")
STEP, PUSH, REPLY = 0, 1, 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.bfloat16)
_CODES = {dtype: code for code, dtype in enumerate(DTYPES[:3])}
INT8_ROWS = 3  # the dtype code of bfloat16 activations in 8-bit rows
_NUMPY = (numpy.float32, numpy.int16, numpy.int16)  # numpy has no bfloat16: 16-bit floats are read as bits
_HAS_DIGEST, _HAS_PROOF = 1, 2


class CompactFrame(bytes):
    """A frame's payload in this layout (swarm.wire.framing tells it from a protobuf by its marker byte)."""


# ------------------------------------------------------------------ what the layout carries
def _carried(record: type) -> dict[str, set[str]]:
    """Per kind, the fields this layout carries: those whose metadata names the kind (swarm.wire.requests.COMPACT).
    Any other field set sends the record as a full frame: a field added to a record goes in full frames until
    this layout learns it, never dropped."""
    carried: dict[str, set[str]] = {}
    for f in dataclasses.fields(record):
        for kind in f.metadata.get(COMPACT, ()):
            carried.setdefault(kind, set()).add(f.name)
    return carried


_LAYOUT = {"inference": {"hidden", "position"}, "push": {"hidden", "position", "route_id", "push_proof"},
           "reply": {"outputs", "length", "digest", "push_proof"}}  # what pack_step and pack_reply below write


def check_layout(step: type = InferenceStep, reply: type = SpanReply) -> dict[str, set[str]]:
    """The fields the records mark as compact, when they are exactly those this layout writes; a field marked
    that the layout does not write would be lost, so the import fails instead."""
    carried = {**_carried(step), **_carried(reply)}
    if carried != _LAYOUT:
        raise RuntimeError(f"swarm.wire.compact writes {_LAYOUT} but the records mark {carried} as compact")
    return carried


CARRIED = check_layout()


def _only_carried(record, kind: str) -> bool:
    return all(getattr(record, name) is None for name in _not_carried(type(record), kind))


@functools.lru_cache(maxsize=32)
def _not_carried(record_type: type, kind: str) -> tuple[str, ...]:
    """The fields of ``record_type`` this layout does not carry for ``kind`` (per class, once: every decode step
    asks)."""
    return tuple(f.name for f in dataclasses.fields(record_type) if f.name not in CARRIED[kind])


# ------------------------------------------------------------------ steps and pushes
def pack_step(step: InferenceStep) -> CompactFrame | None:
    """``step`` in this layout, or None when it carries more than a steady-state decode step does."""
    if step.kind not in ("inference", "push") or step.position is None or not _only_carried(step, step.kind) \
            or not _fits(step.hidden):
        return None
    kind, route = (PUSH, bytes.fromhex(step.route_id)) if step.kind == "push" else (STEP, b"")
    batch, tokens, hidden_size = step.hidden.shape
    proof = step.push_proof or b""
    code, values = _values(step.hidden)
    return CompactFrame(HEADER.pack(kind, code, batch, tokens, hidden_size, step.position,
                                    _HAS_PROOF if proof else 0, route) + proof + values)


def parse_step(frame: bytes, bounds: Bounds, push: bool) -> InferenceStep:
    """An untrusted step (``push``: a pushed step) in this layout, checked as InferenceStep.parse checks one."""
    kind, code, batch, tokens, hidden_size, position, flags, tail = _header(frame, PUSH if push else STEP)
    proof, offset = _proof(frame, flags)
    limits = bounds.limits
    if hidden_size != bounds.hidden_size or tokens < 1:
        raise bad(f"hidden must have shape [batch, tokens, {bounds.hidden_size}], got {[batch, tokens, hidden_size]}")
    if not 1 <= batch <= limits.max_batch:
        raise bad(f"batch of {batch} is outside 1..{limits.max_batch}")
    if batch * tokens > limits.max_tokens_per_request:
        raise bad(f"{batch * tokens} tokens in one request exceed the limit of {limits.max_tokens_per_request}")
    if position > limits.max_length:
        raise bad(f"metadata 'position' must lie in [0, {limits.max_length}]")
    hidden = _tensor(frame, code, (batch, tokens, hidden_size), bounds.max_numel, "hidden", offset)
    if push:  # (the next server answers a push with its digest: from the frame's bytes, no torch calls)
        step = PushStep(hidden, position=position, route_id=tail[:16].hex(), push_proof=proof)
        raw = tensor_bytes(hidden) if code == INT8_ROWS else memoryview(frame)[offset:]  # digests are of the values
        step.hidden_digest = hidden_state_digest(DTYPES[code], hidden.shape, raw)
        return step
    if proof is not None:
        raise bad("a client's step carries no push proof")
    return InferenceStep(hidden, position=position)


# ------------------------------------------------------------------ replies
def pack_reply(reply: SpanReply) -> CompactFrame | None:
    """An inference step's ``reply`` in this layout, or None when it carries an attestation or a receipt."""
    if not _only_carried(reply, "reply") or len(reply.outputs) != 1 or reply.length is None:
        return None
    output = reply.outputs[0]
    if not _fits(output):
        return None
    digest = bytes.fromhex(reply.digest) if reply.digest is not None else b""
    proof = reply.push_proof or b""
    flags = (_HAS_DIGEST if digest else 0) | (_HAS_PROOF if proof else 0)
    code, values = _values(output)
    return CompactFrame(HEADER.pack(REPLY, code, *output.shape, reply.length, flags, digest) + proof + values)


def reply_from_push(frame: bytes) -> tuple[str | None, bytes | None]:
    """A reply's digest (set when it was computed from a pushed step) and push proof, read before its tensor is
    checked: such a reply answers what was pushed, which may not be the client's step."""
    try:
        _, _, _, _, _, _, flags, tail = _header(frame, REPLY)
        return (tail.hex() if flags & _HAS_DIGEST else None), _proof(frame, flags)[0]
    except WireError:
        return None, None  # parse_reply says what is wrong with it


def parse_reply(frame: bytes, expected: Sequence[tuple[tuple[int, ...], torch.dtype]],
                peer_id: str | None = None) -> SpanReply:
    """A server's reply in this layout, checked as SpanReply.parse checks one; raises InvalidReply."""
    try:
        _, code, batch, tokens, hidden_size, length, flags, tail = _header(frame, REPLY)
        proof, offset = _proof(frame, flags)
        if len(expected) != 1 or (batch, tokens, hidden_size) != tuple(expected[0][0]) \
                or DTYPES[code] != expected[0][1]:
            raise bad(f"returned {dtype_name(DTYPES[code])} {[batch, tokens, hidden_size]}, expected "
                      f"{[(dtype_name(dtype), list(shape)) for shape, dtype in expected]}")
        output = _tensor(frame, code, (batch, tokens, hidden_size), batch * tokens * hidden_size, "output", offset)
    except WireError as e:
        raise InvalidReply(f"server {peer_id}: {e.message}") from None
    if not 1 <= length < 1 << 40:
        raise InvalidReply(f"server {peer_id} answered for length {length}")
    return SpanReply([output], length, digest=tail.hex() if flags & _HAS_DIGEST else None, push_proof=proof)


# ------------------------------------------------------------------ both
def _fits(tensor: torch.Tensor) -> bool:
    return (tensor.dtype in _CODES and tensor.ndim == 3 and tensor.device.type == "cpu" and not tensor.requires_grad
            and tensor.shape[0] <= 0xFFFF and max(tensor.shape[1:]) <= 0xFFFFFFFF)


def _values(tensor: torch.Tensor) -> tuple[int, bytes]:
    """A tensor's dtype code and bytes: 8-bit rows when it was rounded to them."""
    if int8_rows.is_rounded(tensor):
        return INT8_ROWS, int8_rows.encode(tensor)
    return _CODES[tensor.dtype], tensor_bytes(tensor)


def _header(frame: bytes, kind: int) -> tuple:
    if len(frame) < HEADER.size:
        raise bad(f"a compact frame of {len(frame)} bytes is shorter than its {HEADER.size}-byte header")
    fields = HEADER.unpack_from(frame)
    if fields[0] != kind:
        raise bad(f"a compact frame of kind {fields[0]} where kind {kind} belongs")
    if fields[1] >= len(DTYPES):
        raise bad(f"a compact frame with dtype code {fields[1]}; known: 0..{len(DTYPES) - 1}")
    return fields


def _proof(frame: bytes, flags: int) -> tuple[bytes | None, int]:
    """The push proof after the header when flags say so, and where the tensor starts."""
    if not flags & _HAS_PROOF:
        return None, HEADER.size
    end = HEADER.size + PROOF_BYTES
    if len(frame) < end:
        raise bad(f"a compact frame of {len(frame)} bytes is too short for its push proof")
    return bytes(frame[HEADER.size:end]), end


def _tensor(frame: bytes, code: int, shape: tuple[int, int, int], max_numel: int, name: str,
            offset: int = HEADER.size) -> torch.Tensor:
    """The frame's tensor from ``offset`` on, once its size and its values are checked (in numpy: cheaper than
    torch per call)."""
    dtype, numel = DTYPES[code], shape[0] * shape[1] * shape[2]
    if numel > max_numel:
        raise WireError(ErrorCode.TOO_LARGE, f"tensor {name!r} has {numel} elements; the limit is {max_numel}")
    if code == INT8_ROWS:
        return int8_rows.decode(memoryview(frame)[offset:], shape, name)
    if len(frame) - offset != numel * dtype.itemsize:
        raise bad(f"a compact frame of {len(frame) - offset} bytes does not hold "
                  f"{dtype_name(dtype)} {list(shape)}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    values = numpy.frombuffer(bytearray(memoryview(frame)[offset:]), _NUMPY[code])  # a copy torch may write
    if not finite_values(values, dtype):
        raise bad(f"{name} contains NaN or inf")
    tensor = torch.from_numpy(values.reshape(shape))
    return tensor if dtype == torch.float32 else tensor.view(dtype)
