"""Direct connections for the hot path: TLS over TCP between peers that can reach each other.

Every inference step through hivemind crosses two p2p daemons (a Unix socket into Go, yamux, noise, TCP,
and back out on the other side). A server also listens on a TCP port of its own (``--direct-port``) and
announces it in its signed DHT record; a client opens inference streams there when it can reach it, and
through hivemind when it cannot (behind NAT, a firewall, or ``--no-direct``): the frames and handlers are
the same, only the pipe differs.

Who is at the other end is proven as strongly as through libp2p: TLS encrypts the stream (a throwaway
self-signed certificate per server process), and both peers sign, with the key behind their peer id, the
server certificate's fingerprint and the other side's fresh nonce. A man in the middle would present its
own certificate, so neither signature would match what the other side sees; a replayed signature names an
old nonce. The server then knows the caller's peer id (its quotas and payments are per peer id) and the
client knows it reached the server of the DHT record.

The client proves itself first: a server signs (an RSA signature, a millisecond of CPU, made off its serving
loop) only for a caller that has already signed, so handshakes cost whoever starts them at least as much as the
server. A server with too many handshakes under way says it is busy, and the client goes through hivemind for
that stream only, not for the next minute.

    client -> server   hello {public_key, nonce, handler, protocol}   (another protocol: {error}; too many: {busy})
    server -> client   {nonce, protocol}
    client -> server   {signature over (b"client", fingerprint, server nonce, handler)}
    server -> client   {ok: true, public_key, signature over (b"server", fingerprint, client nonce, handler)} or
                       {error: "..."}
    client -> server   {ok: true} once the server proved to be the peer it dialled, sent with its first frame;
                       then the handler's frames (swarm.wire.framing)
"""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from hivemind.proto import crypto_pb2

from swarm.dht.validator import peer_id_of, public_key_bytes
from swarm.wire.protocol import PROTOCOL_VERSION, mismatch, protocol_of

logger = logging.getLogger(__name__)
PROTOCOL = b"cocoon-direct/1"
HELLO_BYTES = 4096          # a handshake message is a key, a nonce and a signature: well under this
HANDSHAKE_SECONDS = 10.0    # a connection that has not proven its peer id by then is closed
HELLO_SECONDS = 2.0         # ...and one that has not said hello by then
MAX_HANDSHAKES = 256        # connections still proving who they are, at once (beyond: closed at once)
MAX_HANDSHAKES_PER_IP = 16  # ...of them from one IP address, so that one flooding address leaves room for others
HANDSHAKE_RATE_PER_IP = 20.0  # new connections a second from one IP address (a burst of twice that), before TLS
CONNECT_SECONDS = 2.0       # a client gives up on a direct address after this and uses hivemind

Handler = Callable[["DirectCaller", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class HandshakeError(Exception):
    pass


class ServerBusy(HandshakeError):
    """The server has too many handshakes under way: try this stream another way, and its direct address later."""


@dataclass(frozen=True)
class DirectCaller:
    """What a stream handler learns about its caller (the same attribute as hivemind's StreamInfo)."""
    peer_id: str


# ---------------------------------------------------------------------- messages
async def send_message(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(_message_bytes(message))
    await writer.drain()


def _message_bytes(message: dict) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


async def receive_message(reader: asyncio.StreamReader) -> dict:
    length = int.from_bytes(await reader.readexactly(4), "big")
    if length > HELLO_BYTES:
        raise HandshakeError(f"a handshake message of {length} bytes")
    try:
        message = msgpack.unpackb(await reader.readexactly(length), raw=False, max_bin_len=HELLO_BYTES,
                                  max_str_len=HELLO_BYTES, max_array_len=16, max_map_len=16)
    except Exception:
        raise HandshakeError("an unreadable handshake message") from None
    if not isinstance(message, dict):
        raise HandshakeError("a handshake message must be a map")
    return message


def _field(message: dict, key: str, kind: type, max_len: int = HELLO_BYTES):
    value = message.get(key)
    if not isinstance(value, kind) or (isinstance(value, (bytes, str)) and not 0 < len(value) <= max_len):
        raise HandshakeError(f"handshake field {key!r} is missing or malformed")
    return value


def _signed(role: bytes, fingerprint: bytes, nonce: bytes, handler: str) -> bytes:
    return b"|".join([PROTOCOL, role, fingerprint, nonce, handler.encode()])


def _sign(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _verify(public_key: bytes, signature: bytes, data: bytes) -> str:
    """The peer id of ``public_key`` (a libp2p PublicKey protobuf) when it signed ``data``."""
    try:
        key = serialization.load_der_public_key(crypto_pb2.PublicKey.FromString(public_key).data)
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        raise HandshakeError("the peer's signature does not verify") from None
    return peer_id_of(public_key)


# ---------------------------------------------------------------------- TLS
def _server_context() -> tuple[ssl.SSLContext, bytes]:
    """A TLS context with a fresh self-signed certificate, and that certificate's SHA-256 fingerprint."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cocoon")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365)).sign(key, hashes.SHA256()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory() as directory:  # ssl loads certificates from files only
        path = os.path.join(directory, "cert.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        context.load_cert_chain(path)
    return context, hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # who the server is, is proven by the signed handshake, not by a CA
    context.verify_mode = ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------- server
class DirectServer:
    """Accepts direct connections and hands each, once its caller is proven, to the named stream handler."""

    def __init__(self, key: rsa.RSAPrivateKey, handlers: dict[str, Handler]):
        self.key, self.handlers = key, handlers
        self.public_key = public_key_bytes(key)
        self.context, self.fingerprint = _server_context()
        self.listener: socket.socket | None = None
        self.handshaking = 0
        self.handshaking_from: dict[str, int] = {}  # IP address -> its connections still handshaking
        self.allowance: dict[str, tuple[float, float]] = {}  # IP address -> (connections it may open, when)
        self.tasks: set[asyncio.Task] = set()  # connections being served
        self.accepting: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen, and take connections: an address over its limits is closed before TLS costs anything."""
        self.listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                             backlog=1024)
        self.listener.setblocking(False)
        self.accepting = asyncio.create_task(self._take_connections(self.listener))
        return self.listener.getsockname()[1]

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _take_connections(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except OSError as e:  # out of file descriptors, say: the flood passes, this server stays
                logger.warning(f"accepting a direct connection failed: {e}")
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            ip = str(address[0])
            if self.handshaking_from.get(ip, 0) >= MAX_HANDSHAKES_PER_IP or not self._allowed(ip):
                sock.close()  # before TLS: a flooding address costs this server next to nothing
                continue
            self._spawn(self.accept_socket(sock))

    def _allowed(self, ip: str) -> bool:
        """A token bucket per IP address: HANDSHAKE_RATE_PER_IP new connections a second."""
        now = time.monotonic()
        tokens, since = self.allowance.get(ip, (2 * HANDSHAKE_RATE_PER_IP, now))
        tokens = min(2 * HANDSHAKE_RATE_PER_IP, tokens + (now - since) * HANDSHAKE_RATE_PER_IP)
        if len(self.allowance) > 4096:  # (addresses a peer can have many of: forget the oldest)
            self.allowance = dict(list(self.allowance.items())[2048:])
        self.allowance[ip] = (tokens - 1, now) if tokens >= 1 else (tokens, now)
        return tokens >= 1

    async def accept_socket(self, sock) -> None:
        """Serve an accepted connection, or one this peer dialled out (to a relay, swarm.net.relay) as if it had
        been accepted here: this side is the TLS server, and the caller proves its peer id."""
        try:
            peername = sock.getpeername()
        except OSError:
            sock.close()
            return
        ip = str(peername[0]) if isinstance(peername, tuple) else ""
        busy = self.handshaking >= MAX_HANDSHAKES
        self.handshaking += 1
        self.handshaking_from[ip] = self.handshaking_from.get(ip, 0) + 1
        writer = None
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                reader, writer = await self._tls(sock)
                if busy:
                    writer.write(_message_bytes({"busy": True}))
                    writer.close()
                    return
                caller, handler = await self._handshake(reader, writer)
        except (HandshakeError, TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError,
                ssl.SSLError) as e:
            logger.debug(f"direct connection refused: {e}")
            if writer is not None:
                writer.close()
            else:
                sock.close()
            return
        finally:
            self.handshaking -= 1
            self.handshaking_from[ip] -= 1
            if not self.handshaking_from[ip]:
                del self.handshaking_from[ip]
        await handler(caller, reader, writer)

    async def _tls(self, sock) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2**20)
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=sock, ssl=self.context,
                                                          ssl_handshake_timeout=HANDSHAKE_SECONDS)
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        async with asyncio.timeout(HELLO_SECONDS):
            hello = await receive_message(reader)
        theirs = protocol_of(hello.get("protocol"))
        if theirs != PROTOCOL_VERSION:
            await send_message(writer, {"error": mismatch(theirs, "the client"), "protocol": PROTOCOL_VERSION})
            raise HandshakeError(mismatch(theirs, "a client"))
        name = _field(hello, "handler", str, 64)
        client_key, client_nonce = _field(hello, "public_key", bytes), _field(hello, "nonce", bytes, 64)
        nonce = os.urandom(32)
        await send_message(writer, {"nonce": nonce, "protocol": PROTOCOL_VERSION})
        proof = await receive_message(reader)
        peer_id = _verify(client_key, _field(proof, "signature", bytes),
                          _signed(b"client", self.fingerprint, nonce, name))
        if name not in self.handlers:
            await send_message(writer, {"error": f"no handler {name!r} here"})
            raise HandshakeError(f"unknown handler {name!r}")
        signature = await asyncio.to_thread(_sign, self.key, _signed(b"server", self.fingerprint, client_nonce, name))
        await send_message(writer, {"ok": True, "public_key": self.public_key, "signature": signature})
        if (await receive_message(reader)).get("ok") is not True:  # the client found us to be whom it dialled
            raise HandshakeError("the client did not confirm the server's proof")
        return DirectCaller(peer_id), self.handlers[name]

    def close(self) -> None:
        if self.accepting is not None:
            self.accepting.cancel()
        if self.listener is not None:
            self.listener.close()


# ---------------------------------------------------------------------- client
async def connect(host: str, port: int, peer_id: str, handler: str,
                  key: rsa.RSAPrivateKey) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``handler`` of the server ``peer_id`` at host:port, once it proved to be that peer."""
    async with asyncio.timeout(CONNECT_SECONDS + HANDSHAKE_SECONDS):
        async with asyncio.timeout(CONNECT_SECONDS):
            reader, writer = await asyncio.open_connection(host, port, ssl=client_context(), server_hostname="cocoon",
                                                           limit=2**20)
        await prove(reader, writer, f"{host}:{port}", peer_id, handler, key)
    return reader, writer


async def prove(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str, peer_id: str, handler: str,
                key: rsa.RSAPrivateKey) -> None:
    """The client's side of the handshake on a TLS stream (closed when it fails)."""
    try:
        certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        fingerprint = hashlib.sha256(certificate).digest()
        nonce = os.urandom(32)
        await send_message(writer, {"public_key": public_key_bytes(key), "nonce": nonce, "handler": handler,
                                    "protocol": PROTOCOL_VERSION})
        reply = await receive_message(reader)
        if reply.get("busy") is True:
            raise ServerBusy(f"{peer_id} at {where} has too many handshakes under way")
        theirs = protocol_of(reply.get("protocol"))
        if theirs != PROTOCOL_VERSION:
            raise HandshakeError(mismatch(theirs, f"server {peer_id} at {where}"))
        await send_message(writer, {"signature": _sign(key, _signed(b"client", fingerprint,
                                                                    _field(reply, "nonce", bytes, 64), handler))})
        verdict = await receive_message(reader)
        if verdict.get("ok") is not True:
            raise HandshakeError(f"{peer_id} refused: {str(verdict.get('error'))[:200]}")
        server = _verify(_field(verdict, "public_key", bytes), _field(verdict, "signature", bytes),
                         _signed(b"server", fingerprint, nonce, handler))
        if server != peer_id:
            raise HandshakeError(f"{where} is {server}, not {peer_id}")
        writer.write(_message_bytes({"ok": True}))  # (goes out with the first frame: no round trip more)
    except BaseException:
        writer.close()
        raise
