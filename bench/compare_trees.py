"""Decode speed of two versions of the project, by turns in one invocation: the reshaping of issue 26 must cost
nothing on the decode path.

    python bench/compare_trees.py [--base REV] [--rounds 3] [--new-tokens 32] [--fresh-cache]

``--base`` (default: the commit before the reshaping) is checked out in a `git worktree`; this working tree is
the other side. Each round runs, in an order that alternates, for each tree and for one server holding all 8
blocks and two servers of 4: a swarm of `cocoon serve` processes with their defaults (that tree's code), a client
from from_pretrained() with default arguments, a warm-up and two timed greedy generations (batch 1, 16-token
prompt, float32, hidden 512 x 8 blocks), and bench/local_baseline.py in a clean process. Added ms/hop is
(swarm - local) per token / servers, against the local run of the same round. The table shows medians over the
rounds and their spread. ``--fresh-cache``: every swarm measures its decode plans and throughput at start, as on
a machine's first start (and in every test), instead of reading what earlier runs cached.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASE = "7882f23"  # the last commit before issue 26's moves
NAME, SHAPE = "512x8", dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           intermediate_size=1024, vocab_size=32000)


def child(checkpoint: str, servers: int, new_tokens: int) -> None:
    """In the tree under test (PYTHONPATH): a swarm, a client, two timed generations; prints one JSON line."""
    import torch
    if (Path.cwd() / "swarm" / "apps").is_dir():
        from swarm.apps.local_swarm import LocalSwarm
    else:  # the base tree, before swarm.apps (an import that fails here would find this tree's, installed editable)
        from swarm.local_swarm import LocalSwarm
    from swarm import AutoDistributedModelForCausalLM
    import swarm
    assert Path(swarm.__file__).resolve().parent.parent == Path.cwd().resolve(), swarm.__file__

    ids = torch.randint(3, SHAPE["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    blocks = SHAPE["num_hidden_layers"]
    spans = [(i * blocks // servers, (i + 1) * blocks // servers) for i in range(servers)]
    with LocalSwarm(checkpoint, spans) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
        times, tokens = [], None
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)
            for _ in range(2):
                started = time.perf_counter()
                tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
                times.append((time.perf_counter() - started) / new_tokens)
        model.shutdown()
    print(json.dumps({"s_per_token": statistics.median(times), "tokens": tokens[0].tolist()}), flush=True)


def run_child(tree: Path, checkpoint: str, servers: int, new_tokens: int, fresh_cache: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryDirectory() as cache:
        if fresh_cache:
            env["COCOON_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, str(HERE / "compare_trees.py"), "--child", checkpoint, str(servers),
                              str(new_tokens)], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"the run in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def local_baseline(checkpoint: str, new_tokens: int) -> float:
    out = subprocess.run([sys.executable, str(HERE / "local_baseline.py"), checkpoint, "--new-tokens",
                          str(new_tokens)], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return json.loads(out.stdout.strip().splitlines()[-1])["generate_s_per_token"][0]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f} ({min(values) * 1000:.2f}-{max(values) * 1000:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=BASE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--fresh-cache", action="store_true")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.base], cwd=ROOT, check=True)
        try:
            sys.path.insert(0, str(ROOT))
            from shards.testing import save_random_checkpoint
            checkpoint = str(Path(tmp) / NAME)
            save_random_checkpoint(checkpoint, "llama", **SHAPE)
            trees = {f"base {args.base}": base_tree, f"this tree (HEAD {head.strip()} + changes)": ROOT}
            results = {(label, servers): [] for label in trees for servers in (1, 2)}
            locals_, tokens = [], {}
            for round_ in range(args.rounds):
                locals_.append(local_baseline(checkpoint, args.new_tokens))
                order = list(trees.items()) if round_ % 2 == 0 else list(trees.items())[::-1]
                for label, tree in order:
                    for servers in (1, 2):
                        run = run_child(tree, checkpoint, servers, args.new_tokens, args.fresh_cache)
                        results[(label, servers)].append((run["s_per_token"], locals_[-1]))
                        tokens.setdefault(servers, set()).add(tuple(run["tokens"]))
                        print(f"  round {round_ + 1}, {label}, {servers} server(s): "
                              f"{run['s_per_token'] * 1000:.2f} ms/token (local {locals_[-1] * 1000:.2f})", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT)
    print(f"\n{len(os.sched_getaffinity(0))} cores, {NAME} float32, greedy, batch 1, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds{', fresh caches' if args.fresh_cache else ''}; local transformers: {spread(locals_)} ms/token\n")
    print("| tree | servers | swarm ms/token | added ms/hop |\n|---|---|---|---|")
    for (label, servers), runs in results.items():
        added = [(swarm - local) / servers for swarm, local in runs]
        print(f"| {label} | {servers} | {spread([s for s, _ in runs])} | {spread(added)} |")
    print(f"\nthe same tokens from both trees: {all(len(t) == 1 for t in tokens.values())}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
