"""End to end through real processes on 127.0.0.1: a DHT, servers with different spans, clients.
Every result is compared with transformers running the same float32 weights in this process."""
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def swarm_and_models(request, checkpoints):
    path = checkpoints(request.param)
    with LocalSwarm(path, [(0, 2), (2, 4)]) as swarm:
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                 exact_wire=True)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield swarm, remote, local, path
        remote.shutdown()


def test_greedy_generate_equals_local(swarm_and_models):
    _, remote, local, _ = swarm_and_models
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    expected = local.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(remote.generate(ids, max_new_tokens=40, do_sample=False), expected)


def test_forward_logits_and_input_gradients_match_local(swarm_and_models):
    _, remote, local, _ = swarm_and_models
    ids = torch.randint(3, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(remote(ids).logits, local(ids).logits) < 1e-4

    embeds = local.get_input_embeddings()(ids).detach()
    grads = []
    for model in (remote, local):
        x = embeds.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(inputs_embeds=x).logits[:, :-1].flatten(0, 1),
                                                 ids[:, 1:].flatten())
        loss.backward()
        grads.append(x.grad)
    assert grads[0].abs().sum() > 0
    assert rel_err(grads[0], grads[1]) < 1e-4


def test_lm_loss_backward_reaches_client_parameters(swarm_and_models):
    _, remote, local, _ = swarm_and_models
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (remote, local):
        weight = model.get_input_embeddings().weight
        weight.requires_grad_(True)
        weight.grad = None
        model(ids, labels=ids).loss.backward()
        grads.append(weight.grad.clone())
        weight.requires_grad_(False)
    assert rel_err(grads[0], grads[1]) < 1e-4


def test_sampling_penalties_padding_stop_tokens_and_streamer(swarm_and_models):
    _, remote, local, path = swarm_and_models
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    batch = tokenizer(["A swarm of bees", "Hi"], return_tensors="pt", padding=True)
    assert batch.attention_mask[1].sum() < batch.attention_mask.shape[1]  # really padded

    greedy = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(remote.generate(**batch, **greedy), local.generate(**batch, **greedy))

    sampling = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
                    repetition_penalty=1.3, pad_token_id=0)
    outputs = []
    for model in (remote, local):
        torch.manual_seed(123)
        outputs.append(model.generate(**batch, **sampling))
    assert torch.equal(*outputs)

    single = tokenizer("Stop here", return_tensors="pt")
    free_run = local.generate(**single, **greedy)[0, single.input_ids.shape[1]:]
    stop_token = int(free_run[5])
    expected = local.generate(**single, **greedy, eos_token_id=stop_token)
    assert torch.equal(remote.generate(**single, **greedy, eos_token_id=stop_token), expected)
    assert expected.shape[1] < single.input_ids.shape[1] + 24

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=remote.generate, kwargs=dict(**single, **greedy, streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(free_run, skip_special_tokens=True)


def test_beam_search_on_a_padded_batch_equals_local(swarm_and_models):
    """The servers' KV caches follow the surviving beams, as transformers reorders a local cache."""
    _, remote, local, path = swarm_and_models
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    batch = tokenizer(["A swarm of bees", "Hi"], return_tensors="pt", padding=True)
    beams = dict(max_new_tokens=16, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0,
                 output_scores=True, return_dict_in_generate=True)
    got, expected = remote.generate(**batch, **beams), local.generate(**batch, **beams)
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(got.sequences_scores, expected.sequences_scores, rtol=1e-4)
    greedy = local.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert not torch.equal(expected.sequences[::2], greedy)  # the beams mattered


def test_inference_session_by_hand(swarm_and_models):
    _, remote, local, _ = swarm_and_models
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = local(ids).logits
        with remote.inference_session(max_length=12) as session:
            parts = [remote(ids[:, :7]).logits, remote(ids[:, 7:10]).logits, remote(ids[:, 10:]).logits]
            assert session.position == 12
            with pytest.raises(ValueError, match="max_length"):
                remote(ids[:, :1])
    assert rel_err(torch.cat(parts, 1), expected) < 1e-4


def test_two_clients_generate_concurrently(swarm_and_models):
    swarm, remote, local, path = swarm_and_models
    other = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True)
    prompts = [torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    results = {}

    def run(model, i):
        results[i] = model.generate(prompts[i], max_new_tokens=32, do_sample=False)

    threads = [threading.Thread(target=run, args=(m, i)) for i, m in enumerate((remote, other))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    other.shutdown()
    for i in range(2):
        assert torch.equal(results[i], local.generate(prompts[i], max_new_tokens=32, do_sample=False))


def test_default_16bit_wire_stays_close(swarm_and_models):
    swarm, _, local, path = swarm_and_models
    compressed = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
    ids = torch.randint(3, 128, (1, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel_err(compressed(ids).logits, local(ids).logits) < 1e-2
    compressed.shutdown()


def test_ctrl_c_stops_generate_and_the_model_generates_on(swarm_and_models):
    """generate() runs the client loop on the caller's thread: Ctrl-C in the main thread
    still stops it, with its session closed, and the next generate() equals transformers again."""
    import os
    import signal
    _, remote, local, _ = swarm_and_models
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background `make test &` ignores it)
    try:
        threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            remote.generate(ids, max_new_tokens=3000, do_sample=False, eos_token_id=None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert remote._session is None
    expected = local.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(remote.generate(ids, max_new_tokens=20, do_sample=False), expected)
