"""Operating a swarm: a full server is skipped, `cocoon status` shows coverage, servers leave gracefully."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.client import loop
from swarm.wire.requests import InferenceStep
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow


def status(swarm, path):
    result = subprocess.run([sys.executable, "-m", "swarm.apps.cli", "status", str(path), "--initial-peers",
                             *swarm.initial_peers], capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout


def test_full_server_is_skipped_status_and_graceful_shutdown(checkpoints):
    path = checkpoints("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with LocalSwarm(path, [(0, 2), (2, 4)], server_args=["--announce-period", "1"]) as swarm:
        whole = swarm.add_server((0, 4), "--max-sessions", "1")
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True)
        state = model.swarm.swarm_state(refresh=True)
        (big,) = [peer for peer, info in state.servers.items() if info.end - info.start == 4]

        # occupy the one session of the server that alone covers every block: the chain must go around it
        stream = loop.run(model.swarm.open_stream(big, "inference"))
        loop.run(stream.span(InferenceStep(torch.randn(1, 1, 64), 0, 4, max_length=8), 30))
        ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
        with model.inference_session(max_length=30) as session:
            output = model.generate(ids, max_new_tokens=24, do_sample=False)
            assert [link.peer_id for link in session.chain] != [big]
        assert torch.equal(output, local.generate(ids, max_new_tokens=24, do_sample=False))
        assert not model.swarm.bans.is_banned(big)  # full is busy, not failed: skipped, never banned
        stream.close()

        code, table = status(swarm, path)
        assert code == 0 and "every block is served" in table and "server2" in table, table
        assert "0:4" in table and "##.." in table and "..##" in table

        whole.signal(15)  # SIGTERM: announce offline, finish, exit cleanly
        assert whole.process.wait(60) == 0
        assert "Server stopped" in "".join(whole.output)
        swarm.servers[1].signal(2)  # SIGINT works the same
        assert swarm.servers[1].process.wait(60) == 0
        code, table = status(swarm, path)
        assert code == 1 and "MISSING: no online server holds block(s) 2, 3" in table, table
        model.shutdown()
