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


def wire_bytes(hidden: torch.Tensor) -> int:
    return hidden.numel() * hidden.element_size()


def cut_inputs(extra: dict, position: int, kept: int) -> dict:
    """A step's position ids and attention mask for its first ``kept`` tokens (the mask covers the past too)."""
    ids, mask = extra.get("position_ids"), extra.get("attention_mask")
    return {**extra, "position_ids": None if ids is None else ids[:, :kept],
            "attention_mask": None if mask is None else mask[:, :position]}


def concat_history(history: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict] | None:
    """All past steps as one: hidden states and position ids concatenated, the latest attention mask."""
    if not history:
        return None
    hidden = torch.cat([h for h, _ in history], dim=1)
    batch, past = hidden.shape[0], 0
    positions = []
    for h, extra in history:
        length = h.shape[1]
        given = extra.get("position_ids")
        positions.append(given if given is not None else torch.arange(past, past + length).expand(batch, -1))
        past += length
    mask = history[-1][1].get("attention_mask")
    return hidden, optional_inputs(batch, 0, past, mask, torch.cat(positions, dim=1))
