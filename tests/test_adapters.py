"""peft adapter directories at the shards level: what peft itself saves loads for a span, and applied by
hooks gives peft's hidden states; bad adapters are refused with a clear error."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from shards import BlockSpan
from shards.lora import applied_lora, load_adapter, resolve_adapter


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def peft_adapter(checkpoints, tmp_path_factory):
    """An adapter saved by peft itself, with B != 0, for every family's linear layers we name."""
    path = checkpoints("llama")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    directory = tmp_path_factory.mktemp("adapters") / "peft-made"
    model.save_pretrained(directory)
    return path, model.eval(), directory


@torch.no_grad()
@pytest.mark.parametrize("blocks", [(0, 2), (1, 3)])  # hidden_states[4] is after the final norm
def test_a_peft_saved_adapter_applied_to_a_span_equals_peft(peft_adapter, blocks):
    path, model, directory = peft_adapter
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    span = BlockSpan.from_pretrained(path, *blocks)
    adapter = load_adapter(directory, span)
    assert adapter.weights.shape[0] == blocks[1] - blocks[0] and adapter.scale == 4.0
    with applied_lora(span, blocks, adapter):
        output = span(hidden[blocks[0]])
    assert rel_err(output, hidden[blocks[1]]) < 1e-5
    assert rel_err(span(hidden[blocks[0]]), hidden[blocks[1]]) > 1e-3  # the hooks are gone again
    assert resolve_adapter(str(directory)) == ("peft-made", directory)


def test_bad_adapters_are_refused_with_clear_errors(peft_adapter, tmp_path):
    path, _, directory = peft_adapter
    span = BlockSpan.from_pretrained(path, 0, 2)
    with pytest.raises(FileNotFoundError, match="not a peft adapter directory: no adapter_config.json"):
        load_adapter(tmp_path, span)
    with pytest.raises(FileNotFoundError, match="no adapter directory at"):
        resolve_adapter(str(tmp_path / "missing"))

    def variant(name, **changes):
        target = tmp_path / name
        target.mkdir()
        config = json.loads((directory / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        (target / "adapter_model.safetensors").write_bytes((directory / "adapter_model.safetensors").read_bytes())
        return target

    with pytest.raises(ValueError, match="regular expressions are not supported"):
        load_adapter(variant("regex", target_modules=".*q_proj"), span)
    with pytest.raises(ValueError, match="unknown target modules \\['w_nothing'\\]"):
        load_adapter(variant("unknown", target_modules=["q_proj", "w_nothing"]), span)
    with pytest.raises(ValueError, match="has shape \\[4, 64\\], expected \\[8, 64\\] for rank 8"):
        load_adapter(variant("rank", r=8), span)
    with pytest.raises(ValueError, match="only LoRA adapters are supported"):
        load_adapter(variant("ia3", peft_type="IA3"), span)
