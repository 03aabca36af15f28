"""The testbed (swarm/net/testbed.py) gives the delays, the upload limit and the NAT it was asked for, measured from
inside its namespaces: round trips between hosts, a transfer over a limited upload, a dial that NAT refuses."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from swarm.net.testbed import Host, Testbed, draw_delays

PROBE = str(Path(__file__).with_name("testbed_probe.py"))
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")


def _probe(net: Testbed, host: str, *args) -> object:
    done = net.run(host, [sys.executable, PROBE, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _listen(net: Testbed, host: str, kind: str, port: int) -> None:
    server = net.popen(host, [sys.executable, PROBE, kind, str(port)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "listening"


@root_only
def test_delays_upload_and_nat_measured_inside_the_namespaces():
    hosts = [Host("a", delay_ms=10), Host("b", delay_ms=20, upload_mbit=20), Host("c", delay_ms=30, nat=True)]
    with Testbed(hosts) as net:
        for host in ("a", "b", "c"):
            _listen(net, host, "echo", 7000)
            _listen(net, host, "sink", 7001)
        # a round trip between two hosts is the sum of their one-way delays (a: 10 + b: 20 = 30 ms)
        a_b = 1000 * statistics.median(_probe(net, "a", "ping", net.public_ip("b"), 7000, 20))
        assert 29.5 <= a_b <= 36, a_b
        # from behind NAT: c's 30 ms out through its router, a's 10 ms back
        c_a = 1000 * statistics.median(_probe(net, "c", "ping", net.public_ip("a"), 7000, 20))
        assert 39.5 <= c_a <= 46, c_a
        # b's upload is 20 Mbit/s: 3 MB take 1.2 s plus a round trip; a has no limit and sends it far faster
        size, bound = 3_000_000, 3_000_000 * 8 / 20e6
        b_up = _probe(net, "b", "send", net.public_ip("a"), 7001, size)
        assert 0.95 * bound <= b_up <= 1.3 * bound + 0.03, (b_up, bound)
        a_up = _probe(net, "a", "send", net.public_ip("b"), 7001, size)
        assert a_up < 0.5 * bound, (a_up, bound)
        # nobody dials in to c: its router has no port forward; c's private address is not routed
        assert _probe(net, "a", "dial", net.public_ip("c"), 7000) != "connected"
        assert _probe(net, "a", "dial", net.host_ip("c"), 7000) != "connected"
        assert _probe(net, "c", "dial", net.public_ip("a"), 7000) == "connected"
        processes = list(net.processes)
    assert all(p.poll() is not None for p in processes)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cnt-" not in listed


def test_the_testbed_refuses_to_run_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PermissionError, match="needs root"):
        Testbed([Host("a")]).__enter__()


def test_drawn_delays_are_regional_with_a_far_fraction():
    delays = draw_delays(1000, seed=1, far=0.2)
    far = [d for d in delays if d >= 40]
    assert all(10 <= d <= 25 or 40 <= d <= 65 for d in delays)
    assert 150 <= len(far) <= 250
    assert draw_delays(10, seed=1) == draw_delays(10, seed=1)
