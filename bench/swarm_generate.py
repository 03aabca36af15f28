"""Tokens/s of generate() through a swarm against transformers' local generate(), same weights, same device.

    python bench/swarm_generate.py [--model small|large|7b] [--servers 1 2 4] [--device cuda] [--dtype bfloat16]

Servers are real processes on 127.0.0.1 started by `cocoon serve` with its defaults (plus --device and
--dtype); the client is from_pretrained() with its default dtype unless --client-dtype says otherwise.
Greedy, batch 1. Each configuration runs --repeats times, interleaved with the local baseline; the table
shows medians and the spread (max - min). 'added ms/hop' = (swarm - local) per token / number of servers.
The local baseline is timed by bench/local_baseline.py in a process of its own that never imported the
project (torch's defaults, as a user runs transformers), once per repeat.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from typing import Iterator

import torch

from engine import local_baseline  # bench/engine.py: the clean-process baseline

MODELS = {  # name: (hidden, blocks, heads, kv heads, intermediate)
    "small": (512, 8, 8, 4, 1024),
    "large": (2048, 16, 16, 8, 4096),
    "7b": (4096, 16, 32, 8, 14336),   # Llama-7B-shaped blocks, 16 of them
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seconds_per_token(model, ids, new_tokens: int, device: str) -> float:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    sync()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return (time.perf_counter() - start) / new_tokens


def spans_of(blocks: int, servers: int) -> list[tuple[int, int]]:
    step = blocks // servers
    return [(i * step, (i + 1) * step if i < servers - 1 else blocks) for i in range(servers)]


def split_variant(extra: list[str]) -> tuple[dict[str, str], list[str], bool]:
    """A variant's words -> (its KEY=VALUE environment settings, its `cocoon serve` arguments, whether the
    client pushes: --no-push is a client's argument, as for `cocoon generate`)."""
    settings = [arg for arg in extra if arg.partition("=")[0].isupper()]
    server_args = [arg for arg in extra if arg not in settings and arg != "--no-push"]
    return dict(arg.split("=", 1) for arg in settings), server_args, "--no-push" not in extra


@contextlib.contextmanager
def environment(settings: dict[str, str]) -> Iterator[None]:
    """os.environ with ``settings`` added, for the processes started meanwhile."""
    saved = dict(os.environ)
    os.environ.update(settings)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def measure(args, path, blocks, servers, variant, extra, local, ids, expected, name) -> tuple:
    from swarm.client import loop

    settings, server_args, push = split_variant(extra)  # the settings hold for every process, the client's too
    with environment(settings):
        loop._loop = None  # the client's event loop too is made anew under this variant's environment
        return _measure(args, path, servers, spans_of(blocks, servers), variant,
                        ["--device", args.device, *args.server_arg, *server_args], push, local, ids, expected, name)


def _measure(args, path, servers, spans, variant, server_args, push, local, ids, expected, name) -> tuple:
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    with LocalSwarm(path, spans, dtype=args.dtype, server_args=server_args) as swarm:
        client_dtype = DTYPES.get(args.client_dtype, "auto")
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, device=args.device, dtype=client_dtype, exact_wire=args.exact_wire,
            push=push)
        local_times, swarm_times = [], []
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)
            for _ in range(args.repeats):
                local_times.append(local_baseline(path, args.new_tokens, device=args.device,
                                                  dtype=args.dtype)["generate_s_per_token"][0])
                swarm_times.append(seconds_per_token(model, ids, args.new_tokens, args.device))
            same = torch.equal(model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                              eos_token_id=None), expected)
        model.shutdown()
    local_s, swarm_s = statistics.median(local_times), statistics.median(swarm_times)
    added = [1000 * (s - l) / servers for s, l in zip(swarm_times, local_times)]
    print(f"  {servers} servers ({variant}): local {1 / local_s:.1f} tokens/s, swarm {1 / swarm_s:.1f} tokens/s",
          flush=True)
    return (name, servers, variant, 1 / local_s, 1 / swarm_s, local_s / swarm_s, 1000 * local_s, 1000 * swarm_s,
            statistics.median(added), max(added) - min(added), same)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), nargs="+", default=["small", "large"])
    parser.add_argument("--servers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--device", default="cpu", help="cpu or cuda: servers, client and the local baseline")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="servers' and local dtype")
    parser.add_argument("--client-dtype", default="auto", help="the client's dtype (default: from_pretrained's)")
    parser.add_argument("--exact-wire", action="store_true", help="float32 activations on the wire")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-arg", action="append", default=[], help="extra `cocoon serve` argument")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="also measure servers started with these extra arguments, in the same run "
                             "(e.g. 'hivemind=--no-direct'); KEY=VALUE sets an environment variable of the "
                             "servers and the client (e.g. 'asyncio=COCOON_EVENT_LOOP=asyncio'); --no-push is "
                             "the client's, as for `cocoon generate`")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    dtype = DTYPES[args.dtype]
    rows = []
    for name in args.model:
        hidden, blocks, heads, kv_heads, intermediate = MODELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{name}: writing a random checkpoint (hidden {hidden}, {blocks} blocks) ...", flush=True)
            save_random_checkpoint(tmp, "llama", hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=32000,
                                   max_shard_size="2GB", dtype=dtype)
            ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0)).to(args.device)
            with torch.no_grad():
                local = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
                local.generate(ids, max_new_tokens=4, do_sample=False)
                expected = local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
            variants = [("defaults", [])] + [(v.partition("=")[0], v.partition("=")[2].split()) for v in args.variant]
            for servers in args.servers:
                for variant, extra in variants:
                    rows.append(measure(args, tmp, blocks, servers, variant, extra, local, ids, expected, name))
            del local

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{device}; servers {args.dtype}, client {args.client_dtype}, wire {'exact' if args.exact_wire else '16-bit'}, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print("\n| model | servers | servers' args | local tok/s | swarm tok/s | swarm/local | local ms/token | "
          "swarm ms/token | added ms/hop | spread ms/hop | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, servers, variant, local_tps, swarm_tps, ratio, local_ms, swarm_ms, per_hop, spread, same in rows:
        print(f"| {name} | {servers} | {variant} | {local_tps:.1f} | {swarm_tps:.1f} | {ratio:.2f}x | {local_ms:.1f} | "
              f"{swarm_ms:.1f} | {per_hop:.2f} | {spread:.2f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
