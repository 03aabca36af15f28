"""Swarm simulator at internet scale: the placement and chain code of routing/ on 1000 heterogeneous
servers over an 80-block model with churn, against random placement of the same servers, same seed.

    python bench/routing_simulate.py [--hours 2]
"""
import argparse

from routing.simulate import format_report, simulate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=2.0)
    args = parser.parse_args()
    results = {}
    for placement in ("bottleneck", "random"):
        print(f"simulating {placement} placement ...", flush=True)
        results[placement] = simulate(servers=1000, blocks=80, hours=args.hours, placement=placement, progress=False)
    print("\n## Bottleneck placement with moves (routing.placement)\n")
    print(format_report(results["bottleneck"]))
    print("\n## Summary\n")
    print("| placement | throughput / upper bound (steady) | median chain ms | p99 chain ms | failovers / sessions | unserved |")
    print("|---|---|---|---|---|---|")
    for name, report in results.items():
        chain = sorted(report.chain_ms) or [float("nan")]
        print(f"| {name} | {report.steady_ratio():.3f} | {chain[len(chain) // 2]:.2f} | "
              f"{chain[int(0.99 * (len(chain) - 1))]:.2f} | {report.failovers} / {report.sessions} | {report.unserved} |")


if __name__ == "__main__":
    main()
