"""The decoder-only families people run today, each computed by transformers' own decoder layer: span outputs,
logits, greedy tokens and KV-cached decoding equal transformers in float32, in-process for every family and
through one swarm (a DHT, two servers per model with a span boundary inside it) for every new family."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from shards import BlockSpan, ClientModules, UnknownFamilyError, get_family
from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

NEW = ["qwen3", "qwen3_moe", "gemma2", "gemma3_text", "phi3", "olmo2", "granite"]
ALL = ["llama", "mistral", "qwen2", "mixtral", *NEW]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("family", ALL)
@torch.no_grad()
def test_spans_logits_and_cached_decoding_equal_transformers(checkpoints, family):
    path = checkpoints(family, num_hidden_layers=4)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = local(ids, output_hidden_states=True)
    client = ClientModules.from_pretrained(path, dtype="float32")
    spans = [BlockSpan.from_pretrained(path, 0, 3, dtype="float32"), BlockSpan.from_pretrained(path, 3, 4, dtype="float32")]
    hidden = client.scale_inputs(client.embed(ids))
    assert rel_err(hidden, expected.hidden_states[0]) < 1e-6
    hidden = spans[0](hidden)
    assert rel_err(hidden, expected.hidden_states[3]) < 1e-5
    assert rel_err(client.logits(spans[1](hidden)), expected.logits) < 1e-5

    # 16 tokens decoded one by one with the spans' KV caches (past gemma's sliding window of 6)
    caches, tokens, step = [span.new_cache() for span in spans], [], ids[:1]
    for _ in range(16):
        hidden = client.scale_inputs(client.embed(step))
        for span, cache in zip(spans, caches):
            hidden = span(hidden, cache=cache)
        step = client.logits(hidden)[:, -1].argmax(-1, keepdim=True)
        tokens.append(step.item())
    assert tokens == local.generate(ids[:1], max_new_tokens=16, do_sample=False)[0, 12:].tolist()


def test_a_family_that_cannot_work_says_why():
    from transformers import Gemma3Config, WhisperConfig
    with pytest.raises(UnknownFamilyError, match="'gemma3'.*serve its language model"):
        get_family(Gemma3Config())
    with pytest.raises(UnknownFamilyError, match="architecture 'whisper'.*supported: gemma2, gemma3_text"):
        get_family(WhisperConfig())


@pytest.mark.slow
def test_every_new_family_through_one_swarm(checkpoints):
    paths = {family: checkpoints(family, num_hidden_layers=4) for family in NEW}
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    with LocalSwarm(paths[NEW[0]]) as swarm:
        servers = [swarm.add_server(span, model=paths[family], wait=False)
                   for family in NEW for span in ((0, 2), (2, 4))]
        for server in servers:
            server.wait_for("Server ready", 300)
        for family, path in paths.items():
            local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                     exact_wire=True)
            with torch.no_grad():
                assert rel_err(remote(ids).logits, local(ids).logits) < 1e-5, family
            expected = local.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None)
            assert torch.equal(remote.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None),
                               expected), family
            remote.shutdown()
