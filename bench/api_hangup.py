"""Callers of `cocoon api` that hang up on a non-streaming request: how soon their generation stops (the servers'
sessions close), and what an honest caller's short request takes meanwhile, against the same request alone.

    python bench/api_hangup.py

One server (`cocoon serve` defaults) of a random 512x8 Llama and `cocoon api` with its defaults, on this machine.
The attack is the second audit's: 2 callers ask for max_tokens 3000 without streaming and hang up after 0.3 s.
"""
from __future__ import annotations

import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import openai

    from shards import Checkpoint
    from shards.testing import save_random_checkpoint
    from swarm.client import loop
    from swarm.client.swarm_client import SwarmClient
    from swarm.apps.local_swarm import LocalSwarm, SwarmProcess

    directory = tempfile.TemporaryDirectory()
    path = directory.name
    save_random_checkpoint(path, "llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                           intermediate_size=1376, vocab_size=256)
    with LocalSwarm(path, [(0, 8)]) as swarm:
        api = SwarmProcess(["api", path, "--initial-peers", *swarm.initial_peers, "--port", "0"], "api")
        watcher = SwarmClient(swarm.initial_peers, Checkpoint(path).model_id, 30)
        try:
            url = api.wait_for("API ready", 120).split("API ready: ")[1].split()[0]
            host, port = url.split("//")[1].split("/")[0].split(":")
            client = openai.OpenAI(base_url=url, api_key="-", max_retries=0)
            name = client.models.list().data[0].id

            def sessions() -> int:
                return sum(loop.run(watcher.info(p))["sessions"] for p in watcher.swarm_state(refresh=True).online())

            def honest() -> float:
                started = time.perf_counter()
                client.completions.create(model=name, prompt="abc", max_tokens=8, temperature=0)
                return time.perf_counter() - started

            honest()  # first use
            alone = [honest() for _ in range(5)]
            freed, beside = [], []
            for _ in range(3):
                connections = []
                for _ in range(2):
                    connection = http.client.HTTPConnection(host, int(port))
                    connection.request("POST", "/v1/completions", json.dumps(
                        {"model": name, "prompt": "abc", "max_tokens": 3000, "temperature": 0}).encode(),
                        {"Content-Type": "application/json"})
                    connections.append(connection)
                time.sleep(0.3)
                for connection in connections:
                    connection.close()  # hung up
                hung_up = time.perf_counter()
                answered: list[float] = []
                caller = threading.Thread(target=lambda: answered.append(honest()))
                caller.start()
                while sessions() > (1 if caller.is_alive() else 0):
                    time.sleep(0.02)
                freed.append(time.perf_counter() - hung_up)
                caller.join()
                beside.append(answered[0])
                while sessions():
                    time.sleep(0.05)
        finally:
            watcher.shutdown()
            api.stop()

    print("\n| | seconds (median of runs) | runs |")
    print("|---|---|---|")
    print(f"| honest 8-token request alone | {statistics.median(alone):.3f} | {len(alone)} |")
    print(f"| the same beside 2 callers that hung up | {statistics.median(beside):.3f} | {len(beside)} |")
    print(f"| hang-up to the hung-up generations' sessions closed | {statistics.median(freed):.3f} "
          f"(max {max(freed):.3f}) | {len(freed)} |")


if __name__ == "__main__":
    main()
