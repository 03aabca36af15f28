"""Peers of another protocol version (swarm.wire.protocol) are refused with a message naming both versions, never
met with a parse error: in a request, in the hello of a direct connection, and in the DHT records a client
reads (real DHT peers, a real TLS server on loopback)."""
import asyncio
import ssl

import pytest
import torch

from routing import ServerInfo, ServerState
from swarm.client.failover import Verdict, judge
from swarm.dht.records import announce, fetch_swarm_state, make_dht
from swarm.dht.validator import public_key_bytes
from swarm.net.direct import DirectServer, receive_message, send_message
from swarm.wire.codes import ErrorCode, RemoteError, WireError
from swarm.wire.fields import pack_metadata, unpack_metadata
from swarm.wire.limits import Limits
from swarm.wire.protocol import PROTOCOL_VERSION
from swarm.wire.requests import Bounds, InferenceStep, SpanRequest

BOUNDS = Bounds(Limits(), 8, 0, 2, 64)


def _with_protocol(step: SpanRequest, protocol) -> SpanRequest:
    message = step.pack()
    meta = unpack_metadata(message.metadata)
    if protocol is None:
        del meta["protocol"]
    else:
        meta["protocol"] = protocol
    message.metadata = pack_metadata(meta)
    return message


@pytest.mark.parametrize("protocol, said", [(None, 1), (1, 1), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 1),
                                            ("2", -1)])
def test_a_request_of_another_protocol_is_refused_naming_both_versions(protocol, said):
    step = InferenceStep(torch.randn(1, 2, 8), 0, 2, max_length=4)
    assert InferenceStep.parse(step.pack(), BOUNDS).max_length == 4
    with pytest.raises(WireError) as refused:
        InferenceStep.parse(_with_protocol(step, protocol), BOUNDS)
    assert refused.value.code == ErrorCode.VERSION_MISMATCH
    assert f"protocol {said} and this peer speaks {PROTOCOL_VERSION}" in refused.value.message
    # the client skips such a server for the request and bans nobody
    assert judge(RemoteError(refused.value.code, refused.value.message, "peer")) is Verdict.SKIP


def test_a_direct_connection_of_another_protocol_is_refused_naming_both_versions():
    from cryptography.hazmat.primitives.asymmetric import rsa
    key, client_key = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    reached = []

    async def handler(caller, reader, writer):
        reached.append(caller.peer_id)
        writer.close()

    async def main():
        server = DirectServer(key, {"inference": handler})
        port = await server.start("127.0.0.1", 0)
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            for hello in ({}, {"protocol": 1}, {"protocol": PROTOCOL_VERSION + 1}):  # an older or newer client
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                await send_message(writer, {"public_key": public_key_bytes(client_key), "nonce": b"n" * 32,
                                            "handler": "inference", **hello})
                reply = await receive_message(reader)
                said = hello.get("protocol", 1)
                assert f"protocol {said} and this peer speaks {PROTOCOL_VERSION}" in reply["error"]
                assert await reader.read() == b""  # and it hangs up
                writer.close()
        finally:
            server.close()

    asyncio.run(main())
    assert reached == []


def test_dht_records_of_another_protocol_are_not_used():
    """Servers of protocol 1 and of a later protocol announce real, signed records; a client of this version
    reads only its own version's servers. A record that says no version is of protocol 1."""
    unsaid = {k: v for k, v in ServerInfo(ServerState.ONLINE, 0, 2, 10.0).to_wire().items() if k != "protocol"}
    assert ServerInfo.from_wire(unsaid).protocol == 1
    dht = make_dht([])
    peers = [make_dht(dht.get_visible_maddrs(), sign=True) for _ in range(3)]
    try:
        for peer, protocol in zip(peers, (PROTOCOL_VERSION, 1, PROTOCOL_VERSION + 1)):
            info = ServerInfo(ServerState.ONLINE, 0, 2, 10.0, protocol=protocol)
            announce(peer, "m", str(peer.peer_id), info, expiration=60)
        state = fetch_swarm_state(peers[0], "m", 2)
        assert list(state.servers) == [str(peers[0].peer_id)]
    finally:
        for peer in (*peers, dht):
            peer.shutdown()
