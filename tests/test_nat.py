"""A server behind a home router's NAT, with real processes in network namespaces (swarm.net.netns: the DHT peer,
its relay, the client and `cocoon status` on the public side, the server behind a masquerading router).

The server finds that nobody can dial it, registers with the relay and says so; the client generates
through the relay (and a public server pushes to it through the relay) the tokens local transformers generates; `cocoon status` marks it relayed. With ports
forwarded on the router (DNAT) and --public-ip it is reachable directly; with --no-relay it is unreachable,
says what to do, and leaves."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.apps.local_swarm import LocalSwarm
from swarm.net.netns import HOME, PUB, HomeNetwork

pytestmark = pytest.mark.slow
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def nat():
    if shutil.which("iptables") is None:
        pytest.skip("iptables is missing: `make system` (as root) installs it")
    try:
        network = HomeNetwork().__enter__()
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"network namespaces need root and iproute2: {e}")
    yield network
    network.__exit__()


@pytest.fixture(scope="module")
def model_and_expected(checkpoints):
    path = checkpoints("llama")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, ids, local.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)


def generate_in_pub(path, ids, swarm) -> dict:
    done = subprocess.run(["ip", "netns", "exec", PUB, sys.executable, "-m", "tests.netns_client", str(path),
                           str(NEW_TOKENS), json.dumps(ids[0].tolist()), *swarm.initial_peers],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_in_pub(path, swarm) -> str:
    done = subprocess.run(["ip", "netns", "exec", PUB, sys.executable, "-m", "swarm.apps.cli", "status", str(path),
                           "--initial-peers", *swarm.initial_peers], capture_output=True, text=True, timeout=120)
    return done.stdout


def reachability(server) -> str:
    return server.wait_for("Reachability:", 120)


def test_a_server_behind_nat_is_reached_through_a_relay(nat, model_and_expected):
    path, ids, expected = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm:
        public = swarm.add_server((0, 2), host="10.78.0.1", netns=PUB, wait=False)
        home = swarm.add_server((2, 4), host="192.168.78.2", netns=HOME, wait=False)
        assert "reachable directly" in reachability(public)
        assert "reachable only through relay" in reachability(home)
        for server in (public, home):
            server.wait_for("Server ready", 180)
        result = generate_in_pub(path, ids, swarm)
        assert result["ids"] == expected[0].tolist() and result["via"] == ["direct", "relay"]
        assert result["pushes"][1]["taken"] > 0  # the public server pushed to the home one through its relay
        line = next(l for l in status_in_pub(path, swarm).splitlines() if home.peer_id[-19:] in l)
        assert "relayed" in line and "online" in line


def test_a_forwarded_port_makes_it_reachable_directly(nat, model_and_expected):
    path, ids, expected = model_and_expected
    for port in (40123, 40124):  # the direct port and the p2p port, forwarded by the router to the server
        nat.forward(port)
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm:
        home = swarm.add_server((0, 4), "--public-ip", "10.78.0.2", "--direct-port", "40123", "--port", "40124",
                                host="192.168.78.2", netns=HOME, wait=False)
        assert "reachable directly at 10.78.0.2:40123" in reachability(home)
        home.wait_for("Server ready", 180)
        result = generate_in_pub(path, ids, swarm)
        assert result["ids"] == expected[0].tolist() and result["via"] == ["direct"]
        line = next(l for l in status_in_pub(path, swarm).splitlines() if home.peer_id[-19:] in l)
        assert "direct" in line


def test_a_server_nobody_can_reach_says_so_and_leaves(nat, model_and_expected):
    path, _, _ = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm:
        home = swarm.add_server((0, 4), "--no-relay", host="192.168.78.2", netns=HOME, wait=False)
        line = reachability(home)
        assert "unreachable" in line and "forward TCP port" in line and "--no-relay" in line
        assert home.process.wait(timeout=60) == 1
        assert not any("Server ready" in l for l in home.output)
