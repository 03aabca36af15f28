"""The machine's floor under every hop: how long a message takes from one process's send() to another
process running again after its recv(), over TCP on 127.0.0.1 (no TLS, no event loop), when the receiver ran
a moment before and when it has been idle as long as a server is while another computes.

    python bench/wakeup.py [--idle-ms 6] [--messages 200]

On a VM an idle virtual CPU is halted, and waking it costs far more than the message itself.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle-ms", type=float, default=6.0)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if os.fork() == 0:  # the receiver: stamps the time it runs again after each message, and sends it back
        peer = socket.create_connection(("127.0.0.1", port))
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while peer.recv(1):
            peer.sendall(time.perf_counter_ns().to_bytes(8, "little"))
        os._exit(0)
    sender, _ = listener.accept()
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print("| receiver idle before each message | one-way median us | p90 us |\n|---|---|---|")
    for idle in (0.0, args.idle_ms / 1000):
        latencies = []
        for _ in range(args.messages):
            time.sleep(idle)  # (the receiver sleeps in recv() meanwhile)
            sent = time.perf_counter_ns()
            sender.sendall(b"x")
            latencies.append((int.from_bytes(sender.recv(8), "little") - sent) / 1000)
        latencies.sort()
        p90 = latencies[len(latencies) * 9 // 10]
        print(f"| {idle * 1000:.0f} ms | {statistics.median(latencies):.0f} | {p90:.0f} |")
    sender.close()
    os.wait()


if __name__ == "__main__":
    main()
