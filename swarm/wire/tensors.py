"""Tensors on the wire: hivemind's serialization, uncompressed (a tensor's dtype is its wire dtype), read back
with bounds on its size and checked for NaN and inf.

Activations cross in 16 bits by default: bfloat16 and float16 as themselves, float32 as bfloat16 (never
float16: its range ends at 65504, and real models have activation outliers beyond it) or as float32 with
``exact_wire``. The server computes in its own dtype and answers in the dtype the request names.
"""
from __future__ import annotations

import math

import numpy
import torch
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType

from swarm.wire import int8_rows
from swarm.wire.codes import ErrorCode, WireError, bad

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TENSOR_DTYPES = {**WIRE_DTYPES, "int64": torch.int64}
COMPRESSION = "none"  # the only one: 16-bit activations are sent as 16-bit tensors, not compressed
MAX_DIMS = 4


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


INT8_ROWS = "bfloat16-int8-rows"  # a tensor's dtype on the wire when it crosses in 8 bits (swarm.wire.int8_rows)


def pack_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """A tensor rounded to 8-bit rows crosses so; any other as its own dtype."""
    if int8_rows.is_rounded(tensor):
        return runtime_pb2.Tensor(buffer=int8_rows.encode(tensor), size=tensor.shape, dtype=INT8_ROWS,
                                  compression=CompressionType.NONE)
    return runtime_pb2.Tensor(buffer=tensor_bytes(tensor), size=tensor.shape, dtype=dtype_name(tensor.dtype),
                              compression=CompressionType.NONE)


def unpack_tensor(proto: runtime_pb2.Tensor, name: str, max_numel: int) -> torch.Tensor:
    """An untrusted tensor: dtype, compression, shape and buffer size are checked before the buffer is read."""
    dtype = _TENSOR_DTYPES.get(proto.dtype, torch.bfloat16 if proto.dtype == INT8_ROWS else None)
    if dtype is None:
        raise bad(f"tensor {name!r} has dtype {proto.dtype!r}; allowed: {', '.join(_TENSOR_DTYPES)}, {INT8_ROWS}")
    if proto.compression != CompressionType.NONE:
        raise bad(f"tensor {name!r} uses compression {proto.compression}; allowed: {COMPRESSION}")
    shape = list(proto.size)
    if len(shape) > MAX_DIMS or any(not 0 <= d <= max_numel for d in shape):
        raise bad(f"tensor {name!r} has shape {shape[:8]}: at most {MAX_DIMS} dimensions of at most {max_numel}")
    numel = math.prod(shape)
    if numel > max_numel:
        raise WireError(ErrorCode.TOO_LARGE, f"tensor {name!r} has {numel} elements; the limit is {max_numel}")
    if proto.dtype == INT8_ROWS:
        return int8_rows.decode(proto.buffer, tuple(shape), name)
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
