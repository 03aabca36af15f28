"""Decode steps of several sessions as one forward.

A decode step reads every weight of the span for one token, so running the steps of the sessions waiting
at the same time as one batch costs little more than one of them. Each session keeps its own KV cache (of
its own length): for the batched forward their caches are left-padded to the longest and stacked, the
padding masked out, each row keeps its own positions; afterwards each session's cache gets exactly the
keys and values of its new token, as if it had run alone.

Only what can share a forward is batched (swarm.server.scheduler groups tasks by key): one token per row,
the same blocks, no LoRA weights or deep prompts, caches already holding at least one token, and spans whose
layers all attend to the full past (sliding-window caches keep a window of their own).
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
    """items: (request, cache, blocks) of decode steps with the same blocks -> each one's output, in its
    request's dtype, on the CPU."""
    blocks = items[0][2]
    local = range(blocks[0] - span.start, blocks[1] - span.start)
    pasts = [cache.layers[local.start].get_seq_length() for _, cache, _ in items]
    longest = max(pasts)
    hidden, masks, positions, rows = [], [], [], []
    for (request, _, _), past in zip(items, pasts):
        batch = request.hidden.shape[0]
        hidden.append(to_span(request.hidden))
        own = to_span(request.attention_mask)
        own = torch.ones(batch, past + 1, dtype=torch.long, device=span.device) if own is None else own.long()
        masks.append(F.pad(own, (longest - past, 0)))  # padding on the left, masked out
        given = to_span(request.position_ids)
        positions.append(given if given is not None else torch.full((batch, 1), past, device=span.device))
        rows.append(batch)
    shared = DynamicCache(config=span.span_config)
    for i in local:
        keys = [F.pad(cache.layers[i].keys, (0, 0, longest - past, 0)) for (_, cache, _), past in zip(items, pasts)]
        values = [F.pad(cache.layers[i].values, (0, 0, longest - past, 0)) for (_, cache, _), past in zip(items, pasts)]
        shared.layers[i].update(torch.cat(keys), torch.cat(values))
    output = span(torch.cat(hidden), cache=shared, attention_mask=torch.cat(masks), position_ids=torch.cat(positions),
                  blocks=blocks)
    results, first = [], 0
    for (request, cache, _), batch in zip(items, rows):
        for i in local:  # the new token's keys and values, appended as its own forward would have
            layer = shared.layers[i]
            cache.layers[i].update(layer.keys[first:first + batch, :, -1:], layer.values[first:first + batch, :, -1:])
        results.append(output[first:first + batch].to(device="cpu", dtype=request.dtype))
        first += batch
    return results
