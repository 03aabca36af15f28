"""One server's compute for a batch of sessions' steps, through MKL (transformers' linear layers as they are)
against oneDNN's packed copies of the weights (shards.packed_linears), in one process.

    python bench/batched_step.py [--hidden 2048] [--intermediate 5632] [--blocks 4]

Decode steps of 1, 8 and 16 sessions (each cache 20 tokens long), and 16-token prompts of 1 and 8 new
sessions, as swarm.server.batching runs them (a lone session's decode step through the packed copies too, as a
server runs it; a lone prompt always through MKL); milliseconds per batch, median of 5.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch

from shards.packed_linears import packed_forwards, packed_linears
from swarm.server import batching


def timed(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--blocks", type=int, default=4)
    args = parser.parse_args()
    from shards import BlockSpan
    from shards.testing import save_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.blocks, num_attention_heads=args.hidden // 128,
                               num_key_value_heads=max(1, args.hidden // 512), vocab_size=8000, max_shard_size="2GB")
        span = BlockSpan.from_pretrained(tmp, 0, args.blocks)
    copies = packed_forwards(span)  # as a server whose decode plan took the packed path (shards.decode_paths)
    blocks = (0, args.blocks)

    def batch(sessions: int, past: int, tokens: int):
        caches = []
        for _ in range(sessions):
            cache = span.new_cache()
            if past:
                span(torch.randn(1, past, args.hidden), cache=cache)
            caches.append(cache)
        requests = [SimpleNamespace(hidden=torch.randn(1, tokens, args.hidden), attention_mask=None,
                                    position_ids=None, dtype=torch.float32) for _ in caches]
        if sessions == 1:  # alone: the span's own forward, as a lone session's step runs
            return lambda: span(requests[0].hidden, cache=span.new_cache() if not past else caches[0], blocks=blocks)
        fresh = lambda: [span.new_cache() for _ in caches] if not past else caches  # noqa: E731
        return lambda: batching.run_batched(span, [(r, c, blocks) for r, c in zip(requests, fresh())], lambda t: t)

    rows = []
    with torch.inference_mode():
        for name, sessions, past, tokens in (("decode steps", 1, 20, 1), ("decode steps", 8, 20, 1),
                                             ("decode steps", 16, 20, 1), ("16-token prompts", 1, 0, 16),
                                             ("16-token prompts", 8, 0, 16)):
            run = batch(sessions, past, tokens)
            with contextlib.ExitStack() as stack:
                stack.callback(setattr, span, "packed_linears", copies)
                span.packed_linears = {}  # MKL, as before the packed copies
                mkl = timed(run)
            if sessions > 1 or tokens == 1:
                packed = timed(lambda: _packed(span, run))  # as the engine runs decode steps on the packed path
            else:
                packed = None  # a lone prompt never uses them
            rows.append((name, sessions, mkl, packed))
            print(f"  {name}, {sessions} sessions: MKL {mkl:.1f} ms" +
                  (f", packed {packed:.1f} ms" if packed else ""), flush=True)
    print(f"\nhidden {args.hidden}, intermediate {args.intermediate}, {args.blocks} blocks, float32, "
          f"{torch.get_num_threads()} threads\n")
    print("| steps | sessions | MKL (ms per batch) | packed oneDNN (ms per batch) | x one session's step (packed) |")
    print("|---|---|---|---|---|")
    alone = {name: packed or mkl for name, sessions, mkl, packed in rows if sessions == 1}
    for name, sessions, mkl, packed in rows:
        print(f"| {name} | {sessions} | {mkl:.1f} | {'-' if packed is None else f'{packed:.1f}'} | "
              f"{'-' if packed is None else f'{packed / alone[name]:.2f}x'} |")


def _packed(span, run):
    with packed_linears(span):
        return run()


if __name__ == "__main__":
    main()
