"""Every client dtype against every server dtype, on checkpoints saved in float32 and in bfloat16 (as hub
checkpoints are): logits within the tolerance of the pair's lowest precision against local transformers in
that dtype, generate() to the end, and float32 with exact_wire token-identical. Activations far beyond
float16's range cross the wire unclipped."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# relative error of logits against local transformers in the pair's lowest precision (measured on these
# checkpoints: bfloat16 vs float32 ~1e-2, float16 vs float32 ~1.3e-3; two such computations differ by up to ~2x)
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 4e-2}
PRECISION = ["bfloat16", "float16", "float32"]  # lowest first
CLIENTS = [("float32", True), ("float32", False), ("bfloat16", False), ("float16", False)]


def rel_err(a, b):  # the client may be on a GPU (its default there), local transformers on the CPU
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def lowest(*dtypes: str) -> str:
    return min(dtypes, key=PRECISION.index)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from shards.testing import save_random_checkpoint
    return {name: save_random_checkpoint(tmp_path_factory.mktemp(f"ckpt-{name}"), "llama", dtype=DTYPES[name])
            for name in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def local_models(saved):
    return {(ckpt, dtype): AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()
            for ckpt, path in saved.items() for dtype in DTYPES}


@pytest.mark.parametrize("server_dtype", list(DTYPES))
@pytest.mark.parametrize("checkpoint", ["float32", "bfloat16"])
def test_every_client_dtype_against_servers_of_one_dtype(saved, local_models, checkpoint, server_dtype):
    path = saved[checkpoint]
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :8]
    with LocalSwarm(path, [(0, 2), (2, 4)], dtype=server_dtype) as swarm:
        for client_dtype, exact in CLIENTS:
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                    dtype=DTYPES[client_dtype], exact_wire=exact)
            wire = client_dtype if client_dtype != "float32" or exact else "bfloat16"
            reference = lowest(client_dtype, server_dtype, wire)
            local = local_models[(checkpoint, reference)]
            with torch.no_grad():
                logits = model(ids.to(model.device)).logits  # as transformers: inputs on the model's device
                assert logits.dtype == DTYPES[client_dtype]
                error = rel_err(logits, local(ids).logits)
            assert error < TOLERANCE[reference], (client_dtype, exact, server_dtype, reference, error)
            output = model.generate(prompt.to(model.device), max_new_tokens=12, do_sample=False, eos_token_id=None).cpu()
            assert output.shape == (1, 20)
            if reference == "float32":
                assert torch.equal(output, local.generate(prompt, max_new_tokens=12, do_sample=False,
                                                          eos_token_id=None))
            model.shutdown()


def test_activations_beyond_float16_range_cross_unclipped(tmp_path):
    """Block 0 makes the residual stream reach ~1e5 (real models have such outliers): it crosses the wire
    between the two servers in bfloat16, and the output equals local bfloat16."""
    from shards.testing import save_random_checkpoint
    path = save_random_checkpoint(tmp_path, "llama", dtype=torch.bfloat16,
                                  scale={"model.layers.0.mlp.down_proj.weight": 2e5})
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expected = local(ids, output_hidden_states=True)
    crossing = expected.hidden_states[2].abs().max().item()  # what leaves the server of blocks 0:2
    assert crossing > 2 * torch.finfo(torch.float16).max, crossing
    with LocalSwarm(path, [(0, 2), (2, 4)], dtype="bfloat16") as swarm:
        for dtype in (torch.bfloat16, torch.float32):  # a float32 client sends bfloat16 too
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                    dtype=dtype)
            with torch.no_grad():
                logits = model(ids.to(model.device)).logits
            assert torch.isfinite(logits).all()
            assert rel_err(logits, expected.logits) < TOLERANCE["bfloat16"]
            assert torch.equal(logits.argmax(-1).cpu(), expected.logits.argmax(-1))
            model.shutdown()
