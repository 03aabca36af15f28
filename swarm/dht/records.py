"""Server records in the hivemind DHT: key ``{model_id}.{block}``, subkey = the server's peer id, value =
{"info": ServerInfo fields, "public_key": the server's libp2p key}, signed by that key (swarm.dht.validator)."""
from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import hivemind
from hivemind import DHT
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PDaemonError
from hivemind.utils import get_dht_time

from routing import ServerInfo, SwarmState
from routing.addresses import direct_address
from swarm.dht.validator import ServerRecordValidator, load_identity, parse_peer_id, public_key_bytes
from swarm.wire.protocol import PROTOCOL_VERSION, mismatch, protocol_of

if TYPE_CHECKING:
    from incentives.verification import Evidence

logger = logging.getLogger(__name__)
T = TypeVar("T")


IDENTITY_PREFIX = "cocoon-identity-"  # a temporary identity's directory
JOIN_ATTEMPTS = 3  # a first connection to a live peer on loopback failed about once in a full test run
DHT_SECONDS = 60.0  # a blocking DHT call that takes longer has failed (on loopback they take milliseconds)


class DHTStopped(RuntimeError):
    """The DHT's process is gone (a signal to the whole process group reaches it first): no call will be answered."""


def dht_call(dht: DHT, fn: Callable, timeout: float = DHT_SECONDS, get: dict | None = None):
    """``dht.run_coroutine(fn)`` (or, with ``get``, ``dht.get(**get)``), given up on after ``timeout`` seconds or as
    soon as the DHT's process has stopped: hivemind would wait for its answer for ever."""
    future = dht.get(**get, return_future=True) if get is not None else dht.run_coroutine(fn, return_future=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return future.result(timeout=0.2)
        except TimeoutError:
            if not dht.is_alive():
                raise DHTStopped("the DHT process has stopped") from None
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the DHT did not answer within {timeout:.0f} s") from None


async def replicate_p2p(dht: DHT):
    """``dht.replicate_p2p()``, bounded like dht_call: hivemind's waits for ever on a DHT process that has stopped
    (a process-group SIGTERM stops it first)."""
    from hivemind.p2p import P2P
    return await P2P.replicate(await in_dht(dht_call, dht, DHT._get_p2p_daemon_listen_maddr))


MODELS_KEY = "cocoon.models"  # the index of models: subkey = a server's peer id, value = the model it serves


def block_key(model_id: str, block: int) -> str:
    return f"{model_id}.{block}"


def make_dht(initial_peers: Sequence[str], *, client_mode: bool = False, identity_path: str | None = None,
             host_maddrs: Sequence[str] | None = None, sign: bool = False, **kwargs) -> DHT:
    """A DHT peer of the swarm: it stores and reads server records only when their server signed them. With
    ``sign`` it signs its own (an identity file holds its key: a temporary one unless ``identity_path``)."""
    temporary = identity_path is None
    if temporary:  # our own file, so that we hold the key behind our peer id (swarm.net.direct signs with it)
        identity_path = _temporary_identity()
        kwargs.setdefault("check_if_identity_free", False)  # fresh: nobody has it (the check starts another daemon)
    key = load_identity(identity_path)
    kwargs["identity_path"] = identity_path
    if host_maddrs is not None:
        kwargs["host_maddrs"] = list(host_maddrs)
    try:
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            try:
                dht = hivemind.DHT(initial_peers=list(initial_peers), client_mode=client_mode, start=True,
                                   record_validators=[ServerRecordValidator(key if sign else None)], **kwargs)
                break
            except P2PDaemonError as error:
                if not reached_no_peer(error) or attempt == JOIN_ATTEMPTS:
                    raise
                # (info, not a warning: a command's error stays one line when the last attempt fails too)
                logger.info(f"Could not reach any initial peer (attempt {attempt} of {JOIN_ATTEMPTS}); retrying")
                time.sleep(attempt)
    finally:  # the daemon has read the file once the DHT is up; a process killed later would leave it behind
        if temporary:
            shutil.rmtree(os.path.dirname(identity_path), ignore_errors=True)
    dht.private_key = key
    dht.public_key = public_key_bytes(key) if sign else None
    return dht


def reached_no_peer(error: BaseException) -> bool:
    """The p2p daemon connected to none of the initial peers (its one line for it names no reason)."""
    return isinstance(error, P2PDaemonError) and "bootstrap peers" in str(error)


def _temporary_identity() -> str:
    """A fresh identity file in a directory of its own (make_dht removes it once its daemon has read it). Those
    that processes killed while joining left behind go too: a join takes seconds, not an hour."""
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), f"{IDENTITY_PREFIX}*")):
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(stale) > 3600:
                shutil.rmtree(stale, ignore_errors=True)
    path = os.path.join(tempfile.mkdtemp(prefix=IDENTITY_PREFIX), "identity.key")
    P2P.generate_identity(path)
    return path


def announce(dht: DHT, model_id: str, peer_id: str, info: ServerInfo, expiration: float, wait: bool = True,
             num_blocks: int | None = None, timeout: float = DHT_SECONDS):
    """Store ``info`` under every block of the server's span, signed (the DHT must be ``make_dht(sign=True)``);
    with ``num_blocks``, list the model in the index of models too."""
    keys = [block_key(model_id, b) for b in range(info.start, info.end)]
    values = [{"info": info.to_wire(), "public_key": dht.public_key}] * len(keys)
    if num_blocks is not None:  # and in the index of models, where monitors find them
        keys.append(MODELS_KEY)
        values.append({"model": {"model_id": model_id, "num_blocks": num_blocks, "protocol": PROTOCOL_VERSION},
                       "public_key": dht.public_key})
    store = partial(_store_many, keys=keys, subkey=peer_id, values=values, expiration_time=get_dht_time() + expiration)
    return dht_call(dht, store, timeout) if wait else dht.run_coroutine(store, return_future=True)


def fetch_models(dht: DHT) -> dict[str, int]:
    """model id -> number of blocks, of every model some server announced (records checked like blocks'). Where
    announcers disagree on a model's block count, the count most of them give (sybils can still add models and
    outvote: readers cap what they read, and trust the servers' own block records over this index)."""
    found = dht_call(dht, partial(_get_many, keys=[MODELS_KEY])).get(MODELS_KEY)
    counts: dict[str, Counter] = {}
    for peer_id, record in (found.value.items() if found is not None and isinstance(found.value, dict) else []):
        model = record.value.get("model") if parse_peer_id(peer_id) and isinstance(record.value, dict) else None
        if isinstance(model, dict) and isinstance(model.get("model_id"), str) and len(model["model_id"]) <= 128 \
                and type(model.get("num_blocks")) is int and 0 < model["num_blocks"] <= 4096 \
                and protocol_of(model.get("protocol")) == PROTOCOL_VERSION:
            counts.setdefault(model["model_id"], Counter())[model["num_blocks"]] += 1
    return {model_id: count.most_common(1)[0][0] for model_id, count in counts.items()}


RELAYS_KEY = "cocoon.relays"  # subkey = a relay's peer id, value = where (swarm.net.relay)


def announce_relay(dht: DHT, peer_id: str, control: Sequence[str], splice: str, expiration: float) -> None:
    """Offer to relay for servers behind NAT: ``control`` = its direct addresses, ``splice`` = its relay port."""
    value = {"relay": {"control": list(control)[:4], "splice": splice, "protocol": PROTOCOL_VERSION},
             "public_key": dht.public_key}
    dht_call(dht, partial(_store_many, keys=[RELAYS_KEY], subkey=peer_id, values=[value],
                          expiration_time=get_dht_time() + expiration))


def fetch_relays(dht: DHT) -> dict[str, tuple[list[str], str]]:
    """relay peer id -> (direct addresses, relay port address), of every relay announced (and signed)."""
    found = dht_call(dht, partial(_get_many, keys=[RELAYS_KEY])).get(RELAYS_KEY)
    relays = {}
    for peer_id, record in (found.value.items() if found is not None and isinstance(found.value, dict) else []):
        relay = record.value.get("relay") if parse_peer_id(peer_id) and isinstance(record.value, dict) else None
        try:
            if protocol_of(relay.get("protocol")) != PROTOCOL_VERSION:
                continue  # a relay of another protocol cannot splice this one's handshake
            control = [direct_address(a) for a in relay["control"][:4]]
            relays[peer_id] = (control, direct_address(relay["splice"]))
        except (TypeError, KeyError, ValueError):
            continue
    return relays


def evidence_key(model_id: str) -> str:
    return f"{model_id}.evidence"


def fetch_evidence(dht: DHT, model_id: str) -> list[tuple[str, "Evidence | str", float]]:
    """(digest, evidence, expiration) of every piece of evidence published against the model's servers; anyone
    may write these, so each is parsed on its own: where it is malformed, the evidence is why (a string)."""
    from incentives.verification import Evidence  # (eth_account takes 0.5 s to import: only where evidence is read)
    found = dht_call(dht, None, get={"key": evidence_key(model_id), "latest": True})
    records = []
    for digest, item in (found.value.items() if found is not None and isinstance(found.value, dict) else []):
        try:
            records.append((str(digest), Evidence.from_wire(item.value), item.expiration_time))
        except (ValueError, TypeError, AttributeError) as e:
            records.append((str(digest), f"malformed evidence ({e})", item.expiration_time))
    return records


def fetch_swarm_state(dht: DHT, model_id: str, num_blocks: int, timeout: float = DHT_SECONDS) -> SwarmState:
    """Read every block's records; malformed or inconsistent records are skipped, not trusted."""
    keys = [block_key(model_id, b) for b in range(num_blocks)]
    return _parse_records(dht_call(dht, partial(_get_many, keys=keys), timeout), keys, num_blocks)


async def fetch_swarm_state_async(dht: DHT, model_id: str, num_blocks: int) -> SwarmState:
    """The same, awaitable from an event loop without blocking it."""
    keys = [block_key(model_id, b) for b in range(num_blocks)]
    return _parse_records(await in_dht(dht.run_coroutine, partial(_get_many, keys=keys)), keys, num_blocks)


async def in_dht(call: Callable[..., T], *args, **kwargs) -> T:
    """A blocking DHT call (``dht.run_coroutine``, ``dht.store``...) awaited from an event loop, in a thread.

    Not through hivemind's ``return_future=True``: its future remembers the loop that made it, and when the DHT's
    answer comes while no thread runs that loop, hivemind's pipe thread runs the loop itself. The client's loop
    is run by whichever thread calls generate() (swarm.client.loop): the two met in one loop and a decode step
    failed with "this event loop is already running". A daemon thread, not an executor's: a call the DHT never
    answers (it was shut down meanwhile) must not hold up the interpreter's exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():  # (the awaiting task may have been cancelled)
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            outcome = (call(*args, **kwargs), None)
        except BaseException as e:
            outcome = (None, e)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="cocoon-dht-call", daemon=True).start()
    return await future


def _parse_records(found: dict, keys: list[str], num_blocks: int) -> SwarmState:
    state = SwarmState(num_blocks)
    for block, key in enumerate(keys):
        entry = found.get(key)
        if entry is None or not isinstance(entry.value, dict):
            continue
        for peer_id, record in entry.value.items():
            if parse_peer_id(peer_id) is None:
                continue  # only records under a peer id were checked for that peer's signature
            try:
                info = ServerInfo.from_wire(record.value.get("info") if isinstance(record.value, dict) else None)
            except ValueError as e:
                logger.debug(f"skipping a record of {peer_id} under {key}: {e}")
                continue
            if not info.start <= block < info.end or info.end > num_blocks:
                continue  # a record must lie under a block its span covers
            if info.protocol != PROTOCOL_VERSION:
                _say_once(peer_id, f"not using server {peer_id}: {mismatch(info.protocol, 'it')}")
                continue
            state.servers[peer_id] = info
    return state


_said: set[str] = set()


def _say_once(peer_id: str, text: str) -> None:
    if peer_id not in _said and len(_said) < 4096:
        _said.add(peer_id)
        logger.warning(text)


async def _store_many(dht: DHT, node: DHTNode, keys, subkey, values, expiration_time):
    return await node.store_many(keys=keys, values=values, expiration_time=expiration_time,
                                 subkeys=[subkey] * len(keys))


async def _get_many(dht: DHT, node: DHTNode, keys):
    # latest: ask every replica, since a fresh subkey may not be on all of them yet
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))
