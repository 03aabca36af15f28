"""Client LoRA weights kept by content hash, so that they cross the network once per update.

A training step sends the weights with its forward and names them by hash in its backward; the key is
computed here from the bytes received, so a client cannot plant weights under another client's hash.
Least recently used weights leave first once the byte budget is full: however many clients train at
once, the cache stays within its budget (a client whose weights left simply sends them again).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from shards.lora import content_hash


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
