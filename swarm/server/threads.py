"""How many torch threads a server computes with: its share of this machine's cores.

Servers that share a machine (several spans on one box, a LocalSwarm) take turns along a chain, and each
decode step is many small operations: a server whose OpenMP threads outnumber its share of the cores
spends more on waking them than it gains (on 2 cores with 2 servers and a client, 1 thread each added
about half as much per hop as 2 each, for hidden sizes 512 and 2048). So by default a server counts the
`cocoon serve` processes on this machine, itself included, and takes cores / servers threads; it counts
again whenever it announces itself, as servers come and go.
"""
from __future__ import annotations

import os

import psutil
import torch


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_server(cmdline: list[str]) -> bool:
    """`cocoon serve ...` or `python -m swarm.cli serve ...`."""
    return any(arg == "serve" and (before == "swarm.cli" or os.path.basename(before) == "cocoon")
               for before, arg in zip(cmdline, cmdline[1:]))


def servers_here() -> int:
    """`cocoon serve` processes on this machine. A server's own children carry its command line (hivemind's
    DHT runs in a process forked from it): only those whose parent is not a server count."""
    parents = {}  # server pid -> its parent's pid
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        try:
            if is_server(process.info["cmdline"] or []):
                parents[process.info["pid"]] = process.info["ppid"]
        except psutil.Error:
            pass
    return sum(parent not in parents for parent in parents.values())


def share(configured: int) -> int:
    """``--num-threads`` when given (> 0), else this server's share of the cores."""
    return configured if configured > 0 else max(1, cores() // max(1, servers_here()))


def use(threads: int) -> None:
    """Set in the thread that computes (OpenMP's thread count is per calling thread)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
