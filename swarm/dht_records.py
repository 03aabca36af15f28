"""Server records in the hivemind DHT: key ``{model_id}.{block}``, subkey = server peer id."""
from __future__ import annotations

import logging
from functools import partial

from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from routing import ServerInfo, SwarmState

logger = logging.getLogger(__name__)


def block_key(model_id: str, block: int) -> str:
    return f"{model_id}.{block}"


def announce(dht: DHT, model_id: str, peer_id: str, info: ServerInfo, expiration: float, wait: bool = True):
    """Store ``info`` under every block of the server's span."""
    keys = [block_key(model_id, b) for b in range(info.start, info.end)]
    return dht.run_coroutine(partial(_store_many, keys=keys, subkey=peer_id, value=info.to_wire(),
                                     expiration_time=get_dht_time() + expiration), return_future=not wait)


def fetch_swarm_state(dht: DHT, model_id: str, num_blocks: int) -> SwarmState:
    """Read every block's records; malformed or inconsistent records are skipped, not trusted."""
    keys = [block_key(model_id, b) for b in range(num_blocks)]
    return _parse_records(dht.run_coroutine(partial(_get_many, keys=keys)), keys, num_blocks)


async def fetch_swarm_state_async(dht: DHT, model_id: str, num_blocks: int) -> SwarmState:
    """The same, awaitable from an event loop without blocking it."""
    keys = [block_key(model_id, b) for b in range(num_blocks)]
    return _parse_records(await dht.run_coroutine(partial(_get_many, keys=keys), return_future=True), keys, num_blocks)


def _parse_records(found: dict, keys: list[str], num_blocks: int) -> SwarmState:
    state = SwarmState(num_blocks)
    for block, key in enumerate(keys):
        entry = found.get(key)
        if entry is None or not isinstance(entry.value, dict):
            continue
        for peer_id, record in entry.value.items():
            try:
                info = ServerInfo.from_wire(record.value)
            except ValueError as e:
                logger.debug(f"skipping a record of {peer_id} under {key}: {e}")
                continue
            if not info.start <= block < info.end or info.end > num_blocks:
                continue  # a record must lie under a block its span covers
            state.servers[str(peer_id)] = info
    return state


async def _store_many(dht: DHT, node: DHTNode, keys, subkey, value, expiration_time):
    return await node.store_many(keys=keys, values=[value] * len(keys), expiration_time=expiration_time,
                                 subkeys=[subkey] * len(keys))


async def _get_many(dht: DHT, node: DHTNode, keys):
    # latest: ask every replica, since a fresh subkey may not be on all of them yet
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))
