"""Client LoRA weights kept by content hash, so that they cross the network once per update.

A training step sends the weights with its forward and names them by hash in its backward; the key is
computed here from the bytes received, so a client cannot plant weights under another client's hash.
Least recently used weights leave first once the byte budget is full: however many clients train at
once, the cache stays within its budget (a client whose weights left simply sends them again).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from shards import BlockSpan
from shards.lora import LoraWeights, content_hash, lora_layout, lora_numel
from swarm.wire.codes import ErrorCode, WireError, bad
from swarm.wire.requests import SpanRequest


class LoraCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0

    def put(self, received: torch.Tensor, stored: torch.Tensor) -> str:
        """Keep ``stored`` (the weights ready for compute) under the hash of ``received`` (as they arrived)."""
        key = content_hash(received)
        if key in self.entries:
            self.entries.move_to_end(key)
            return key
        size = stored.numel() * stored.element_size()
        if size > self.max_bytes:
            return key  # larger than the whole cache: used for this request only
        while self.bytes + size > self.max_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self.entries[key] = stored
        self.bytes += size
        return key

    def get(self, key: str) -> torch.Tensor | None:
        tensor = self.entries.get(key)
        if tensor is not None:
            self.entries.move_to_end(key)
        return tensor


def request_lora(span: BlockSpan, adapters: dict[str, LoraWeights], cache: LoraCache, request: SpanRequest
                 ) -> LoraWeights | None:
    """The LoRA weights a request computes with: a served adapter picked by name, or the client's own weights
    [blocks, per-block numel] (laid out as shards.lora describes), sent as a tensor or named by the hash of
    weights sent before. None: the plain blocks."""
    blocks = (request.start, request.end)
    if request.adapter is not None:
        served = adapters.get(request.adapter)
        if served is None:
            raise bad(f"this server does not serve adapter {request.adapter!r}; it serves {sorted(adapters) or 'none'}")
        rows = served.weights[blocks[0] - span.start:blocks[1] - span.start]
        return LoraWeights(served.targets, served.rank, served.scale, rows)
    spec = request.lora_spec
    if spec is None:
        return None
    try:
        layout = lora_layout(span, blocks[0], spec.targets)
    except ValueError as e:
        raise bad(str(e)) from None
    shape = (blocks[1] - blocks[0], lora_numel(layout, spec.rank, 1))
    if request.lora is None:
        stored = cache.get(spec.hash)
        if stored is None:
            raise WireError(ErrorCode.LORA_NOT_CACHED,
                            f"lora weights not cached: {spec.hash!r} is not on this server; send the weights")
    else:
        stored = request.lora.to(device=span.device, dtype=span.dtype_)
    if tuple(stored.shape) != shape:
        raise bad(f"lora weights must have shape {list(shape)} for rank {spec.rank} and targets {spec.targets}, "
                  f"got {list(stored.shape)}")
    if request.lora is not None:
        cache.put(request.lora, stored)
    return LoraWeights(spec.targets, spec.rank, spec.alpha / spec.rank, stored)
