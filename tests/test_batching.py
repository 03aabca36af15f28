"""Decode steps of concurrent sessions batched on one server (swarm.server.batching): each session's output
equals its own forward, and concurrent clients of a real server get exactly the tokens they get alone."""
import copy
import threading
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig

from shards import BlockSpan
from shards.decode_paths import DecodePlan, use_plan
from shards.packed_linears import packed_linears
from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm
from swarm.server.batching import run_batched


@pytest.mark.parametrize("path", ["plain", "packed"])
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_a_batch_of_sessions_of_different_lengths_equals_each_alone(checkpoints, new_tokens, path):
    """Steps of as many new tokens (decode steps; prompts of clients that start together, a new session's cache
    empty) from sessions of different lengths, one of them of two rows, run as one batch, through either
    decode path of a CPU."""
    span = BlockSpan.from_pretrained(checkpoints("llama"), 0, 4, dtype="float32")
    use_plan(span, DecodePlan(path))
    hidden = span.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    caches = []
    for length, batch in ((5, 1), (9, 2), (1, 1), (0, 1)):
        cache = span.new_cache()
        if length:
            span(torch.randn(batch, length, hidden, generator=generator), cache=cache)
        caches.append((cache, batch))
    steps = [torch.randn(batch, new_tokens, hidden, generator=generator) for _, batch in caches]
    caches = [cache for cache, _ in caches]
    batched_caches = copy.deepcopy(caches)
    alone = [span(step, cache=cache) for step, cache in zip(steps, caches)]
    requests = [SimpleNamespace(hidden=step, attention_mask=None, position_ids=None, dtype=torch.float32)
                for step in steps]
    with packed_linears(span):  # as the engine runs a batch of decode steps (a no-op on the plain path)
        together = run_batched(span, [(r, c, (0, 4)) for r, c in zip(requests, batched_caches)], lambda t: t)
    for a, b in zip(alone, together):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5)
    for own, shared in zip(caches, batched_caches):  # each cache grew by its own tokens, as alone
        for a, b in zip(own.layers, shared.layers):
            assert a.keys.shape == b.keys.shape and torch.allclose(a.keys, b.keys, atol=1e-5)
            assert torch.allclose(a.values, b.values, atol=1e-5)
    assert bool(span.packed_linears) == (path == "packed")  # the copies exist only where the plan chose them


def test_a_lone_decode_step_through_the_packed_weights_equals_the_plain_step(checkpoints):
    """Where a server's decode plan takes oneDNN's packed copies (shards.packed_linears), a step gives the same
    values as transformers' linear layers within float32 rounding, and the layers are plain again after."""
    span = BlockSpan.from_pretrained(checkpoints("llama"), 0, 4, dtype="float32")
    use_plan(span, DecodePlan("packed"))
    generator = torch.Generator().manual_seed(0)
    prompt, step = torch.randn(1, 9, 64, generator=generator), torch.randn(1, 1, 64, generator=generator)
    plain_cache, packed_cache = span.new_cache(), span.new_cache()
    with torch.inference_mode():
        span(prompt, cache=plain_cache)
        span(prompt, cache=packed_cache)
        plain = span(step, cache=plain_cache)
        with packed_linears(span):
            assert all("forward" in m.__dict__ for m in span.packed_linears)
            packed = span(step, cache=packed_cache)
    assert len(span.packed_linears) == 4 * 7  # q, k, v, o, gate, up, down of each block
    assert not any("forward" in m.__dict__ for m in span.modules())
    assert torch.allclose(packed, plain, rtol=0, atol=1e-5) and plain.abs().max() > 0.1
    assert torch.allclose(packed_cache.layers[3].keys, plain_cache.layers[3].keys, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_concurrent_clients_of_one_server_get_the_tokens_they_get_alone(checkpoints):
    """Four greedy sessions with prompts of different lengths (two of the same), one beam search and one session with its own
    LoRA weights decode at once on one server: every output equals that client's output alone, and the
    server ran decode steps of several sessions as one batch."""
    path = checkpoints("llama")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (1, n), generator=generator) for n in (3, 6, 6, 12, 5, 7)]  # two prompts of 6: their prefills may batch
    kinds = ["greedy"] * 4 + ["beams", "lora"]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    with LocalSwarm(path, [(0, 4)], server_args=["--batch-window-ms", "20"]) as swarm:
        def client(kind):
            extra = dict(tuning_mode="lora", lora_config=lora) if kind == "lora" else {}
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                    exact_wire=True, **extra)
            if kind == "lora":
                with torch.no_grad():
                    model.lora_weights.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
            return model

        def generate(model, kind, prompt):
            beams = dict(num_beams=2) if kind == "beams" else {}
            with torch.no_grad():
                return model.generate(prompt.to(model.device), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                      **beams)

        models = [client(kind) for kind in kinds]
        alone = [generate(m, kind, p) for m, kind, p in zip(models, kinds, prompts)]
        together = [None] * len(models)
        barrier = threading.Barrier(len(models))

        def run(i):
            barrier.wait()
            together[i] = generate(models[i], kinds[i], prompts[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for kind, a, t in zip(kinds, alone, together):
            assert torch.equal(a, t), kind
        from swarm.client import loop
        info = loop.run(models[0].swarm.info(swarm.servers[0].peer_id))
        assert max(int(size) for size in info["batches"]) >= 3, info["batches"]  # steps of 3+ sessions at once
        for model in models:
            model.shutdown()
