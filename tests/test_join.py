"""Joining the swarm: a first connection to the initial peers that fails is tried again."""
import logging
import os
import socket
import tempfile
import threading
import time

from hivemind.p2p import P2P, PeerID

from swarm.dht.records import IDENTITY_PREFIX, make_dht


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_join_that_fails_is_retried_until_the_initial_peer_answers(tmp_path):
    """The initial peer comes up only after the first attempt failed (as when a loaded machine delays a first
    connection): the join succeeds on a later attempt, connected to that peer."""
    identity = str(tmp_path / "boot.key")
    P2P.generate_identity(identity)
    with open(identity, "rb") as file:
        boot_id = PeerID.from_identity(file.read())
    port = free_port()
    boot: list = []

    def start_boot():
        boot.append(make_dht([], identity_path=identity, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"]))

    class StartBootOnFirstFailure(logging.Handler):
        def emit(self, record):
            if "Could not reach any initial peer" in record.getMessage() and starter.ident is None:
                starter.start()

    starter = threading.Thread(target=start_boot)
    handler = StartBootOnFirstFailure(level=logging.INFO)
    records_logger = logging.getLogger("swarm.dht.records")
    records_logger.addHandler(handler)
    level = records_logger.level
    records_logger.setLevel(logging.INFO)  # the retry is logged at INFO
    try:
        dht = make_dht([f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_id}"], client_mode=True)
    finally:
        records_logger.removeHandler(handler)
        records_logger.setLevel(level)
        starter.join(30)
    try:
        assert starter.ident is not None, "the first attempt did not fail"
        peers = dht.run_coroutine(_connected_peers)
        assert boot_id in peers
    finally:
        dht.shutdown()
        for peer in boot:
            peer.shutdown()


async def _connected_peers(_dht, node) -> set:
    return {info.peer_id for info in await node.protocol.p2p.list_peers()}


def test_a_join_removes_identity_files_left_by_killed_processes():
    """A process killed while it joins (SIGKILL runs no cleanup) leaves its temporary identity behind: the next
    join removes those older than an hour, and leaves a recent one, which may be a join under way."""
    stale, recent = (tempfile.mkdtemp(prefix=IDENTITY_PREFIX) for _ in range(2))
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    dht = make_dht([])
    try:
        assert not os.path.exists(stale) and os.path.isdir(recent)
    finally:
        dht.shutdown()
        os.rmdir(recent)
