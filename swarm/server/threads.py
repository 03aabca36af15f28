"""Torch threads of a server's compute, set in the thread that computes.

How many is measured at start-up with the rest of the decode plan (shards.decode_paths): all cores or half
of them, whichever steps faster. Servers of one chain that share a machine each take every core: they take
turns along the chain, and their OpenMP workers sleep while they wait (parked: shards.openmp), so a
compute-bound chain is not halved. Servers of different chains that compute at the
same time on one machine should split the cores between them with ``--decode-path auto:THREADS``.
"""
from __future__ import annotations

import torch


def use(threads: int) -> None:
    """OpenMP's thread count is per calling thread: the compute thread and the event loop (inline steps) each set it."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
