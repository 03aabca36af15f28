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
    status: str  # "direct", "relay", "relay and direct", "unreachable", "unsettled" or "unchecked"
    line: str
    relay: str = ""  # "peer id@ip:port" of the relay it registered with
    registration: RelayRegistration | None = None


def _advice(port: int) -> str:
    return (f"forward TCP port {port} of your router to this machine and start with --public-ip YOUR_PUBLIC_IP "
            f"(or --announce-direct IP:PORT of the forwarded port)")


async def check(dht, peer_id: str, direct: DirectServer, addresses: list[str], port: int,
                relay: bool) -> Reachability:
    """Ask relays on up to 3 IP addresses to dial ``addresses`` (this server's direct addresses) back; register
    with one when none could and ``relay`` allows.

    Relays lie (a sybil answers every check with "unreachable"), so one IP address is one opinion however many
    relays announce it, and only 2 or more that agree make this server drop its direct address ("relay") or,
    with --no-relay, leave. One opinion alone ("relay and direct": the demo's single relay, a private swarm) keeps
    the direct address announced beside the relay, and clients try both; a relay that refuses or fails to answer
    is no opinion at all."""
    relays = [(p, r) for p, r in fetch_relays(dht).items() if p != peer_id]
    if not relays:
        return Reachability("unchecked", "Reachability: not checked (no relay in the swarm yet to dial back)")
    by_ip: dict[str, tuple[str, list[str], str]] = {}
    for relay_peer, (control, splice) in random.sample(relays, len(relays)):
        by_ip.setdefault(control[0].rpartition(":")[0] if control else "", (relay_peer, control, splice))
    unreachable, failures = [], []  # registrations open with the relays that could not dial us back
    for relay_peer, control, splice in list(by_ip.values())[:RELAYS_TRIED]:
        for address in control:
            registration = RelayRegistration(relay_peer, address, splice, dht.private_key)
            try:
                await registration.open()
                reachable = await registration.check(addresses)
            except (OSError, TimeoutError, HandshakeError, ValueError) as e:
                registration.close()
                failures.append(f"{address}: {type(e).__name__} {e}".strip())
                continue
            if reachable:
                for _, _, other in unreachable + [(relay_peer, splice, registration)]:
                    other.close()
                return Reachability("direct", f"Reachability: reachable directly at {', '.join(reachable)}")
            unreachable.append((relay_peer, splice, registration))
            break
    if not unreachable:
        return Reachability("unchecked", f"Reachability: not checked: no relay answered "
                                         f"({'; '.join(failures)[:300]}); announcing {', '.join(addresses)}")
    return await _register(unreachable, direct, addresses, port, relay, agreed=len(unreachable) >= 2)


async def _register(unreachable: list, direct: DirectServer, addresses: list[str], port: int, relay: bool,
                    agreed: bool) -> Reachability:
    """After relays (``agreed``: on 2 IP addresses or more) could not dial this server: register with one of
    them, or say what to do."""
    registered = None
    for relay_peer, splice, registration in unreachable:
        if relay and registered is None:
            try:
                await registration.register(direct)
                registered = (relay_peer, splice, registration)
                continue
            except (OSError, TimeoutError, HandshakeError, ValueError):
                pass
        registration.close()
    nobody = f"no peer could connect to {', '.join(addresses) or 'this server'}"
    if registered is None:
        if agreed or not relay:
            if agreed:
                return Reachability("unreachable", f"Reachability: unreachable: {nobody}" + (
                    f" and relaying is off (--no-relay): drop --no-relay, or {_advice(port)}" if not relay else
                    f" and no relay took it: {_advice(port)}"))
            return Reachability("unsettled", f"Reachability: one relay could not dial {', '.join(addresses)} back, "
                                          f"which one relay's word does not settle: announcing it (if clients cannot "
                                          f"reach this server, {_advice(port)})")
        return Reachability("unchecked", f"Reachability: {nobody}, and the relay did not take it: announcing "
                                         f"{', '.join(addresses)}")
    relay_peer, splice, registration = registered
    if agreed:
        return Reachability("relay", f"Reachability: reachable only through relay {relay_peer} at {splice} (slower: "
                                     f"each step crosses the relay; for direct connections {_advice(port)})",
                            relay=f"{relay_peer}@{splice}", registration=registration)
    return Reachability("relay and direct",
                        f"Reachability: reachable through relay {relay_peer} at {splice}; one relay could not dial "
                        f"{', '.join(addresses)} back, which one relay's word does not settle, so that stays announced "
                        f"too and clients try both (for direct connections {_advice(port)})",
                        relay=f"{relay_peer}@{splice}", registration=registration)


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


async def recheck(server) -> bool:
    """A relayed server's reachability again (every --recheck-period): once a relay can dial it (a router's port
    was forwarded since) it drops its relay and goes direct; if its relay went away it registers again. A
    recheck never makes a server leave. Returns whether what it announces changed."""
    registration, addresses = server.relaying, list(server.direct_addresses)
    alive = registration.task is not None and not registration.task.done()
    port = int(addresses[0].rpartition(":")[2]) if addresses else server.config.direct_port
    found = await check(server.dht, server.peer_id, server.direct, addresses, port, relay=not alive)
    if found.status == "direct" or (found.registration is not None and not alive):
        print(found.line, flush=True)
        registration.close()
        server.relaying, server.info.relay = found.registration, found.relay
        server.info.direct = tuple(addresses) if found.status in ("direct", "relay and direct") else ()
        return True
    if found.registration is not None:
        found.registration.close()
    return False
