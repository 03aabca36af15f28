"""Keeping a thread's OpenMP workers off the cores while it waits, without stopping them.

After each parallel region, the OpenMP runtime torch ships (libgomp on Linux) keeps its workers spinning for a
while (about 7 ms on the development machine) so that the next region starts at once. Along a chain the client
and the servers take turns: while one waits for the next, its spinning workers take the cores the next one
computes on. The settings that shorten the spin (``OMP_WAIT_POLICY=PASSIVE``, ``GOMP_SPINCOUNT``) are
process-wide, and slow every parallel region of the process: between the many small regions of one decode step
the workers then fall asleep, and waking them costs more than the step's arithmetic (8 blocks of hidden 512 on 2
threads: 15-17 ms a step with a spin of 1000 rounds, 7-8 ms with libgomp's default). Letting the workers go
(``omp_pause_resource_all``) costs 3 to 8 ms to start them again.

``asleep_while`` parks them instead, for one wait: it opens a parallel region of the calling thread's own team
in which the workers sleep on a lock while the calling thread waits. They stay alive and keep their spin for the
next computation. A server's compute thread waits for work this way, and a client waits for the swarm this way;
no setting of the process changes.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # the body of a parallel region: void fn(void *data)


@functools.cache
def _libgomp():
    """GNU OpenMP, the runtime torch's Linux wheels ship, as a library; None where torch uses another."""
    import torch  # noqa: F401  (loaded: its OpenMP runtime is mapped into this process)
    for name in _openmp_libraries():
        if "libgomp" in name.rsplit("/", 1)[-1]:
            library = ctypes.CDLL(name)
            library.GOMP_parallel.argtypes = [_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
            library.GOMP_parallel.restype = None
            library.omp_get_thread_num.restype = library.omp_in_parallel.restype = ctypes.c_int
            return library
    return None


def _openmp_libraries() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (libgomp, LLVM's libomp, Intel's libiomp5)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:  # not Linux
        return []
    return sorted(p for p in paths if any(n in p.rsplit("/", 1)[-1] for n in ("libgomp", "libomp", "libiomp5")))


def asleep_while(wait: Callable[[], T]) -> T:
    """``wait()``, run in this thread while this thread's OpenMP workers sleep instead of spinning. Torch code that
    ``wait`` runs meanwhile runs on this thread alone (a region inside a region is not parallel): keep it short."""
    import torch
    threads = torch.get_num_threads()
    gomp = _libgomp() if threads > 1 else None
    if gomp is None or gomp.omp_in_parallel():
        return wait()
    done, outcome = threading.Event(), []

    def region(_) -> None:  # run by every thread of the team: this one waits, the workers sleep until it is done
        if gomp.omp_get_thread_num() != 0:
            done.wait()
            return
        try:
            outcome.append((wait(), None))
        except BaseException as error:  # (nothing may unwind through the runtime: raised below instead)
            outcome.append((None, error))
        finally:
            done.set()

    gomp.GOMP_parallel(_REGION(region), None, threads, 0)
    result, error = outcome[0]
    if error is not None:
        raise error
    return result
