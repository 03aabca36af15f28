"""A TCP relay that holds every byte for D ms in each direction: network delay where the kernel has no netem.

    python bench/delay_relay.py --listen 127.0.0.1:9000 --to 127.0.0.1:9001 --delay-ms 25

Put in front of a server's direct port and announced instead of it (`cocoon serve --direct-port 9001
--announce-direct 127.0.0.1:9000`), every connection to that server (clients', and other servers' pushes)
gets D ms of one-way delay each way. Bytes keep their order; the relay adds no bandwidth limit.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + delay, data))
    finally:
        queue.put_nowait((0.0, None))
        with contextlib.suppress(Exception):
            await delivering
        writer.close()


async def relay(listen: tuple[str, int], target: tuple[str, int], delay_ms: float) -> asyncio.Server:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        with contextlib.suppress(Exception):
            await asyncio.gather(_pump(reader, upstream_writer, delay_ms / 1000),
                                 _pump(upstream_reader, writer, delay_ms / 1000))

    return await asyncio.start_server(connection, *listen)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--to", type=_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    server = await relay(args.listen, args.to, args.delay_ms)
    print(f"relay ready: {args.listen[0]}:{args.listen[1]} -> {args.to[0]}:{args.to[1]}, {args.delay_ms} ms each way",
          flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
