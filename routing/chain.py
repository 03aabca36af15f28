"""Choosing the chain of servers that a client's hidden states go through.

A chain covers blocks [start, end) in order with no gap; a server may be entered in the middle of its
span and left before its end. The cost of a chain is the expected time per token: for every hop, the
round trip to that server, plus the compute of the blocks it runs at its throughput, slowed by its load.
What the client measured counts instead of what a server announces. An announced speed is a claim: once a
client has measured a few servers, one it has not measured counts as no faster than the swarm's fastest
quarter claims, times a random factor drawn per chain, so that unmeasured servers are tried at random rather
than by how much they claim (a server announcing 10x its speed would otherwise win every client's traffic
until each has tried it).
The cheapest chain is found by dynamic programming over blocks in O(blocks x servers per block).
"""
from __future__ import annotations


import random
from dataclasses import dataclass
from typing import Collection

from routing.state import ServerInfo, ServerState, SwarmState

DEFAULT_RTT = 0.05  # seconds, for a server this client has not measured yet
TRUST_AFTER = 5  # measured servers before unmeasured claims are held...
HOLD_QUANTILE = 0.25  # ...to the claim at this quantile of the swarm's seconds per block (the fastest quarter)...
SPREAD = 0.6  # ...times a factor drawn from [1 - SPREAD, 1 + SPREAD] per chain and server
HOLD_CLAIMS = True  # (off: bench/routing_simulate.py's "without the defences")


class NoChainError(LookupError):
    """Some block has no usable server: the message names the blocks."""


@dataclass(frozen=True)
class ChainLink:
    peer_id: str
    start: int
    end: int


def block_seconds(info: ServerInfo, *, training: bool = False, measured: float | None = None) -> float:
    """Seconds one token spends in one block of this server, counting the sessions it already serves. What
    the client measured itself (``measured``, decode steps) counts instead of what the server advertises."""
    if measured is not None and not training:
        return measured
    span_throughput = (info.prefill_throughput or info.throughput * 8) if training else info.throughput
    per_block = max(span_throughput, 1e-9) * (info.end - info.start)
    load = 1.0 + (info.sessions / info.max_sessions if info.max_sessions else 0.0)
    return load / per_block


def make_chain(state: SwarmState, start: int = 0, end: int | None = None, *, banned: Collection[str] = (),
               training: bool = False, batch_tokens: int = 1, rng: random.Random | None = None,
               adapter: str | None = None) -> list[ChainLink]:
    """The chain of least expected time per token (``training``: of most throughput for large batches,
    where round trips weigh ``1 / batch_tokens`` as much). Ties are broken at random so that load spreads.
    With ``adapter``, only servers that serve that LoRA adapter are used."""
    end = state.num_blocks if end is None else end
    rng = rng or random.Random()
    servers, hop, per_block = _candidates(state, start, end, banned, training, batch_tokens, adapter, rng)
    by_block: list[list[str]] = [[] for _ in range(end)]
    for peer, info in servers.items():
        per_block[peer] *= 1 + 1e-9 * rng.random()  # breaks ties between equal servers at random
        for block in range(max(info.start, start), min(info.end, end)):
            by_block[block].append(peer)

    # best[b]: cheapest time to have run blocks [start, b); inside[p]: cheapest time with the last hop
    # being server p, still inside its span. Back-pointers rebuild the chain.
    best = {start: (0.0, None)}
    inside: dict[str, tuple[float, int]] = {}  # peer -> (cost, block where we entered it)
    entry_of: dict[tuple[int, str], int] = {}
    for block in range(start, end):
        if not by_block[block]:
            missing = [b for b in range(block, end) if not by_block[b]]
            which = f" with adapter {adapter!r}" if adapter is not None else ""
            raise NoChainError(f"no server holds block(s) {_ranges(missing)} of {state.num_blocks}{which}; "
                               f"start a server with --blocks covering them, or wait for one to join")
        before, _ = best[block]
        updated = {}
        for peer in by_block[block]:
            stay = inside.get(peer)
            enter = before + hop[peer]
            cost, entered = (stay if stay is not None and stay[0] <= enter else (enter, block))
            updated[peer] = (cost + per_block[peer], entered)
        inside = updated
        peer = min(inside, key=lambda p: inside[p][0])
        best[block + 1] = (inside[peer][0], peer)
        entry_of[(block + 1, peer)] = inside[peer][1]

    chain, block = [], end
    while block > start:
        peer = best[block][1]
        entered = entry_of[(block, peer)]
        chain.append(ChainLink(peer, entered, block))
        block = entered
    return chain[::-1]


def _seconds(info: ServerInfo, measured: float | None, floor: float) -> float:
    return measured if measured is not None else max(block_seconds(info), floor)


def _by_span(state: SwarmState) -> tuple[dict[tuple[int, int], list[tuple[str, ServerInfo, float, float]]], float]:
    """The online servers by span, each with the decode seconds per block it claims and that claim held to the
    swarm's HOLD_QUANTILE claim; and that claim."""
    online = [(peer, info, block_seconds(info)) for peer, info in state.servers.items()
              if info.state is ServerState.ONLINE]
    claims = sorted(seconds for _, _, seconds in online)
    floor = claims[int(HOLD_QUANTILE * (len(claims) - 1))] if claims else 0.0
    spans: dict[tuple[int, int], list[tuple[str, ServerInfo, float, float]]] = {}
    for peer, info, seconds in online:
        spans.setdefault((info.start, info.end), []).append((peer, info, seconds, max(seconds, floor)))
    return spans, floor


def _candidates(state: SwarmState, start: int, end: int, banned: Collection[str], training: bool,
                batch_tokens: int, adapter: str | None, rng: random.Random):
    """The servers some chain could prefer, with their hop and per-block seconds. Of servers with the same
    span, one slower per block and no nearer than another is never chosen (the other does any part of its
    work for less), so only each span's front stays: with thousands of servers over a few hundred spans, the
    search looks at a few per span. Servers by span, with their claims, are derived once per snapshot."""
    scale = batch_tokens if training else 1
    spans, _ = state.derived("chain.by_span", _by_span)
    rtt_of, measured_of = state.rtt.get, state.block_seconds.get
    hold = HOLD_CLAIMS and len(state.block_seconds) >= TRUST_AFTER
    draw = rng.random
    kept = []
    for (first, last), members in spans.items():  # the hot loop at 10,000 servers
        if last <= start or first >= end:
            continue
        entries = []
        for peer, info, claimed, held in members:
            if peer in banned or (adapter is not None and adapter not in info.adapters):
                continue
            if training:
                seconds = block_seconds(info, training=True)
            else:
                seconds = measured_of(peer)
                if seconds is None:
                    seconds = held * (1.0 - SPREAD + 2 * SPREAD * draw()) if hold else claimed
            entries.append((rtt_of(peer, DEFAULT_RTT) / scale, seconds, peer, info))
        kept += _front(entries)
    return ({entry[2]: entry[3] for entry in kept}, {entry[2]: entry[0] for entry in kept},
            {entry[2]: entry[1] for entry in kept})


def _front(entries: list[tuple]) -> list[tuple]:
    """Of one span's (hop, seconds, peer, info), those that no other beats on both hop and seconds (equals all
    stay)."""
    if len(entries) == 1:
        return entries
    front = []
    for entry in sorted(entries):  # by hop, then seconds
        if not front or entry[1] < front[-1][1] or entry[:2] == front[-1][:2]:
            front.append(entry)
    return front


def chain_seconds(state: SwarmState, chain: list[ChainLink]) -> float:
    """Expected seconds per token of a chain under the same model as ``make_chain``."""
    _, floor = state.derived("chain.by_span", _by_span)
    total, floor = 0.0, floor if HOLD_CLAIMS and len(state.block_seconds) >= TRUST_AFTER else 0.0
    for link in chain:
        seconds = _seconds(state.servers[link.peer_id], state.block_seconds.get(link.peer_id), floor)
        total += state.rtt.get(link.peer_id, DEFAULT_RTT) + (link.end - link.start) * seconds
    return total


def _ranges(blocks: list[int]) -> str:
    parts: list[list[int]] = []
    for b in blocks:
        if parts and b == parts[-1][-1] + 1:
            parts[-1].append(b)
        else:
            parts.append([b])
    return ", ".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in parts)



