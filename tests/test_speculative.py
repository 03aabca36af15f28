"""Speculative decoding through the swarm with real server processes: transformers' assisted generation
(a small local draft, prompt lookup, speculative sampling) gives local transformers' tokens inside and outside
an inference session, with push on, beside other sessions in the servers' batches and through a failover; every
server rolls its KV cache back to where the client's next step starts, and a client cannot roll back without end."""
import copy
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client import loop
from swarm.apps.local_swarm import LocalSwarm
from tests.test_push import KillAfter

pytestmark = pytest.mark.slow
NEW_TOKENS = 24
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def models(checkpoints):
    """The target (4 blocks), a draft that agrees with it on about half the tokens (its last block's MLP doubled),
    a prompt; and a draft that almost never agrees (another random model, of 1 block)."""
    path = checkpoints("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    draft = copy.deepcopy(local)
    with torch.no_grad():
        draft.model.layers[3].mlp.down_proj.weight.mul_(2.0)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    other = AutoModelForCausalLM.from_pretrained(checkpoints("llama", num_hidden_layers=1, seed=7), dtype=torch.float32)
    return path, local, draft, ids, other


@pytest.fixture(scope="module")
def swarm(models):
    with LocalSwarm(models[0], [(0, 2), (2, 4)]) as swarm:
        yield swarm


def client(path, swarm, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True,
                                                           request_timeout=10.0, **kwargs)


def server_counts(model, swarm, key: str) -> list[dict]:
    """What each server of the swarm (in the order of its spans) says in its info under ``key``."""
    return [loop.run(model.swarm.info(server.peer_id))[key] for server in swarm.servers]


@pytest.mark.parametrize("speculation", ["draft", "other_draft", "prompt_lookup"])
def test_greedy_assisted_generation_equals_local_greedy_inside_and_outside_a_session(models, swarm, speculation):
    path, local, draft, ids, other = models
    kwargs = {"draft": dict(assistant_model=draft), "other_draft": dict(assistant_model=other),
              "prompt_lookup": dict(prompt_lookup_num_tokens=3)}[speculation]
    expected = local.generate(ids, **GREEDY)
    model = client(path, swarm)
    before = server_counts(model, swarm, "drafts")
    assert torch.equal(model.generate(ids, **GREEDY, **kwargs), expected)  # a session of generate's own

    # inside a session, over two turns: the second continues the servers' caches after the first's rollbacks
    turn = dict(GREEDY, max_new_tokens=NEW_TOKENS // 2)
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS + 8) as session:
        first = model.generate(ids, **turn, **kwargs)
        second = model.generate(first, **turn, **kwargs)
        rolled_back, steps = session.rolled_back, session.steps
    assert torch.equal(second, expected)
    assert rolled_back > 0  # drafts were rejected
    if speculation == "draft":
        assert steps < NEW_TOKENS  # and some accepted: more than one token a step

    after = server_counts(model, swarm, "drafts")
    for old, new in zip(before, after):  # every server of the chain verified drafts, and saw some rejected
        proposed, accepted = new["proposed"] - old["proposed"], new["accepted"] - old["accepted"]
        assert proposed > accepted >= 0
        if speculation == "draft":
            assert accepted > 0
    pushes = server_counts(model, swarm, "pushes")[1]  # the second server took verify steps and rollbacks from pushes
    assert pushes["taken"] > 0 and pushes["differed"] == 0
    model.shutdown()


def test_speculative_sampling_equals_local_speculative_sampling(models, swarm):
    path, local, draft, ids, _ = models
    sampling = dict(max_new_tokens=NEW_TOKENS, do_sample=True, top_k=0, eos_token_id=None, assistant_model=draft)
    model = client(path, swarm)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = local.generate(ids, **sampling)
        torch.manual_seed(seed)
        assert torch.equal(model.generate(ids, **sampling), expected), seed
    model.shutdown()


def test_verify_steps_batch_with_other_sessions_and_stay_exact(models, swarm):
    """Four clients at once, each verifying 1 + 3 drafted tokens a step: their verify steps share forwards."""
    path, local, draft, _, _ = models
    prompts = [torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    expected = [local.generate(p, **GREEDY) for p in prompts]
    model = client(path, swarm)
    before = server_counts(model, swarm, "batches")
    drafts = [copy.deepcopy(draft) for _ in prompts]
    for d in drafts:
        d.generation_config.num_assistant_tokens, d.generation_config.num_assistant_tokens_schedule = 3, "constant"
    outputs = [None] * len(prompts)

    def run(i):
        outputs[i] = model.generate(prompts[i], **GREEDY, assistant_model=drafts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(outputs, expected):
        assert torch.equal(got, want)
    after = server_counts(model, swarm, "batches")
    shared = sum(n for old, new in zip(before, after) for size, n in new.items()
                 if int(size) > 1 and n > old.get(size, 0))
    assert shared > 0, after  # some steps of different sessions ran as one forward
    model.shutdown()


def test_failover_in_the_middle_of_a_speculative_generate_gives_the_same_tokens(models):
    path, local, draft, ids, _ = models
    expected = local.generate(ids, **GREEDY)
    with LocalSwarm(path, [(0, 2), (2, 4), (2, 4)]) as swarm:
        model = client(path, swarm)
        killer = KillAfter(model, swarm, after=4)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            output = model.generate(ids, streamer=killer, assistant_model=draft, **GREEDY)
            assert session.failovers >= 1 and session.rolled_back > 0
        assert torch.equal(output, expected)
        model.shutdown()


def test_a_client_that_rolls_back_without_end_is_refused(models):
    path, *_ = models
    with LocalSwarm(path, [(0, 4)], server_args=["--rollback-factor", "1"]) as swarm:
        model = client(path, swarm)
        ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(1))
        with model.inference_session(max_length=16) as session:
            model(ids)
            with pytest.raises(Exception, match="allowance"):
                for _ in range(8):  # 3 positions back each time: past 16 (1 x max_length) on the 6th
                    model(ids[:, :3])
                    session.rollback(session.position - 3)
        model.shutdown()
