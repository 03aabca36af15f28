"""Where a joining server should sit: the span whose blocks the swarm serves least."""
from __future__ import annotations

from routing.state import SwarmState


def block_throughput(state: SwarmState) -> list[float]:
    """Sum of the throughput of the online servers that hold each block."""
    totals = [0.0] * state.num_blocks
    for info in state.online().values():
        for block in range(info.start, min(info.end, state.num_blocks)):
            totals[block] += info.throughput
    return totals


def choose_span(state: SwarmState, num_blocks: int) -> tuple[int, int]:
    """The window of ``num_blocks`` consecutive blocks whose weakest block is weakest (then: least total),
    so that a new server raises the swarm's bottleneck; the first such window on ties."""
    totals = block_throughput(state)
    num_blocks = min(num_blocks, state.num_blocks)
    best = min(range(state.num_blocks - num_blocks + 1),
               key=lambda s: (min(totals[s:s + num_blocks]), sum(totals[s:s + num_blocks]), s))
    return best, best + num_blocks
