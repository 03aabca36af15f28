"""A real instruct model through the swarm: SmolLM2-135M-Instruct (from its PyPI wheel), greedy answers equal
transformers token for token in float32 and within tolerance in bfloat16, and the chat commands answer real
questions, across turns and through a server killed mid-answer."""
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def swarm(smollm2):
    """One DHT: the float32 checkpoint on 3 servers (one of blocks 15:30 announces itself fastest, so that chains
    go through it and killing it fails over), and the bfloat16 copy on 2 servers in bfloat16."""
    with LocalSwarm(smollm2["float32"]) as swarm:
        fast = {"COCOON_MISCHIEF": "none", "COCOON_ADVERTISE_THROUGHPUT": "1e5"}
        servers = [swarm.add_server((0, 15), wait=False),
                   swarm.add_server((15, 30), wait=False, module="tests.malicious_server", env=fast),
                   swarm.add_server((15, 30), wait=False)]
        servers += [swarm.add_server(span, "--dtype", "bfloat16", model=smollm2["bfloat16"], wait=False)
                    for span in ((0, 15), (15, 30))]
        for server in servers:
            server.wait_for("Server ready", 300)
        yield swarm


def question_ids(tokenizer):
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


def test_float32_answers_token_for_token_like_transformers(swarm, smollm2):
    path = smollm2["float32"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = question_ids(tokenizer)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = local.generate(ids, max_new_tokens=24, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True)
    output = model.generate(ids, max_new_tokens=24, do_sample=False)
    model.shutdown()
    assert torch.equal(output, expected)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def test_bfloat16_copy_answers_like_transformers_in_bfloat16(swarm, smollm2):
    path = smollm2["bfloat16"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = question_ids(tokenizer)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                            dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_err(model(ids).logits, local(ids).logits) < 4e-2  # bfloat16's tolerance (see test_dtypes)
    output = model.generate(ids, max_new_tokens=24, do_sample=False)
    model.shutdown()
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def cocoon(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "swarm.apps.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_cocoon_generate_uses_the_chat_template(swarm, smollm2):
    result = cocoon("generate", str(smollm2["float32"]), "What is the capital of France?", "--initial-peers",
                    *swarm.initial_peers)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    raw = cocoon("generate", str(smollm2["float32"]), "What is the capital of France?", "--raw", "--max-new-tokens",
                 "4", "--initial-peers", *swarm.initial_peers)
    assert raw.returncode == 0 and raw.stdout.startswith("What is the capital of France?")  # the text as is


def chat(swarm, path, turns, kill=None):
    """`cocoon chat` fed one turn at a time on standard input; ``kill`` (a server) dies once the second answer
    has begun to stream (mid-answer). Returns the answers, one a line, and what it logged."""
    process = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", "chat", str(path), "--initial-peers",
                                *swarm.initial_peers, "--exact-wire", "--system", SYSTEM, "--max-new-tokens", "48"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers = []
    for i, turn in enumerate(turns):
        process.stdin.write(turn + "\n")
        process.stdin.flush()
        line = ""
        if i == 1 and kill is not None:  # while the second answer is being computed (a short answer streams
            kill.signal(signal.SIGKILL)  # out whole at its end, so waiting for its first characters may be late)
        while not line.strip():
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read()
        answers.append(line.strip())
    process.stdin.close()
    log = process.stderr.read()
    assert process.wait(60) == 0, log
    return answers, log


def test_cocoon_chat_remembers_the_conversation_and_survives_a_server_dying_mid_answer(swarm, smollm2):
    turns = ["My name is Ada.", "Repeat my name."]
    answers, _ = chat(swarm, smollm2["float32"], turns)
    assert "Ada" in answers[1], answers  # the second answer needs the first turn
    victim = next(s for s in swarm.servers if s.name == "server1")  # the one chains go through
    after_failure, log = chat(swarm, smollm2["float32"], turns, kill=victim)
    assert f"server {victim.peer_id} failed" in log and "finding a replacement" in log, log
    assert after_failure == answers
