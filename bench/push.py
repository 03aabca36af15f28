"""ms/token through 1, 2 and 4 servers at 0, 10 and 25 ms of one-way delay per link, with and without
server-to-server push, in one run.

    python bench/push.py [--servers 1 2 4] [--delays 0 10 25] [--new-tokens 16]

Each server is started by `cocoon serve` with its defaults, behind a bench/delay_relay.py that holds every
byte D ms each way and is announced as the server's direct address (`--announce-direct`), so that the
client's connections and the servers' pushes to each other all cross one delayed link. For each swarm the
client generates greedily with push (the default) and with push=False, median of --repeats of the decode
steps' ms/token (from the first new token to the last), and its tokens are checked against local transformers. Without push a token crosses 2k links over k servers; with push k + 1.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, BLOCKS, HEADS, KV_HEADS, INTERMEDIATE = 512, 8, 8, 4, 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_relay(listen: int, target: int, delay_ms: float) -> subprocess.Popen:
    relay = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delay_relay.py")), "--listen",
                              f"127.0.0.1:{listen}", "--to", f"127.0.0.1:{target}", "--delay-ms", str(delay_ms)],
                             stdout=subprocess.PIPE, text=True)
    assert "relay ready" in relay.stdout.readline()
    return relay


class Clock:
    """A streamer that notes when each token came: the decode steps' time, without opening and prefill."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def ms_per_token(model, ids, new_tokens: int, expected) -> tuple[float, bool]:
    clock = Clock()  # put() 0 is the prompt, 1 the first new token (after the prefill)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, streamer=clock)
    return 1000 * (clock.times[-1] - clock.times[1]) / (new_tokens - 1), torch.equal(out, expected)


def measure(path, servers: int, delay: float, args, ids, expected) -> dict[bool, tuple[float, float, bool]]:
    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm

    step = BLOCKS // servers
    relays = []
    with LocalSwarm(path, []) as swarm:
        try:
            for i in range(servers):
                direct, relay = free_port(), free_port()
                relays.append(start_relay(relay, direct, delay))
                swarm.add_server((i * step, (i + 1) * step), "--direct-port", str(direct),
                                 "--announce-direct", f"127.0.0.1:{relay}")
            results = {}
            for push in (False, True):
                model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                        push=push)
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=4, do_sample=False)
                    runs = [ms_per_token(model, ids, args.new_tokens, expected) for _ in range(args.repeats)]
                model.shutdown()
                times = [ms for ms, _ in runs]
                results[push] = (statistics.median(times), max(times) - min(times), all(same for _, same in runs))
                print(f"  {servers} servers, {delay:g} ms, push {push}: {results[push][0]:.1f} ms/token", flush=True)
        finally:
            for relay in relays:
                relay.kill()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 10, 25], help="one-way ms per link")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from shards.testing import save_random_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, "llama", hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=HEADS,
                               num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, vocab_size=32000)
        ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = local.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
        for delay in args.delays:
            for servers in args.servers:
                rows.append((servers, delay, measure(path, servers, delay, args, ids, expected)))

    print(f"\nhidden {HIDDEN} x {BLOCKS} blocks, float32 servers, default client, {args.new_tokens} new tokens, "
          f"median of {args.repeats} (spread = max - min); one delay relay in front of each server")
    print("\n| one-way delay | servers | without push ms/token | with push ms/token | saved ms/token | "
          "saved / delay | spread without / with | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for servers, delay, results in rows:
        (off, off_spread, off_same), (on, on_spread, on_same) = results[False], results[True]
        ratio = f"{(off - on) / delay:.2f}" if delay else "-"
        print(f"| {delay:g} ms | {servers} | {off:.1f} | {on:.1f} | {off - on:.1f} | {ratio} | "
              f"{off_spread:.1f} / {on_spread:.1f} | {'yes' if off_same and on_same else 'no'} |")
    print("\nWithout push a token crosses 2k delayed links over k servers, with push k + 1: push should save about "
          "(k - 1) delays per token.")


if __name__ == "__main__":
    main()
