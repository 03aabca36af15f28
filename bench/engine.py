"""The server's engine against transformers as a user runs it: decode steps alone, one server, two servers, and
eight concurrent clients.

    python bench/engine.py [--repeats 5] [--new-tokens 32] [--skip span swarm clients]

The local baseline is always bench/local_baseline.py in a process of its own that never imported the project
(torch's defaults), run once per repeat, interleaved with the swarm's runs: this machine's speed drifts by
tens of percent within minutes. Servers are started by `cocoon serve` with its defaults (the decode plan they
measure at start-up), clients are from_pretrained() with default arguments. Float32 weights, greedy, batch 1,
16-token prompts. Tables show medians of the repeats and their spread (min-max).

- span: one decode step of all blocks, in this process: transformers' own layers (the clean process), the
  plain path and the path the engine picks (shards.decode_paths), at the threads it picks.
- swarm: one server holding every block, and two servers (4 + 4 blocks); added ms/hop is
  (swarm - local) per token / servers.
- clients: hidden 2048 x 4 blocks on one server; 1 client and 8 concurrent clients (threads of one process, each
  with its own model object: bench/batching.py), against the local baseline of the same model.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODELS = {  # name: (hidden, blocks, heads, kv heads, intermediate, vocab)
    "512x8": (512, 8, 8, 4, 1024, 32000),
    "2048x8": (2048, 8, 16, 8, 4096, 32000),
    "2048x4": (2048, 4, 16, 4, 5632, 8000),  # bench/batching.py's model
}


def write_checkpoint(root: str, name: str) -> str:
    from shards.testing import save_random_checkpoint
    hidden, blocks, heads, kv_heads, intermediate, vocab = MODELS[name]
    path = os.path.join(root, name)
    save_random_checkpoint(path, "llama", hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                           num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                           max_shard_size="2GB")
    return path


def local_baseline(path: str, new_tokens: int, layers: bool = False, device: str = "cpu", dtype: str = "float32"
                   ) -> dict:
    """One run of bench/local_baseline.py in a fresh process."""
    command = [sys.executable, str(HERE / "local_baseline.py"), path, "--new-tokens", str(new_tokens),
               "--device", device, "--dtype", dtype]
    out = subprocess.run(command + (["--layers"] if layers else []), capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float], scale: float = 1000.0) -> str:
    return f"{statistics.median(values) * scale:.2f} ({min(values) * scale:.2f}-{max(values) * scale:.2f})"


# ---------------------------------------------------------------------- span steps
def span_steps(root: str, names: list[str], rounds: int = 3) -> list[str]:
    """Interleaved rounds: transformers' layers in a clean process, then the span's paths in this one."""
    from shards import BlockSpan
    from shards.decode_paths import BATCH_ROWS, PROMPT_TOKENS, _timed, choose_plan, decode_step, prompt_step
    from shards.packed_linears import packed_forwards

    rows = []
    for name in names:
        path = write_checkpoint(root, name)
        span = BlockSpan.from_pretrained(path, 0, MODELS[name][1], dtype="float32")
        plan = choose_plan(span, {})
        cores = len(os.sched_getaffinity(0))
        candidates = {"plain": ("plain", cores, 1), "plan": (plan.path, plan.threads, 1),
                      "plain, batch": ("plain", plan.threads, BATCH_ROWS),
                      "plan, batch": (plan.path_for(BATCH_ROWS), plan.threads, BATCH_ROWS)}
        packed_forwards(span)  # both paths stay timeable here
        steps = {label: (decode_step(span, path_name, batch), threads)
                 for label, (path_name, threads, batch) in candidates.items()}
        steps["prompt, plain"] = (prompt_step(span, "plain"), cores)  # prefills take every core
        steps["prompt, plan"] = (prompt_step(span, plan.prompt_path), cores)
        times = {label: [] for label in ["local", *steps]}
        for _ in range(rounds):
            times["local"].append(local_baseline(path, 4, layers=True)["layers_step_s"])
            for label, (step, threads) in steps.items():
                torch.set_num_threads(threads)
                _timed(step, 2)
                times[label].append(_timed(step, 15))
        torch.set_num_threads(cores)
        ms = {label: statistics.median(values) * 1000 for label, values in times.items()}
        rows.append(f"| {name} | {spread(times['local'])} | {spread(times['plain'])} | {plan} | "
                    f"{spread(times['plan'])} | {ms['local'] / ms['plan']:.2f}x | {spread(times['plain, batch'])} | "
                    f"{plan.path_for(BATCH_ROWS)}: {spread(times['plan, batch'])} | {spread(times['prompt, plain'])} | "
                    f"{plan.prompt_path}: {spread(times['prompt, plan'])} |")
        print(rows[-1], flush=True)
        del span, steps
    return ["| model | transformers' layers ms (clean process) | span, plain, all cores ms | the engine's plan | "
            f"span, the plan ms | speed vs transformers | batch of 8, plain ms | batch of 8, the plan's path ms | "
            f"prompt of {PROMPT_TOKENS}, plain ms | prompt of {PROMPT_TOKENS}, the plan's path ms |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows]


# ---------------------------------------------------------------------- swarm generate
def swarm_runs(root: str, names: list[str], servers_counts: list[int], repeats: int, new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    rows = []
    for name in names:
        path = write_checkpoint(root, name)
        blocks = MODELS[name][1]
        ids = torch.randint(3, MODELS[name][5], (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().generate(
                ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        for servers in servers_counts:
            spans = [(i * blocks // servers, (i + 1) * blocks // servers) for i in range(servers)]
            with LocalSwarm(path, spans) as swarm:
                plans = [re.search(r"decode path (\S+?),", line).group(1) for s in swarm.servers
                         for line in s.output if "Server ready" in line]
                model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=4, do_sample=False)
                    local_times, swarm_times = [], []
                    for repeat in range(repeats):
                        local_times.append(local_baseline(path, new_tokens)["generate_s_per_token"][0])
                        swarm_times.append(_seconds_per_token(model, ids, new_tokens))
                        print(f"  {name}, {servers} servers, repeat {repeat + 1}: local "
                              f"{local_times[-1] * 1000:.1f} ms/token, swarm {swarm_times[-1] * 1000:.1f}", flush=True)
                    same = torch.equal(model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                                      eos_token_id=None), expected)
                model.shutdown()
            local_s, swarm_s = statistics.median(local_times), statistics.median(swarm_times)
            added = [(s - l) / servers for s, l in zip(swarm_times, local_times)]
            rows.append(f"| {name} | {servers} | {'; '.join(plans)} | {spread(local_times)} | {spread(swarm_times)} | "
                        f"{local_s / swarm_s:.2f}x | {spread(added)} | {'yes' if same else 'no'} |")
            print(rows[-1], flush=True)
    return ["| model | servers | decode plans | local ms/token | swarm ms/token | swarm/local | added ms/hop | "
            "same tokens |", "|---|---|---|---|---|---|---|---|", *rows]


def _seconds_per_token(model, ids, new_tokens: int) -> float:
    import time
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return (time.perf_counter() - started) / new_tokens


# ---------------------------------------------------------------------- concurrent clients
def concurrent_clients(root: str, repeats: int, new_tokens: int, clients: int = 8) -> list[str]:
    sys.path.insert(0, str(HERE))
    from batching import run_clients

    from swarm.apps.local_swarm import LocalSwarm

    path = write_checkpoint(root, "2048x4")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, MODELS["2048x4"][5], (1, 16), generator=generator) for _ in range(clients)]
    local, one, many = [], [], []
    with LocalSwarm(path, [(0, 4)]) as swarm:
        plan = next(re.search(r"decode path (.+?), as peer", line).group(1) for line in swarm.servers[0].output
                    if "Server ready" in line)
        solo = run_clients(path, swarm.initial_peers, prompts[:1], new_tokens, "cpu")  # warm-up
        for repeat in range(repeats):
            local.append(1 / local_baseline(path, new_tokens)["generate_s_per_token"][0])
            one.append(run_clients(path, swarm.initial_peers, prompts[:1], new_tokens, "cpu")[0])
            rate, outputs = run_clients(path, swarm.initial_peers, prompts, new_tokens, "cpu")
            many.append(rate)
            print(f"  repeat {repeat + 1}: local {local[-1]:.1f} tokens/s, 1 client {one[-1]:.1f}, {clients} clients "
                  f"{many[-1]:.1f}", flush=True)
        same = torch.equal(outputs[0], solo[1][0])
    median = statistics.median
    return [f"server: decode path {plan}\n", "| configuration | tokens/s (all clients) | x one client | x local |",
            "|---|---|---|---|",
            f"| local transformers (clean process) | {spread(local, 1)} | | 1.00x |",
            f"| 1 client | {spread(one, 1)} | 1.00x | {median(one) / median(local):.2f}x |",
            f"| {clients} concurrent clients | {spread(many, 1)} | {median(many) / median(one):.2f}x | "
            f"{median(many) / median(local):.2f}x |", f"\nthe first client's tokens equal its tokens alone: "
                                                       f"{'yes' if same else 'no'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip", nargs="*", default=[], choices=["span", "swarm", "clients"])
    args = parser.parse_args()
    tables = []
    with tempfile.TemporaryDirectory() as root:
        if "span" not in args.skip:
            tables.append(("A server's decode step alone", span_steps(root, ["512x8", "2048x8"])))
        if "swarm" not in args.skip:
            tables.append(("generate() through a swarm", swarm_runs(root, ["512x8", "2048x8"], [1, 2], args.repeats,
                                                                   args.new_tokens)))
        if "clients" not in args.skip:
            tables.append(("Concurrent clients of one server (hidden 2048 x 4 blocks, vocab 8000)",
                           concurrent_clients(root, max(3, args.repeats // 2 + 1), 24)))
    print(f"\n{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, float32, median of the repeats "
          f"(min-max)")
    for title, lines in tables:
        print(f"\n### {title}\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
