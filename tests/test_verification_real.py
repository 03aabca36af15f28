"""Spot checks on real weights, where cheats hide best: SmolLM2-135M-Instruct in bfloat16, whose blocks 12:20
change the hidden state by a few percent. A client with its own copy of the blocks convicts a server of those
blocks that scales its output by 1.05, or adds Gaussian noise of 6% of each row's norm, within 16 tokens; and in
20 spot-checked generations of 8 tokens through float32 and bfloat16 servers, it convicts no honest one."""
import time

import pytest
from transformers import AutoTokenizer

from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
SPANS = ((0, 12), (12, 20), (20, 30))
QUESTIONS = ["What is the capital of France?", "Explain how a rainbow forms.", "Write a haiku about the sea.",
             "What is 17 times 23?", "List three uses of copper.", "Why is the sky blue?",
             "Translate 'good morning' into Spanish.", "Name a prime number above 50.",
             "What do bees make?", "How many legs does a spider have?"]


def favour(model, swarm, servers) -> None:
    """Make ``servers`` look nearest, so that the next chain goes through them."""
    now = time.monotonic()
    model.swarm.rtt = {s.peer_id: (1e-4 if s in servers else 0.5, now) for s in swarm.servers}
    model.swarm.swarm_state(refresh=True)


def test_cheats_on_a_few_percent_of_the_hidden_state_are_convicted_and_honest_servers_never(smollm2):
    path = smollm2["bfloat16"]
    tokenizer = AutoTokenizer.from_pretrained(path)

    def ask(question):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]

    with LocalSwarm(path) as swarm:
        honest = {(span, dtype): swarm.add_server(span, "--dtype", dtype, wait=False)
                  for span in SPANS for dtype in ("float32", "bfloat16")}
        cheats = {mischief: swarm.add_server((12, 20), "--dtype", "bfloat16", wait=False,
                                             module="tests.malicious_server", env={"COCOON_MISCHIEF": mischief})
                  for mischief in ("scale", "noise")}
        for server in [*honest.values(), *cheats.values()]:
            server.wait_for("Server ready", 300)
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                spot_check_rate=1.0, spot_check_seed=0)
        checker = model.swarm.spot_checker
        for i, (mischief, cheat) in enumerate(cheats.items()):
            favour(model, swarm, [cheat, honest[(0, 12), "bfloat16"], honest[(20, 30), "bfloat16"]])
            model.generate(ask(QUESTIONS[i]), max_new_tokens=16, do_sample=False)
            assert cheat.peer_id in checker.convicted, (mischief, checker.steps)
            assert checker.convicted_after[cheat.peer_id] <= 16  # steps it answered, the prompt's included

        for i in range(20):  # each question through the float32 servers, then through the bfloat16 ones
            dtype = ("float32", "bfloat16")[i // len(QUESTIONS)]
            favour(model, swarm, [server for (_, d), server in honest.items() if d == dtype])
            # (8 tokens, where 16 took this test over 3 minutes: each check re-runs a span over the whole context)
            model.generate(ask(QUESTIONS[i % len(QUESTIONS)]), max_new_tokens=8, do_sample=False)
        assert set(checker.convicted) == {cheat.peer_id for cheat in cheats.values()}
        assert all(checker.steps.get(server.peer_id, 0) >= 10 for server in honest.values()), checker.steps
        assert checker.unsettled == 0
        print(f"convicted after (steps): {checker.convicted_after}; steps checked: {checker.checked}")
        model.shutdown()
