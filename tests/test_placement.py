"""Servers started with --num-blocks only place themselves where the swarm needs them, and move to a gap."""
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from shards import Checkpoint
from swarm import AutoDistributedModelForCausalLM
from swarm.client.swarm_client import SwarmClient
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow


def spans_of(client):
    return {peer: (info.start, info.end) for peer, info in client.swarm_state(refresh=True).online().items()}


def wait_until(predicate, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_servers_fill_the_model_then_a_redundant_one_moves_to_a_gap(checkpoints):
    path = checkpoints("llama", num_hidden_layers=6)
    # records live 3 announce periods. At 1 s, an announcement that a loaded machine delays by 2 s lets a record
    # expire: a gap that is not there, which a server may move to. The likely cause of one failure in a full run,
    # where the (0, 2) server had left the online servers during the 6 s in which nothing was missing.
    args = ["--announce-period", "2", "--balance-period", "2"]
    with LocalSwarm(path, server_args=args) as swarm:
        client = SwarmClient(swarm.initial_peers, Checkpoint(path).model_id, 6, state_ttl=0)
        placed = []
        for _ in range(3):  # one after another, as volunteers would join
            server = swarm.add_server(num_blocks=2)
            placed.append(server)
            assert wait_until(lambda: server.peer_id in spans_of(client))
        spans = spans_of(client)
        assert sorted(spans.values()) == [(0, 2), (2, 4), (4, 6)], spans  # covered, no gap, no overlap

        fixed = swarm.add_server((0, 2))  # a second holder of 0-1: one of the --num-blocks servers is redundant
        first = next(s for s in placed if spans[s.peer_id] == (0, 2))
        middle = next(s for s in placed if spans[s.peer_id] == (2, 4))
        time.sleep(6)
        assert spans_of(client)[first.peer_id] == (0, 2)  # no gap yet: nothing worth a move

        middle.signal(9)  # the holder of 2-3 vanishes; its records expire, leaving a gap
        assert wait_until(lambda: spans_of(client).get(first.peer_id) == (2, 4), timeout=120), spans_of(client)
        assert not client.swarm_state(refresh=True).missing_blocks()

        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(0))
        assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False),
                           local.generate(ids, max_new_tokens=16, do_sample=False))
        assert fixed.process.poll() is None
        model.shutdown()
        client.shutdown()
