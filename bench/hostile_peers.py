"""An honest client's decode-step latency on a server under attack by another peer, against its latency alone;
and a new client's first generate() beside tarpit servers, against the same swarm without them.

    python bench/hostile_peers.py

One server (tiny random Llama, 4 blocks, `cocoon serve` with its default quotas), an honest client and an
attacker, each a peer of its own, on this machine. Each attack runs while the honest client takes 32
one-token steps; the table shows the median and 90th percentile.

Tarpits: 3 servers (tests/malicious_server.py, COCOON_MISCHIEF=tarpit) announce all 4 blocks as the fastest in
the swarm, answer pings and never answer a step. Each run is a new client with default settings (request
timeout 60 s) timing generate() of 4 new tokens, first with the tarpits stopped, then beside them.

Handshake floods (as root: network namespaces, swarm/net/netns.py): the server and the victim client at
10.78.0.1, the attacker at 10.78.0.3 (tests/handshake_flood.py) opening 200 connections a second that finish TLS
and say nothing ("silent", 300 at once), or that say hello and answer the server's nonce with a proof of nobody
("loops"). The rate is fixed so that the attacker's own CPU on these 2 cores does not decide the figure.
"""
from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


FLOODS = "victim at 10.78.0.1, attacker at 10.78.0.3 |"


def step_times(honest, steps: int = 32) -> list[float]:
    hidden = honest.config.hidden_size
    x = torch.randn(1, steps + 1, hidden)
    times = []
    with honest.inference_session(max_length=steps + 1) as session:
        session.step(x[:, :1])
        for i in range(1, steps + 1):
            started = time.perf_counter()
            session.step(x[:, i:i + 1])
            times.append(time.perf_counter() - started)
    return times


def main():
    from hivemind.proto.runtime_pb2 import ExpertRequest

    from shards import Checkpoint
    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM
    from swarm.client import loop
    from swarm.client.swarm_client import SwarmClient
    from swarm.apps.local_swarm import LocalSwarm
    from swarm.wire.codes import RemoteError
    from swarm.wire.requests import InferenceStep, SpanRequest
    from swarm.wire.tensors import pack_tensor

    directory = tempfile.TemporaryDirectory()  # removed when main() returns
    tmp = directory.name
    save_random_checkpoint(tmp, "llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8)
    with LocalSwarm(tmp, [(0, 4)]) as swarm:
        honest = AutoDistributedModelForCausalLM.from_pretrained(tmp, initial_peers=swarm.initial_peers)
        attacker = SwarmClient(swarm.initial_peers, Checkpoint(tmp).model_id, 4)
        (peer,) = attacker.swarm_state().online()
        hidden = honest.config.hidden_size
        stop = threading.Event()

        async def sessions():  # every session it may open, kept by requests that fail
            streams = []
            for _ in range(64):
                try:
                    stream = await attacker.open_stream(peer, "inference")
                    await stream.span(InferenceStep(torch.randn(1, 1, hidden), 0, 4, max_length=8), 10)
                    streams.append(stream)
                except RemoteError:
                    break
            while not stop.is_set():
                await asyncio.sleep(0.2)
            for stream in streams:
                stream.close()

        async def slowloris():  # 40 streams, each a frame of 1 MiB but its last byte
            streams = [await attacker.open_stream(peer, "inference") for _ in range(40)]
            for stream in streams:
                stream.writer.write(b"\x00" + (1 << 20).to_bytes(8, "big") + b"\x00" * ((1 << 20) - 1))
            while not stop.is_set():
                await asyncio.sleep(0.2)
            for stream in streams:
                stream.close()

        async def forwards():  # 8 loops of 2 x 4096-token forwards
            big = SpanRequest(torch.randn(2, 4096, hidden), 0, 4)

            async def one():
                while not stop.is_set():
                    try:
                        await attacker.call_span(peer, "forward", big)
                    except RemoteError:
                        await asyncio.sleep(0.05)
            await asyncio.gather(*(one() for _ in range(8)))

        async def bombs():  # 60 KiB of nested msgpack, again and again
            request = ExpertRequest(tensors=[pack_tensor(torch.randn(1, 1, hidden))],
                                    metadata=b"\x91" * 60_000 + b"\xc0")
            while not stop.is_set():
                stream = await attacker.open_stream(peer, "forward")
                try:
                    await stream.exchange(request, 10, 1 << 20)
                finally:
                    stream.close()

        rows = [("alone", step_times(honest))]
        for name, attack in (("one peer holds its every session", sessions),
                             ("slowloris: 40 stalled 1 MiB frames", slowloris),
                             ("8 loops of 8192-token forwards", forwards), ("msgpack bombs in a loop", bombs)):
            stop.clear()
            future = asyncio.run_coroutine_threadsafe(attack(), loop.background_loop())
            time.sleep(1.0)
            rows.append((name, step_times(honest)))
            stop.set()
            future.result(120)
        honest.shutdown()
        attacker.shutdown()

    tarpit_rows = tarpits(tmp)
    flood_rows = handshake_floods(tmp)
    print_steps("attack by another peer | honest", rows, ".1f")
    print("\n| a new client's generate() of 4 tokens, default settings | median s | max s | tarpits tried (max) |")
    print("|---|---|---|---|")
    for name, times, tried in tarpit_rows:
        print(f"| {name} | {statistics.median(times):.2f} | {max(times):.2f} | {max(tried)} |")
    if flood_rows:
        print_steps(FLOODS, flood_rows, ".2f")


def print_steps(header: str, rows: list[tuple[str, list[float]]], ratio: str) -> None:
    """A table of step times (seconds), the first row the one the others are divided by."""
    alone = statistics.median(rows[0][1])
    print(f"\n| {header} step median ms | p90 ms | median / alone |")
    print("|---|---|---|---|")
    for name, times in rows:
        times = sorted(times)
        median, p90 = statistics.median(times), times[int(0.9 * len(times)) - 1]
        print(f"| {name} | {1000 * median:.1f} | {1000 * p90:.1f} | {median / alone:{ratio}}x |")


def tarpits(checkpoint: str, runs: int = 5) -> list[tuple[str, list[float], list[int]]]:
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))

    def timed(swarm) -> tuple[float, int]:
        model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=4, do_sample=False)
        seconds, tried = time.perf_counter() - started, len(model.swarm.bans.banned())
        model.shutdown()
        return seconds, tried

    rows = []
    with LocalSwarm(checkpoint, [(0, 4)]) as swarm:
        alone = [timed(swarm) for _ in range(runs)]
        rows.append(("one honest server", [s for s, _ in alone], [t for _, t in alone]))
        env = {"COCOON_MISCHIEF": "tarpit", "COCOON_ADVERTISE_THROUGHPUT": "100000"}
        pits = [swarm.add_server((0, 4), wait=False, module="tests.malicious_server", env=env) for _ in range(3)]
        for pit in pits:
            pit.wait_for("Server ready", 180)
        beside = [timed(swarm) for _ in range(runs)]
        rows.append(("beside 3 tarpits", [s for s, _ in beside], [t for _, t in beside]))
    return rows


def handshake_floods(checkpoint: str, runs: int = 3) -> list[tuple[str, list[float]]]:
    """The victim's decode steps alone and under each flood (see the module's doc); [] without root."""
    import json
    import subprocess

    from swarm.apps.local_swarm import LocalSwarm, SwarmProcess
    from swarm.net.netns import PUB, PUBLIC_IP, SECOND_PUBLIC_IP, HomeNetwork
    try:
        network = HomeNetwork().__enter__()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        print(f"handshake floods skipped: network namespaces need root and iproute2 ({e})")
        return []
    rows = []
    try:
        with LocalSwarm(checkpoint, dht_host=PUBLIC_IP, dht_netns=PUB) as swarm:
            server = swarm.add_server((0, 4), host=PUBLIC_IP, netns=PUB, wait=False)
            address = server.wait_for("Reachability:", 120).split("reachable directly at ")[1].split(",")[0].strip()
            server.wait_for("Server ready", 180)

            def victim() -> list[float]:
                done = subprocess.run(["ip", "netns", "exec", PUB, sys.executable, __file__, "victim", checkpoint,
                                       *swarm.initial_peers], capture_output=True, text=True, timeout=300)
                return json.loads(done.stdout.strip().splitlines()[-1])

            for name, flood in [("alone", None), ("silent TLS connections, 200/s", "silent"),
                                ("handshakes proving nobody, 200/s", "loops")]:
                attacker = None if flood is None else SwarmProcess(
                    [flood, SECOND_PUBLIC_IP, address, "300" if flood == "silent" else "32", "200"], flood,
                    prefix=["ip", "netns", "exec", PUB], module="tests.handshake_flood")
                try:
                    if attacker is not None:
                        attacker.wait_for("flooding", 60)
                    rows.append((name, [t for _ in range(runs) for t in victim()]))
                finally:
                    if attacker is not None:
                        attacker.process.kill()
                        attacker.process.wait(10)
                print(f"  {name}: {1000 * statistics.median(rows[-1][1]):.1f} ms", flush=True)
    finally:
        network.__exit__()
    return rows


def victim(checkpoint: str, *initial_peers: str) -> None:
    """Inside the namespace: a client's 32 decode steps, as JSON seconds."""
    import json

    from swarm import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=list(initial_peers))
    print(json.dumps(step_times(model)), flush=True)
    model.shutdown()


def floods_only() -> None:
    """`python bench/hostile_peers.py floods`: the handshake floods' table alone."""
    from shards.testing import save_random_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8)
        rows = handshake_floods(tmp)
    if rows:
        print_steps(FLOODS, rows, ".2f")


if __name__ == "__main__":
    if sys.argv[1:2] == ["victim"]:
        victim(*sys.argv[2:])
    elif sys.argv[1:2] == ["floods"]:
        floods_only()
    else:
        main()
