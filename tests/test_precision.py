"""16-bit and bitsandbytes-quantized spans: equal to transformers with the same settings, and within
the documented distance of float32 (README, "Precision")."""
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from shards import BlockSpan
from shards.throughput import cache_path, get_throughput

# Relative error of a 2-block span's output against float32, measured on random weights (std 0.08,
# hidden 256): bfloat16 0.012, float16 0.0014, int8 0.032, nf4 0.29. Bounds leave ~1.5x headroom.
TOLERANCE_VS_FLOAT32 = {"bfloat16": 0.02, "float16": 0.003, "int8": 0.05, "nf4": 0.45}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    from shards.testing import save_random_checkpoint
    return save_random_checkpoint(tmp_path_factory.mktemp("wide"), "llama", hidden_size=256, num_hidden_layers=2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@torch.no_grad()
def test_16bit_span_matches_transformers_in_same_dtype(wide_checkpoint, dtype):
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(wide_checkpoint, dtype=torch_dtype)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = model(ids, output_hidden_states=True).hidden_states
    span = BlockSpan.from_pretrained(wide_checkpoint, 0, 1, dtype=dtype)
    assert span(hidden[0]).dtype == torch_dtype
    assert rel_err(span(hidden[0]), hidden[1]) < 1e-3

    reference = BlockSpan.from_pretrained(wide_checkpoint, 0, 2, dtype="float32")
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(1))
    span = BlockSpan.from_pretrained(wide_checkpoint, 0, 2, dtype=dtype)
    assert rel_err(span(x.to(torch_dtype)), reference(x)) < TOLERANCE_VS_FLOAT32[dtype]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
@torch.no_grad()
def test_quantized_span_matches_transformers_bitsandbytes(wide_checkpoint, quant):
    config = (BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(wide_checkpoint, quantization_config=config, dtype=torch.float32,
                                                 device_map="cpu")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = model(ids, output_hidden_states=True).hidden_states
    span = BlockSpan.from_pretrained(wide_checkpoint, 0, 1, dtype="float32", quant=quant)
    assert rel_err(span(hidden[0]), hidden[1]) < 1e-5
    assert span.parameters_bytes() < BlockSpan.from_pretrained(wide_checkpoint, 0, 1).parameters_bytes() / 2

    reference = BlockSpan.from_pretrained(wide_checkpoint, 0, 2, dtype="float32")
    span = BlockSpan.from_pretrained(wide_checkpoint, 0, 2, dtype="float32", quant=quant)
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(1))
    assert rel_err(span(x), reference(x)) < TOLERANCE_VS_FLOAT32[quant]
    # The KV cache works on quantized spans too. int8 picks outlier columns over all rows of a call, so
    # one decoded token is not bit-equal to a recomputation; the bound is the quantization tolerance.
    cache = span.new_cache()
    span(x[:, :15], cache=cache)
    assert rel_err(span(x[:, 15:], cache=cache), span(x)[:, 15:]) < TOLERANCE_VS_FLOAT32[quant]


def test_throughput_is_measured_once_and_cached(wide_checkpoint, monkeypatch):
    import shards.throughput as throughput
    calls = []
    real_measure = throughput.measure
    monkeypatch.setattr(throughput, "measure", lambda *a, **k: calls.append(1) or real_measure(*a, **k))
    span = BlockSpan.from_pretrained(wide_checkpoint, 0, 2)
    first = get_throughput(span, "model-a", decode_steps=4, prefill_tokens=32, progress=False)
    again = get_throughput(span, "model-a", decode_steps=4, prefill_tokens=32, progress=False)
    assert first == again and len(calls) == 1
    # rates only: comparing them is a timing claim, which a loaded CI machine can upset (bench/ makes those)
    assert first.decode_tokens_per_s > 0 and first.prefill_tokens_per_s > 0
    assert cache_path().exists()
    get_throughput(span, "model-b", decode_steps=4, prefill_tokens=32, progress=False)
    assert len(calls) == 2


def test_a_plan_of_one_thread_leaves_the_callers_threads_and_the_cache_key_alone(wide_checkpoint):
    """A server reads its cached throughput before it loads anything (to choose its span), and writes it after the
    decode plan is in use: both must name the same entry, whatever threads the plan takes."""
    from shards.decode_paths import DecodePlan, use_plan
    from shards.throughput import cached_throughput
    threads = torch.get_num_threads()
    span = BlockSpan.from_pretrained(wide_checkpoint, 0, 2)
    use_plan(span, DecodePlan("plain", threads=1, park_idle=True, prefill_threads=2))
    assert torch.get_num_threads() == threads  # the compute thread takes the plan's threads, not the caller
    measured = get_throughput(span, "model-c", decode_steps=4, prefill_tokens=32, progress=False)
    assert torch.get_num_threads() == threads
    assert cached_throughput("model-c", str(span.dtype_).removeprefix("torch."), span.quant, "cpu") == measured
