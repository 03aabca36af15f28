"""LoRA weights supplied per request: added to a span's frozen linear layers by forward hooks.

The weights of blocks [first, last) travel as one flat tensor: for each block in order, for each target
module in the order of ``layout``, A [rank, in] then B [out, rank] (peft's lora_A / lora_B). The output of
a target module becomes ``W x + scale * B A x``, exactly peft's LoRA with dropout 0.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from shards.span import BlockSpan


def lora_layout(span: BlockSpan, first: int, targets: list[str]) -> list[tuple[str, int, int]]:
    """(module name inside a block, in_features, out_features) of each target, in wire order."""
    return layer_lora_layout(span.layers[first - span.start], targets)


def model_lora_layout(config, targets: list[str]) -> list[tuple[str, int, int]]:
    """The same layout from a config alone (a block built on the meta device): what a client needs."""
    from shards.families import get_family
    with torch.device("meta"):
        layer = get_family(config).decoder_layer(config, layer_idx=0)
    return layer_lora_layout(layer, targets)


def layer_lora_layout(layer: nn.Module, targets: list[str]) -> list[tuple[str, int, int]]:
    layout = []
    for name, module in layer.named_modules():
        if name.split(".")[-1] in targets:
            in_features = getattr(module, "in_features", None)
            if not isinstance(module, nn.Linear) and in_features is None:
                raise ValueError(f"target module {name!r} is not a linear layer")
            layout.append((name, module.in_features, module.out_features))
    found = {name.split(".")[-1] for name, _, _ in layout}
    if set(targets) - found:
        raise ValueError(f"unknown target modules {sorted(set(targets) - found)}; this model's linear layers "
                         f"are {sorted({n.split('.')[-1] for n, m in layer.named_modules() if isinstance(m, nn.Linear)})}")
    return layout


def lora_numel(layout: list[tuple[str, int, int]], rank: int, num_blocks: int) -> int:
    return num_blocks * sum(rank * (i + o) for _, i, o in layout)


@contextlib.contextmanager
def applied_lora(span: BlockSpan, blocks: tuple[int, int], targets: list[str], rank: int, scale: float,
                 flat: torch.Tensor) -> Iterator[None]:
    """Within this block, the span's target modules of ``blocks`` add the LoRA update of ``flat``."""
    layout = lora_layout(span, blocks[0], targets)
    handles, offset = [], 0
    try:
        for index in range(*blocks):
            modules = dict(span.layers[index - span.start].named_modules())
            for name, in_features, out_features in layout:
                a = flat[offset:offset + rank * in_features].view(rank, in_features)
                offset += rank * in_features
                b = flat[offset:offset + out_features * rank].view(out_features, rank)
                offset += out_features * rank

                def hook(module, args, output, a=a, b=b):
                    return output + scale * (args[0].to(a.dtype) @ a.T @ b.T).to(output.dtype)

                handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
