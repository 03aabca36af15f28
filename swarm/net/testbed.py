"""An internet on one machine: hosts in network namespaces around one router, for tests and benchmarks (root only).

    with Testbed([Host("dht"), Host("s1", delay_ms=25, upload_mbit=20), Host("s2", delay_ms=40, nat=True)]) as net:
        net.popen("s1", ["cocoon", "serve", ...])   # runs inside s1's namespace
        net.public_ip("s2")                          # the address others see (its router's, behind NAT)

Every host is a namespace with one link, ``eth0``, to a router in a namespace of its own (the "internet").
- **Delay:** everything a host sends into the internet (TCP and UDP: the DHT's traffic, pushes, replies)
  waits ``delay_ms`` in swarm/net/nfqueue.py on the internet's router, so a round trip between hosts A and B
  takes delay(A) + delay(B). Loopback inside a host is not delayed. The wait is on the router, not in the
  host: a packet the host's own kernel held would still count against its socket (TCP small queues) and
  throttle a transfer far below its upload.
- **Upload:** a token bucket (``tbf``) on the host's ``eth0`` limits what it sends to ``upload_mbit``.
- **NAT:** a host with ``nat=True`` sits behind a home router of its own that masquerades it: it can dial
  out, nobody can dial in (a home server without port forwards), and others see the router's address.
No namespace has a route anywhere but the internet's router, so no traffic leaves the testbed. Leaving the
``with`` stops every process it started and deletes every namespace, as does the next testbed after a
killed run.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass

PREFIX = "cnt"  # every namespace of the testbed is named cnt-...
NETWORK = "10.79"  # host i's link to the internet is 10.79.(i + 1).0/24: the router .1, the host (or its home router) .2
HOME_NET = "192.168.1"  # each home behind NAT has its own router and this private network


@dataclass(frozen=True)
class Host:
    name: str
    delay_ms: float = 0.0  # one-way: what this host sends waits this long
    upload_mbit: float | None = None  # None: as fast as the machine moves bytes
    nat: bool = False  # behind a masquerading router: can dial out, cannot be dialled


def draw_delays(count: int, seed: int = 0, far: float = 0.2) -> list[float]:
    """One-way delays of home connections: most in one region (a 20-50 ms round trip to a regional peer, so
    10-25 ms each way), a fraction ``far`` across an ocean (80-130 ms round trip, 40-65 ms each way)."""
    rng = random.Random(seed)
    return [round(rng.uniform(40, 65) if rng.random() < far else rng.uniform(10, 25), 1) for _ in range(count)]


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


class Testbed:
    __test__ = False  # not a pytest class

    def __init__(self, hosts: list[Host]):
        if len({h.name for h in hosts}) != len(hosts) or len(hosts) > 250:
            raise ValueError("a testbed takes up to 250 hosts with distinct names")
        self.hosts = {h.name: h for h in hosts}
        self.processes: list[subprocess.Popen] = []
        self._public = {h.name: f"{NETWORK}.{i + 1}.2" for i, h in enumerate(hosts)}

    def namespace(self, name: str) -> str:
        return f"{PREFIX}-{name}"

    def public_ip(self, name: str) -> str:
        """The address other hosts see: the host's own, or its router's when it is behind NAT."""
        return self._public[name]

    def host_ip(self, name: str) -> str:
        """The address the host has on its own link (a private one behind NAT)."""
        return f"{HOME_NET}.2" if self.hosts[name].nat else self._public[name]

    def popen(self, name: str, command: list[str], **kwargs) -> subprocess.Popen:
        """Start ``command`` inside host ``name``; the testbed stops it (and its process group) on exit."""
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace(name), *command], start_new_session=True,
                                   **kwargs)
        self.processes.append(process)
        return process

    def run(self, name: str, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespace(name), *command], **kwargs)

    def __enter__(self) -> "Testbed":
        if os.geteuid() != 0:
            raise PermissionError("The testbed makes network namespaces, which needs root: run as root (CI does) "
                                  "or with sudo.")
        _remove_namespaces()  # what a killed run left behind
        try:
            hub = self.namespace("internet")
            _run("ip", "netns", "add", hub)
            _in(hub, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            for i, host in enumerate(self.hosts.values()):
                self._add(hub, i, host)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add(self, hub: str, index: int, host: Host) -> None:
        ns, port, gateway = self.namespace(host.name), f"p{index}", f"{NETWORK}.{index + 1}.1"
        _run("ip", "netns", "add", ns)
        _in(ns, "ip", "link", "set", "lo", "up")
        if host.nat:  # the home router: its public leg to the internet, the host on a private link behind it
            router = self.namespace(f"{host.name}-router")
            _run("ip", "netns", "add", router)
            self._link(hub, port, router, "wan", gateway, self._public[host.name])
            _in(router, "ip", "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _up(router, "lan", f"{HOME_NET}.1/24")
            _up(ns, "eth0", f"{HOME_NET}.2/24")
            _in(ns, "ip", "route", "add", "default", "via", f"{HOME_NET}.1")
            _in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            _in(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE")
        else:
            self._link(hub, port, ns, "eth0", gateway, self._public[host.name])
        if host.upload_mbit:
            # burst: one 64 KiB segment (veth hands tbf whole GSO segments); latency bounds the queue
            _in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", f"{host.upload_mbit}mbit",
                "burst", "64kb", "latency", "200ms")
        if host.delay_ms:
            queue = str(index + 1)
            delay = self.popen("internet", [sys.executable, "-m", "swarm.net.nfqueue", "--queue", queue,
                                            "--delay-ms", str(host.delay_ms)], stdout=subprocess.PIPE, text=True)
            if "delay ready" not in delay.stdout.readline():
                raise RuntimeError(f"the delay of host {host.name} did not start (swarm/net/nfqueue.py)")
            # without --queue-bypass: while no delay process listens, the host sends nothing (never undelayed)
            _in(hub, "iptables", "-A", "FORWARD", "-i", port, "-j", "NFQUEUE", "--queue-num", queue)

    @staticmethod
    def _link(hub: str, port: str, ns: str, device: str, gateway: str, address: str) -> None:
        _in(hub, "ip", "link", "add", port, "type", "veth", "peer", "name", device, "netns", ns)
        _up(hub, port, f"{gateway}/24")
        _up(ns, device, f"{address}/24")
        _in(ns, "ip", "route", "add", "default", "via", gateway)

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        self.processes.clear()
        _remove_namespaces()


def _in(ns: str, *command: str) -> None:
    _run("ip", "netns", "exec", ns, *command)


def _up(ns: str, device: str, address: str) -> None:
    _in(ns, "ip", "addr", "add", address, "dev", device)
    _in(ns, "ip", "link", "set", device, "up")


def _remove_namespaces() -> None:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        if name.startswith(f"{PREFIX}-"):  # what still runs inside (a killed run's servers, delays) goes first
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
