"""Aggregate tokens/s of N concurrent clients of one server, with and without batching across sessions.

    python bench/batching.py [--clients 1 2 4 8 16] [--repeats 3] [--hidden 2048] [--device cpu]

One server started by `cocoon serve` holds every block: with its defaults, with a 10 ms batching window,
and with `--max-batch-sessions 1` (no batching). The clients are threads of one process, each with its own
model (from_pretrained with default arguments), each generating greedily from its own 16-token prompt. The
clients first warm up together, untimed (one token each: their first look at the swarm, and the server's
first batch, which packs its weights once: swarm.server.batching); then a run times all clients' new
tokens divided by the wall time until the last one finished (their prompts included), and checks each
client's tokens against what it generates alone.

This machine's speed drifts by tens of percent within minutes, so every configuration and client count
runs --repeats times, interleaved (each repeat starts each configuration's server afresh and runs every
client count on it): the table shows the median of the repeats, their spread (min-max), and the ratio of
medians to one client.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch


def run_clients(path, peers, prompts, new_tokens, device) -> tuple[float, list[torch.Tensor]]:
    from swarm import AutoDistributedModelForCausalLM
    models = [AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, device=device)
              for _ in prompts]
    outputs = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def client(i):
        with torch.no_grad():
            models[i].generate(prompts[i].to(device), max_new_tokens=1, do_sample=False)  # warm-up, not timed
            barrier.wait()
            outputs[i] = models[i].generate(prompts[i].to(device), max_new_tokens=new_tokens, do_sample=False,
                                            eos_token_id=None).cpu()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for model in models:
        model.shutdown()
    return len(prompts) * new_tokens / elapsed, outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from shards.testing import save_random_checkpoint
    from swarm.apps.local_swarm import LocalSwarm

    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                               num_hidden_layers=args.blocks, num_attention_heads=args.hidden // 128,
                               num_key_value_heads=max(1, args.hidden // 512), vocab_size=args.vocab,
                               max_shard_size="2GB")
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, args.vocab, (1, 16), generator=generator) for _ in range(max(args.clients))]
        configs = (("batching (defaults)", []), ("batching, 10 ms window", ["--batch-window-ms", "10"]),
                   ("no batching", ["--max-batch-sessions", "1"]))
        rates: dict[tuple[str, int], list[float]] = {(name, n): [] for name, _ in configs for n in args.clients}
        same: dict[tuple[str, int], bool] = dict.fromkeys(rates, True)
        solo = {}
        for repeat in range(args.repeats):
            for name, extra in configs:
                server_args = ["--device", args.device, *extra]
                with LocalSwarm(tmp, [(0, args.blocks)], dtype=args.dtype, server_args=server_args) as swarm_:
                    for i, prompt in enumerate(prompts):  # what each client generates alone (once)
                        if i not in solo:
                            solo[i] = run_clients(tmp, swarm_.initial_peers, [prompt], args.new_tokens,
                                                  args.device)[1][0]
                    for n in args.clients:
                        tokens_per_s, outputs = run_clients(tmp, swarm_.initial_peers, prompts[:n], args.new_tokens,
                                                            args.device)
                        rates[name, n].append(tokens_per_s)
                        same[name, n] &= all(torch.equal(output, solo[i]) for i, output in enumerate(outputs))
                        print(f"  repeat {repeat + 1}/{args.repeats}, {name}: {n} clients, {tokens_per_s:.1f} tokens/s",
                              flush=True)
        print(f"\nhidden {args.hidden}, intermediate {args.intermediate}, {args.blocks} blocks on one server, vocab "
              f"{args.vocab}, {args.dtype} on {args.device}, 16-token prompts, {args.new_tokens} new tokens, median "
              f"of {args.repeats} interleaved repeats\n")
        print("| server | clients | tokens/s (all clients) | spread (min-max) | x one client | same tokens as alone |")
        print("|---|---|---|---|---|---|")
        for name, _ in configs:
            one = statistics.median(rates[name, args.clients[0]])
            for n in args.clients:
                runs = rates[name, n]
                print(f"| {name} | {n} | {statistics.median(runs):.1f} | {min(runs):.1f}-{max(runs):.1f} | "
                      f"{statistics.median(runs) / one:.2f}x | {'yes' if same[name, n] else 'no'} |")


if __name__ == "__main__":
    main()
