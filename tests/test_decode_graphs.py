"""Decode steps through CUDA graphs (shards.decode_graphs) give the eager span's output bit for bit.

On this CPU machine the graph pieces run eagerly through the same static buffers (capture=False), which checks
the split of each block and the data flow between pieces; on a GPU the same test captures real graphs.
"""
import pytest
import torch

from shards.decode_graphs import DecodeGraphs
from shards.lora import LoraWeights, applied_lora, lora_layout, lora_numel
from shards.span import BlockSpan
from shards.testing import save_random_checkpoint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def checkpoint(request, tmp_path_factory):
    extra = {"sliding_window": 5} if request.param == "mistral" else {}
    return save_random_checkpoint(tmp_path_factory.mktemp(request.param), request.param, num_hidden_layers=5,
                                  **extra)


def decode(span: BlockSpan, hidden: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor, blocks=None):
    """Prefill ``hidden`` then decode each of ``steps``; the outputs of every decode step."""
    cache = span.new_cache()
    with torch.inference_mode():
        span(hidden, cache=cache, attention_mask=mask[:, :hidden.shape[1]], blocks=blocks)
        outputs = []
        for n in range(steps.shape[1]):
            length = hidden.shape[1] + n + 1
            positions = (mask[:, :length].cumsum(-1) - 1).clamp(min=0)[:, -1:]
            outputs.append(span(steps[:, n:n + 1], cache=cache, attention_mask=mask[:, :length],
                                position_ids=positions, blocks=blocks))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_decode_steps_equal_the_eager_span_bit_for_bit(checkpoint, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    eager = BlockSpan.from_pretrained(checkpoint, 1, 5, dtype=dtype, device=device, cuda_graphs=False)
    graphed = BlockSpan.from_pretrained(checkpoint, 1, 5, dtype=dtype, device=device, cuda_graphs=False)
    assert DecodeGraphs.supports(graphed.layers)
    graphed.decode_graphs = DecodeGraphs(graphed.layers, graphed.rotary_emb, capture=device == "cuda")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 64, generator=generator).to(device, dtype)
    steps = torch.randn(2, 6, 64, generator=generator).to(device, dtype)
    mask = torch.ones(2, 13, dtype=torch.long, device=device)
    mask[1, :3] = 0  # the second sequence is left-padded: masks and positions differ between the rows

    expected = decode(eager, hidden, mask, steps)
    assert torch.equal(decode(graphed, hidden, mask, steps), expected)
    assert list(graphed.decode_graphs._sets) == [(2, 0, 4)]
    # a sub-range of the span, and a lone sequence: graph sets of their own, the same values as eager
    assert torch.equal(decode(graphed, hidden[:1], mask[:1], steps[:1], blocks=(2, 4)),
                       decode(eager, hidden[:1], mask[:1], steps[:1], blocks=(2, 4)))
    assert list(graphed.decode_graphs._sets) == [(2, 0, 4), (1, 1, 3)]
    # the graphs changed nothing they should not have: the step from the eager span is still the same
    assert not torch.equal(expected[:, 0], expected[:, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_with_lora_hooks_runs_eagerly(checkpoint, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    span = BlockSpan.from_pretrained(checkpoint, 0, 5, dtype=dtype, device=device, cuda_graphs=False)
    span.decode_graphs = DecodeGraphs(span.layers, span.rotary_emb, capture=device == "cuda")
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    mask = torch.ones(1, 6, dtype=torch.long, device=device)
    plain = decode(span, hidden, mask, hidden[:, :2])
    targets, rank = ["q_proj", "v_proj"], 2
    per_block = lora_numel(lora_layout(span, 0, targets), rank, 1)
    lora = LoraWeights(targets, rank, 1.0, torch.full((5, per_block), 0.05, dtype=dtype, device=device))
    with applied_lora(span, (0, 5), lora):
        hooked = decode(span, hidden, mask, hidden[:, :2])
    assert span.lora_hooks == 0
    assert not torch.equal(hooked, plain)  # the LoRA update reached the output: the step ran eagerly
    assert torch.equal(decode(span, hidden, mask, hidden[:, :2]), plain)
