"""Relays for servers that nobody can dial (behind a home router's NAT), and the reachability check.

A reachable peer (a `cocoon dht` node, a server that others can dial) runs a RelayService: a handler
``relay`` on its direct connections, and a plain TCP port for relayed streams, both announced in the DHT
(swarm.dht.records.announce_relay). A server behind NAT dials out to a relay and keeps that connection:

    server -> relay   (direct connection to "relay", its peer id proven by the handshake)
                      {check: [host:port, ...]}  -> {reachable: [...]}   the relay dials back each address
                      {register: true}           -> {registered: true}, then {incoming: token} per client
                      {alive: true}              every KEEPALIVE_SECONDS while registered
    client -> relay   plain TCP: "cocoon-relay/1 connect <server peer id>\\n"
    relay -> server   {incoming: token} on the registration
    server -> relay   plain TCP: "cocoon-relay/1 accept <token>\\n"
    relay             splices the two TCP connections; "ok\\n" to the client

The client and the server then run the direct-connection handshake (swarm.net.direct) through the splice: TLS
from end to end, each proving its peer id, so the relay sees ciphertext only and cannot pose as the server.

A relay cannot be turned on anyone: it dials back only the IP address the check came from, at unprivileged ports,
at most once per CHECK_EVERY seconds per peer and CHECKS_PER_MINUTE per IP. It registers only peers whose own
check here found no address reachable, at most MAX_PER_IP per IP address, drops a registration silent for
IDLE_SECONDS, and when full makes room by closing the oldest registration of the address holding the most.

libp2p's circuit relays are on too (hivemind's use_auto_relay), for the hivemind fallback; but go-libp2p's
autorelay reserves a slot only after a boot delay of about 3 minutes when it knows fewer than 4 relays, and
its relayed addresses are not announced in a way hivemind's clients find, so the hot path uses this one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import ipaddress
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa

from routing.addresses import split_address

from swarm.net import direct
from swarm.net.direct import DirectCaller, DirectServer, HandshakeError, receive_message, send_message

logger = logging.getLogger(__name__)
PROTOCOL = "cocoon-relay/1"
DIAL_BACK_SECONDS = 10.0  # a server has this long to dial back for a client
CHECK_SECONDS = 4.0       # to reach one address when checking reachability
MAX_CHECKED = 4           # addresses checked per request
MAX_REGISTERED = 256      # servers relayed at once
MAX_WAITING = 256         # client connections waiting for their server to dial back
CHECK_EVERY = 10.0        # seconds between two checks of one peer
CHECKS_PER_MINUTE = 30    # checks from one IP address
FAILED_CHECK_SECONDS = 600.0  # a peer whose check here failed this recently may register
MAX_PER_IP = 4            # registrations from one IP address
IDLE_SECONDS = 90.0       # a registration silent this long is dropped
KEEPALIVE_SECONDS = 30.0  # how often a registered server says it is alive
RELAYED_CONNECT_SECONDS = 6.0  # a client's whole relayed connect: to the relay, the server's dial-back, the proofs
MAX_TRACKED = 4096        # peers and addresses whose checks are remembered


@dataclass
class _Registration:
    writer: asyncio.StreamWriter
    ip: str
    since: float = field(default_factory=time.monotonic)


def _peer_ip(writer: asyncio.StreamWriter) -> str:
    peername = writer.get_extra_info("peername")
    return str(peername[0]) if peername else ""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


class RelayService:
    """Relays streams to servers that registered with it, and dials back addresses for reachability checks."""

    def __init__(self, key: rsa.RSAPrivateKey):
        self.key = key
        self.registered: dict[str, _Registration] = {}  # server peer id -> its registration
        self.checked: dict[str, tuple[float, bool]] = {}  # peer id -> (when it was last checked, whether it failed)
        self.checks: dict[str, deque] = {}  # IP address -> when its latest checks were asked
        self.waiting: dict[str, asyncio.Future] = {}  # token -> the server's dialled-back connection
        self.server: asyncio.Server | None = None
        self.control: list[str] = []  # where servers register (the direct addresses of this peer)
        self.splice = ""               # where clients connect ("ip:port" of start()'s port)

    async def start(self, host: str, port: int = 0) -> int:
        """Listen for relayed streams; returns the port."""
        self.server = await asyncio.start_server(self._splice, host, port, limit=2**16)
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    # -------------------------------------------------------------- registrations (a direct-connection handler)
    async def handle(self, caller: DirectCaller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, ip = caller.peer_id, _peer_ip(writer)
        try:
            while True:
                async with asyncio.timeout(IDLE_SECONDS):
                    message = await receive_message(reader)
                if "check" in message:
                    addresses = message["check"]
                    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                        break
                    refusal = self._check_refusal(peer, ip)
                    if refusal:
                        await send_message(writer, {"error": refusal})
                        continue
                    reachable = await self.dial_back(peer, addresses[:MAX_CHECKED], ip)
                    self.checked[peer] = (time.monotonic(), not reachable)
                    await send_message(writer, {"reachable": reachable})
                elif message.get("register") is True:
                    refusal = self._register(peer, ip, writer)
                    await send_message(writer, {"error": refusal} if refusal else {"registered": True})
                elif message.get("alive") is not True:
                    break
        except (HandshakeError, asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            registration = self.registered.get(peer)
            if registration is not None and registration.writer is writer:
                del self.registered[peer]
            writer.close()

    def _check_refusal(self, peer: str, ip: str) -> str:
        """Why a check is refused now ("" when it is not): checks are rate-limited per peer and per IP."""
        now = time.monotonic()
        if now - self.checked.get(peer, (-1e9, False))[0] < CHECK_EVERY:
            return f"checked less than {CHECK_EVERY:.0f} s ago: try again later"
        recent = self.checks.setdefault(ip, deque())
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= CHECKS_PER_MINUTE:
            return f"{CHECKS_PER_MINUTE} checks a minute from {ip}: try again later"
        recent.append(now)
        for table in (self.checked, self.checks):  # (peer ids are free to make: forget the oldest)
            while len(table) > MAX_TRACKED:
                del table[next(iter(table))]
        return ""

    def _register(self, peer: str, ip: str, writer: asyncio.StreamWriter) -> str:
        """Register ``peer`` for relaying, or say why not."""
        when, failed = self.checked.get(peer, (-1e9, False))
        if not failed or time.monotonic() - when > FAILED_CHECK_SECONDS:
            return "only a server that this relay could not dial back registers: ask for a check first"
        previous = self.registered.get(peer)
        if previous is not None and previous.writer is not writer:
            previous.writer.close()  # the same peer again, on a new connection: that one wins
            del self.registered[peer]
        if peer not in self.registered:
            if sum(r.ip == ip for r in self.registered.values()) >= MAX_PER_IP:
                return f"this relay takes {MAX_PER_IP} registrations from {ip}: try another relay"
            if len(self.registered) >= MAX_REGISTERED:
                self._evict()
        self.registered[peer] = _Registration(writer, ip)
        return ""

    def _evict(self) -> None:
        """Room for one more: the oldest registration of the IP address that holds the most."""
        counts: dict[str, int] = {}
        for registration in self.registered.values():
            counts[registration.ip] = counts.get(registration.ip, 0) + 1
        crowded = max(counts, key=counts.get)
        peer = min((p for p, r in self.registered.items() if r.ip == crowded), key=lambda p: self.registered[p].since)
        self.registered.pop(peer).writer.close()

    async def dial_back(self, peer_id: str, addresses: list[str], ip: str) -> list[str]:
        """The addresses at which ``peer_id`` answers a direct connection (its handshake proves it is that peer).
        Only addresses at ``ip``, the address the check came from, and at unprivileged ports are dialled."""
        async def works(address: str) -> bool:
            try:
                host, port = split_address(address)
                if port < 1024 or not ip or ipaddress.ip_address(host) != ipaddress.ip_address(ip):
                    return False
                async with asyncio.timeout(CHECK_SECONDS):
                    _, writer = await direct.connect(host, port, peer_id, "info", self.key)
                writer.close()
                return True
            except (OSError, ValueError, TimeoutError, HandshakeError, asyncio.IncompleteReadError):
                return False

        results = await asyncio.gather(*(works(a) for a in addresses))
        return [a for a, ok in zip(addresses, results) if ok]

    # -------------------------------------------------------------- relayed streams (plain TCP)
    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(DIAL_BACK_SECONDS):
                words = (await reader.readuntil(b"\n")).decode(errors="replace").split()
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.close()
            return
        if len(words) == 3 and words[:2] == [PROTOCOL, "accept"]:
            future = self.waiting.pop(words[2], None)
            if future is not None and not future.done():
                future.set_result((reader, writer))  # the client's side splices it
            else:
                writer.close()
            return
        if len(words) != 3 or words[:2] != [PROTOCOL, "connect"]:
            writer.close()
            return
        registration = self.registered.get(words[2])
        registration = registration.writer if registration is not None else None
        if registration is None or len(self.waiting) >= MAX_WAITING:
            writer.write(b"error: that server is not registered here\n" if registration is None else b"error: busy\n")
            writer.close()
            return
        token = os.urandom(16).hex()
        self.waiting[token] = future = asyncio.get_running_loop().create_future()
        try:
            await send_message(registration, {"incoming": token})
            async with asyncio.timeout(DIAL_BACK_SECONDS):
                server_reader, server_writer = await future
        except (TimeoutError, ConnectionError):
            writer.write(b"error: the server did not dial back\n")
            writer.close()
            return
        finally:
            self.waiting.pop(token, None)
        writer.write(b"ok\n")
        await asyncio.gather(_pump(reader, server_writer), _pump(server_reader, writer))


class RelayRegistration:
    """A server's connection to one relay: reachability checks, then (when it needs one) relaying."""

    def __init__(self, relay_peer: str, control: str, splice: str, key: rsa.RSAPrivateKey):
        self.relay_peer, self.control, self.splice, self.key = relay_peer, control, splice, key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.keepalive: asyncio.Task | None = None

    async def open(self) -> None:
        host, port = split_address(self.control)
        self.reader, self.writer = await direct.connect(host, port, self.relay_peer, "relay", self.key)

    async def check(self, addresses: list[str]) -> list[str]:
        """The addresses at which the relay could reach this server directly."""
        await send_message(self.writer, {"check": list(addresses)[:MAX_CHECKED]})
        async with asyncio.timeout(CHECK_SECONDS * 2):
            reply = await receive_message(self.reader)
        if "error" in reply:  # refused (rate-limited): no answer, not a vote that nobody can dial us
            raise HandshakeError(f"the relay refused the check: {str(reply['error'])[:200]}")
        reachable = reply.get("reachable")
        return [a for a in reachable if isinstance(a, str)] if isinstance(reachable, list) else []

    async def register(self, direct_server: DirectServer) -> None:
        """Be reachable through this relay: each client that connects there is dialled back and served."""
        await send_message(self.writer, {"register": True})
        reply = await receive_message(self.reader)
        if reply.get("registered") is not True:
            raise HandshakeError(f"the relay refused: {str(reply.get('error'))[:200]}")
        self.task = asyncio.create_task(self._serve(direct_server))
        self.keepalive = asyncio.create_task(self._keep_alive())

    async def _keep_alive(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await asyncio.sleep(KEEPALIVE_SECONDS)
                await send_message(self.writer, {"alive": True})

    async def _serve(self, direct_server: DirectServer) -> None:
        try:
            while True:
                token = (await receive_message(self.reader)).get("incoming")
                if isinstance(token, str) and len(token) == 32:
                    asyncio.create_task(self._dial_back(token, direct_server))
        except (HandshakeError, asyncio.IncompleteReadError, ConnectionError) as e:
            logger.warning(f"the relay {self.relay_peer} closed its connection ({e}): clients cannot reach this "
                           f"server through it any more")

    async def _dial_back(self, token: str, direct_server: DirectServer) -> None:
        host, port = split_address(self.splice)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(DIAL_BACK_SECONDS):
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(sock, f"{PROTOCOL} accept {token}\n".encode())
        except (OSError, TimeoutError) as e:
            logger.debug(f"could not dial the relay back: {e}")
            sock.close()
            return
        await direct_server.accept_socket(sock)

    def close(self) -> None:
        for task in (self.task, self.keepalive):
            if task is not None:
                task.cancel()
        if self.writer is not None:
            self.writer.close()


async def connect(splice: str, peer_id: str, handler: str, key: rsa.RSAPrivateKey
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to ``handler`` of the server ``peer_id`` through the relay at ``splice``."""
    host, port = split_address(splice)
    async with asyncio.timeout(RELAYED_CONNECT_SECONDS):  # a relay that stalls costs seconds, not the sum of timeouts
        reader, writer = await asyncio.open_connection(host, port, limit=2**20)
        try:
            writer.write(f"{PROTOCOL} connect {peer_id}\n".encode())
            line = await reader.readuntil(b"\n")
            if line != b"ok\n":
                raise HandshakeError(f"relay {splice}: {line.decode(errors='replace').strip()[:200]}")
            await writer.start_tls(direct.client_context(), server_hostname="cocoon")
        except BaseException:
            writer.close()
            raise
        await direct.prove(reader, writer, f"relay {splice}", peer_id, handler, key)
    return reader, writer


async def start_standalone(dht, host: str, port: int) -> RelayService:
    """The relay of a `cocoon dht` peer: a direct port with the ``relay`` handler only, and a relay port."""
    service = RelayService(dht.private_key)
    control = DirectServer(dht.private_key, {"relay": service.handle})
    control_port, splice_port = await control.start(host, 0), await service.start(host, port)
    hosts = [host] if host not in ("0.0.0.0", "::") else sorted({
        str(m).split("/")[2] for m in dht.get_visible_maddrs() if str(m).startswith("/ip4/")})
    service.control = [f"{h}:{control_port}" for h in hosts[:4]]
    service.splice = f"{hosts[0]}:{splice_port}"
    return service


async def announce_forever(dht, service: RelayService, period: float = 60.0) -> None:
    """Announce the relay every ``period`` seconds (its caller announced it once already)."""
    from swarm.dht.records import announce_relay
    while True:
        await asyncio.sleep(period)
        announce_relay(dht, str(dht.peer_id), service.control, service.splice, 3 * period)
