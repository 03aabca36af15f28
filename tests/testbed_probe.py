"""Run inside a testbed host: a TCP echo or sink, and round trips or transfers timed from inside, as JSON.

    python tests/testbed_probe.py echo PORT | sink PORT | ping HOST PORT COUNT | send HOST PORT BYTES | dial HOST PORT
"""
import json
import socket
import sys
import time


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve(port: int, echo: bool) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        with _nodelay(conn):
            while data := conn.recv(1 << 16):
                if echo:
                    conn.sendall(data)
            if not echo:
                conn.sendall(b"k")  # everything arrived


def ping(host: str, port: int, count: int) -> list[float]:
    with _nodelay(socket.create_connection((host, port), timeout=10)) as conn:
        rtts = []
        for _ in range(count):
            start = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(1)
            rtts.append(time.perf_counter() - start)
    return rtts


def send(host: str, port: int, size: int) -> float:
    with _nodelay(socket.create_connection((host, port), timeout=10)) as conn:
        start = time.perf_counter()
        conn.sendall(bytes(size))
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        return time.perf_counter() - start


def dial(host: str, port: int) -> str:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return "connected"
    except OSError as e:
        return type(e).__name__


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command in ("echo", "sink"):
        serve(int(rest[0]), command == "echo")
    else:
        host, port, *more = rest
        result = {"ping": lambda: ping(host, int(port), int(more[0])), "send": lambda: send(host, int(port), int(more[0])),
                  "dial": lambda: dial(host, int(port))}[command]()
        print(json.dumps(result), flush=True)
