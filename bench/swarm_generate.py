"""Tokens/s of generate() through a loopback swarm against transformers' local generate(), same weights.

    python bench/swarm_generate.py [--quick]

For a small model (overhead-bound) and a larger one (compute-bound, hidden 2048, 16 blocks), with the
blocks split over 2 and 4 servers (real processes on 127.0.0.1), greedy, float32 weights, batch 1. The
added time per token divided by the number of hops is the software overhead of one hop.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

MODELS = {  # name: (hidden, blocks, heads, kv heads)
    "small (hidden 512, 8 blocks)": (512, 8, 8, 4),
    "large (hidden 2048, 16 blocks)": (2048, 16, 16, 8),
}


def per_token_times(model, ids, new_tokens: int, repeats: int) -> float:
    """Median seconds per generated token over ``repeats`` runs (after one warm-up run)."""
    model.generate(ids, max_new_tokens=4, do_sample=False)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        assert out.shape[1] == ids.shape[1] + new_tokens
        times.append((time.perf_counter() - start) / new_tokens)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model only")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm

    rows = []
    for name, (hidden, blocks, heads, kv_heads) in MODELS.items():
        if args.quick and "large" in name:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{name}: writing checkpoint ...", flush=True)
            save_random_checkpoint(tmp, "llama", hidden_size=hidden, num_hidden_layers=blocks,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000,
                                   max_shard_size="500MB")
            ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
            repeats = 3 if hidden <= 512 else 1
            with torch.no_grad():
                local = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
                local_s = per_token_times(local, ids, args.new_tokens, repeats)
                expected = local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
                del local
            print(f"  local transformers: {1 / local_s:.1f} tokens/s", flush=True)
            for servers in (2, 4):
                step = blocks // servers
                spans = [(i * step, (i + 1) * step) for i in range(servers)]
                with LocalSwarm(tmp, spans) as swarm:
                    for exact in (True, False):
                        model = AutoDistributedModelForCausalLM.from_pretrained(
                            tmp, initial_peers=swarm.initial_peers, exact_wire=exact)
                        with torch.no_grad():
                            swarm_s = per_token_times(model, ids, args.new_tokens, repeats)
                            same = torch.equal(model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                                              eos_token_id=None), expected)
                        model.shutdown()
                        wire = "float32" if exact else "float16"
                        rows.append((name, servers, wire, 1 / local_s, 1 / swarm_s, local_s / swarm_s,
                                     1000 * (swarm_s - local_s), 1000 * (swarm_s - local_s) / servers, same))
                        print(f"  {servers} servers, {wire} wire: {1 / swarm_s:.1f} tokens/s", flush=True)

    print("\n| model | servers | wire | local tok/s | swarm tok/s | swarm/local | added ms/token | added ms/hop | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, servers, wire, local_tps, swarm_tps, ratio, added, per_hop, same in rows:
        print(f"| {name} | {servers} | {wire} | {local_tps:.1f} | {swarm_tps:.1f} | {ratio:.2f}x | {added:.1f} | "
              f"{per_hop:.2f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
