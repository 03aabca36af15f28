"""Decode ms/token and a long prompt's prefill through chains of servers on the testbed (swarm/net/testbed.py), each
against its physical bound on the same network. Root only (network namespaces).

    python bench/internet.py [--chains 4 8] [--delay-ms 25] [--upload-mbit 20] [--new-tokens 32] [--prompt 2000]

Hosts: the DHT peer (no delay), a client and one host per server, each with a one-way delay of --delay-ms on what
it sends and an upload of --upload-mbit. Servers are started by `cocoon serve` with its defaults (and
--metrics-port), each holding an equal span of a random hidden-256 x 16-block model (float32); the client is
from_pretrained with default arguments (push on, 16-bit wire), in its own host. For a chain of k servers:

- decode: greedy, median of --repeats over the decode steps (first new token to the last). Bound: the one-way
  delays of the legs a token takes (client -> first server, k - 1 pushes, last server -> client) plus each
  server's compute for a step, from its own metrics (the decode step it timed at start-up, cocoon_decode_plan);
- prefill: the time to the first token of a --prompt-token prompt (a new session: its opening is counted), with
  the 16-bit wire and again with a second client that has wire_codec="int8" (8-bit rows: swarm.wire.int8_rows).
  Bound: the client's upload of the prompt's hidden states, then for each server the larger of its compute
  (its blocks' forward over the prompt, timed here by transformers) and its upload of its output (the wire
  carries 2 bytes a value): stages one after another. A prompt goes down the chain in pieces that overlap the
  stages (swarm.wire.requests.piece_bounds), so a long chain may take less than this sum.

Every stream's path is checked: one that fell back to hivemind's own connection is reported, not counted.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time

import torch

from push import Clock  # bench/push.py, beside this script: a streamer noting when each token came

HIDDEN, BLOCKS, VOCAB = 256, 16, 32000
METRICS_PORT = 9400


def client(path: str, peers: list[str], new_tokens: int, prompt: int, repeats: int) -> None:
    """Inside the client's host: one JSON line with the decode and prefill timings, paths and exactness."""
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    long_ids = torch.randint(3, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(1))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = local.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers)
    result = {"decode_ms": [], "same": True, "vias": set(), "chain": None, "fell_back": 0}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        for _ in range(repeats):
            times = Clock()
            with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                     streamer=times)
                vias = {s.stream.via for s in session._sessions}
                result["chain"] = [s.link.peer_id for s in session._sessions]
            result["vias"] |= vias
            if "hivemind" in vias:  # a fallback bypassed the delays: reported, not counted
                result["fell_back"] += 1
            else:
                result["decode_ms"].append(1000 * (times.times[-1] - times.times[1]) / (new_tokens - 1))
            result["same"] = result["same"] and torch.equal(out, expected)
        result["prefill_s"] = prefills(model, long_ids, repeats, result)
    model.shutdown()
    eight_bits = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers, wire_codec="int8")
    with torch.no_grad():
        eight_bits.generate(ids, max_new_tokens=2, do_sample=False)
        result["prefill_int8_s"] = prefills(eight_bits, long_ids, repeats, result)
    eight_bits.shutdown()
    print(json.dumps({**result, "vias": sorted(result["vias"])}), flush=True)


def prefills(model, long_ids: torch.Tensor, repeats: int, result: dict) -> list[float]:
    """Seconds to the first token of ``long_ids`` in a new session, ``repeats`` times (paths noted in ``result``)."""
    seconds = []
    for _ in range(repeats):
        times = Clock()
        with model.inference_session(max_length=long_ids.shape[1] + 1) as session:
            model.generate(long_ids, max_new_tokens=1, do_sample=False, eos_token_id=None, streamer=times)
            vias = {s.stream.via for s in session._sessions}
        result["vias"] |= vias
        if "hivemind" in vias:  # a fallback bypassed the delays: reported, not counted
            result["fell_back"] += 1
        else:
            seconds.append(times.times[1] - times.times[0])
    return seconds


def step_seconds(net, host: str) -> dict[str, float]:
    """A server's own measure of a decode step over its blocks (the step_ms of cocoon_decode_plan, timed at
    start-up), read from inside its host (it serves its metrics on its --host address)."""
    url = f"http://{net.host_ip(host)}:{METRICS_PORT}/metrics"
    read = f"import urllib.request; print(urllib.request.urlopen('{url}').read().decode())"
    text = net.run(host, [sys.executable, "-c", read], capture_output=True, text=True, check=True).stdout
    return {"step_s": float(re.search(r'step_ms="([0-9.]+)"', text).group(1)) / 1000}


def prefill_block_seconds(path: str, prompt: int) -> float:
    """Seconds of one block's forward over the prompt, timed here with transformers (the blocks' share of the
    base model's forward: embeddings are nothing beside them): the compute of a prefill stage, per block."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (1, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - started)
    return statistics.median(times) / BLOCKS


def measure_chain(path: str, k: int, args) -> dict:
    from swarm.apps.local_swarm import LocalSwarm
    from swarm.net.testbed import Host, Testbed

    servers = [f"s{i}" for i in range(k)]
    hosts = [Host("dht"), Host("client", args.delay_ms, args.upload_mbit)] + \
        [Host(name, args.delay_ms, args.upload_mbit) for name in servers]
    step = BLOCKS // k
    with Testbed(hosts) as net, LocalSwarm(path, dht_host=net.host_ip("dht"), dht_netns=net.namespace("dht")) as swarm:
        started = [swarm.add_server((i * step, (i + 1) * step), "--metrics-port", str(METRICS_PORT), wait=False,
                                    host=net.host_ip(name), netns=net.namespace(name)) for i, name in enumerate(servers)]
        for server in started:
            server.wait_for("Server ready", 300)
        done = net.run("client", [sys.executable, __file__, "--client", path, *swarm.initial_peers,
                                  "--new-tokens", str(args.new_tokens), "--prompt", str(args.prompt),
                                  "--repeats", str(args.repeats)], capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(f"the client failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.splitlines()[-1])
        after = {name: step_seconds(net, name) for name in servers}
    compute = [after[name]["step_s"] for name in servers]
    delay = args.delay_ms / 1000
    decode_bound = (k + 1) * delay + sum(compute)
    transfer = args.prompt * HIDDEN * 2 * 8 / (args.upload_mbit * 1e6)  # 16-bit values over the sender's upload
    prefill_bound = transfer + k * max(args.prefill_block_s * step, transfer)  # the client's upload, then each server
    return {"k": k, **result, "decode_bound_ms": 1000 * decode_bound, "compute_ms": [1000 * c for c in compute],
            "prefill_bound_s": prefill_bound}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--delay-ms", type=float, default=25.0)
    parser.add_argument("--upload-mbit", type=float, default=20.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--client", nargs="+", help=argparse.SUPPRESS)  # PATH PEERS...: the client's side
    args = parser.parse_args()
    if args.client:
        return client(args.client[0], args.client[1:], args.new_tokens, args.prompt, args.repeats)

    from shards.testing import save_random_checkpoint
    rows = []
    with tempfile.TemporaryDirectory() as path:
        save_random_checkpoint(path, "llama", hidden_size=HIDDEN, num_hidden_layers=BLOCKS, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=2 * HIDDEN, vocab_size=VOCAB,
                               max_position_embeddings=4096)
        args.prefill_block_s = prefill_block_seconds(path, args.prompt)
        print(f"a block's forward over the {args.prompt}-token prompt: {1000 * args.prefill_block_s:.1f} ms", flush=True)
        for k in args.chains:
            print(f"chain of {k} servers ...", flush=True)
            row = measure_chain(path, k, args)
            print(f"  {json.dumps(row)}", flush=True)
            rows.append(row)

    print(f"\n{args.delay_ms:g} ms one-way and {args.upload_mbit:g} Mbit/s upload on every host but the DHT's; "
          f"{args.new_tokens} new tokens, a {args.prompt}-token prompt; median of {args.repeats}")
    print("\n| servers in the chain | decode ms/token | bound ms/token | ratio | servers' compute ms/step | "
          "prefill s | bound s | ratio | prefill s, int8 wire | 16-bit / int8 | same tokens as local | paths |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        nan = float("nan")
        decode = statistics.median(r["decode_ms"]) if r["decode_ms"] else nan
        prefill = statistics.median(r["prefill_s"]) if r["prefill_s"] else nan
        prefill8 = statistics.median(r["prefill_int8_s"]) if r["prefill_int8_s"] else nan
        fell_back = f" ({r['fell_back']} runs fell back to hivemind: not counted)" if r["fell_back"] else ""
        print(f"| {r['k']} | {decode:.1f} | {r['decode_bound_ms']:.1f} | {decode / r['decode_bound_ms']:.2f} | "
              f"{sum(r['compute_ms']):.1f} | {prefill:.2f} | {r['prefill_bound_s']:.2f} | "
              f"{prefill / r['prefill_bound_s']:.2f} | {prefill8:.2f} | {prefill / prefill8:.2f} | "
              f"{'yes' if r['same'] else 'no'} | "
              f"{', '.join(r['vias'])}{fell_back} |")


if __name__ == "__main__":
    main()
