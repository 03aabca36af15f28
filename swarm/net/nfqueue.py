"""Hold every packet a network namespace sends for D ms: a one-way delay where the kernel has no netem.

    ip netns exec HOST python -m swarm.net.nfqueue --queue 1 --delay-ms 25

An iptables rule sends packets to queue 1 (the testbed sends all that a host sends out of its link:
``iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 1``). The kernel keeps each packet and tells this
process its id; D ms after it arrived, this process accepts it. Packets leave in order: one batch verdict
accepts every packet up to an id. Only metadata crosses to user space, never the payload.

Standard library only: the netlink messages of linux/netfilter/nfnetlink_queue.h, written by hand.
"""
from __future__ import annotations

import argparse
import collections
import errno
import os
import select
import signal
import socket
import struct
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
MSG_PACKET, MSG_CONFIG, MSG_VERDICT_BATCH = 0, 2, 3
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
ATTR_PACKET_HDR, ATTR_VERDICT_HDR = 1, 2
CFG_CMD, CFG_PARAMS, CFG_QUEUE_MAXLEN, CFG_MASK, CFG_FLAGS = 1, 2, 3, 4, 5
CMD_BIND, COPY_META, F_GSO, NF_ACCEPT = 1, 1, 4, 1
QUEUE_MAX = 1 << 16  # packets the kernel holds for us; TCP's window keeps a host far below this


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attributes: list[bytes], flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", queue) + b"".join(attributes)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0) + body


def _messages(data: bytes):
    """(type, payload after the netlink header) of each message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            return
        yield kind, data[offset + 16:offset + length]
        offset += (length + 3) & ~3


def _packet_id(payload: bytes) -> int | None:
    offset = 4  # nfgenmsg
    while offset + 4 <= len(payload):
        length, kind = struct.unpack_from("=HH", payload, offset)
        if length < 4:
            return None
        if kind & 0x7FFF == ATTR_PACKET_HDR:
            return struct.unpack_from(">I", payload, offset + 4)[0]
        offset += (length + 3) & ~3
    return None


class PacketDelay:
    """A bound netfilter queue whose packets are accepted ``delay`` seconds after they were queued."""

    def __init__(self, queue: int, delay: float):
        self.queue, self.delay = queue, delay
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: root may exceed rmem_max
        self._configure([_attribute(CFG_CMD, struct.pack("=BBH", CMD_BIND, 0, socket.htons(socket.AF_INET)))])
        self._configure([_attribute(CFG_PARAMS, struct.pack(">IB", 0, COPY_META)),
                         _attribute(CFG_QUEUE_MAXLEN, struct.pack(">I", QUEUE_MAX)),
                         _attribute(CFG_FLAGS, struct.pack(">I", F_GSO)), _attribute(CFG_MASK, struct.pack(">I", F_GSO))])
        self.pending: collections.deque[tuple[float, int]] = collections.deque()

    def _configure(self, attributes: list[bytes]) -> None:
        self.sock.send(_message(MSG_CONFIG, self.queue, attributes, NLM_F_REQUEST | NLM_F_ACK))
        for kind, payload in _messages(self.sock.recv(65536)):
            if kind == NLMSG_ERROR and (code := struct.unpack_from("=i", payload)[0]) != 0:
                raise OSError(-code, f"configuring netfilter queue {self.queue}: {os.strerror(-code)}")

    def _receive(self) -> None:
        now = time.monotonic()
        while True:
            try:
                data = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: notices lost; a later batch verdict accepts those packets too
                if e.errno != errno.ENOBUFS:
                    raise
                continue
            for kind, payload in _messages(data):
                if kind == (NFNL_SUBSYS_QUEUE << 8) | MSG_PACKET and (packet := _packet_id(payload)) is not None:
                    self.pending.append((now + self.delay, packet))

    def _release(self) -> None:
        now, last = time.monotonic(), None
        while self.pending and self.pending[0][0] <= now:
            last = self.pending.popleft()[1]
        if last is not None:
            verdict = _attribute(ATTR_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, last))
            self.sock.send(_message(MSG_VERDICT_BATCH, self.queue, [verdict]))

    def run(self) -> None:
        while True:
            timeout = max(0.0, self.pending[0][0] - time.monotonic()) if self.pending else None
            if select.select([self.sock], [], [], timeout)[0]:
                self._receive()
            self._release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=1, help="the netfilter queue number of the iptables rule")
    parser.add_argument("--delay-ms", type=float, required=True, help="how long each packet waits")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    delay = PacketDelay(args.queue, args.delay_ms / 1000)
    print(f"delay ready: queue {args.queue}, {args.delay_ms:g} ms", flush=True)
    delay.run()


if __name__ == "__main__":
    main()
