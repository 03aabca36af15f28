"""A swarm of 20 servers on the testbed with 4 clients generating at once while servers die: failures, exactness,
and each client's chain against the best one an oracle with the true delays would pick. Root only.

    python bench/internet_churn.py [--minutes 5] [--churn-s 20] [--upload-mbit 20] [--seed 0]

Hosts (swarm/net/testbed.py): the DHT peer (no delay), 20 server hosts and 4 client hosts, each with a one-way
delay drawn as home connections have them (testbed.draw_delays: most 10-25 ms, a fifth 40-65 ms) on what it
sends, and --upload-mbit of upload. The model is a random hidden-256 x 16-block Llama in float32: 12 servers
hold 4 blocks (3 per quarter of the model) and 8 hold 2, so a chain has 4 to 8 servers. Servers are started
by `cocoon serve` with its defaults. Every --churn-s seconds one server that is up is killed (SIGKILL, its DHT
record left to expire) and a new one starts on the same host with the same blocks.

Each client (from_pretrained with exact_wire=True, so that its tokens must equal local float32 transformers')
generates 16 tokens after a random 16-token prompt, over and over, for --minutes, and compares every output
with local transformers. The oracle's chain is the cheapest cover of the 16 blocks by the servers alive at the
end, a route costing the client's delay plus the delay of every server on it (each sends once per token);
a client's chain is costed the same way.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from push import Clock  # bench/push.py, beside this script

HIDDEN, BLOCKS, VOCAB, NEW_TOKENS = 256, 16, 32000, 16
SPANS = [(q, q + 4) for q in range(0, BLOCKS, 4)] * 3 + [(b, b + 2) for b in range(0, BLOCKS, 2)]


def client(path: str, peers: list[str], seconds: float, seed: int) -> None:
    """Inside a client host: generate until the time is up; one JSON line of what happened."""
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, exact_wire=True)
    generator = torch.Generator().manual_seed(seed)
    result = {"generations": 0, "failed": 0, "mismatched": 0, "ms_per_token": [], "chains": [], "errors": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ids = torch.randint(3, VOCAB, (1, 16), generator=generator)
        with torch.no_grad():
            expected = local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            clock = Clock()
            try:
                with model.inference_session(max_length=16 + NEW_TOKENS) as session:
                    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                         streamer=clock)
                    chain = [link.peer_id for link in session.chain]
            except Exception as e:  # a failed generate: counted, and the client goes on
                result["failed"] += 1
                result["errors"].append(f"{type(e).__name__}: {e}"[:300])
                continue
        result["generations"] += 1
        result["mismatched"] += not torch.equal(out, expected)
        result["ms_per_token"].append(1000 * (clock.times[-1] - clock.times[1]) / (NEW_TOKENS - 1))
        result["chains"].append(chain)
    model.shutdown()
    print(json.dumps(result), flush=True)


def oracle(alive: dict[str, tuple[tuple[int, int], float]], client_delay: float) -> float:
    """The cheapest cover of blocks [0, BLOCKS) by consecutive spans of live servers: the client's delay plus
    each server's (name -> (span, one-way delay))."""
    best = [0.0] + [float("inf")] * BLOCKS  # best[b]: the cheapest route through blocks [0, b)
    for block in range(BLOCKS):
        if best[block] == float("inf"):
            continue
        for (start, end), delay in alive.values():
            if start <= block < end:
                best[end] = min(best[end], best[block] + delay)
    return client_delay + best[BLOCKS]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--churn-s", type=float, default=20.0)
    parser.add_argument("--upload-mbit", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", nargs="+", help=argparse.SUPPRESS)  # PATH SECONDS SEED PEERS...
    args = parser.parse_args()
    if args.client:
        return client(args.client[0], args.client[3:], float(args.client[1]), int(args.client[2]))

    from shards.testing import save_random_checkpoint
    from swarm.apps.local_swarm import LocalSwarm
    from swarm.net.testbed import Host, Testbed, draw_delays

    delays = draw_delays(len(SPANS) + 4, seed=args.seed)
    servers = {f"s{i}": (span, delays[i]) for i, span in enumerate(SPANS)}
    clients = {f"c{i}": delays[len(SPANS) + i] for i in range(4)}
    hosts = [Host("dht")] + [Host(name, delay, args.upload_mbit) for name, (_, delay) in servers.items()] + \
        [Host(name, delay, args.upload_mbit) for name, delay in clients.items()]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, "llama", hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                               max_position_embeddings=4096)
        with Testbed(hosts) as net, LocalSwarm(path, dht_host=net.host_ip("dht"), dht_netns=net.namespace("dht"),
                                               startup_timeout=600) as swarm:
            host_of_process = {}

            def start(name):
                process = swarm.add_server(servers[name][0], wait=False, host=net.host_ip(name),
                                           netns=net.namespace(name))
                host_of_process[id(process)] = name
                return process

            running = {name: start(name) for name in servers}
            print(f"starting {len(running)} servers ...", flush=True)
            for process in running.values():
                process.wait_for("Server ready", 600)
            seconds = 60 * args.minutes
            print(f"4 clients generating for {seconds:.0f} s, a server killed every {args.churn_s:g} s", flush=True)
            started = [net.popen(name, [sys.executable, __file__, "--client", path, str(seconds), str(i),
                                        *swarm.initial_peers], stdout=subprocess.PIPE, text=True)
                       for i, name in enumerate(clients)]
            kills, began = [], time.monotonic()
            while any(p.poll() is None for p in started):
                time.sleep(args.churn_s)
                if time.monotonic() - began > seconds:
                    continue
                up = [name for name, process in running.items() if process.peer_id is not None
                      and process.process.poll() is None]
                victim = rng.choice(up)
                running[victim].signal(signal.SIGKILL)
                running[victim] = start(victim)
                kills.append((round(time.monotonic() - began), victim))
                print(f"  {kills[-1][0]} s: killed {victim} (blocks {servers[victim][0]}), replacement starting",
                      flush=True)
            results = [json.loads(p.stdout.read().strip().splitlines()[-1]) for p in started]
            host_of = {process.peer_id: host_of_process[id(process)] for process in swarm.servers}  # killed too
            alive = {name: servers[name] for name, process in running.items() if process.peer_id}

    print(f"\n20 servers, 4 clients, {args.minutes:g} minutes, a server killed every {args.churn_s:g} s "
          f"({len(kills)} killed); one-way delays {min(delays):.0f}-{max(delays):.0f} ms, {args.upload_mbit:g} Mbit/s")
    print("\n| client | its delay ms | generations | failed | outputs unlike local | median ms/token | "
          "its chains' delay sum / the oracle's (median) |")
    print("|---|---|---|---|---|---|---|")
    for (name, delay), result in zip(clients.items(), results):
        best = oracle(alive, delay)
        ratios = []
        for chain in result["chains"]:
            known = [servers[host_of[p]][1] for p in chain if host_of.get(p) in servers]
            if len(known) == len(chain):
                ratios.append((delay + sum(known)) / best)
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        ms = statistics.median(result["ms_per_token"]) if result["ms_per_token"] else float("nan")
        print(f"| {name} | {delay:.1f} | {result['generations']} | {result['failed']} | {result['mismatched']} | "
              f"{ms:.1f} | {ratio} |")
        for error in result["errors"][:3]:
            print(f"  {name} failed: {error}")


if __name__ == "__main__":
    main()
