"""The relay for servers behind NAT (swarm.net.relay), in one process on loopback: a registered server is reached
through it with both peer ids proven end to end; an unregistered peer, garbage and a relay that splices to
the wrong server are refused; dial-back checks report what answers. The same over real processes behind a
real NAT: tests/test_nat.py."""
import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from swarm.net import relay
from swarm.dht.validator import peer_id_of, public_key_bytes
from swarm.net.direct import DirectServer, HandshakeError
from swarm.net.relay import RelayRegistration, RelayService


def _key():
    return rsa.generate_private_key(65537, 2048)


def _peer(key) -> str:
    return peer_id_of(public_key_bytes(key))


async def _echo(caller, reader, writer):
    writer.write(caller.peer_id.encode()[:8] + await reader.readexactly(5))
    await writer.drain()
    writer.close()


async def _relay_and_server(relay_key, server_key):
    service = RelayService(relay_key)
    control = DirectServer(relay_key, {"relay": service.handle})
    control_port, splice_port = await control.start("127.0.0.1", 0), await service.start("127.0.0.1", 0)
    server = DirectServer(server_key, {"info": _echo, "inference": _echo})
    direct_port = await server.start("127.0.0.1", 0)
    registration = RelayRegistration(_peer(relay_key), f"127.0.0.1:{control_port}", f"127.0.0.1:{splice_port}",
                                     server_key)
    await registration.open()
    return service, server, registration, f"127.0.0.1:{splice_port}", f"127.0.0.1:{direct_port}"


def test_a_registered_server_is_reached_through_the_relay_and_nothing_else_is(monkeypatch):
    relay_key, server_key, client_key, other_key = _key(), _key(), _key(), _key()

    async def main():
        service, server, registration, splice, direct_address = await _relay_and_server(relay_key, server_key)
        # reachability: the relay dials back what answers as this peer, and nothing else
        assert await registration.check([direct_address, "127.0.0.1:1"]) == [direct_address]
        with pytest.raises(HandshakeError, match="only a server that this relay could not dial back registers"):
            await registration.register(server)  # reachable: it needs no relay, and takes no slot
        with pytest.raises(HandshakeError, match="checked less than 10 s ago"):
            await registration.check(["127.0.0.1:1"])
        monkeypatch.setattr(relay, "CHECK_EVERY", 0.0)
        registration = RelayRegistration(registration.relay_peer, registration.control, registration.splice,
                                         server_key)
        await registration.open()
        assert await registration.check(["127.0.0.1:1"]) == []  # (a privileged port: not even dialled)
        await registration.register(server)
        assert list(service.registered) == [_peer(server_key)]

        reader, writer = await relay.connect(splice, _peer(server_key), "inference", client_key)
        writer.write(b"hello")
        assert await reader.read() == _peer(client_key).encode()[:8] + b"hello"  # the server knows the client

        with pytest.raises(HandshakeError, match="not registered"):
            await relay.connect(splice, _peer(other_key), "inference", client_key)
        for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"cocoon-relay/1 accept " + b"0" * 32 + b"\n", b"x" * 70000):
            r, w = await asyncio.open_connection(*splice.split(":"))
            w.write(garbage)
            assert await asyncio.wait_for(r.read(), 5) in (b"", b"error: that server is not registered here\n")
            w.close()
        # a relay that splices to another server than the one asked for is caught by the handshake
        service.registered[_peer(other_key)] = service.registered[_peer(server_key)]
        with pytest.raises(HandshakeError, match="is .*, not"):
            await relay.connect(splice, _peer(other_key), "inference", client_key)
        reader, writer = await relay.connect(splice, _peer(server_key), "inference", client_key)  # still serving
        writer.write(b"again")
        assert (await reader.read()).endswith(b"again")

        registration.close()  # the server leaves: the relay forgets it
        for _ in range(100):
            if _peer(server_key) not in service.registered:
                break
            await asyncio.sleep(0.01)
        assert _peer(server_key) not in service.registered
        service.close()
        server.close()

    asyncio.run(main())


def test_a_relay_dials_back_only_the_checking_address_and_registers_few_of_it(monkeypatch):
    """The second audit's open dialer and relay slots: a check dials only the IP address it came from (another
    listener on another address, a name or a privileged port is never dialled), and one address registers at
    most MAX_PER_IP peers, each only after its own check failed."""
    monkeypatch.setattr(relay, "CHECK_EVERY", 0.0)
    relay_key, server_key = _key(), _key()

    async def main():
        service, server, registration, splice, direct_address = await _relay_and_server(relay_key, server_key)
        elsewhere = DirectServer(server_key, {"info": _echo})  # the same peer, on another loopback address
        other_port = await elsewhere.start("127.0.0.2", 0)
        dialled = []
        honest_connect = relay.direct.connect

        async def watched(host, port, *args, **kwargs):
            dialled.append(f"{host}:{port}")
            return await honest_connect(host, port, *args, **kwargs)

        monkeypatch.setattr(relay.direct, "connect", watched)
        assert await service.dial_back(_peer(server_key), [f"127.0.0.2:{other_port}", "localhost:80", "127.0.0.1:22",
                                                           direct_address], "127.0.0.1") == [direct_address]
        assert dialled == [direct_address]
        monkeypatch.setattr(relay.direct, "connect", honest_connect)

        keys = [_key() for _ in range(relay.MAX_PER_IP + 1)]
        accepted = []
        for key in keys:
            other = RelayRegistration(registration.relay_peer, registration.control, registration.splice, key)
            await other.open()
            assert await other.check([]) == []
            try:
                await other.register(server)
                accepted.append(other)
            except HandshakeError as e:
                assert "registrations from 127.0.0.1" in str(e)
                other.close()
        assert len(accepted) == relay.MAX_PER_IP and len(service.registered) == relay.MAX_PER_IP
        for other in accepted:
            other.close()
        elsewhere.close()
        service.close()
        server.close()

    asyncio.run(main())
