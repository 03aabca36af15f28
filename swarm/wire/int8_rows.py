"""8-bit activations for bandwidth-bound traffic (prefills, forwards, backwards): a wire codec of bfloat16 rows.

Each row of the hidden states (one token) crosses as its OUTLIERS largest values in bfloat16 (with their
indices) and every other value as an int8 times the row's float32 scale (its largest other value / 127):
hidden + 36 bytes a row, about half of 16 bits. Real models have a few outlier channels many times larger than
the rest; one scale for the whole row would spend the int8 range on them (5.2% of a row's norm lost on SmolLM2,
against 0.5-0.7% here).

The codec is applied as rounding, not as compression: the sender rounds a tensor to the values its encoding
decodes to (``round_rows``) before anything else sees it (its digests, its spot checks, its own copy of the next
server's input). The rounded tensor keeps its encoding, and crosses as exactly those bytes, so both ends hash
and compare the same values. A tensor read back from the wire keeps the bytes it came in, so a client that
forwards a server's output sends the same bytes on. Anything computed from such a tensor is a new tensor, without
an encoding (16 bits on the wire, unless rounded again). Wire tensors are never changed in place.

    row layout   float32 scale | OUTLIERS x uint16 index | OUTLIERS x bfloat16 value | hidden x int8
"""
from __future__ import annotations

import numpy
import torch

from swarm.wire.codes import bad

NAME = "int8"  # as the wire contract names it (a request's metadata 'codec')
OUTLIERS = 8
MIN_TOKENS = 16  # steps of fewer new tokens (decode and verify steps) stay in 16 bits: latency, not bytes, binds them
MARK = "cocoon_int8_rows"  # the attribute holding a rounded tensor's encoding
_ROW = numpy.dtype([("scale", "<f4"), ("index", "<u2", OUTLIERS), ("value", "<u2", OUTLIERS)])


def applies(codec: str | None, tensor: torch.Tensor) -> bool:
    """Whether a sender using ``codec`` rounds and sends ``tensor`` in 8 bits."""
    return codec == NAME and tensor.dtype == torch.bfloat16 and tensor.ndim == 3 and \
        tensor.shape[1] >= MIN_TOKENS and tensor.shape[2] > OUTLIERS


def is_rounded(tensor: torch.Tensor) -> bool:
    return getattr(tensor, MARK, None) is not None


def maybe_round(codec: str | None, tensor: torch.Tensor) -> torch.Tensor:
    return round_rows(tensor) if applies(codec, tensor) and not is_rounded(tensor) else tensor


def row_bytes(hidden: int) -> int:
    return _ROW.itemsize + hidden


def round_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (bfloat16 [..., hidden]) as its encoding decodes it, holding that encoding."""
    if tensor.dtype != torch.bfloat16:
        raise ValueError(f"int8 rows round bfloat16 activations, not {tensor.dtype}")
    rows = tensor.reshape(-1, tensor.shape[-1])
    values = rows.float()
    index = values.abs().topk(OUTLIERS, dim=1).indices
    rest = values.scatter(1, index, 0.0)
    scale = rest.abs().amax(dim=1) / 127
    q = torch.round(rest / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
    head = numpy.empty(rows.shape[0], _ROW)
    head["scale"], head["index"] = scale.numpy(), index.numpy()
    head["value"] = rows.gather(1, index).view(torch.int16).numpy().view(numpy.uint16)
    q = q.to(torch.int8)
    raw = numpy.concatenate([head.view(numpy.uint8).reshape(rows.shape[0], -1), q.numpy().view(numpy.uint8)],
                            axis=1).tobytes()
    return _assemble(q, scale, index, rows.gather(1, index), tuple(tensor.shape), raw)  # our own bytes: unchecked


def encode(tensor: torch.Tensor) -> bytes:
    """A rounded tensor's bytes on the wire."""
    return getattr(tensor, MARK)


def decode(raw, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """An untrusted encoding of bfloat16 ``shape`` (its size checked by the caller): the tensor, holding it."""
    raw, hidden = bytes(raw), shape[-1]
    rows = len(raw) // row_bytes(hidden)
    if len(raw) != rows * row_bytes(hidden) or rows * hidden != numpy.prod(shape) or hidden <= OUTLIERS:
        raise bad(f"tensor {name!r}: {len(raw)} bytes are not int8 rows of bfloat16 {list(shape)}")
    data = numpy.frombuffer(raw, dtype=numpy.uint8).reshape(rows, -1)
    head = data[:, :_ROW.itemsize].copy().view(_ROW).reshape(rows)
    index = torch.from_numpy(head["index"].astype(numpy.int64))
    scale = torch.from_numpy(head["scale"].copy())
    if rows and ((index >= hidden).any() or (index.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise bad(f"tensor {name!r}: int8 rows whose outlier indices repeat or lie beyond {hidden}")
    if not (torch.isfinite(scale).all() and (scale >= 0).all()):
        raise bad(f"tensor {name!r}: int8 rows with a scale that is not finite and non-negative")
    q = torch.from_numpy(data[:, _ROW.itemsize:].copy().view(numpy.int8))
    values = torch.from_numpy(head["value"].copy().view(numpy.int16)).view(torch.bfloat16)
    tensor = _assemble(q, scale, index, values, shape, raw)
    if not torch.isfinite(tensor).all():
        raise bad(f"{name} contains NaN or inf")
    return tensor


def _assemble(q: torch.Tensor, scale: torch.Tensor, index: torch.Tensor, values: torch.Tensor,
              shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    """The values an encoding stands for (int8 times its row's scale, outliers in place), holding that encoding."""
    tensor = (q.float() * scale[:, None]).scatter(1, index, values.float()).to(torch.bfloat16).view(shape)
    setattr(tensor, MARK, raw)
    return tensor


def token_slice(tensor: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Tokens [a, b) of [batch, tokens, hidden] ``tensor``; a rounded tensor's keep their rows of its encoding."""
    if (a, b) == (0, tensor.shape[1]):
        return tensor
    part = tensor[:, a:b]
    if is_rounded(tensor):
        rows = numpy.frombuffer(encode(tensor), numpy.uint8).reshape(tensor.shape[0], tensor.shape[1], -1)
        setattr(part, MARK, rows[:, a:b].tobytes())
    return part


def join_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` concatenated along tokens; when all are rounded, the result keeps their encodings."""
    if len(parts) == 1:
        return parts[0]
    joined = torch.cat(parts, dim=1)
    if all(is_rounded(p) for p in parts):
        rows = [numpy.frombuffer(encode(p), numpy.uint8).reshape(p.shape[0], p.shape[1], -1) for p in parts]
        setattr(joined, MARK, numpy.concatenate(rows, axis=1).tobytes())
    return joined


def rounding_bound(tensor: torch.Tensor) -> float:
    """How far, relative to its norm, a rounded tensor may lie from what was rounded: each value that is not an
    outlier moved by at most half its row's scale (what a spot check allows on top of honest compute)."""
    raw, hidden = encode(tensor), tensor.shape[-1]
    rows = len(raw) // row_bytes(hidden)
    scale = numpy.frombuffer(raw, numpy.uint8).reshape(rows, -1)[:, :_ROW.itemsize].copy().view(_ROW)["scale"]
    moved = numpy.sqrt(numpy.square(scale.astype(numpy.float64) / 2).sum() * (hidden - OUTLIERS))
    return float(moved / max(float(tensor.double().norm()), 1e-30))
