"""``--num-blocks auto``: as many blocks as fit in this server's memory, with the arithmetic shown.

The limit is ``--max-memory`` or, without it, what the device has free now: GPU memory on CUDA, RAM on a CPU,
for the server's whole process tree (its DHT process and p2p daemon included, on a CPU). What the server already
uses counts against it, and a margin stays free for activations. Servers starting together on one machine claim
what they are about to load in a shared file (under a lock) until they have loaded it: the next one counts those
claims as taken, so that they do not each take all of the free memory.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil

from shards.memory import BlockCost, gb
from shards.throughput import cache_dir

MARGIN_FRACTION = 0.05  # of the limit, kept for activations and the allocator's slack
MIN_MARGIN = 128 * 2**20  # what a server grows by after it chose (its p2p and direct listeners, sessions)
UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def memory_size_arg(text: str) -> int:
    """``24GB``, ``512MB``, ``1.5GB`` or bytes."""
    import argparse
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    unit = found.group(2).upper().replace("I", "") if found else None
    if not found or unit not in UNITS or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 24GB or 512MB, got {text!r}")
    return int(float(found.group(1)) * UNITS[unit])


@dataclass
class MemoryBudget:
    limit: int  # bytes this server may use in all
    in_use: int  # bytes it uses already (imports, DHT, p2p daemon)
    claimed: int  # bytes other servers starting on this machine are about to load
    where: str  # what the limit is: "--max-memory", "free RAM", "free memory of cuda:0"

    @property
    def margin(self) -> int:
        return max(MIN_MARGIN, int(MARGIN_FRACTION * self.limit))

    @property
    def left(self) -> int:
        return self.limit - self.in_use - self.claimed - self.margin

    def blocks(self, cost: BlockCost) -> int:
        return max(0, self.left // cost.total)

    def describe(self, cost: BlockCost, total_blocks: int) -> str:
        fit = self.blocks(cost)
        claimed = f" - {gb(self.claimed)} claimed by servers starting beside it" if self.claimed else ""
        return (f"Memory: {gb(self.limit)} ({self.where}) - {gb(self.in_use)} in use{claimed} - {gb(self.margin)} "
                f"kept for activations = {gb(max(self.left, 0))} for blocks; a block takes {cost.describe()}: "
                f"{fit} block(s) fit, serving {min(fit, total_blocks)} of {total_blocks}")


def measure(device: str | None, max_memory: int | None, claimed: int) -> MemoryBudget:
    import torch
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device_.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device_)
        in_use = torch.cuda.memory_reserved(device_)
        where = f"free memory of {device_}"
    else:
        free, in_use, where = psutil.virtual_memory().available, tree_rss(os.getpid()), "free RAM"
    limit = in_use + free - claimed
    if max_memory is not None and max_memory < limit:
        limit, where = max_memory, "--max-memory"
    return MemoryBudget(limit, in_use, claimed if where != "--max-memory" else 0, where)


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its children."""
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


class MemoryClaims:
    """What the servers of this machine are about to allocate: the blocks they are loading, and the KV budget they
    reserved but did not fill yet. A claim lives as long as its process (dead processes' claims are dropped)."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "memory-claims.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.me = str(os.getpid())

    def choose(self, decide: Callable[[int], int]) -> int:
        """``decide(claimed by others)`` returns the bytes this server claims, under the machine-wide lock."""
        with _locked(self.path) as claims:
            others = {pid: size for pid, size in claims.items() if pid != self.me and psutil.pid_exists(int(pid))}
            mine = decide(sum(others.values()))
            claims.clear()
            claims.update(others, **{self.me: mine})
        return mine

    def update(self, nbytes: int) -> None:
        with _locked(self.path) as claims:
            claims[self.me] = nbytes


@contextmanager
def _locked(path: Path) -> Iterator[dict]:
    with open(path, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        try:
            claims = json.loads(file.read() or "{}")
        except ValueError:
            claims = {}
        yield claims
        file.seek(0)
        file.truncate()
        file.write(json.dumps(claims))
