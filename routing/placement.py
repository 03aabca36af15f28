"""Where a server should sit: the span where the swarm's throughput grows most.

The swarm's throughput is its bottleneck: the least total throughput over blocks, where a server adds
its throughput to every block it holds (a token must pass every block). A joining server takes the
window that raises that minimum most; a serving server moves when leaving its place for the best
window raises the minimum by more than a threshold (hysteresis, so servers don't oscillate).

Announced throughput is a claim nobody checked. Placement counts a server as at most CLAIM_CAP times the
median server's speed per block, so that one announcing 10x its speed cannot pull others off its blocks.
"""
from __future__ import annotations

from routing.state import ServerInfo, SwarmState

CLAIM_CAP = 2.5


def claim_cap(state: SwarmState) -> float:
    """The most block-tokens/s placement believes of one server: CLAIM_CAP x the median server's."""
    speeds = sorted(info.throughput * (info.end - info.start) for info in state.online().values())
    return CLAIM_CAP * speeds[len(speeds) // 2] if speeds else float("inf")


def counted(info: ServerInfo, cap: float) -> float:
    """What ``info`` adds to each block it holds, as placement counts it."""
    return min(info.throughput, cap / max(info.end - info.start, 1))


def block_throughput(state: SwarmState, exclude: str | None = None, cap: float | None = None) -> list[float]:
    """Sum of the counted throughput of the online servers that hold each block."""
    cap = claim_cap(state) if cap is None else cap
    totals = [0.0] * state.num_blocks
    for peer, info in state.online().items():
        if peer == exclude:
            continue
        for block in range(info.start, min(info.end, state.num_blocks)):
            totals[block] += counted(info, cap)
    return totals


def swarm_throughput(state: SwarmState) -> float:
    return min(block_throughput(state), default=0.0)


def choose_span(state: SwarmState, num_blocks: int, throughput: float = 1.0, exclude: str | None = None,
                totals: list[float] | None = None) -> tuple[int, int]:
    """The window of ``num_blocks`` blocks that maximizes the swarm's bottleneck once a server of
    ``throughput`` sits there; among equals, the window holding the least throughput (it fills gaps).
    ``totals``: the blocks' throughput if the caller keeps it (else read from ``state``)."""
    totals = block_throughput(state, exclude) if totals is None else totals
    num_blocks = min(num_blocks, state.num_blocks)
    prefix_min, suffix_min = _prefix_min(totals), _prefix_min(totals[::-1])[::-1]

    def score(start: int) -> tuple[float, float, int]:
        end = start + num_blocks
        outside = min(prefix_min[start], suffix_min[end])
        inside = min(totals[start:end]) + throughput
        return (-min(outside, inside), sum(totals[start:end]), start)

    best = min(range(state.num_blocks - num_blocks + 1), key=score)
    return best, best + num_blocks


def should_move(state: SwarmState, peer_id: str, threshold: float = 1.1, totals: list[float] | None = None,
                cap: float | None = None) -> tuple[int, int] | None:
    """The span ``peer_id`` should move to, or None when moving would not raise the swarm's throughput
    by more than ``threshold`` times (gaps count as zero throughput, so filling one always wins).
    ``totals`` and ``cap``: as the caller keeps them (else read from ``state``)."""
    me: ServerInfo = state.servers[peer_id]
    cap = claim_cap(state) if cap is None else cap
    totals = block_throughput(state, cap=cap) if totals is None else totals
    mine = counted(me, cap)
    without = list(totals)
    for block in range(me.start, min(me.end, state.num_blocks)):
        without[block] -= mine
    start, end = choose_span(state, me.end - me.start, mine, totals=without)
    if (start, end) == (me.start, me.end):
        return None
    current = min(totals, default=0.0)
    after = min((t + mine if start <= block < end else t for block, t in enumerate(without)), default=0.0)
    if after > current * threshold or (current == 0 and after > 0):
        return start, end
    return None


def _prefix_min(values: list[float]) -> list[float]:
    """out[i] = min(values[:i]) (inf for an empty prefix); len(out) = len(values) + 1."""
    out = [float("inf")]
    for v in values:
        out.append(min(out[-1], v))
    return out
