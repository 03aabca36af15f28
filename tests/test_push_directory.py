"""A server's view of the swarm for pushes (swarm.server.push.PushDirectory): a push never waits for the DHT
when the server has a view already, and a peer the view does not show gets one fresh look."""
import asyncio
import time

from routing import ServerInfo, ServerState, SwarmState
from swarm.server import push

READ_SECONDS = 0.4  # a DHT read over real links (25 ms one way per host) takes about this long


def test_an_old_view_serves_while_a_fresh_one_is_read():
    reads = []

    async def read_state() -> SwarmState:
        reads.append(time.monotonic())
        await asyncio.sleep(READ_SECONDS)
        return SwarmState(4, {"next": ServerInfo(ServerState.ONLINE, 2, 4, 10.0)})

    async def timed(directory, peer):
        started = time.perf_counter()
        info = await directory.find(peer, 2)
        return info, time.perf_counter() - started

    async def scenario():
        directory = push.PushDirectory(read_state)
        first = await timed(directory, "next")  # no view yet: this one waits
        directory.read_at -= push.DIRECTORY_SECONDS + 1  # the view grew old
        old = await timed(directory, "next")  # served from the old view, a fresh one read meanwhile
        await asyncio.sleep(READ_SECONDS + 0.1)
        fresh_at = directory.read_at
        directory.read_at -= push.REFRESH_SECONDS + 1
        unknown = await timed(directory, "elsewhere")  # not in the view: one fresh look before saying no
        return first, old, fresh_at, unknown

    (info, waited), (old_info, old_waited), fresh_at, (unknown, unknown_waited) = asyncio.run(scenario())
    assert info is not None and waited >= READ_SECONDS
    assert old_info is not None and old_waited < READ_SECONDS / 4  # (a push would have waited 0.4 s before)
    assert len(reads) == 3 and time.monotonic() - fresh_at < 2 * READ_SECONDS + 0.5
    assert unknown is None and unknown_waited >= READ_SECONDS
