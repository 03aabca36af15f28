"""LoRA weights supplied per request: added to a span's frozen linear layers by forward hooks.

The weights of blocks [first, last) travel as one flat tensor: for each block in order, for each target
module in the order of ``layout``, A [rank, in] then B [out, rank] (peft's lora_A / lora_B). The output of
a target module becomes ``W x + scale * B A x``, exactly peft's LoRA with dropout 0.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from shards.span import BlockSpan

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PEFT_KEY = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


@dataclass
class LoraWeights:
    """LoRA weights of consecutive blocks, one row each (the layout above), with what interprets them."""
    targets: list[str]
    rank: int
    scale: float              # alpha / rank, as peft
    weights: torch.Tensor     # [blocks, per-block numel]


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


def split_row(row: torch.Tensor, layout: list[tuple[str, int, int]], rank: int) -> Iterator[tuple]:
    """One block's row as (module name, A [rank, in], B [out, rank]) per target: views into ``row``."""
    offset = 0
    for name, in_features, out_features in layout:
        a = row[offset:offset + rank * in_features].view(rank, in_features)
        offset += rank * in_features
        b = row[offset:offset + out_features * rank].view(out_features, rank)
        offset += out_features * rank
        yield name, a, b


@contextlib.contextmanager
def applied_lora(span: BlockSpan, blocks: tuple[int, int], lora: LoraWeights) -> Iterator[None]:
    """Within this block, the span's target modules of ``blocks`` add the LoRA update of ``lora``
    (whose rows are those blocks)."""
    layout, scale = lora_layout(span, blocks[0], lora.targets), lora.scale
    handles = []
    span.lora_hooks += 1
    try:
        for index, row in zip(range(*blocks), lora.weights):
            modules = dict(span.layers[index - span.start].named_modules())
            for name, a, b in split_row(row, layout, lora.rank):
                def hook(module, args, output, a=a, b=b):
                    return output + scale * (args[0].to(a.dtype) @ a.T @ b.T).to(output.dtype)

                handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        span.lora_hooks -= 1


def content_hash(tensor: torch.Tensor) -> str:
    """What a server caches client LoRA weights under: the same on both sides of the wire."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{list(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:32]


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    return alpha / rank ** 0.5 if use_rslora else alpha / rank


# ---------------------------------------------------------------------- peft adapter directories
def peft_state_dict(weights: torch.Tensor, layout: list[tuple[str, int, int]], rank: int,
                    layer_prefix: str = "base_model.model.model.layers") -> dict[str, torch.Tensor]:
    """Rows [num_blocks, per-block numel] as the tensors of a peft adapter file (adapter name left out)."""
    state = {}
    for block, row in enumerate(weights.detach().cpu()):
        for name, a, b in split_row(row, layout, rank):
            state[f"{layer_prefix}.{block}.{name}.lora_A.weight"] = a.contiguous()
            state[f"{layer_prefix}.{block}.{name}.lora_B.weight"] = b.contiguous()
    return state


def rows_from_peft(state: dict[str, torch.Tensor], layout: list[tuple[str, int, int]], rank: int,
                   blocks: tuple[int, int]) -> torch.Tensor:
    """The inverse of ``peft_state_dict`` for blocks [first, last); a block the adapter leaves out gets zeros."""
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.search(key)
        if match:
            found[int(match.group(1)), match.group(2), match.group(3)] = tensor
    rows = []
    for block in range(*blocks):
        parts = []
        for name, in_features, out_features in layout:
            for which, shape in (("A", (rank, in_features)), ("B", (out_features, rank))):
                tensor = found.get((block, name, which))
                if tensor is None:
                    tensor = torch.zeros(shape)
                elif tuple(tensor.shape) != shape:
                    raise ValueError(f"lora_{which} of block {block} {name} has shape {list(tensor.shape)}, "
                                     f"expected {list(shape)} for rank {rank}")
                parts.append(tensor.float().flatten())
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def check_lora_config(config: dict, source: str) -> None:
    """Refuse what these hooks do not implement of a peft LoraConfig (as a dict or adapter_config.json)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{source}: only LoRA adapters are supported, not {config.get('peft_type')}")
    if config.get("use_dora") or config.get("fan_in_fan_out") or config.get("bias", "none") != "none":
        raise ValueError(f"{source}: DoRA, fan_in_fan_out and LoRA biases are not supported")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"{source}: target_modules must be a list of module names (regular expressions are "
                         f"not supported), got {targets!r}")


def read_adapter_config(path: Path) -> dict:
    """peft's adapter_config.json, checked for what these hooks implement."""
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a peft adapter directory: no {ADAPTER_CONFIG}")
    config = json.loads(config_file.read_text())
    check_lora_config(config, str(path))
    return config


def resolve_adapter(name_or_path: str) -> tuple[str, Path]:
    """(name clients ask for, local directory): a local directory is named by its last component, a hub
    repo id by itself (its config and weights are downloaded on first use)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path.resolve().name, path
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", name_or_path):
        raise FileNotFoundError(f"no adapter directory at {name_or_path!r} (and it is not a hub repo id)")
    from huggingface_hub import snapshot_download
    local = snapshot_download(name_or_path, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    return name_or_path, Path(local)


def load_adapter(path: str | Path, span: BlockSpan) -> LoraWeights:
    """A peft LoRA adapter directory, for the blocks of ``span`` only."""
    from safetensors import safe_open
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_WEIGHTS} (save adapters with safetensors)")
    targets, rank = sorted(config["target_modules"]), int(config["r"])
    layout = lora_layout(span, span.start, targets)
    with safe_open(weights_file, framework="pt") as f:  # only this span's tensors are read
        state = {key: f.get_tensor(key) for key in f.keys()
                 if (match := _PEFT_KEY.search(key)) and span.start <= int(match.group(1)) < span.end}
    rows = rows_from_peft(state, layout, rank, (span.start, span.end))
    scale = lora_scale(config.get("lora_alpha", rank), rank, config.get("use_rslora", False))
    return LoraWeights(targets, rank, scale, rows.to(span.dtype_).to(span.device))
