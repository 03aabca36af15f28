"""Decode steps of several sessions as one forward.

A decode step reads every weight of the span for one token, so running the steps of the sessions waiting
at the same time as one batch costs little more than one of them. Each session keeps its own KV cache (of
its own length): for the batched forward their caches are left-padded to the longest and stacked, the
padding masked out, each row keeps its own positions; afterwards each session's cache gets exactly the
keys and values of its new token, as if it had run alone.

Only what can share a forward is batched (swarm.server.scheduler groups tasks by key): as many new tokens
per row (decode steps; prompts of the same length, as when clients start together), the same blocks, no LoRA
weights or deep prompts, and spans whose layers all attend to the full past (sliding-window caches keep a
window of their own).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache

from shards import BlockSpan


def can_batch(span: BlockSpan) -> bool:
    return all(kind == "full_attention" for kind in span.layer_types)


def run_batched(span: BlockSpan, items: list[tuple], to_span: Callable) -> list[torch.Tensor]:
    """items: (request, cache, blocks) of steps with the same blocks and as many new tokens -> each one's
    output, in its request's dtype, on the CPU."""
    blocks, length = items[0][2], items[0][0].hidden.shape[1]
    local = range(blocks[0] - span.start, blocks[1] - span.start)
    pasts = [cache.layers[local.start].get_seq_length() for _, cache, _ in items]
    longest = max(pasts)
    hidden, masks, positions, rows = [], [], [], []
    for (request, _, _), past in zip(items, pasts):
        batch = request.hidden.shape[0]
        hidden.append(to_span(request.hidden))
        own = to_span(request.attention_mask)
        own = torch.ones(batch, past + length, dtype=torch.long, device=span.device) if own is None else own.long()
        masks.append(F.pad(own, (longest - past, 0)))  # padding on the left, masked out
        given = to_span(request.position_ids)
        positions.append(given if given is not None else
                         torch.arange(past, past + length, device=span.device).expand(batch, -1))
        rows.append(batch)
    shared = DynamicCache(config=span.span_config)
    if longest > 0:  # (a new session's cache is empty: left padding only)
        for i in local:
            like = next(cache.layers[i] for (_, cache, _), past in zip(items, pasts) if past == longest)
            keys, values = [], []
            for (_, cache, _), past, batch in zip(items, pasts, rows):
                layer = cache.layers[i]
                own_keys, own_values = (layer.keys, layer.values) if past > 0 else (
                    like.keys.new_zeros((batch, like.keys.shape[1], 0, like.keys.shape[3])),
                    like.values.new_zeros((batch, like.values.shape[1], 0, like.values.shape[3])))
                keys.append(F.pad(own_keys, (0, 0, longest - past, 0)))
                values.append(F.pad(own_values, (0, 0, longest - past, 0)))
            shared.layers[i].update(torch.cat(keys), torch.cat(values))
    output = span(torch.cat(hidden), cache=shared, attention_mask=torch.cat(masks),
                  position_ids=torch.cat(positions), blocks=blocks)
    results, first = [], 0
    for (request, cache, _), batch in zip(items, rows):
        for i in local:  # the new tokens' keys and values, appended as its own forward would have
            layer = shared.layers[i]
            cache.layers[i].update(layer.keys[first:first + batch, :, -length:],
                                   layer.values[first:first + batch, :, -length:])
        results.append(output[first:first + batch].to(device="cpu", dtype=request.dtype))
        first += batch
    return results
