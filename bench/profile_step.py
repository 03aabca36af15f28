"""Where the time of one decode step goes, on the client and on a server (py-spy, sampling real processes).

    python bench/profile_step.py [--model small] [--seconds 8] [--server-arg=--no-direct]

Two servers started by `cocoon serve` with its defaults, a client with default arguments decoding in a loop
(batch 1, one token per step); py-spy samples the client and server0 at 1000 Hz, idle time included.
Each sample is put in the stage of the innermost frame that names one (below); the table shows
milliseconds per decode step per stage, per process (wall time of each thread in that stage / steps).
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.swarm_generate import MODELS  # noqa: E402

# (stage, substrings of "function (file)" of a frame): the innermost frame that matches decides
STAGES = [
    ("waiting (idle)", ["select (selectors.py", "wait (threading.py", "acquire", "Condition.wait", "result (concurrent",
                        "_worker (concurrent"]),
    ("compute: the blocks (torch)", ["shards/span.py", "shards/families.py", "transformers/models/"]),
    ("compute: client modules, sampling", ["shards/client_modules.py", "transformers/generation/"]),
    ("wire: pack (protobuf, msgpack, tensors)", ["pack (swarm/wire/requests.py", "pack (swarm/wire/replies.py",
                                                 "serialize_torch_tensor", "pack_metadata",
                                                 "SerializeToString"]),
    ("wire: parse (protobuf, msgpack, tensors)", ["parse (swarm/wire/requests.py", "parse (swarm/wire/replies.py",
                                                  "deserialize_torch_tensor",
                                                  "unpack_metadata", "ParseFromString"]),
    ("attestations, receipts, payments", ["incentives/", "attestation", "payments.py"]),
    ("stream I/O (asyncio, framing, TLS)", ["swarm/wire/framing.py", "asyncio/streams.py", "asyncio/sslproto.py",
                                            "asyncio/selector_events.py", "swarm/net/direct.py", "ssl.py"]),
    ("hivemind p2p client", ["hivemind/p2p/"]),
    ("scheduler and thread hand-offs", ["swarm/server/scheduler.py", "swarm/client/loop.py", "call_soon_threadsafe",
                                        "run_coroutine_threadsafe"]),
    ("event loop machinery", ["asyncio/base_events.py", "asyncio/events.py", "asyncio/tasks.py", "asyncio/futures.py"]),
    ("session, routing, failover bookkeeping", ["swarm/client/", "swarm/server/", "routing/"]),
]


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def record(pid: int, seconds: float, out: str) -> subprocess.Popen:
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "1000",
                             "--format", "raw", "--idle", "--threads", "--nonblocking", "--output", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(path: str) -> dict[str, collections.Counter]:
    """samples per stage, per thread name."""
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        thread, *frames = stack.split(";")
        per_thread[thread.partition(": ")[2] or thread][stage_of(frames)] += int(count)
    return per_thread


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="small")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--keep", metavar="DIR", help="copy py-spy's raw samples there")
    args = parser.parse_args()
    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    hidden, blocks, heads, kv_heads, intermediate = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "llama", hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads,
                               num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=32000)
        half = blocks // 2
        with LocalSwarm(tmp, [(0, half), (half, blocks)], server_args=args.server_arg) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(tmp, initial_peers=swarm.initial_peers)
            ids = torch.randint(3, 32000, (1, 8))
            steps, stop = [0], threading.Event()

            def decode():
                with torch.no_grad(), model.inference_session(max_length=4096):
                    logits = model(ids).logits
                    while not stop.is_set():
                        logits = model(logits[:, -1:].argmax(-1)).logits
                        steps[0] += 1

            worker = threading.Thread(target=decode)
            worker.start()
            time.sleep(2)
            client_out, server_out = os.path.join(tmp, "client.txt"), os.path.join(tmp, "server.txt")
            spies = [record(os.getpid(), args.seconds, client_out),
                     record(swarm.servers[0].process.pid, args.seconds, server_out)]
            time.sleep(0.5)  # py-spy attaches
            first = steps[0]
            for spy in spies:
                spy.wait()
            counted = steps[0] - first
            stop.set()
            worker.join()
            model.shutdown()
            step_ms = 1000 * args.seconds / max(counted, 1)
            print(f"\n{counted} decode steps in ~{args.seconds:.0f} s: {step_ms:.2f} ms per step "
                  f"(hidden {hidden}, {blocks} blocks, 2 servers; server args {args.server_arg or 'defaults'})\n")
            columns = []  # the two threads of each process that work the most: the step's path
            for name, path in (("client", client_out), ("server0", server_out)):
                if args.keep:
                    shutil.copy(path, os.path.join(args.keep, f"{name}.txt"))
                threads = summarize(path)
                busy = sorted(threads, key=lambda t: sum(n for stage, n in threads[t].items()
                                                         if stage not in ("waiting (idle)", "other")))[-2:]
                columns += [(f"{name} {thread}", threads[thread]) for thread in reversed(busy)]
            print("| stage (ms per step) | " + " | ".join(c for c, _ in columns) + " |")
            print("|---|" + "---|" * len(columns))
            for stage in [s for s, _ in STAGES] + ["other"]:
                values = [counts.get(stage, 0) / max(counted, 1) for _, counts in columns]  # 1 sample = 1 ms
                if max(values) >= 0.005:
                    print(f"| {stage} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


if __name__ == "__main__":
    main()
