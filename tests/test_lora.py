"""LoRA on the remote blocks, trained by the client: gradients equal transformers + peft on the same weights."""
import signal

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm
from tests.test_failover import Saboteur
from tests.test_swarm_ops import status

pytestmark = pytest.mark.slow


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def peft_rows(peft_model, layout, rank, attribute):
    """The peft model's LoRA tensors (or their .grad) in the client's [blocks, numel] layout."""
    rows = []
    for layer in peft_model.base_model.model.model.layers:
        parts = []
        for name, _, _ in layout:
            module = layer.get_submodule(name)
            for which in (module.lora_A["default"], module.lora_B["default"]):
                tensor = which.weight if attribute == "weight" else which.weight.grad
                parts.append(tensor.flatten())
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def test_lora_gradients_and_training_equal_peft(checkpoints):
    path = checkpoints("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    with LocalSwarm(path, [(0, 2), (2, 4)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True, tuning_mode="lora", lora_config=config)
        with torch.no_grad():
            model.lora_weights.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))  # B != 0 too
        local = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), config)
        with torch.no_grad():  # the same LoRA weights in peft's modules
            for layer, row in zip(local.base_model.model.model.layers, model.lora_weights):
                offset = 0
                for name, in_features, out_features in model.lora_layout:
                    module = layer.get_submodule(name)
                    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                    a.copy_(row[offset:offset + a.numel()].view_as(a))
                    offset += a.numel()
                    b.copy_(row[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
        assert torch.equal(peft_rows(local, model.lora_layout, 4, "weight"), model.lora_weights.detach())

        ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
        remote_loss = model(ids, labels=ids).loss
        local_loss = local(input_ids=ids, labels=ids).loss
        assert remote_loss.item() == pytest.approx(local_loss.item(), rel=1e-5)
        remote_loss.backward()
        local_loss.backward()
        assert model.lora_weights.grad.abs().sum() > 0
        assert rel_err(model.lora_weights.grad, peft_rows(local, model.lora_layout, 4, "grad")) < 1e-4

        # a short training run ends at the same loss as peft's
        local_params = [p for p in local.parameters() if p.requires_grad]
        optimizers = [torch.optim.Adam([model.lora_weights], lr=1e-2), torch.optim.Adam(local_params, lr=1e-2)]
        for step in range(5):
            for optimizer, compute in zip(optimizers, (lambda: model(ids, labels=ids).loss,
                                                      lambda: local(input_ids=ids, labels=ids).loss)):
                optimizer.zero_grad()
                compute().backward()
                optimizer.step()
        with torch.no_grad():
            remote_after, local_after = model(ids, labels=ids).loss.item(), local(input_ids=ids, labels=ids).loss.item()
        assert local_after < local_loss.item()
        assert abs(remote_after - local_after) < 0.01 * local_after
        model.shutdown()


def test_adapter_trained_saved_and_served_generates_as_peft(checkpoints, tmp_path):
    """Train a LoRA adapter through the swarm, save it as a peft adapter, serve it with --adapters: clients
    that ask for it by name generate exactly what transformers + peft generate with it locally."""
    from peft import PeftModel

    from routing import NoChainError
    path = checkpoints("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    prompt = ids[:, :4]
    greedy = dict(max_new_tokens=24, do_sample=False)
    adapter_dir = tmp_path / "my-adapter"
    with LocalSwarm(path, [(0, 2), (2, 4), (2, 4)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True, tuning_mode="lora", lora_config=config,
                                                                request_timeout=4.0)
        optimizer = torch.optim.Adam([model.lora_weights], lr=0.05)
        losses = []
        for _ in range(8):  # learn to continue the prompt as `ids` does
            optimizer.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0]
        model.save_pretrained(adapter_dir)
        # client-owned weights in an inference session; a server killed mid-generation is replaced, and the
        # replacement gets the LoRA weights with the replayed history
        saboteur = Saboteur(model, swarm, after=10, action=lambda server: server.signal(signal.SIGKILL))
        with model.inference_session(max_length=prompt.shape[1] + 24) as session:
            trained_generation = model.generate(prompt, streamer=saboteur, **greedy)
            assert session.failovers >= 1
        model.shutdown()

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base_generation = base.generate(prompt, **greedy)
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), adapter_dir)
    saved = dict(local.named_parameters())
    v_out = model.lora_layout[-1][2]  # v_proj's B is the last part of a block's row
    assert torch.equal(saved["base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight"],
                       model.lora_weights.detach()[3, -v_out * 4:].view(v_out, 4))
    peft_generation = local.generate(input_ids=prompt, **greedy)
    assert not torch.equal(peft_generation, base_generation)  # the adapter changes what is generated
    assert torch.equal(trained_generation, peft_generation)
    with torch.no_grad():
        peft_logits = local(input_ids=ids).logits

    # a fast server of the whole model without the adapter, and two that serve it
    with LocalSwarm(path, [(0, 4)]) as swarm:
        for span in ((0, 2), (2, 4)):
            swarm.add_server(span, "--adapters", str(adapter_dir))
        code, table = status(swarm, path)
        assert code == 0 and "adapter my-adapter" in table and table.rstrip().endswith("every block is served")
        assert [line.split()[-1] for line in table.splitlines() if line.startswith("adapter ")] == ["####"]
        served = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                 exact_wire=True, active_adapter="my-adapter")
        assert torch.equal(served.generate(prompt, **greedy), peft_generation)
        with torch.no_grad():
            assert rel_err(served(ids).logits, peft_logits) < 1e-4
        plain = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True)
        assert torch.equal(plain.generate(prompt, **greedy), base_generation)
        served.shutdown()
        plain.shutdown()
        missing = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                  active_adapter="not-served")
        with pytest.raises(NoChainError, match="with adapter 'not-served'"):
            missing.generate(prompt, max_new_tokens=2)
        missing.shutdown()
