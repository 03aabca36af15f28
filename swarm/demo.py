"""`cocoon demo`: a whole swarm on this machine, no configuration, no internet.

A small random Llama checkpoint is written to a temporary directory, a DHT and a few servers split its
blocks on 127.0.0.1, and a client streams a generation through them. The weights are random, so the
text is noise: what the demo shows is the path a real 70B model takes.
"""
from __future__ import annotations

import tempfile
import time

import torch


def run_demo(num_servers: int = 3, max_new_tokens: int = 48, prompt: str = "The swarm") -> int:
    from transformers import AutoTokenizer, TextStreamer

    from shards.testing import save_random_checkpoint
    from swarm.client.model import AutoDistributedModelForCausalLM
    from swarm.dht_records import fetch_swarm_state
    from swarm.local_swarm import LocalSwarm
    from swarm.status import format_status

    num_blocks = 2 * num_servers
    with tempfile.TemporaryDirectory(prefix="cocoon-demo-") as tmp:
        print(f"1/4 writing a random Llama checkpoint ({num_blocks} blocks, hidden 256) to {tmp}", flush=True)
        save_random_checkpoint(tmp, "llama", hidden_size=256, num_hidden_layers=num_blocks, num_attention_heads=8,
                               num_key_value_heads=4)
        spans = [(2 * i, 2 * i + 2) for i in range(num_servers)]
        print(f"2/4 starting a DHT and {num_servers} servers on 127.0.0.1 with spans {spans}", flush=True)
        started = time.perf_counter()
        with LocalSwarm(tmp, spans) as swarm:
            print(f"    swarm up in {time.perf_counter() - started:.1f}s", flush=True)
            model = AutoDistributedModelForCausalLM.from_pretrained(tmp, initial_peers=swarm.initial_peers)
            print("3/4 the swarm as a client sees it:\n")
            state = fetch_swarm_state(model.swarm.dht, model.swarm.model_id, num_blocks)
            print(format_status(state, model.swarm.model_id) + "\n", flush=True)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
            inputs = tokenizer(prompt, return_tensors="pt")
            print(f"4/4 generating {max_new_tokens} tokens (random weights: the text is noise)\n", flush=True)
            print(prompt, end="", flush=True)
            started = time.perf_counter()
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        streamer=TextStreamer(tokenizer, skip_prompt=True))
            elapsed = time.perf_counter() - started
            new_tokens = output.shape[1] - inputs.input_ids.shape[1]
            print(f"\n{new_tokens} tokens in {elapsed:.2f}s: {new_tokens / elapsed:.1f} tokens/s through "
                  f"{num_servers} servers", flush=True)
            model.shutdown()
            print("shutting the swarm down ...", flush=True)
    print("done", flush=True)
    return 0
