"""Swarm simulator at internet scale: the placement and chain code of routing/ on heterogeneous servers
over an 80-block model with churn.

    python bench/routing_simulate.py [--hours 2] [--servers 1000] [--large 10000]

1. --servers (1000) honest servers: bottleneck placement against random placement of the same servers.
2. --large (10000) servers, 30% behind NAT (reached through a relay: one more leg), 5% announcing 10x their
   real throughput; with the defences (placement counts a claim as at most 2.5x the median server, a client
   counts a server it has not measured as no faster than the swarm's median claim) and without them, same seed.
"""
import argparse
import statistics

from routing import chain, placement
from routing.simulate import format_report, simulate


def summary(name: str, report) -> str:
    ms = sorted(report.chain_ms) or [float("nan")]
    ratio = report.liar_traffic_ratio()
    latency = [r["latency_ms"] for r in report.rows[len(report.rows) // 2:]]
    return (f"| {name} | {report.steady_ratio():.3f} | {statistics.median(ms):.2f} | "
            f"{ms[int(0.99 * (len(ms) - 1))]:.2f} | {statistics.median(latency):.0f} | {report.failovers} / "
            f"{report.sessions} | {report.unserved} | {'-' if ratio is None else f'{ratio:.2f}'} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--servers", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    args = parser.parse_args()
    rows = []
    for name in ("bottleneck", "random"):
        print(f"simulating {args.servers} servers, {name} placement ...", flush=True)
        report = simulate(servers=args.servers, blocks=80, hours=args.hours, placement=name, progress=False)
        rows.append(summary(f"{args.servers} honest servers, {name} placement", report))
        if name == "bottleneck":
            print(f"\n## {args.servers} servers, bottleneck placement with moves (routing.placement)\n")
            print(format_report(report))
    defended = (placement.CLAIM_CAP, chain.HOLD_CLAIMS)
    for name, (cap, hold) in {"with the defences": defended, "without them": (float("inf"), False)}.items():
        placement.CLAIM_CAP, chain.HOLD_CLAIMS = cap, hold
        print(f"simulating {args.large} servers, 30% behind NAT, 5% liars, {name} ...", flush=True)
        report = simulate(servers=args.large, blocks=80, hours=args.hours, nat=0.3, liars=0.05, progress=True)
        rows.append(summary(f"{args.large} servers, 30% NAT, 5% liars (10x), {name}", report))
    placement.CLAIM_CAP, chain.HOLD_CLAIMS = defended
    print("\n## Summary\n")
    print("| swarm | throughput / upper bound (steady) | median chain ms | p99 chain ms | ms/token (steady median) | "
          "failovers / sessions | unserved | liars' traffic share / capacity share |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
