"""Paired comparison of server configurations: every variant's swarm is up at once (idle while another
runs), and each repeat times local transformers and then each variant in turn, so that the machine's drift
(on a shared VM the local baseline alone moves by a third within an hour) hits every variant alike.

    python bench/swarm_paired.py --variant "defaults=" --variant "before=COCOON_EVENT_LOOP=asyncio --decode-path plain:2"

A variant is `cocoon serve` arguments; KEY=VALUE sets an environment variable of its servers (the client
is one process here: its own event loop is uvloop, the default, for every variant); --no-push is the
client's. Prints added ms per hop ((swarm - local) per token / servers) per repeat, the medians, and each
variant's paired difference from the first.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

from engine import local_baseline  # bench/engine.py: timed in a process that never imported the project

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.swarm_generate import MODELS, environment, seconds_per_token, spans_of, split_variant  # noqa: E402


def start(path: str, spans, variant: str):
    """A variant's swarm, its KEY=VALUE settings in its servers' environment; and whether its client pushes."""
    from swarm.apps.local_swarm import LocalSwarm
    settings, server_args, push = split_variant(variant.split())
    with environment(settings):
        return LocalSwarm(path, spans, server_args=server_args).__enter__(), push


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="small")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=ARGS")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM

    hidden, blocks, heads, kv_heads, intermediate = MODELS[args.model]
    variants = [v.split("=", 1) for v in args.variant]
    spans = spans_of(blocks, args.servers)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "llama", hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                               num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=32000)
        ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        local = AutoModelForCausalLM.from_pretrained(tmp).eval()
        swarms, models = [], []
        try:
            for name, variant in variants:
                print(f"starting {args.servers} servers: {name} ({variant or 'defaults'}) ...", flush=True)
                swarm_, push = start(tmp, spans, variant)
                swarms.append(swarm_)
                models.append(AutoDistributedModelForCausalLM.from_pretrained(tmp, initial_peers=swarm_.initial_peers,
                                                                              push=push))
            added = {name: [] for name, _ in variants}
            with torch.no_grad():
                expected = local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
                same = {name: torch.equal(model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                                         eos_token_id=None), expected)
                        for (name, _), model in zip(variants, models)}
                for repeat in range(args.repeats):
                    for (name, _), model in zip(variants, models):
                        local_s = local_baseline(tmp, args.new_tokens)["generate_s_per_token"][0]  # a clean process
                        swarm_s = seconds_per_token(model, ids, args.new_tokens, "cpu")
                        added[name].append(1000 * (swarm_s - local_s) / args.servers)
                    print(f"  repeat {repeat + 1}: " + ", ".join(f"{n} {added[n][-1]:.2f}" for n, _ in variants),
                          flush=True)
        finally:
            for model in models:
                model.shutdown()
            for swarm_ in swarms:
                swarm_.close()
    first = variants[0][0]
    print(f"\n{args.model} model, {args.servers} servers, {args.new_tokens} new tokens, {args.repeats} paired repeats; "
          f"added ms per hop\n")
    print(f"| variant | servers' args | median | spread | paired difference from {first} (median) | "
          f"repeats below {first} | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, variant in variants:
        diffs = [a - b for a, b in zip(added[name], added[first])]
        below = "-" if name == first else f"{sum(d < 0 for d in diffs)} of {len(diffs)}"
        print(f"| {name} | {variant or '(none)'} | {statistics.median(added[name]):.2f} | "
              f"{max(added[name]) - min(added[name]):.2f} | "
              f"{'-' if name == first else f'{statistics.median(diffs):+.2f}'} | {below} | "
              f"{'yes' if same[name] else 'no'} |")


if __name__ == "__main__":
    main()
