"""What a client sends with its hidden states: position ids, attention masks, and per-block tensors."""
from __future__ import annotations

import torch


def block_slice(block_tensors: dict, start: int, end: int, offset: int = 0) -> dict:
    """The rows of blocks [start, end) of tensors whose first dimension is blocks [offset, ...)."""
    return {name: None if t is None else t[start - offset:end - offset].contiguous() for name, t in block_tensors.items()}


def optional_inputs(batch: int, past: int, length: int, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """Position ids and attention mask, left out when they say what the server assumes anyway (no padding)."""
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if position_ids is not None and attention_mask is None and position_ids.ndim == 2:
        default = list(range(past, past + length))
        if all(row == default for row in position_ids.tolist()):  # (compared as lists: no torch op per step)
            position_ids = None
    if position_ids is not None:
        position_ids = position_ids.long().cpu().expand(batch, -1).contiguous()
    if attention_mask is not None:
        attention_mask = attention_mask.long().cpu()
    return {"position_ids": position_ids, "attention_mask": attention_mask}
