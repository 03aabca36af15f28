"""At start-up a server asks a relay of the swarm to dial it back, and says in one line what it found:
reachable directly, reachable only through a relay (it then registers there), or unreachable (with what to
try). A reachable server offers to relay for others, unless --no-relay."""
from __future__ import annotations

import random
from dataclasses import dataclass

from swarm.dht.records import announce_relay, fetch_relays
from swarm.net.direct import DirectServer, HandshakeError
from swarm.net.relay import RelayRegistration, RelayService

RELAYS_TRIED = 3


@dataclass
class Reachability:
    status: str  # "direct", "relay", "unreachable" or "unchecked"
    line: str
    relay: str = ""  # "peer id@ip:port" of the relay it registered with
    registration: RelayRegistration | None = None


def _advice(port: int) -> str:
    return (f"forward TCP port {port} of your router to this machine and start with --public-ip YOUR_PUBLIC_IP "
            f"(or --announce-direct IP:PORT of the forwarded port)")


async def check(dht, peer_id: str, direct: DirectServer, addresses: list[str], port: int,
                relay: bool) -> Reachability:
    """Ask up to 3 relays to dial ``addresses`` (this server's direct addresses) back; register with one when
    none could and ``relay`` allows."""
    relays = [(p, r) for p, r in fetch_relays(dht).items() if p != peer_id]
    if not relays:
        return Reachability("unchecked", "Reachability: not checked (no relay in the swarm yet to dial back)")
    failures = []
    for relay_peer, (control, splice) in random.sample(relays, min(RELAYS_TRIED, len(relays))):
        for address in control:
            registration = RelayRegistration(relay_peer, address, splice, dht.private_key)
            try:
                await registration.open()
                reachable = await registration.check(addresses)
                if reachable:
                    registration.close()
                    return Reachability("direct", f"Reachability: reachable directly at {', '.join(reachable)}")
                if not relay:
                    registration.close()
                    return Reachability("unreachable", f"Reachability: unreachable: no peer could connect to "
                                                       f"{', '.join(addresses) or 'this server'} and relaying is off "
                                                       f"(--no-relay): drop --no-relay, or {_advice(port)}")
                await registration.register(direct)
                return Reachability(
                    "relay", f"Reachability: reachable only through relay {relay_peer} at {splice} (slower: each "
                             f"step crosses the relay; for direct connections {_advice(port)})",
                    relay=f"{relay_peer}@{splice}", registration=registration)
            except (OSError, TimeoutError, HandshakeError, ValueError) as e:
                registration.close()
                failures.append(f"{address}: {type(e).__name__} {e}".strip())
    return Reachability("unreachable", f"Reachability: unreachable: no relay of the swarm answered "
                                       f"({'; '.join(failures)[:300]}): check this machine's connection and "
                                       f"firewall, or {_advice(port)}")


async def offer_relay(dht, peer_id: str, direct: DirectServer, control: list[str], host: str,
                      expiration: float) -> RelayService:
    """Relay for servers behind NAT: the ``relay`` handler on the direct port (``control``: its addresses) and
    a relay port on ``host``, both announced in the DHT (again with every announcement of the caller's)."""
    service = RelayService(dht.private_key)
    port = await service.start(host)
    service.control = list(control)
    service.splice = f"{control[0].rpartition(':')[0] if host in ('0.0.0.0', '::') else host}:{port}"
    direct.handlers["relay"] = service.handle
    announce_relay(dht, peer_id, service.control, service.splice, expiration)
    return service
