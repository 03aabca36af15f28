"""Prompt tuning through the swarm: gradients of shallow and deep prompts equal local transformers'
on the same weights, and a short training run reaches the same loss."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from shards.testing import deep_prompt_hooks
from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
PREFIX = 3


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def swarm_and_local(checkpoints):
    path = checkpoints("llama")
    with LocalSwarm(path, [(0, 2), (2, 4)]) as swarm:
        yield swarm, path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def local_loss(local, ids, prompts, deep=None):
    """transformers' model with the prefix prepended, and (deep) added before every decoder layer."""
    handles = deep_prompt_hooks(local, deep, PREFIX) if deep is not None else []
    embeds = torch.cat([prompts.expand(ids.shape[0], -1, -1), local.get_input_embeddings()(ids)], dim=1)
    logits = local(inputs_embeds=embeds).logits[:, PREFIX:]
    for handle in handles:
        handle.remove()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def remote_loss(model, ids):
    logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_equal_local(swarm_and_local, mode):
    swarm, path, local = swarm_and_local
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True,
                                                            tuning_mode=mode, pre_seq_len=PREFIX)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    prompts = model.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    deep = None
    if mode == "deep_ptune":
        with torch.no_grad():
            model.intermediate_prompt_embeddings.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        deep_weight = model.intermediate_prompt_embeddings.weight.detach().clone().requires_grad_(True)
        deep = deep_weight.view(PREFIX, 4, -1).permute(1, 0, 2)

    remote = remote_loss(model, ids)
    remote.backward()
    reference = local_loss(local, ids, prompts, deep)
    reference.backward()
    assert abs(remote.item() - reference.item()) < 1e-5 * abs(reference.item())
    assert model.prompt_embeddings.weight.grad.abs().sum() > 0
    assert rel_err(model.prompt_embeddings.weight.grad, prompts.grad) < 1e-4
    if deep is not None:
        assert rel_err(model.intermediate_prompt_embeddings.weight.grad, deep_weight.grad) < 1e-4
    model.shutdown()


def test_training_a_soft_prompt_reaches_the_local_loss(swarm_and_local):
    swarm, path, local = swarm_and_local
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True,
                                                            tuning_mode="ptune", pre_seq_len=PREFIX)
    prompts = torch.nn.Parameter(model.prompt_embeddings.weight.detach().clone())  # same start, same seed
    remote_opt = torch.optim.Adam(model.prompt_embeddings.parameters(), lr=0.05)
    local_opt = torch.optim.Adam([prompts], lr=0.05)
    data = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = local_loss(local, data, prompts).item()
    for step in range(8):
        batch = data[step % 2 * 2:step % 2 * 2 + 2]
        for optimizer, loss in ((remote_opt, lambda: remote_loss(model, batch)),
                                (local_opt, lambda: local_loss(local, batch, prompts))):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
    with torch.no_grad():
        remote_after, local_after = remote_loss(model, data).item(), local_loss(local, data, prompts).item()
    assert local_after < before  # the run learned something
    assert abs(remote_after - local_after) < 0.01 * local_after
    model.shutdown()


def test_shallow_prompt_generation_equals_local(swarm_and_local):
    swarm, path, local = swarm_and_local
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True,
                                                            tuning_mode="ptune", pre_seq_len=PREFIX)
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
        embeds = torch.cat([model.prompt_embeddings.weight[None], local.get_input_embeddings()(ids)], dim=1)
        expected = local.generate(inputs_embeds=embeds, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(output[0, ids.shape[1]:], expected[0, -12:])
    model.shutdown()


def test_sequence_classification_matches_transformers(tmp_path):
    """A LlamaForSequenceClassification checkpoint: the blocks in the swarm, transformers' head locally."""
    from transformers import AutoModelForSequenceClassification

    from shards.testing import tiny_config
    from swarm import AutoDistributedModelForSequenceClassification
    torch.manual_seed(0)
    config = tiny_config("llama", num_labels=3)
    local = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        for param in local.parameters():
            param.normal_(0, 0.08)
    local.save_pretrained(tmp_path)
    with LocalSwarm(tmp_path, [(0, 2), (2, 4)]) as swarm:
        model = AutoDistributedModelForSequenceClassification.from_pretrained(
            tmp_path, initial_peers=swarm.initial_peers, exact_wire=True)
        ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(1))
        ids[0, -3:] = 0  # right padding: pooled at the last real token
        labels = torch.tensor([0, 2, 1])
        grads = []
        for m in (model, local):
            m.score.weight.requires_grad_(True)
            out = m(ids, labels=labels)
            out.loss.backward()
            grads.append((out.logits.detach(), out.loss.item(), m.score.weight.grad.clone()))
        assert rel_err(grads[0][0], grads[1][0]) < 1e-5
        assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)
        assert rel_err(grads[0][2], grads[1][2]) < 1e-4
        model.shutdown()


@torch.no_grad()
def test_generate_with_deep_prompts_equals_local_recompute(swarm_and_local):
    """During generate(), the deep prompts go to each server with the session's first step and apply to
    the prefix positions held in its KV cache: the tokens equal a local greedy loop that recomputes the
    whole sequence (prompts prepended and added before every layer) at every step."""
    swarm, path, local = swarm_and_local
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True,
                                                            tuning_mode="deep_ptune", pre_seq_len=PREFIX)
    model.prompt_embeddings.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    model.intermediate_prompt_embeddings.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    prompts = model.prompt_embeddings.weight
    deep = model.intermediate_prompt_embeddings.weight.view(PREFIX, 4, -1).permute(1, 0, 2)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(6))

    def local_greedy(deep_prompts):
        sequence = ids
        handles = deep_prompt_hooks(local, deep_prompts, PREFIX)
        for _ in range(12):
            embeds = torch.cat([prompts[None], local.get_input_embeddings()(sequence)], dim=1)
            sequence = torch.cat([sequence, local(inputs_embeds=embeds).logits[:, -1:].argmax(-1)], dim=1)
        for handle in handles:
            handle.remove()
        return sequence

    expected = local_greedy(deep)
    assert not torch.equal(expected, local_greedy(torch.zeros_like(deep)))  # the deep prompts matter
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None), expected)
    model.shutdown()
