"""Failover mid-generation with real processes: the output equals the no-failure output."""
import signal
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
NEW_TOKENS = 64


class Saboteur:
    """A streamer that, after ``after`` generated tokens, does ``action`` to the server of blocks 2-3."""

    def __init__(self, model, swarm, after, action):
        self.model, self.swarm, self.after, self.action = model, swarm, after, action
        self.calls, self.victim = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == self.after + 1:  # the first put() is the prompt
            link = next(l for l in self.model._session.chain if l.start <= 2 < l.end)
            self.victim = self.swarm.server_of(link.peer_id)
            self.action(self.victim)

    def end(self):
        pass


def generate_with(model, ids, streamer=None):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, streamer=streamer)


@pytest.fixture(scope="module")
def local_and_ids(checkpoints):
    path = checkpoints("llama")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, ids, generate_with(local, ids), local


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_server_dies_or_hangs_mid_generation(local_and_ids, how):
    path, ids, expected, local = local_and_ids
    with LocalSwarm(path, [(0, 2), (2, 4), (2, 4)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True, request_timeout=4.0)
        sig = signal.SIGKILL if how == "SIGKILL" else signal.SIGSTOP  # SIGSTOP: silent, connection kept open
        saboteur = Saboteur(model, swarm, after=20, action=lambda server: server.signal(sig))
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            output = generate_with(model, ids, streamer=saboteur)
            assert session.failovers >= 1
            assert saboteur.victim.peer_id not in [l.peer_id for l in session.chain]
        assert torch.equal(output, expected)

        # stateless forward and backward go around the dead server the same way
        x = local.get_input_embeddings()(ids).detach()
        grads = []
        for m in (model, local):
            inputs = x.clone().requires_grad_(True)
            m(inputs_embeds=inputs).logits.square().mean().backward()
            grads.append(inputs.grad)
        assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
        saboteur.victim.signal(signal.SIGKILL)
        model.shutdown()


class SabotageAfter(StoppingCriteria):
    """Beam search takes no streamer: the saboteur is called once per generated position instead."""

    def __init__(self, saboteur):
        self.saboteur = saboteur
        saboteur.put(None)  # stands for the prompt

    def __call__(self, input_ids, scores, **kwargs):
        self.saboteur.put(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def test_server_killed_mid_beam_search_with_every_step_spot_checked(local_and_ids):
    """The servers' caches follow the beams; the replacement gets the history in the beams' current order,
    and re-checks of reordered sessions agree with the honest servers that answered them."""
    path, ids, _, local = local_and_ids
    beams = dict(max_new_tokens=24, do_sample=False, num_beams=3, num_return_sequences=2, eos_token_id=None)
    expected = local.generate(ids, **beams)
    assert not torch.equal(expected[0], local.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)[0])
    with LocalSwarm(path, [(0, 2), (2, 4), (2, 4), (2, 4)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True, spot_check_rate=1.0)
        saboteur = Saboteur(model, swarm, after=10, action=lambda server: server.signal(signal.SIGKILL))
        with model.inference_session(max_length=ids.shape[1] + 24) as session:
            output = model.generate(ids, stopping_criteria=StoppingCriteriaList([SabotageAfter(saboteur)]), **beams)
            assert session.failovers >= 1 and saboteur.victim is not None
        assert torch.equal(output, expected)
        checker = model.swarm.spot_checker
        assert checker.checked >= 24 and not checker.convicted
        model.shutdown()


def test_a_dead_checker_is_not_blamed_on_the_server_it_checks(local_and_ids):
    path, ids, expected, _ = local_and_ids
    with LocalSwarm(path, [(0, 4), (0, 4)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True, spot_check_rate=1.0,
                                                                spot_check_local=False)
        checker = model.swarm.spot_checker

        def kill_the_checker(server_in_chain):
            (other,) = [s for s in swarm.servers if s is not server_in_chain]
            other.signal(signal.SIGKILL)
            saboteur.victim = other

        saboteur = Saboteur(model, swarm, after=10, action=kill_the_checker)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            output = generate_with(model, ids, streamer=saboteur)
            assert session.failovers == 0  # the server doing the work kept it
        assert torch.equal(output, expected)
        assert 10 <= checker.checked < NEW_TOKENS and model.swarm.bans.banned() == {saboteur.victim.peer_id}
        model.shutdown()


def _run(*command):
    subprocess.run(command, check=True, capture_output=True)


@pytest.fixture
def hosts():
    """Three hosts in network namespaces joined by a bridge: 10.77.0.1 (here) and 10.77.0.11-13."""
    names = ["cocoon-h1", "cocoon-h2", "cocoon-h3"]
    try:
        _run("ip", "link", "add", "cocoon-br", "type", "bridge")
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"network namespaces need root and iproute2: {e}")
    try:
        _run("ip", "addr", "add", "10.77.0.1/24", "dev", "cocoon-br")
        _run("ip", "link", "set", "cocoon-br", "up")
        for i, name in enumerate(names, start=1):
            _run("ip", "netns", "add", name)
            _run("ip", "link", "add", f"cocoon-v{i}", "type", "veth", "peer", "name", "eth0", "netns", name)
            _run("ip", "link", "set", f"cocoon-v{i}", "master", "cocoon-br", "up")
            _run("ip", "netns", "exec", name, "ip", "addr", "add", f"10.77.0.1{i}/24", "dev", "eth0")
            _run("ip", "netns", "exec", name, "ip", "link", "set", "eth0", "up")
            _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield {name: f"10.77.0.1{i}" for i, name in enumerate(names, start=1)}
    finally:
        for i, name in enumerate(names, start=1):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            subprocess.run(["ip", "link", "del", f"cocoon-v{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", "cocoon-br"], capture_output=True)


def test_host_cut_off_mid_generation(local_and_ids, hosts):
    path, ids, expected, _ = local_and_ids
    names = list(hosts)
    with LocalSwarm(path, dht_host="10.77.0.1") as swarm:
        servers = [swarm.add_server(span, wait=False, host=hosts[name], netns=name)
                   for span, name in zip([(0, 2), (2, 4), (2, 4)], names)]
        for server in servers:
            server.wait_for("Server ready", 180)
        host_of = {server.peer_id: name for server, name in zip(servers, names)}
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True, request_timeout=4.0)

        def cut_off(server):  # the host's link goes down: packets vanish, no connection is closed
            _run("ip", "netns", "exec", host_of[server.peer_id], "ip", "link", "set", "eth0", "down")

        saboteur = Saboteur(model, swarm, after=24, action=cut_off)
        with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
            output = generate_with(model, ids, streamer=saboteur)
            assert session.failovers >= 1
        assert torch.equal(output, expected)
        model.shutdown()
