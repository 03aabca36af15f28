"""Spans, caches and client modules against transformers' full model on the same random weights."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from shards import (BlockSpan, Checkpoint, ClientModules, MissingWeightsError, SpanOutOfRangeError,
                    UnknownFamilyError, UnsupportedPrecisionError)
from tests.conftest import FAMILIES

SPANS = [(0, 2), (2, 4), (1, 3)]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def full_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def left_padded_batch(generator=None):
    ids = torch.randint(3, 128, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # second sequence is 4 tokens shorter, padded on the left
    ids[1, :4] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_span_outputs_equal_full_model_hidden_states(checkpoints, family):
    path = checkpoints(family)
    model = full_model(path)
    ids, mask, position_ids = left_padded_batch(torch.Generator().manual_seed(0))
    hidden = model(ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True).hidden_states
    for start, end in SPANS:
        span = BlockSpan.from_pretrained(path, start, end, dtype="float32")
        out = span(hidden[start], attention_mask=mask, position_ids=position_ids)
        if end < model.config.num_hidden_layers:  # transformers' last hidden state is after the final norm
            assert rel_err(out[mask.bool()], hidden[end][mask.bool()]) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_embeddings_spans_and_head_reproduce_logits_and_greedy_tokens(checkpoints, family):
    path = checkpoints(family)
    model = full_model(path)
    client = ClientModules.from_pretrained(path, dtype="float32")
    spans = [BlockSpan.from_pretrained(path, 0, 1), BlockSpan.from_pretrained(path, 1, 4)]
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(1))

    hidden = client.embed(ids)
    for span in spans:
        hidden = span(hidden)
    assert rel_err(client.logits(hidden), model(ids).logits) < 1e-5

    expected = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    caches = [span.new_cache() for span in spans]
    tokens, step_input = [], ids
    for _ in range(16):
        hidden = client.embed(step_input)
        for span, cache in zip(spans, caches):
            hidden = span(hidden, cache=cache)
        step_input = client.logits(hidden)[:, -1].argmax(-1, keepdim=True)
        tokens.append(step_input.item())
    assert tokens == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_prefill_then_decode_equals_recomputing_whole_sequence(checkpoints, family):
    span = BlockSpan.from_pretrained(checkpoints(family), 1, 3)
    ids, mask, position_ids = left_padded_batch(torch.Generator().manual_seed(2))
    x = torch.randn(2, 12, span.config.hidden_size, generator=torch.Generator().manual_seed(3))
    whole = span(x, attention_mask=mask, position_ids=position_ids)

    cache = span.new_cache()
    parts = [span(x[:, :8], cache=cache, attention_mask=mask[:, :8], position_ids=position_ids[:, :8])]
    for t in range(8, 12):
        parts.append(span(x[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1],
                          position_ids=position_ids[:, t:t + 1]))
    stepped = torch.cat(parts, dim=1)
    assert cache.get_seq_length() == 12
    assert rel_err(stepped[mask.bool()], whole[mask.bool()]) < 1e-5


@torch.no_grad()
def test_cache_reorder_follows_beams(checkpoints):
    span = BlockSpan.from_pretrained(checkpoints("llama"), 0, 2)
    x = torch.randn(3, 10, span.config.hidden_size, generator=torch.Generator().manual_seed(4))
    beam_idx = torch.tensor([2, 0, 0])
    cache = span.new_cache()
    span(x[:, :9], cache=cache)
    cache.reorder_cache(beam_idx)
    reordered = span(x[beam_idx, 9:10], cache=cache)
    assert rel_err(reordered, span(x[beam_idx])[:, 9:10]) < 1e-5


def test_span_loads_with_other_blocks_weights_deleted_or_corrupted(checkpoints, tmp_path):
    source = checkpoints("llama")
    path = tmp_path / "partial"
    shutil.copytree(source, path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {f for name, f in weight_map.items() if name.startswith(("model.layers.2.", "model.layers.3."))}
    others = sorted(set(weight_map.values()) - needed)
    assert len(others) >= 4
    for i, filename in enumerate(others):
        if i % 2:
            (path / filename).unlink()
        else:
            (path / filename).write_bytes(b"garbage, not safetensors")
    span = BlockSpan.from_pretrained(path, 2, 4)
    reference = BlockSpan.from_pretrained(source, 2, 4)
    x = torch.randn(1, 5, span.config.hidden_size)
    assert torch.equal(span(x), reference(x))
    with pytest.raises(MissingWeightsError, match="Re-download|does not exist"):
        BlockSpan.from_pretrained(path, 0, 2)  # those files are gone


def test_hub_cache_directory_and_repo_id_offline(checkpoints, tmp_path, monkeypatch):
    source = checkpoints("qwen2")
    repo_dir = tmp_path / "hub" / "models--someone--tiny-qwen2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    x = torch.randn(1, 4, 64)
    reference = BlockSpan.from_pretrained(source, 1, 2)(x)
    by_dir = BlockSpan.from_pretrained(repo_dir, 1, 2)
    by_repo_id = BlockSpan.from_pretrained("someone/tiny-qwen2", 1, 2, cache_dir=tmp_path / "hub")
    assert torch.equal(by_dir(x), reference) and torch.equal(by_repo_id(x), reference)
    client = ClientModules.from_pretrained("someone/tiny-qwen2", cache_dir=tmp_path / "hub")
    assert client.embed_tokens.weight.shape == (128, 64)


def test_model_id_is_stable_across_locations(checkpoints, tmp_path):
    source = checkpoints("llama")
    shutil.copytree(source, tmp_path / "elsewhere")
    assert Checkpoint(source).model_id == Checkpoint(tmp_path / "elsewhere").model_id
    assert Checkpoint(source).model_id != Checkpoint(checkpoints("mistral")).model_id
    assert Checkpoint(source).model_id.startswith("llama-")


def test_tied_and_untied_heads(checkpoints):
    tied = ClientModules.from_pretrained(checkpoints("llama", tie_word_embeddings=True))
    untied = ClientModules.from_pretrained(checkpoints("llama"))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)


def test_clear_errors(checkpoints, tmp_path):
    path = tmp_path / "gpt2-like"
    shutil.copytree(checkpoints("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownFamilyError, match="architecture 'gpt2' .*supported: gemma2, .*llama, mistral, mixtral"):
        BlockSpan.from_pretrained(path, 0, 1)

    with pytest.raises(SpanOutOfRangeError, match="outside the model's 4 blocks"):
        BlockSpan.from_pretrained(checkpoints("llama"), 3, 6)
    with pytest.raises(SpanOutOfRangeError):
        BlockSpan.from_pretrained(checkpoints("llama"), 2, 2)

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints("llama"), broken)
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    (broken / weight_map["model.layers.1.mlp.up_proj.weight"]).unlink()
    with pytest.raises(MissingWeightsError, match="does not exist"):
        BlockSpan.from_pretrained(broken, 0, 2)

    with pytest.raises(UnsupportedPrecisionError, match="unknown dtype"):
        BlockSpan.from_pretrained(checkpoints("llama"), 0, 1, dtype="float64")
    with pytest.raises(UnsupportedPrecisionError, match="unknown quantization"):
        BlockSpan.from_pretrained(checkpoints("llama"), 0, 1, quant="int3")
    with pytest.raises(UnsupportedPrecisionError, match="does not run on meta"):
        BlockSpan.from_pretrained(checkpoints("llama"), 0, 1, device="meta")
    with pytest.raises(FileNotFoundError):
        BlockSpan.from_pretrained(tmp_path / "nothing-here", 0, 1)


@torch.no_grad()
def test_part_of_a_span_with_its_own_cache(checkpoints):
    path = checkpoints("qwen2")
    span, part = BlockSpan.from_pretrained(path, 0, 4), BlockSpan.from_pretrained(path, 1, 3)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5))
    assert rel_err(span(x, blocks=(1, 3)), part(x)) < 1e-6
    cache = span.new_cache()
    stepped = torch.cat([span(x[:, :5], cache=cache, blocks=(1, 3)), span(x[:, 5:], cache=cache, blocks=(1, 3))], 1)
    assert rel_err(stepped, part(x)) < 1e-5
    with pytest.raises(SpanOutOfRangeError):
        span(x, blocks=(3, 5))
