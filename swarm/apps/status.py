"""A text table of which servers hold which blocks; a block nobody holds stands out."""
from __future__ import annotations

from routing import SwarmState


def format_status(state: SwarmState, model_id: str) -> str:
    names = state.model_names()
    name = f" ({names[0]}, as its servers announce it)" if names else ""
    lines = [f"model {model_id}{name}: {state.num_blocks} blocks, {len(state.online())} servers online"]
    peers = sorted(state.servers, key=lambda p: (state.servers[p].start, p))
    header = f"{'server':<20} {'name':<12} {'state':<8} {'reached':<8} {'blocks':<9} {'tok/s':>8} {'sessions':>8}  "
    lines.append(header + "coverage")
    for peer in peers:
        info = state.servers[peer]
        bar = "".join("#" if info.start <= b < info.end else "." for b in range(state.num_blocks))
        reached = "relayed" if info.relay else "direct" if info.direct else "p2p"
        lines.append(f"{'…' + peer[-19:]:<20} {info.public_name[:12]:<12} {info.state.value:<8} {reached:<8} "
                     f"{f'{info.start}:{info.end}':<9} {info.throughput:>8.1f} {info.sessions:>8}  {bar}")
    holders = "".join(str(min(len(state.holders(b)), 9)) if state.holders(b) else "!" for b in range(state.num_blocks))
    lines.append(f"{'servers per block (! = none)':<{len(header)}}{holders}")
    adapters = sorted({a for info in state.online().values() for a in info.adapters})
    for adapter in adapters:
        cover = "".join("#" if any(adapter in state.servers[p].adapters for p in state.holders(b)) else "!"
                        for b in range(state.num_blocks))
        lines.append(f"{'adapter ' + adapter[:40]:<{len(header)}}{cover}")
    missing = state.missing_blocks()
    if missing:
        lines.append(f"MISSING: no online server holds block(s) {', '.join(map(str, missing))}")
    else:
        lines.append("every block is served")
    return "\n".join(lines)
