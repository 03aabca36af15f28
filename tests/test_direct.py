"""Direct TLS connections for the hot path (swarm.net.direct): used when a server offers one, proven to reach the
peer id of the record on both sides, refused to impostors and garbage, and hivemind when they fail."""
import asyncio
import os
import socket
import ssl

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from transformers import AutoModelForCausalLM

from swarm import AutoDistributedModelForCausalLM
from swarm.net.direct import DirectServer, HandshakeError, connect
from swarm.dht.validator import peer_id_of, public_key_bytes
from swarm.apps.local_swarm import LocalSwarm


def _key():
    return rsa.generate_private_key(65537, 2048)


def _peer(key) -> str:
    return peer_id_of(public_key_bytes(key))


def test_handshake_proves_both_peer_ids_and_refuses_impostors_and_garbage():
    server_key, client_key, other_key = _key(), _key(), _key()
    callers = []

    async def echo(caller, reader, writer):
        callers.append(caller.peer_id)
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    async def main():
        server = DirectServer(server_key, {"inference": echo})
        port = await server.start("127.0.0.1", 0)
        reader, writer = await connect("127.0.0.1", port, _peer(server_key), "inference", client_key)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        with pytest.raises(HandshakeError, match="not"):  # the address of another peer than the record says
            await connect("127.0.0.1", port, _peer(other_key), "inference", client_key)
        with pytest.raises(HandshakeError, match="refused"):
            await connect("127.0.0.1", port, _peer(server_key), "no-such-handler", client_key)
        # garbage: plain bytes instead of TLS, a TLS peer that claims a 1 GiB hello, one that never speaks
        plain = socket.create_connection(("127.0.0.1", port))
        plain.sendall(os.urandom(4096))
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_insecure(), server_hostname="x")
        w.write((1 << 30).to_bytes(4, "big"))
        await w.drain()
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed by the server
        silent = await asyncio.open_connection("127.0.0.1", port, ssl=_insecure(), server_hostname="x")
        for _ in range(100):  # the server has accepted it and waits for its hello (within HANDSHAKE_SECONDS)
            if server.handshaking == 1:
                break
            await asyncio.sleep(0.01)
        assert server.handshaking == 1
        reader, writer = await connect("127.0.0.1", port, _peer(server_key), "inference", client_key)
        writer.write(b"again")  # everyone else is still served
        assert await reader.readexactly(5) == b"again"
        plain.close()
        silent[1].close()
        server.close()

    asyncio.run(main())
    assert callers == [_peer(client_key)] * 2  # the handler learns the proven caller


def _insecure() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


@pytest.mark.slow
def test_generate_uses_direct_connections_and_falls_back_to_hivemind(checkpoints):
    """server0 offers a direct connection; server1 announces server0's direct address as its own (an
    impostor's record, or a stale one): the client's handshake with it fails, and it is reached through
    hivemind. Greedy tokens equal transformers either way."""
    path = checkpoints("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    with LocalSwarm(path, [(0, 2)]) as swarm:
        from shards import Checkpoint
        from swarm.client.swarm_client import SwarmClient
        watcher = SwarmClient(swarm.initial_peers, Checkpoint(path).model_id, 4)
        address = watcher.swarm_state(refresh=True).servers[swarm.servers[0].peer_id].direct[0]
        watcher.shutdown()
        impostor = swarm.add_server((2, 4), module="tests.malicious_server",
                                    env={"COCOON_MISCHIEF": "none", "COCOON_DIRECT_ADDRESS": address})
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=True)
        with model.inference_session(max_length=16) as session:
            output = model.generate(ids, max_new_tokens=6, do_sample=False)
            assert [s.stream.via for s in session._sessions] == ["direct", "hivemind"]
        assert torch.equal(output, local.generate(ids, max_new_tokens=6, do_sample=False))
        assert impostor.peer_id in {peer for peer, _ in model.swarm.connector.failed}
        assert not model.swarm.bans.is_banned(impostor.peer_id)
        model.shutdown()


def test_the_client_proves_itself_before_the_server_signs_anything_and_a_busy_server_says_so():
    """A caller that proves nothing gets no signature (an RSA signature costs the server a millisecond of CPU);
    a server with too many handshakes under way answers 'busy', which the client tells from a failure."""
    from swarm.dht.validator import public_key_bytes
    from swarm.net import direct
    from swarm.net.direct import ServerBusy, receive_message, send_message
    from swarm.wire.protocol import PROTOCOL_VERSION
    server_key, client_key = _key(), _key()

    async def main():
        server = DirectServer(server_key, {"inference": lambda caller, reader, writer: writer.close()})
        port = await server.start("127.0.0.1", 0)
        signed = []
        honest_sign = direct._sign
        direct._sign = lambda key, data: signed.append(data) or honest_sign(key, data)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_insecure(), server_hostname="x")
            await send_message(w, {"public_key": public_key_bytes(client_key), "nonce": b"n" * 32,
                                   "handler": "inference", "protocol": PROTOCOL_VERSION})
            reply = await receive_message(r)
            assert set(reply) == {"nonce", "protocol"}  # no signature, no key: nothing that cost the server
            await send_message(w, {"signature": b"\0" * 256})  # a proof that does not verify
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert signed == []
            server.handshaking = direct.MAX_HANDSHAKES  # as under a flood of silent connections
            with pytest.raises(ServerBusy):
                await connect("127.0.0.1", port, _peer(server_key), "inference", client_key)
            server.handshaking = 0
            reader, writer = await connect("127.0.0.1", port, _peer(server_key), "inference", client_key)
            writer.close()
            assert len(signed) == 2  # the client's proof and the server's, for the one caller that proved itself
        finally:
            direct._sign = honest_sign
            server.close()

    asyncio.run(main())
