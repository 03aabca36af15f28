"""Releasing this thread's OpenMP workers while it waits, so that they do not spin on cores another process needs.

After each parallel region, the OpenMP runtime torch ships (libgomp on Linux) keeps its workers spinning for a
while so that the next region starts at once. Along a chain the
client and the servers take turns: while one waits for the next, its spinning workers take the cores the next
one computes on. ``OMP_WAIT_POLICY=PASSIVE`` would stop that for the whole process, and slows every parallel
region of it, including a user's own torch code when a library sets it.
``omp_pause_resource_all`` (OpenMP 5.0) instead frees the calling thread's workers once, right before a wait;
the next parallel region starts them again. It changes no setting of the process, but starting them again is
not free (bench/RESULTS.md, "Figures moved out of comments"). So a server releases its workers only where its decode
plan measured that this pays (shards.decode_paths), and `cocoon` processes shorten the spin instead
(GOMP_SPINCOUNT, swarm/apps/cli.py).
"""
from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)
OMP_PAUSE_SOFT = 1  # free the threads, keep the runtime's state


@functools.cache
def _pause_all():
    """omp_pause_resource_all of the OpenMP runtime torch is linked with, or None where there is none."""
    import torch  # loaded: its OpenMP runtime is in this process
    for name in _openmp_libraries():
        try:
            function = ctypes.CDLL(name).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function
    logger.debug(f"no OpenMP runtime with omp_pause_resource_all next to torch {torch.__version__}")
    return None


def _openmp_libraries() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (libgomp, LLVM's libomp, Intel's libiomp5)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:  # not Linux
        return []
    return sorted(p for p in paths if any(n in p.rsplit("/", 1)[-1] for n in ("libgomp", "libomp", "libiomp5")))


def release_workers() -> bool:
    """Let this thread's OpenMP workers go before it waits (for the network, for the next request). True if a
    runtime did; torch starts them again at its next parallel region."""
    pause = _pause_all()
    return pause is not None and pause(OMP_PAUSE_SOFT) == 0
