"""Where a server should sit: the span where the swarm's throughput grows most.

The swarm's throughput is its bottleneck: the least total throughput over blocks, where a server adds
its throughput to every block it holds (a token must pass every block). A joining server takes the
window that raises that minimum most; a serving server moves when leaving its place for the best
window raises the minimum by more than a threshold (hysteresis, so servers don't oscillate).
"""
from __future__ import annotations

from routing.state import ServerInfo, SwarmState


def block_throughput(state: SwarmState, exclude: str | None = None) -> list[float]:
    """Sum of the throughput of the online servers that hold each block."""
    totals = [0.0] * state.num_blocks
    for peer, info in state.online().items():
        if peer == exclude:
            continue
        for block in range(info.start, min(info.end, state.num_blocks)):
            totals[block] += info.throughput
    return totals


def swarm_throughput(state: SwarmState) -> float:
    return min(block_throughput(state), default=0.0)


def choose_span(state: SwarmState, num_blocks: int, throughput: float = 1.0,
                exclude: str | None = None) -> tuple[int, int]:
    """The window of ``num_blocks`` blocks that maximizes the swarm's bottleneck once a server of
    ``throughput`` sits there; among equals, the window holding the least throughput (it fills gaps)."""
    totals = block_throughput(state, exclude)
    num_blocks = min(num_blocks, state.num_blocks)
    prefix_min, suffix_min = _prefix_min(totals), _prefix_min(totals[::-1])[::-1]

    def score(start: int) -> tuple[float, float, int]:
        end = start + num_blocks
        outside = min(prefix_min[start], suffix_min[end])
        inside = min(totals[start:end]) + throughput
        return (-min(outside, inside), sum(totals[start:end]), start)

    best = min(range(state.num_blocks - num_blocks + 1), key=score)
    return best, best + num_blocks


def should_move(state: SwarmState, peer_id: str, threshold: float = 1.1) -> tuple[int, int] | None:
    """The span ``peer_id`` should move to, or None when moving would not raise the swarm's throughput
    by more than ``threshold`` times (gaps count as zero throughput, so filling one always wins)."""
    me: ServerInfo = state.servers[peer_id]
    num_blocks = me.end - me.start
    current = swarm_throughput(state)
    start, end = choose_span(state, num_blocks, me.throughput, exclude=peer_id)
    if (start, end) == (me.start, me.end):
        return None
    moved = SwarmState(state.num_blocks, dict(state.servers), state.rtt)
    moved.servers[peer_id] = ServerInfo(me.state, start, end, me.throughput)
    after = swarm_throughput(moved)
    if after > current * threshold or (current == 0 and after > 0):
        return start, end
    return None


def _prefix_min(values: list[float]) -> list[float]:
    """out[i] = min(values[:i]) (inf for an empty prefix); len(out) = len(values) + 1."""
    out = [float("inf")]
    for v in values:
        out.append(min(out[-1], v))
    return out
