"""Does a server's own DHT traffic hold up the sessions it serves? Every announce period a server stores its
records (and reads the evidence against it) in the DHT: 16 ms on loopback, seconds where a DHT peer does not
answer. Done on the server's event loop, that time lands on whichever decode step arrives meanwhile.

    python bench/announce_stall.py [--seconds 20]

Two servers started by `cocoon serve` (defaults, plus --announce-period), a client generating greedily for
--seconds; every decode step's time is recorded. Baseline in the same run: the same swarm announcing every
200 s (not once during the run). Printed: per-step median, p99 and max, and the steps slower than the median by
more than 10 ms. --code NAME=PATH measures another checkout too (e.g. the code before a change)."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CLIENT = r'''
import json, sys, time, torch
from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm
path, period, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with LocalSwarm(path, [(0, 4), (4, 8)], server_args=["--announce-period", period]) as swarm:
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
    times, forward = [], model.forward
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)
    model.forward = timed
    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    end = time.monotonic() + seconds
    with torch.no_grad():
        while time.monotonic() < end:
            model.generate(ids, max_new_tokens=200, do_sample=False, eos_token_id=None)
    model.shutdown()
print("TIMES", json.dumps(times))
'''


def measure(code: str, path: str, period: str, seconds: float) -> list[float]:
    env = dict(os.environ, PYTHONPATH=code)
    run = subprocess.run([sys.executable, "-c", CLIENT, path, period, str(seconds)], env=env, cwd=code,
                         capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"the client failed:\n{run.stderr[-3000:]}")
    out = run.stdout
    times = next(line for line in out.splitlines() if line.startswith("TIMES "))
    import json
    return [t * 1e3 for t in json.loads(times[6:])[1:]]  # (the first step of each generate is the prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--period", default="1.0", help="announce period of the measured swarm, seconds")
    parser.add_argument("--code", action="append", default=[], metavar="NAME=PATH")
    args = parser.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("this checkout", here)] + [tuple(c.split("=", 1)) for c in args.code]
    sys.path.insert(0, here)
    from shards.testing import save_random_checkpoint
    rows = []
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, "llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                               intermediate_size=1376, vocab_size=1000)
        for name, code in trees:
            for period in ("200", args.period):
                print(f"{name}, announcing every {period} s ...", file=sys.stderr, flush=True)
                times = [t for t in measure(code, path, period, args.seconds)]
                rows.append((name, period, times))
    print(f"\nhidden 512 x 8 blocks, 2 servers (`cocoon serve`), greedy, {args.seconds:.0f} s of decode steps each\n")
    print("| code | announce period s | steps | median ms | p99 ms | max ms | steps > median + 10 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, period, times in rows:
        median = statistics.median(times)
        p99 = sorted(times)[int(0.99 * (len(times) - 1))]
        print(f"| {name} | {period} | {len(times)} | {median:.1f} | {p99:.1f} | {max(times):.1f} | "
              f"{sum(t > median + 10 for t in times)} |")


if __name__ == "__main__":
    main()
