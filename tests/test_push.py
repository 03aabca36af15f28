"""Server-to-server push with real processes: chains of three servers where each pushes its output to the
next, compared with local transformers and with push turned off; a middle server killed mid-generation;
middle servers that push something other than what they return, return NaN, or push to a server the client
did not name."""
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from routing.bans import BanList
from swarm import AutoDistributedModelForCausalLM
from swarm.client import loop
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
NEW_TOKENS = 24
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def six_blocks(checkpoints):
    path = checkpoints("llama", num_hidden_layers=6)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, ids, local, local.generate(ids, **GREEDY)


def pushes(model, peer_id) -> dict:
    return loop.run(model.swarm.info(peer_id))["pushes"]


def client(path, swarm, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers, exact_wire=True,
                                                           request_timeout=10.0, **kwargs)


class KillAfter:
    """A streamer that kills the server of block 2 after ``after`` new tokens."""

    def __init__(self, model, swarm, after):
        self.model, self.swarm, self.after, self.calls, self.victim = model, swarm, after, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == self.after + 1:  # the first put() is the prompt
            link = next(l for l in self.model._session.chain if l.start <= 2 < l.end)
            self.victim = self.swarm.server_of(link.peer_id)
            self.victim.signal(signal.SIGKILL)

    def end(self):
        pass


def test_pushed_chains_equal_local_greedy_and_beam_search_and_fail_over(six_blocks):
    path, ids, local, expected = six_blocks
    beams = dict(max_new_tokens=12, do_sample=False, num_beams=3, num_return_sequences=2, eos_token_id=None)
    with LocalSwarm(path, [(0, 2), (2, 4), (4, 6), (2, 4)]) as swarm:
        model = client(path, swarm)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            assert torch.equal(model.generate(ids, **GREEDY), expected)
            chain = [link.peer_id for link in session.chain]
        counts = [pushes(model, peer) for peer in chain]
        # the 1st and 2nd server push every decode step once the next one took the route; the 2nd and 3rd take
        # most of them (on loopback the client's own copy sometimes arrives first), answer the client from them,
        # and find the client's own copy identical
        assert counts[0]["sent"] >= NEW_TOKENS - 2 and counts[1]["sent"] >= NEW_TOKENS - 3
        for count in counts[1:]:
            assert count["taken"] >= NEW_TOKENS // 2 and count["answered"] == count["taken"]
            assert count["differed"] == count["refused"] == 0
        assert torch.equal(model.generate(ids, **beams), local.generate(ids, **beams))
        off = client(path, swarm, push=False)
        assert torch.equal(off.generate(ids, **GREEDY), expected)
        off.shutdown()

        killer = KillAfter(model, swarm, after=10)  # the middle server of a pushing chain
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            assert torch.equal(model.generate(ids, streamer=killer, **GREEDY), expected)
            assert session.failovers >= 1 and killer.victim.peer_id not in [l.peer_id for l in session.chain]
            chain = [link.peer_id for link in session.chain]
        assert pushes(model, chain[1])["taken"] > 0  # the replacement took pushes too
        model.shutdown()


def test_a_long_prompt_crosses_the_chain_in_pieces_each_pushed_on_as_it_is_computed(checkpoints):
    """A first step longer than a piece (256 tokens at hidden 256: 128 KiB in 16 bits) goes from the first server
    along the chain in pieces: each later server takes a piece by push, computes it, answers it to the client and
    pushes it on while the next piece is still on the wire. None of them needs the client's copy."""
    path = checkpoints("llama", num_hidden_layers=6, hidden_size=256)
    ids = torch.randint(3, 128, (1, 600), generator=torch.Generator().manual_seed(3))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = local.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    with LocalSwarm(path, [(0, 2), (2, 4), (4, 6)]) as swarm:
        model = client(path, swarm)
        with model.inference_session(max_length=ids.shape[1] + 4) as session:
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None), expected)
            chain = [link.peer_id for link in session.chain]
        for peer in chain[1:]:  # pieces of 256, 256 and 88 tokens, taken from pushes with no copy to answer
            count = pushes(model, peer)
            assert count["taken"] - count["answered"] == 3 and count["differed"] == count["refused"] == 0
        # a server not measured yet gets time for a long prompt's bytes on a slow upload (2 Mbit/s), thrice
        unmeasured = "QmUnmeasured"
        assert model.swarm.step_timeout(unmeasured, 600, 2, 600 * 256 * 4) == \
            pytest.approx(model.swarm.step_timeout(unmeasured, 600, 2) + 3 * 600 * 256 * 4 / 250_000)
        model.shutdown()


@pytest.mark.parametrize("mischief", ["push_wrong", "nan"])
def test_a_lying_middle_server_is_caught_and_replaced(six_blocks, mischief):
    path, ids, _, expected = six_blocks
    with LocalSwarm(path, [(0, 2), (4, 6)]) as swarm:
        liar = swarm.add_server((2, 4), wait=False, module="tests.malicious_server",  # picked first
                                env={"COCOON_MISCHIEF": mischief, "COCOON_ADVERTISE_THROUGHPUT": "100000"})
        swarm.add_server((2, 4), wait=False, module="tests.malicious_server",  # picked next
                         env={"COCOON_MISCHIEF": "none", "COCOON_ADVERTISE_THROUGHPUT": "1"})
        for server in swarm.servers[-2:]:
            server.wait_for("Server ready", 180)
        model = client(path, swarm)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            assert torch.equal(model.generate(ids, **GREEDY), expected)
            assert liar.peer_id not in [l.peer_id for l in session.chain] and session.failovers >= 1
            last = session.chain[-1].peer_id
        assert liar.peer_id in model.swarm.bans.banned()
        if mischief == "push_wrong":
            assert pushes(model, last)["differed"] >= 1  # the next server saw the lie and computed the client's
        model.shutdown()


@pytest.mark.parametrize("liar_span, mischief", [((4, 6), "frame_pusher"), ((2, 4), "push_tokens")])
def test_pushes_are_proven_so_only_the_liar_is_blamed(six_blocks, liar_span, mischief, caplog):
    """The second audit's push framing, both ways. A next server that claims its pusher pushed something else
    cannot show the pusher's proof of it, and is replaced; a pusher that pushes a step of another shape than the
    client's is proven so by its own proof, and is replaced. The honest side is never banned."""
    path, ids, _, expected = six_blocks
    spans = [(0, 2), (2, 4), (4, 6)]
    with LocalSwarm(path, [span for span in spans if span != liar_span]) as swarm:
        liar = swarm.add_server(liar_span, wait=False, module="tests.malicious_server",  # picked first
                                env={"COCOON_MISCHIEF": mischief, "COCOON_ADVERTISE_THROUGHPUT": "100000"})
        swarm.add_server(liar_span, wait=False, module="tests.malicious_server",  # picked next
                         env={"COCOON_MISCHIEF": "none", "COCOON_ADVERTISE_THROUGHPUT": "1"})
        for server in swarm.servers[-2:]:
            server.wait_for("Server ready", 180)
        honest = [server.peer_id for server in swarm.servers if server is not liar]
        model = client(path, swarm)
        for _ in range(3):  # sessions, as the audit ran them
            with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                assert torch.equal(model.generate(ids, **GREEDY), expected)
                assert liar.peer_id not in [l.peer_id for l in session.chain]
            model.swarm.bans = BanList()  # the next session may meet the liar again
        failed = [r.getMessage() for r in caplog.records if " failed (" in r.getMessage()]  # each ban's line
        assert any(liar.peer_id in line for line in failed)
        assert not any(peer in line for peer in honest for line in failed)
        model.shutdown()


def test_a_push_to_a_server_the_client_did_not_name_is_refused(six_blocks):
    path, ids, _, expected = six_blocks
    with LocalSwarm(path, [(0, 2), (4, 6)]) as swarm:
        bystander = swarm.add_server((4, 6), module="tests.malicious_server",  # never picked: it seems slow
                                     env={"COCOON_MISCHIEF": "none", "COCOON_ADVERTISE_THROUGHPUT": "1"})
        swarm.add_server((2, 4), module="tests.malicious_server",
                         env={"COCOON_MISCHIEF": "push_elsewhere", "COCOON_PUSH_TO": bystander.peer_id})
        model = client(path, swarm)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            assert torch.equal(model.generate(ids, **GREEDY), expected)
            assert bystander.peer_id not in [l.peer_id for l in session.chain]
        count = pushes(model, bystander.peer_id)
        assert count["refused"] >= 1 and count["taken"] == 0  # refused: the pusher then stops pushing there
        model.shutdown()
