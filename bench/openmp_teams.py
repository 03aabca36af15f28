"""A second OpenMP team in a process, and what ends it: decode steps of one thread while another thread's team lives.

    python bench/openmp_teams.py [--rounds 5] [--steps 30]

Every thread that runs a parallel region gets a team of OpenMP workers of its own, which lives as long as the
thread. While a process holds more OpenMP threads than it has cores, libgomp cuts every worker's spin to 100
rounds, and a decode step's many small regions then wait for sleeping workers (shards.openmp). This times one
decode step (transformers' Llama layers, hidden 512 x 8 blocks, float32, 16-token cache, torch's default
threads) in the main thread, by rounds, in each of these states of another thread of the process:

- none: no other thread computes (the baseline);
- team alive: another thread ran one matrix product with torch's threads and waits (a server's start-up
  measurement before this stop, a client's spot check in a pool thread);
- compute_elsewhere: the same, and that thread then called shards.openmp.compute_elsewhere (a server's);
- team_ended_after: a pool thread ran the product through shards.openmp.team_ended_after (a client's spot check).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaModel
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shards.openmp import compute_elsewhere, team_ended_after  # noqa: E402

PRODUCT = torch.randn(1024, 1024)


def decode_steps(model: LlamaModel, steps: int) -> float:
    """Median seconds of a one-token step onto a 16-token cache (the cache is cut back after each step)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids[:, :16], past_key_values=cache, use_cache=True)
        for _ in range(steps):
            started = time.perf_counter()
            model(input_ids=ids[:, 16:], past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - started)
            cache.crop(-1)  # (transformers 5: a negative count removes that many tokens)
    return statistics.median(times)


def with_other_thread(state: str, timed) -> float:
    if state == "none":
        return timed()
    if state == "team_ended_after":
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # its thread stays alive until the block ends
            pool.submit(team_ended_after, torch.mm, PRODUCT, PRODUCT).result()
            return timed()
    ready, done = threading.Event(), threading.Event()

    def other():
        torch.mm(PRODUCT, PRODUCT)
        if state == "compute_elsewhere":
            compute_elsewhere()
        ready.set()
        done.wait()

    thread = threading.Thread(target=other)
    thread.start()
    ready.wait()
    try:
        return timed()
    finally:
        done.set()
        thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000)
    model = LlamaModel(config).eval()
    states = ("none", "team alive", "compute_elsewhere", "team_ended_after")
    seconds: dict[str, list[float]] = {state: [] for state in states}
    decode_steps(model, 10)  # warm-up
    for round_ in range(args.rounds):
        for state in states:
            seconds[state].append(with_other_thread(state, lambda: decode_steps(model, args.steps)))
        print(f"  round {round_ + 1}: " + ", ".join(f"{s} {seconds[s][-1] * 1000:.2f}" for s in states), flush=True)
    base = statistics.median(seconds["none"])
    print(f"\n{torch.get_num_threads()} threads, hidden 512 x 8 blocks, median of {args.rounds} rounds of "
          f"{args.steps} steps each\n")
    print("| another thread of the process | decode step ms | x the step with no other thread |\n|---|---|---|")
    for state in states:
        values = seconds[state]
        median = statistics.median(values)
        print(f"| {state} | {median * 1000:.2f} ({min(values) * 1000:.2f}-{max(values) * 1000:.2f}) | "
              f"{median / base:.2f}x |")


if __name__ == "__main__":
    main()
