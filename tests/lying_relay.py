"""A test double: `cocoon dht` whose relay lies. Run as `python -m tests.lying_relay dht ...`.

Its checks answer that no address is reachable (without dialling anything) and its relay port takes client
connections and never answers them: what the second audit's sybil relays did to make a reachable server hide
behind them and its clients wait."""
import asyncio

from swarm.net import relay


async def _nobody_is_reachable(self, peer_id, addresses, ip):
    return []


async def _tarpit(self, reader, writer):
    await asyncio.sleep(3600)


relay.RelayService.dial_back = _nobody_is_reachable
relay.RelayService._splice = _tarpit

if __name__ == "__main__":
    from swarm.apps.cli import run
    run()
