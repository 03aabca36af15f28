"""Decode steps (and prompts, where measured faster) on a CPU through copies of the linear weights that oneDNN
packed once.

A decode step multiplies a few rows by every weight matrix of the span, and on a CPU that is bound by
reading the weights. oneDNN's packed layout can read them faster than MKL's path through the plain matrix,
and for a batch of rows MKL also packs the whole matrix on every call (bench/RESULTS.md, "Figures moved out
of comments", has what was measured).
Outputs differ from MKL's by float32 rounding (about 1e-6 relative), as a GEMM of a different number of rows
does. The copies double the memory of the linear weights, so they are made only when the machine has that
much memory free; otherwise steps use the plain weights. Prompts take them too where the plan timed them faster
on a prompt (MKL's GEMM of 16 to 64 rows was the slow one on the host of 2026-12-08); backward passes never do.

Whether a server uses them at all is measured on its machine (shards.decode_paths): on the 2-core development
machine of 2026-12-02 they were slower than MKL at hidden 512 and 2048 alike. They go through two private
oneDNN ops of torch, the only private torch ops of the project: this file checks they are there, and without
them the plain path is the only one.
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
TORCH_VERSIONS = ((2, 4), (3, 0))  # the private ops below have had these signatures in these releases


def packing_ops_present() -> bool:
    """Whether this torch has the private oneDNN ops that pack linear weights (CPU decode steps)."""
    version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    if not TORCH_VERSIONS[0] <= version < TORCH_VERSIONS[1] or not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkldnn, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


def _linears(span: BlockSpan) -> list[nn.Linear]:
    return [m for m in span.modules() if type(m) is nn.Linear]  # not bitsandbytes' subclasses


def packing_possible(span: BlockSpan) -> bool:
    """float32 linear layers on a CPU, torch with the private ops, and memory for a second copy of the weights."""
    linears = _linears(span)
    if span.device.type != "cpu" or not linears or any(m.weight.dtype != torch.float32 for m in linears) or \
            not packing_ops_present():
        return False
    return psutil.virtual_memory().available > 2 * sum(m.weight.numel() * m.weight.element_size() for m in linears)


@contextlib.contextmanager
def packed_linears(span: BlockSpan) -> Iterator[None]:
    """Within this block, the span's linear layers compute with their packed copies, where its decode plan made
    them (shards.decode_paths.use_plan); otherwise this changes nothing."""
    packed = span.packed_linears or {}
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
    packed = span.packed_linears
    if packed is None:
        packed = {}
        if packing_possible(span):
            logger.info("packing the linear weights for decode steps (oneDNN)")
            packed = {m: functools.partial(_packed_forward, m, torch.ops.mkldnn._reorder_linear_weight(
                m.weight.detach(), PACKED_FOR_ROWS)) for m in _linears(span)}
        span.packed_linears = packed
    return packed


def drop_packed_forwards(span: BlockSpan) -> None:
    """Free the packed copies and use none from now on (the decode plan took another path)."""
    span.packed_linears = {}


def _packed_forward(linear: nn.Linear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, linear.bias, "none", [], "")
