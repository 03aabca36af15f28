"""Decode steps on a CPU through copies of the linear weights that oneDNN packed once.

A decode step multiplies a few rows by every weight matrix of the span, and on a CPU that is bound by
reading the weights. oneDNN's packed layout reads them faster than MKL's path through the plain matrix:
on the 2-core development machine the 28 GEMVs of 4 Llama blocks (hidden 512, intermediate 1024, one row)
took 1.25 ms packed against 2.2 ms through MKL, with the caches cold between steps as on a chain. For a
batch of rows MKL also packs the whole matrix on every call: 8 sessions of 4 blocks (hidden 2048,
intermediate 5632) took 105 ms as one batch through MKL, 49 ms packed, 42 ms for one session alone.
Outputs differ from MKL's by float32 rounding (about 1e-6 relative), as a GEMM of a different number of rows
does. The copies double the memory of the linear weights, so they are made only when the machine has that
much memory free; otherwise steps use the plain weights. Prefill, forward and backward always do.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator

import psutil
import torch
from torch import nn

from shards.span import BlockSpan

logger = logging.getLogger(__name__)
PACKED_FOR_ROWS = 8  # oneDNN lays packed weights out for about this many rows (one row runs fastest so too)


@contextlib.contextmanager
def packed_linears(span: BlockSpan) -> Iterator[None]:
    """Within this block, the span's float32 linear layers on a CPU compute with their packed copies."""
    packed = packed_forwards(span)
    try:
        for linear, forward in packed.items():
            linear.forward = forward
        yield
    finally:
        for linear in packed:
            linear.__dict__.pop("forward", None)


def packed_forwards(span: BlockSpan) -> dict[nn.Linear, functools.partial]:
    """Each linear layer's forward through its packed copy, made on first use and kept: a decode step only
    swaps them in ({} where the copies are not used)."""
    packed = getattr(span, "_packed_linears", None)
    if packed is None:
        linears = [m for m in span.modules() if type(m) is nn.Linear]  # not bitsandbytes' subclasses
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        usable = (span.device.type == "cpu" and torch.backends.mkldnn.is_available() and linears
                  and all(m.weight.dtype == torch.float32 for m in linears))
        if usable and psutil.virtual_memory().available > 2 * size:
            logger.info(f"packing {size / 2**20:.0f} MiB of linear weights for decode steps (oneDNN)")
            packed = {m: functools.partial(_packed_forward, m, torch.ops.mkldnn._reorder_linear_weight(
                m.weight.detach(), PACKED_FOR_ROWS)) for m in linears}
        else:
            packed = {}
        span._packed_linears = packed
    return packed


def _packed_forward(linear: nn.Linear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, linear.bias, "none", [], "")
