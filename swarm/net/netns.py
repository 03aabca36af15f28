"""A home network behind NAT, in Linux network namespaces (root only), for tests and benchmarks:

    cn-pub    10.78.0.1, 10.78.0.3          the public side: DHT peer, relays, clients (two addresses: two
                                            independent relays, or an attacker beside them)
    cn-router 10.78.0.2 | 192.168.78.1      masquerades 192.168.78.0/24: nothing on the public side can dial in
    cn-home   192.168.78.2                  a home server

No namespace has a route anywhere else, so no traffic leaves them. ``forward(port)`` adds a port forward
(DNAT) on the router, as a user would on a home router.
"""
from __future__ import annotations

import subprocess

PUB, ROUTER, HOME = "cn-pub", "cn-router", "cn-home"
PUBLIC_IP, ROUTER_IP, HOME_IP = "10.78.0.1", "10.78.0.2", "192.168.78.2"
SECOND_PUBLIC_IP = "10.78.0.3"


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def run_in(ns: str, *command: str) -> None:
    _run("ip", "netns", "exec", ns, *command)


class HomeNetwork:
    def __enter__(self) -> "HomeNetwork":
        self.__exit__()  # what a killed run left behind
        _run("ip", "netns", "add", PUB)  # raises without root or iproute2
        try:
            _run("ip", "netns", "add", ROUTER)
            _run("ip", "netns", "add", HOME)
            _run("ip", "link", "add", "cn-pub0", "netns", PUB, "type", "veth", "peer", "name", "cn-rpub",
                 "netns", ROUTER)
            _run("ip", "link", "add", "cn-home0", "netns", HOME, "type", "veth", "peer", "name", "cn-rhome",
                 "netns", ROUTER)
            for ns, device, address in [(PUB, "cn-pub0", f"{PUBLIC_IP}/24"), (ROUTER, "cn-rpub", f"{ROUTER_IP}/24"),
                                        (ROUTER, "cn-rhome", "192.168.78.1/24"), (HOME, "cn-home0", f"{HOME_IP}/24")]:
                run_in(ns, "ip", "addr", "add", address, "dev", device)
                run_in(ns, "ip", "link", "set", device, "up")
            run_in(PUB, "ip", "addr", "add", f"{SECOND_PUBLIC_IP}/24", "dev", "cn-pub0")
            for ns in (PUB, ROUTER, HOME):
                run_in(ns, "ip", "link", "set", "lo", "up")
            run_in(HOME, "ip", "route", "add", "default", "via", "192.168.78.1")
            run_in(ROUTER, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            run_in(ROUTER, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.168.78.0/24", "-o", "cn-rpub",
                   "-j", "MASQUERADE")
        except BaseException:
            self.__exit__()
            raise
        return self

    def forward(self, port: int) -> None:
        """Forward TCP ``port`` of the router's public address to the home server."""
        run_in(ROUTER, "iptables", "-t", "nat", "-A", "PREROUTING", "-i", "cn-rpub", "-p", "tcp", "--dport",
               str(port), "-j", "DNAT", "--to-destination", f"{HOME_IP}:{port}")

    def __exit__(self, *exc) -> None:
        for ns in (PUB, ROUTER, HOME):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
