"""ms/token through a home server reached through a relay, against the same server reached directly through
ports forwarded on its router, in one run. Root only: it builds network namespaces (swarm.net.netns).

    python bench/relay.py [--new-tokens 16] [--repeats 3]

The DHT peer (whose relay the server registers with) and the client are on the public side; the server, started
by `cocoon serve` with its defaults, holds every block of a random model (hidden 512 x 8 blocks, float32)
behind a masquerading router: relayed by default, direct with `--public-ip` and the two ports forwarded. The
client (from_pretrained with default arguments) measures the decode steps' ms/token (first new token to the
last), median of --repeats, and checks its tokens against local transformers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

import torch

from push import Clock  # bench/push.py, beside this script

HIDDEN, BLOCKS = 512, 8
DIRECT_PORT, P2P_PORT = 40123, 40124


def client(path: str, new_tokens: int, repeats: int, peers: list[str]) -> None:
    """In the public namespace: generate, print ms/token of each run, how the server was reached, same tokens."""
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM
    ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
    expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).generate(
        ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers)
    times, same = [], True
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            clock = Clock()
            with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     streamer=clock)
                via = [s.stream.via for s in session._sessions]
            times.append(1000 * (clock.times[-1] - clock.times[1]) / (new_tokens - 1))
            same = same and torch.equal(out, expected)
    model.shutdown()
    print(json.dumps({"ms": times, "via": via, "same": same}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", nargs="+", help=argparse.SUPPRESS)  # PATH PEERS...: the client's side
    args = parser.parse_args()
    if args.client:
        return client(args.client[0], args.new_tokens, args.repeats, args.client[1:])

    from shards.testing import save_random_checkpoint
    from swarm.apps.local_swarm import LocalSwarm
    from swarm.net.netns import HOME, HOME_IP, PUB, PUBLIC_IP, ROUTER_IP, HomeNetwork

    variants = [("through the relay (default)", []),
                ("direct: ports forwarded, --public-ip", ["--public-ip", ROUTER_IP, "--direct-port", str(DIRECT_PORT),
                                                          "--port", str(P2P_PORT)])]
    rows = []
    with HomeNetwork() as network, tempfile.TemporaryDirectory() as path:
        network.forward(DIRECT_PORT)
        network.forward(P2P_PORT)
        save_random_checkpoint(path, "llama", hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=8,
                               num_key_value_heads=4, intermediate_size=2 * HIDDEN, vocab_size=32000)
        for name, extra in variants:
            with LocalSwarm(path, dht_host=PUBLIC_IP, dht_netns=PUB) as swarm:
                server = swarm.add_server((0, BLOCKS), *extra, host=HOME_IP, netns=HOME, wait=False)
                line = server.wait_for("Reachability:", 120).strip()
                server.wait_for("Server ready", 180)
                print(f"{name}: {line}", flush=True)
                done = subprocess.run(["ip", "netns", "exec", PUB, sys.executable, __file__, "--new-tokens",
                                       str(args.new_tokens), "--repeats", str(args.repeats), "--client", path,
                                       *swarm.initial_peers], capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    raise SystemExit(done.stderr[-3000:])
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append((name, result))

    print(f"\nhidden {HIDDEN} x {BLOCKS} blocks on one home server, float32, default client, {args.new_tokens} new "
          f"tokens, median of {args.repeats} (spread = max - min)")
    print("\n| server reached | via | ms/token | spread | same tokens |")
    print("|---|---|---|---|---|")
    for name, result in rows:
        ms = result["ms"]
        print(f"| {name} | {', '.join(result['via'])} | {statistics.median(ms):.1f} | {max(ms) - min(ms):.1f} | "
              f"{'yes' if result['same'] else 'no'} |")


if __name__ == "__main__":
    main()
