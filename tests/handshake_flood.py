"""The second audit's handshake floods, run by the tests and bench/hostile_peers.py inside a network namespace
(`ip netns exec NS python -m tests.handshake_flood KIND FROM_IP HOST:PORT COUNT [RATE]`), from FROM_IP:

  silent  COUNT connections that finish TLS and then say nothing, each opened again when the server drops it
  loops   COUNT handshakes in a loop that say hello and answer the server's nonce with a proof of nobody

RATE (a second, default unlimited) caps new connections, so that the attacker's own CPU does not decide what
a benchmark measures. Prints "flooding" once the first COUNT are open, and runs until killed."""
import asyncio
import os
import ssl
import sys
import time

from routing.addresses import split_address


class Pace:
    def __init__(self, rate: float):
        self.interval, self.next = (1.0 / rate if rate else 0.0), time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        self.next = max(self.next + self.interval, now)
        await asyncio.sleep(self.next - now)


async def hold(kind: str, source: str, host: str, port: int, context: ssl.SSLContext, opened: list,
               pace: Pace) -> None:
    from swarm.net.direct import receive_message, send_message
    from swarm.wire.protocol import PROTOCOL_VERSION
    while True:
        await pace.wait()
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname="cocoon",
                                                           local_addr=(source, 0))
            opened.append(1)
            if kind == "loops":
                await send_message(writer, {"protocol": PROTOCOL_VERSION, "handler": "inference",
                                            "public_key": os.urandom(270), "nonce": os.urandom(32)})
                await receive_message(reader)
                await send_message(writer, {"signature": os.urandom(256)})
            await reader.read()  # until the server gives up on us
            writer.close()
        except Exception:  # refused or dropped, in whatever form: again
            await asyncio.sleep(0.05)


async def main(kind: str, source: str, address: str, count: str, rate: str = "0") -> None:
    host, port = split_address(address)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    opened: list = []
    pace = Pace(float(rate))
    tasks = [asyncio.create_task(hold(kind, source, host, port, context, opened, pace)) for _ in range(int(count))]
    while len(opened) < int(count):
        await asyncio.sleep(0.1)
    print("flooding", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
