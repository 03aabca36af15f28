"""Load time and peak RSS per span size, and span throughput against transformers' full model.

    python bench/shards_bench.py [--hidden 1024 --layers 16]

Each load runs in a fresh process so that its peak RSS is its own. The throughput rows compare a
BlockSpan of every block with transformers' LlamaModel on the same weights, in the same run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

LOAD_ONE = """
import json, sys, threading, time
import psutil, torch
from shards import BlockSpan
path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
process = psutil.Process()
before = process.memory_info().rss
peak, done = [before], threading.Event()
def sample():  # ru_maxrss would include the peak of the imports; sample the load itself instead
    while not done.is_set():
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
t = time.perf_counter()
if end < 0:
    from transformers import AutoModelForCausalLM
    module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
else:
    module = BlockSpan.from_pretrained(path, start, end, dtype="float32")
sum(float(p.sum()) for p in module.parameters())  # weights must be resident, not only mapped
elapsed = time.perf_counter() - t
done.set(); sampler.join()
peak[0] = max(peak[0], process.memory_info().rss)
size = sum(p.numel() * p.element_size() for p in module.parameters())
print(json.dumps(dict(load_s=elapsed, peak=peak[0], before=before, size=size)))
"""


def load_in_subprocess(path, start, end):
    out = subprocess.run([sys.executable, "-c", LOAD_ONE, str(path), str(start), str(end)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@torch.inference_mode()
def time_decode(run_step, hidden, steps=32, prefill=64):
    run_step(hidden[:, :prefill], fresh=True)
    start = time.perf_counter()
    for i in range(steps):
        run_step(hidden[:, prefill + i:prefill + i + 1], fresh=False)
    return steps / (time.perf_counter() - start)


@torch.inference_mode()
def time_prefill(run, hidden, repeats=3):
    run(hidden)
    start = time.perf_counter()
    for _ in range(repeats):
        run(hidden)
    return repeats * hidden.shape[1] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    from shards import BlockSpan
    from shards.testing import save_random_checkpoint
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing a random llama checkpoint: hidden {args.hidden}, {args.layers} blocks ...", flush=True)
        save_random_checkpoint(tmp, "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, max_shard_size="200MB")
        print("\n## Loading (fresh process each, float32)\n")
        print("| what | blocks | weights MiB | load s | peak RSS - start MiB | ratio to weights |")
        print("|---|---|---|---|---|---|")
        sizes = sorted({1, max(1, args.layers // 4), max(1, args.layers // 2), args.layers})
        for n in sizes + [-1]:
            r = load_in_subprocess(tmp, 0, n) if n > 0 else load_in_subprocess(tmp, 0, -1)
            what = "BlockSpan" if n > 0 else "transformers full model"
            grown = (r["peak"] - r["before"]) / 2**20
            print(f"| {what} | {n if n > 0 else args.layers} | {r['size'] / 2**20:.0f} | {r['load_s']:.2f} | "
                  f"{grown:.0f} | {grown / (r['size'] / 2**20):.2f} |", flush=True)

        print("\n## Throughput of all blocks, same weights, same process (float32, batch 1)\n")
        span = BlockSpan.from_pretrained(tmp, 0, args.layers, dtype="float32")
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).model.eval()
        hidden = torch.randn(1, 256, args.hidden)
        state = {}

        def span_step(x, fresh):
            if fresh:
                state["span"] = span.new_cache()
            span(x, cache=state["span"])

        def hf_step(x, fresh):
            if fresh:
                state["hf"] = DynamicCache(config=model.config)
            model(inputs_embeds=x, cache=state["hf"], use_cache=True)

        rows = [("decode tokens/s", time_decode(span_step, hidden), time_decode(hf_step, hidden)),
                ("prefill tokens/s (256)", time_prefill(span, hidden),
                 time_prefill(lambda x: model(inputs_embeds=x), hidden))]
        print("| measure | BlockSpan | transformers | ratio |")
        print("|---|---|---|---|")
        for name, ours, theirs in rows:
            print(f"| {name} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |")


if __name__ == "__main__":
    main()
