"""A swarm simulator that runs the real placement and chain code on thousands of synthetic servers.

    python -m routing.simulate --servers 1000 --blocks 80 --hours 2

Servers join and leave (exponential lifetimes; arrivals keep the population steady), choose their span
with ``choose_span``, and reconsider it with ``should_move`` at random times. Clients open sessions whose
chains come from ``make_chain``. Every step reports the swarm's throughput (its bottleneck block)
against the upper bound (total block-throughput over the number of blocks: what a perfect placement of
the same servers could reach), the latency per token a client really gets (round trips and the servers' true
speeds), and the sessions that had to fail over.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field

from routing.chain import NoChainError, make_chain
from routing.placement import block_throughput, choose_span, claim_cap, counted, should_move
from routing.state import ServerInfo, ServerState, SwarmState


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    chain_ms: list[float] = field(default_factory=list)
    sessions: int = 0
    failovers: int = 0
    unserved: int = 0
    liar_hops: float = 0.0  # after warm-up (the second half): blocks run by liars in chosen chains...
    all_hops: float = 0.0  # ...and by everyone
    liar_capacity: list[float] = field(default_factory=list)  # liars' share of the true block-throughput, per step

    def steady_ratio(self) -> float:
        """Mean throughput / bound over the second half of the run (after the swarm has formed)."""
        half = self.rows[len(self.rows) // 2:]
        return statistics.mean(r["throughput"] / r["bound"] for r in half)

    def liar_traffic_ratio(self) -> float | None:
        """Liars' share of the blocks run for clients over their share of the true capacity (1.0: no gain)."""
        if not self.all_hops or not self.liar_capacity or not statistics.mean(self.liar_capacity):
            return None
        return (self.liar_hops / self.all_hops) / statistics.mean(self.liar_capacity)


def simulate(*, servers: int = 1000, blocks: int = 80, hours: float = 2.0, step: float = 60.0,
             mean_lifetime: float = 3600.0, sessions_per_step: int = 10, session_seconds: float = 120.0,
             balance_period: float = 600.0, placement: str = "bottleneck", seed: int = 0, nat: float = 0.0,
             liars: float = 0.0, lie_factor: float = 10.0, clients: int = 10, progress: bool = True) -> Report:
    """``placement="random"`` places joining servers at random and never moves them: the baseline.
    ``nat``: the fraction of servers behind NAT, reached through a relay (one more leg on the client's round
    trip). ``liars``: the fraction that announce ``lie_factor`` times their real throughput. ``clients`` route
    sessions in turn, each with its own measurements: once it used a server, it knows its real speed."""
    rng = random.Random(seed)
    state = SwarmState(blocks)
    true_speed: dict[str, float] = {}   # block-tokens/s each server really does
    liar_set: set[str] = set()
    measured: list[dict[str, float]] = [{} for _ in range(clients)]
    leaves_at: dict[str, float] = {}
    next_balance: dict[str, float] = {}
    active: list[tuple[float, set[str]]] = []  # (end time, servers of its chain)
    report = Report()
    counter = 0
    cap, totals = float("inf"), [0.0] * blocks  # placement's view, refreshed every step and kept up to date

    def join(now: float) -> None:
        nonlocal counter
        peer = f"s{counter}"
        counter += 1
        speed = rng.lognormvariate(5.0, 0.6)                    # ~150 block-tokens/s, heterogeneous
        num_blocks = rng.choice([4, 6, 8, 10, 12, 16])          # what fits in its memory
        lying, relayed = rng.random() < liars, rng.random() < nat
        claimed = speed * (lie_factor if lying else 1.0) / num_blocks
        if placement == "random":
            start = rng.randrange(blocks - num_blocks + 1)
            start, end = start, start + num_blocks
        else:
            start, end = choose_span(state, num_blocks, claimed, totals=totals)
        info = ServerInfo(ServerState.ONLINE, start, end, throughput=claimed, max_sessions=64,
                          relay="relay@10.0.0.1:4001" if relayed else "")
        state.servers[peer] = info
        _add(totals, info, counted(info, cap))
        # ~50 ms round trips; a relayed server adds the leg from the relay to it
        state.rtt[peer] = rng.lognormvariate(-3.0, 0.7) + (rng.lognormvariate(-3.0, 0.7) if relayed else 0.0)
        true_speed[peer] = speed
        if lying:
            liar_set.add(peer)
        leaves_at[peer] = now + rng.expovariate(1 / mean_lifetime)
        next_balance[peer] = now + balance_period * rng.uniform(0.5, 1.5)

    for i in range(servers):  # the initial swarm forms one server after another
        if i % 500 == 0:
            cap = claim_cap(state)
            totals = block_throughput(state, cap=cap)
        join(0.0)
    now, end_time = 0.0, hours * 3600
    while now < end_time:
        now += step
        for peer in [p for p, t in leaves_at.items() if t <= now]:  # departures, and the sessions they break
            for peer_dict in (state.servers, state.rtt, true_speed, leaves_at, next_balance, *measured):
                peer_dict.pop(peer, None)
            liar_set.discard(peer)
            broken = [s for s in active if peer in s[1]]
            report.failovers += len(broken)
        cap = claim_cap(state)
        totals = block_throughput(state, cap=cap)
        while len(state.servers) < servers:  # arrivals keep the population steady
            join(now)
        for peer in [p for p, t in next_balance.items() if t <= now and placement != "random"]:
            target = should_move(state, peer, totals=totals, cap=cap)
            if target:
                info = state.servers[peer]
                _add(totals, info, -counted(info, cap))
                info.start, info.end = target
                _add(totals, info, counted(info, cap))
            next_balance[peer] = now + balance_period * rng.uniform(0.5, 1.5)
        active = [s for s in active if s[0] > now]
        state.changed()
        latencies = []
        steady = now > end_time / 2
        for i in range(sessions_per_step):
            state.block_seconds = measured[(report.sessions + i) % clients]
            started = time.perf_counter()
            try:
                chain = make_chain(state, rng=rng)
            except NoChainError:
                report.unserved += 1
                continue
            report.chain_ms.append(1000 * (time.perf_counter() - started))
            latencies.append(sum(state.rtt[link.peer_id] + (link.end - link.start) / true_speed[link.peer_id]
                                 for link in chain))  # what the client really gets
            for link in chain:  # the client now knows what each of them really does
                state.block_seconds[link.peer_id] = 1 / true_speed[link.peer_id]
                if steady:
                    report.all_hops += link.end - link.start
                    report.liar_hops += (link.end - link.start) if link.peer_id in liar_set else 0
            active.append((now + session_seconds, {link.peer_id for link in chain}))
        report.sessions += len(latencies)
        bound = sum(true_speed.values()) / blocks
        truth = [0.0] * blocks
        for peer, info in state.servers.items():
            _add(truth, info, true_speed[peer] / (info.end - info.start))
        if steady:
            report.liar_capacity.append(sum(true_speed[p] for p in liar_set) / sum(true_speed.values()))
        row = dict(minute=now / 60, servers=len(state.servers), throughput=min(truth), bound=bound,
                   latency_ms=1000 * statistics.median(latencies) if latencies else float("nan"),
                   failovers=report.failovers)
        report.rows.append(row)
        if progress and len(report.rows) % 10 == 0:
            print(f"  minute {row['minute']:.0f}: throughput {row['throughput']:.1f} of bound {bound:.1f}", flush=True)
    return report


def _add(totals: list[float], info: ServerInfo, amount: float) -> None:
    for block in range(info.start, min(info.end, len(totals))):
        totals[block] += amount


def format_report(report: Report, every: int = 10) -> str:
    lines = ["| minute | servers | swarm tokens/s | upper bound | ratio | median latency ms/token | failovers so far |",
             "|---|---|---|---|---|---|---|"]
    for row in report.rows[every - 1::every]:
        lines.append(f"| {row['minute']:.0f} | {row['servers']} | {row['throughput']:.2f} | {row['bound']:.2f} | "
                     f"{row['throughput'] / row['bound']:.3f} | {row['latency_ms']:.0f} | {row['failovers']} |")
    chain = sorted(report.chain_ms)
    lines.append("")
    lines.append(f"steady-state throughput / upper bound: {report.steady_ratio():.3f}")
    lines.append(f"chain computation: median {statistics.median(chain):.2f} ms, p99 {chain[int(0.99 * (len(chain) - 1))]:.2f} ms "
                 f"over {len(chain)} sessions")
    lines.append(f"sessions {report.sessions}, failed over {report.failovers}, unserved {report.unserved}")
    if (ratio := report.liar_traffic_ratio()) is not None:
        lines.append(f"liars' share of the blocks run for clients / their share of the true capacity: {ratio:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--blocks", type=int, default=80)
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--mean-lifetime", type=float, default=3600.0, help="seconds a server stays, on average")
    parser.add_argument("--sessions-per-step", type=int, default=10)
    parser.add_argument("--nat", type=float, default=0.0, help="fraction of servers behind NAT, reached through relays")
    parser.add_argument("--liars", type=float, default=0.0, help="fraction announcing --lie-factor x their throughput")
    parser.add_argument("--lie-factor", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="write throughput and bound over time (needs matplotlib)")
    args = parser.parse_args()
    report = simulate(servers=args.servers, blocks=args.blocks, hours=args.hours, mean_lifetime=args.mean_lifetime,
                      sessions_per_step=args.sessions_per_step, seed=args.seed, nat=args.nat, liars=args.liars,
                      lie_factor=args.lie_factor)
    print(format_report(report))
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: pip install matplotlib to write a plot")
            return
        minutes = [r["minute"] for r in report.rows]
        plt.plot(minutes, [r["throughput"] for r in report.rows], label="swarm throughput")
        plt.plot(minutes, [r["bound"] for r in report.rows], label="upper bound")
        plt.xlabel("minute")
        plt.ylabel("tokens/s through all blocks")
        plt.legend()
        plt.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
