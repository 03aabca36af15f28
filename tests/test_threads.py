"""A server's default thread count: its share of the cores among the `cocoon serve` processes here."""
import subprocess
import sys
import time

import psutil

from swarm.server import threads

# a stand-in for `python -m swarm.cli serve`: it forks a child, as hivemind's DHT process is forked from a server
FAKE_SERVER = """
import os, sys, time
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
sys.stdout.write("ready\\n"); sys.stdout.flush()
time.sleep(60)
"""


def start_fake_server() -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, "swarm.cli", "serve"], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "ready\n"
    deadline = time.monotonic() + 10
    while len(psutil.Process(process.pid).children()) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def test_a_servers_forked_children_do_not_count_as_servers():
    before = threads.servers_here()
    fakes = []
    try:
        fakes.append(start_fake_server())
        assert threads.is_server(psutil.Process(fakes[0].pid).children()[0].cmdline())  # the child looks the same
        assert threads.servers_here() == before + 1
        fakes.append(start_fake_server())
        assert threads.servers_here() == before + 2
        assert threads.share(0) == max(1, threads.cores() // (before + 2))  # 1 here, on 2 cores
        assert threads.share(3) == 3
    finally:
        for fake in fakes:
            for process in [*psutil.Process(fake.pid).children(), psutil.Process(fake.pid)]:
                process.kill()
            fake.wait()
