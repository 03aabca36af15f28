"""A server behind a home router's NAT, with real processes in network namespaces (swarm.net.netns: the DHT peer,
its relay, the client and `cocoon status` on the public side, the server behind a masquerading router).

The server finds that nobody can dial it (two relays on two addresses agree), registers with a relay and says
so; the client generates through the relay (and a public server pushes to it through the relay) the tokens
local transformers generates; `cocoon status` marks it relayed. With ports forwarded on the router (DNAT) and
--public-ip it is reachable directly; with --no-relay it is unreachable, says what to do, and leaves.

And the second audit's relay attacks, each from an address of its own: five lying relays do not make a
reachable server hide behind them nor a --no-relay one leave, and 256 idle registrations from one address do
not keep a server behind NAT from registering."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.apps.local_swarm import LocalSwarm, SwarmProcess
from swarm.net.netns import HOME, PUB, SECOND_PUBLIC_IP, HomeNetwork

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


class MoreRelays:
    """``count`` more `cocoon dht` peers with relays at the second public address (tests.lying_relay's with
    ``module``), joined to the swarm."""

    def __init__(self, swarm, count: int = 1, module: str = "swarm.apps.cli"):
        self.processes = [SwarmProcess(["dht", "--host", SECOND_PUBLIC_IP, "--port", "0", "--initial-peers",
                                        *swarm.initial_peers], f"relay{i}", prefix=["ip", "netns", "exec", PUB],
                                       module=module) for i in range(count)]

    def __enter__(self):
        for process in self.processes:
            process.wait_for("DHT running", 60)
        time.sleep(2.0)  # their relay records reach the swarm's DHT
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.process.terminate()
        for process in self.processes:
            process.process.wait(30)


def test_a_server_behind_nat_is_reached_through_a_relay(nat, model_and_expected):
    path, ids, expected = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm, MoreRelays(swarm):
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


def test_a_relayed_server_goes_direct_once_its_port_is_forwarded(nat, model_and_expected):
    """Reachability is checked again (--recheck-period): a port forwarded after start-up makes it direct."""
    path, ids, expected = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm, MoreRelays(swarm):
        home = swarm.add_server((0, 4), "--public-ip", "10.78.0.2", "--direct-port", "40125", "--port", "40126",
                                "--recheck-period", "5", "--announce-period", "2", host="192.168.78.2", netns=HOME,
                                wait=False)
        assert "reachable only through relay" in reachability(home)
        home.wait_for("Server ready", 180)
        nat.forward(40125)
        assert "reachable directly at 10.78.0.2:40125" in home.wait_for("Reachability:", 90)
        result = generate_in_pub(path, ids, swarm)
        assert result["ids"] == expected[0].tolist() and result["via"] == ["direct"]


def test_a_server_nobody_can_reach_says_so_and_leaves(nat, model_and_expected):
    path, _, _ = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm, MoreRelays(swarm):
        home = swarm.add_server((0, 4), "--no-relay", host="192.168.78.2", netns=HOME, wait=False)
        line = reachability(home)
        assert "unreachable" in line and "forward TCP port" in line and "--no-relay" in line
        assert home.process.wait(timeout=60) == 1
        assert not any("Server ready" in l for l in home.output)


def test_five_lying_relays_cannot_hide_a_reachable_server_nor_make_it_leave(nat, model_and_expected):
    """Five sybil relays on one address answer every check "unreachable" and tarpit their relay port; the swarm's
    own relay, on another address, tells the truth. One address is one opinion: both servers stay direct."""
    path, ids, expected = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm, \
            MoreRelays(swarm, 5, module="tests.lying_relay"):
        servers = [swarm.add_server((0, 2), host="10.78.0.1", netns=PUB, wait=False),
                   swarm.add_server((2, 4), "--no-relay", host="10.78.0.1", netns=PUB, wait=False)]
        for server in servers:
            assert "reachable directly at 10.78.0.1" in reachability(server)
            server.wait_for("Server ready", 180)
        started = time.monotonic()
        result = generate_in_pub(path, ids, swarm)
        assert result["ids"] == expected[0].tolist() and result["via"] == ["direct", "direct"]
        assert time.monotonic() - started < 30  # (22 s went to the lying relay's tarpit per connection before)


def test_a_server_behind_nat_registers_despite_256_idle_registrations(nat, model_and_expected):
    """256 throwaway peer ids from one address ask the relay for a check and a registration, and sit idle. The
    relay takes 4 from that address; the server behind NAT, from another, registers and serves."""
    path, ids, expected = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm:
        flood = SwarmProcess(["256", *swarm.initial_peers], "flood", prefix=["ip", "netns", "exec", PUB],
                             module="tests.relay_flood")
        try:
            registered = int(flood.wait_for("registered", 240).split()[1])
            assert 0 < registered <= 4
            home = swarm.add_server((0, 4), host="192.168.78.2", netns=HOME, wait=False)
            assert "reachable through relay" in reachability(home)
            home.wait_for("Server ready", 180)
            result = generate_in_pub(path, ids, swarm)
            assert result["ids"] == expected[0].tolist() and result["via"] == ["relay"]
        finally:
            os.killpg(flood.process.pid, signal.SIGKILL)  # and its p2p daemon


def test_a_handshake_flood_from_one_address_leaves_the_direct_path_to_others(nat, model_and_expected):
    """300 connections that finish TLS and say nothing, from one address, refilled as they are dropped: the server
    takes 16 handshakes from that address at once, and a client elsewhere still connects directly."""
    path, ids, expected = model_and_expected
    with LocalSwarm(path, dht_host="10.78.0.1", dht_netns=PUB) as swarm:
        server = swarm.add_server((0, 4), host="10.78.0.1", netns=PUB, wait=False)
        address = reachability(server).split("reachable directly at ")[1].split(",")[0].strip()
        server.wait_for("Server ready", 180)
        flood = SwarmProcess(["silent", SECOND_PUBLIC_IP, address, "300"], "flood",
                             prefix=["ip", "netns", "exec", PUB], module="tests.handshake_flood")
        try:
            flood.wait_for("flooding", 60)
            result = generate_in_pub(path, ids, swarm)
            assert result["ids"] == expected[0].tolist() and result["via"] == ["direct"]
        finally:
            os.killpg(flood.process.pid, signal.SIGKILL)  # and its p2p daemon
