"""What a server loads before it serves: how many blocks fit in memory, the span itself with the fastest way to
run its decode steps, and the name people know the checkpoint by."""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

from shards import BlockSpan, Checkpoint
from shards.decode_paths import DecodePlan, get_plan, use_plan
from shards.memory import block_cost
from swarm.server.config import ServerConfig
from swarm.server.memory_budget import MemoryClaims, measure


class ServerStartError(RuntimeError):
    """The server cannot start as configured; the message says what to change (`cocoon serve` prints it)."""


def blocks_that_fit(config: ServerConfig, checkpoint: Checkpoint, total_blocks: int) -> tuple[int, MemoryClaims]:
    """``--num-blocks auto``: how many blocks fit, and the claim on their memory (held until they are loaded,
    so that servers starting side by side do not count the same free memory)."""
    cost = block_cost(checkpoint, dtype=config.dtype, quant=config.quant, device=config.device,
                      cache_tokens=config.cache_tokens)
    claims, budget = MemoryClaims(), None

    def decide(claimed: int) -> int:
        nonlocal budget
        budget = measure(config.device, config.max_memory, claimed)
        return min(budget.blocks(cost), total_blocks) * cost.total
    claims.choose(decide)
    print(budget.describe(cost, total_blocks), flush=True)
    if budget.blocks(cost) < 1:
        raise ServerStartError(f"not even one block fits in {budget.where}: free memory, give --max-memory, lower "
                               f"--cache-tokens ({config.cache_tokens}), or serve smaller blocks (--quant nf4 or int8 "
                               f"on CUDA, --dtype bfloat16)")
    return min(budget.blocks(cost), total_blocks), claims


def load_span(config: ServerConfig, checkpoint: Checkpoint, start: int, end: int,
              plan: DecodePlan | None) -> tuple[BlockSpan, DecodePlan]:
    """Blocks [start, end), set up to run decode steps by ``plan`` (for the first span: the plan measured as
    fastest on this machine, or the one --decode-path fixes)."""
    span = BlockSpan.from_pretrained(checkpoint, start, end, dtype=config.dtype, quant=config.quant,
                                     device=config.device, progress=True)
    if plan is None:
        plan = choose_plan(config, span)
    use_plan(span, plan)  # packed copies made now, not at the first client's first decode step
    if span.decode_graphs is not None:  # the first client's first token should not wait for the capture
        started = time.perf_counter()
        span.decode_graphs.prepare(1, range(end - start), span.dtype_)
        print(f"Captured the CUDA graphs of a decode step in {time.perf_counter() - started:.1f} s", flush=True)
    return span, plan


def choose_plan(config: ServerConfig, span: BlockSpan) -> DecodePlan:
    fixed = DecodePlan.parse(config.decode_path)
    started = time.perf_counter()
    plan, measured = get_plan(span, fixed)
    how = f"measured in {time.perf_counter() - started:.1f} s" if measured else \
        "as --decode-path says" if plan == DecodePlan(**fixed) else "measured before on this machine"
    print(f"Decode steps: {plan} ({how})", flush=True)
    return plan


def model_name(name_or_path: str) -> str:
    """What people call a checkpoint: a repo id as it is, a hub cache directory (models--org--name) as its repo
    id, a directory by its name (its snapshot's repo for a snapshot directory)."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path[:96]
    parts = path.resolve().parts
    for part in reversed(parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")[:96]
    return path.resolve().name[:96]


def return_freed_buffers() -> None:
    """Frames and activations of 128 KiB and more get pages of their own, unmapped when freed. glibc raises
    this threshold after every large free by default, after which a burst of large frames (a peer's, up to
    its quota) stays in the heap, interleaved with tensors, long after it is gone."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass
