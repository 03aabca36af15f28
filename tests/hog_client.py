"""An attacker in a process of its own (as it would be on its own machine), run by tests: 8 loops of 8192-token
forwards to one server for N seconds; prints how many were done and refused, as JSON."""
import asyncio
import json
import sys
import time

import torch

from shards import Checkpoint
from swarm.client import loop
from swarm.client.swarm_client import SwarmClient
from swarm.wire.codes import ErrorCode, RemoteError
from swarm.wire.requests import SpanRequest


def main(path: str, peer: str, seconds: str, hidden: str, *initial_peers: str) -> None:
    attacker = SwarmClient(list(initial_peers), Checkpoint(path).model_id, 4)
    attacker.swarm_state()
    big = torch.randn(2, 4096, int(hidden))
    state = {"done": 0, "refused": 0}
    deadline = time.monotonic() + float(seconds)

    async def hog():
        while time.monotonic() < deadline:
            try:
                await attacker.call_span(peer, "forward", SpanRequest(big, start=0, end=4))
                state["done"] += 1
            except RemoteError as e:
                assert e.code == ErrorCode.QUOTA_EXCEEDED
                state["refused"] += 1
                await asyncio.sleep(0.25)  # its compute queue is full: the attack is the forwards it keeps queued

    async def hogs():
        await asyncio.gather(*(hog() for _ in range(8)))

    print("attacking", flush=True)
    loop.run(hogs())
    print(json.dumps(state), flush=True)
    attacker.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
