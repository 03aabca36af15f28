"""Choosing the chain of servers that a client's hidden states go through."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Collection

from routing.state import SwarmState


class NoChainError(LookupError):
    """Some block has no usable server: the message names the blocks."""


@dataclass(frozen=True)
class ChainLink:
    peer_id: str
    start: int
    end: int


def make_chain(state: SwarmState, start: int = 0, end: int | None = None, *,
               banned: Collection[str] = (), rng: random.Random | None = None) -> list[ChainLink]:
    """Servers that together cover blocks [start, end) in order, with no gap and no overlap.

    Greedy: at each block take a server that reaches furthest (fewest hops), ties broken at random so
    that clients spread over equivalent servers. A server may be used for a part of its span.
    """
    end = state.num_blocks if end is None else end
    rng = rng or random.Random()
    online = {peer: info for peer, info in state.online().items() if peer not in banned}
    chain, block = [], start
    while block < end:
        candidates = [(min(info.end, end), peer) for peer, info in online.items() if info.start <= block < info.end]
        if not candidates:
            missing = [b for b in range(block, end)
                       if not any(info.start <= b < info.end for info in online.values())]
            raise NoChainError(f"no server holds block(s) {_ranges(missing)} of {state.num_blocks}; "
                               f"start a server with --blocks covering them, or wait for one to join")
        reach = max(c[0] for c in candidates)
        peer = rng.choice(sorted(p for r, p in candidates if r == reach))
        chain.append(ChainLink(peer, block, reach))
        block = reach
    return chain


def _ranges(blocks: list[int]) -> str:
    parts, run = [], []
    for b in blocks:
        if run and b != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(b)
    if run:
        parts.append(run)
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)
