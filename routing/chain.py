"""Choosing the chain of servers that a client's hidden states go through.

A chain covers blocks [start, end) in order with no gap; a server may be entered in the middle of its
span and left before its end. The cost of a chain is the expected time per token: for every hop, the
round trip to that server, plus the compute of the blocks it runs at its throughput, slowed by its load.
What the client measured counts instead of what a server announces; once it has measured a few servers,
an unmeasured one counts as no faster than its typical measured one (an announced speed is a claim).
The cheapest chain is found by dynamic programming over blocks in O(blocks x servers per block).
"""
from __future__ import annotations


import random
from dataclasses import dataclass
from typing import Collection

from routing.state import ServerInfo, ServerState, SwarmState

DEFAULT_RTT = 0.05  # seconds, for a server this client has not measured yet
TRUST_AFTER = 5  # measured servers before unmeasured claims are held to the typical measured speed


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
    servers, hop, per_block = _candidates(state, start, end, banned, training, batch_tokens, adapter)
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


def _seconds(info: ServerInfo, measured: float | None, training: bool, typical: float | None) -> float:
    seconds = block_seconds(info, training=training, measured=measured)
    return seconds if measured is not None or typical is None else max(seconds, typical)


def _typical_seconds(state: SwarmState) -> float | None:
    """The median of this client's measurements, once it has measured TRUST_AFTER servers."""
    measured = sorted(state.block_seconds.values())
    return measured[len(measured) // 2] if len(measured) >= TRUST_AFTER else None


def _candidates(state: SwarmState, start: int, end: int, banned: Collection[str], training: bool,
                batch_tokens: int, adapter: str | None):
    """The servers some chain could prefer, with their hop and per-block seconds. Of servers with the same
    span, one slower per block and no nearer than another is never chosen (the other does any part of its
    work for less), so only each span's front stays: with thousands of servers over a few hundred spans, the
    search looks at a few per span. A server this client has not measured counts as no faster than its
    typical measured one: a claim is trusted only after the client has seen it."""
    scale = batch_tokens if training else 1
    typical = None if training else _typical_seconds(state)
    rtt, measured = state.rtt, state.block_seconds
    spans: dict[tuple[int, int], list[tuple]] = {}
    online, rtt_of, measured_of = ServerState.ONLINE, rtt.get, measured.get
    for peer, info in state.servers.items():  # the hot loop at 10,000 servers: block_seconds() written out
        if info.state is not online or info.end <= start or info.start >= end or peer in banned or (
                adapter is not None and adapter not in info.adapters):
            continue
        seconds = None if training else measured_of(peer)
        if seconds is None:
            if training:
                seconds = block_seconds(info, training=True)
            else:
                load = 1.0 + info.sessions / info.max_sessions if info.max_sessions else 1.0
                seconds = load / (max(info.throughput, 1e-9) * (info.end - info.start))
                seconds = seconds if typical is None or seconds >= typical else typical
        span = (info.start, info.end)
        entry = (rtt_of(peer, DEFAULT_RTT) / scale, seconds, peer, info)
        if span in spans:
            spans[span].append(entry)
        else:
            spans[span] = [entry]
    kept = [entry for entries in spans.values() for entry in _front(entries)]
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
    total, typical = 0.0, _typical_seconds(state)
    for link in chain:
        seconds = _seconds(state.servers[link.peer_id], state.block_seconds.get(link.peer_id), False, typical)
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



