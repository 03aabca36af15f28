"""What one block of a checkpoint costs in memory, before loading it: the arithmetic of ``--num-blocks auto``.

A block's weights are counted from the block itself, built on the meta device (no bytes read or allocated), at
the dtype and quantization it will run in. On a CPU with float32 weights the packed decode path
(shards.packed_linears) may keep a second, packed copy of every linear layer, so they count twice. The KV
budget (``--cache-tokens``) is reserved per block: every block keeps the cache of every token of every session.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from shards.checkpoint import Checkpoint
from shards.families import get_family
from shards.precision import resolve_dtype

QUANT_BYTES = {"none": None, "int8": 1.0, "nf4": 0.5 + 4 / 64}  # bytes per linear weight (nf4: plus its scales)


@dataclass(frozen=True)
class BlockCost:
    weights: int  # bytes of one block's parameters as they will run
    copies: int  # 2 where the CPU's packed decode path may keep a second copy of the linear layers
    linear_weights: int  # bytes of those linear layers (what a second copy takes)
    cache: int  # bytes of the KV budget in one block

    @property
    def total(self) -> int:
        return self.weights + (self.copies - 1) * self.linear_weights + self.cache

    def describe(self) -> str:
        copies = f" + {gb(self.linear_weights)} of packed copies (float32 on this CPU)" if self.copies > 1 else ""
        return f"{gb(self.weights)} of weights{copies} + {gb(self.cache)} of KV budget = {gb(self.total)}"


def block_cost(checkpoint: Checkpoint | PretrainedConfig, *, dtype: str = "auto", quant: str = "none",
               device: str | None = None, cache_tokens: int = 0) -> BlockCost:
    """The memory one block of ``checkpoint`` (or of a model of this config) takes when served with these options."""
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # what the dtype is, not whether this machine runs it (the bench sizes GPUs it does not have)
    torch_dtype = resolve_dtype(dtype, device_) if dtype == "auto" else getattr(torch, str(dtype).removeprefix("torch."))
    config = copy.deepcopy(checkpoint if isinstance(checkpoint, PretrainedConfig) else checkpoint.config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    with torch.device("meta"):
        layer = get_family(config).decoder_layer(config, layer_idx=0)
    linears = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    every = sum(p.numel() for p in layer.parameters())
    per_linear = QUANT_BYTES[quant] or torch_dtype.itemsize
    weights = int((every - linears) * torch_dtype.itemsize + linears * per_linear)
    packed = device_.type == "cpu" and torch_dtype == torch.float32 and quant == "none" and _packing_ops()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = cache_tokens * 2 * config.num_key_value_heads * head_dim * torch_dtype.itemsize
    return BlockCost(weights, 2 if packed else 1, linears * torch_dtype.itemsize, cache)


def _packing_ops() -> bool:
    from shards.packed_linears import packing_ops_present
    return packing_ops_present()


def gb(size: float) -> str:
    return f"{size / 2**30:.2f} GB" if size >= 2**30 / 10 else f"{size / 2**20:.0f} MB"
