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
in which the workers sleep on a semaphore while the calling thread waits. They stay alive and keep their spin
for the next computation. A server's compute thread waits for work this way, and a client's calling thread
waits for the swarm so (swarm/client/loop.py); no setting of the process changes.

Each thread that runs a parallel region has a team of its own, and libgomp cuts every worker's spin to 100
rounds (its "throttled" spin) for as long as the process holds more OpenMP threads than it has cores. So a
second team anywhere in a process slows every decode step of the first: 8 blocks of hidden 512 on 2 cores
took 16.7-19.9 ms a step while an idle thread of the same process kept a team, against 7.6-8.5 ms without it.
``compute_elsewhere`` ends a thread's team and keeps it to one core: a server calls it in the thread that
loaded and measured its span, so that the compute thread's team is the only one. ``team_ended_after`` ends the
team of a thread that computes only now and then (a client's spot check, in an executor thread): the user's own
torch code must not slow down for the rest of the process's life after one check.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
from typing import Callable, TypeVar

T = TypeVar("T")
SEM_T_BYTES = 32  # sizeof(sem_t) with glibc on 64-bit Linux
OMP_PAUSE_HARD = 2


@functools.cache
def _runtime():
    """(GNU OpenMP, libc, the address of libc's sem_wait), where torch runs on libgomp (its Linux wheels); else
    None."""
    import torch  # noqa: F401  (loaded: its OpenMP runtime is mapped into this process)
    for name in _openmp_libraries():
        if "libgomp" in name.rsplit("/", 1)[-1]:
            gomp, libc = ctypes.CDLL(name), ctypes.CDLL(None)
            gomp.GOMP_parallel_start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
            gomp.GOMP_parallel_start.restype = gomp.GOMP_parallel_end.restype = None
            gomp.omp_in_parallel.restype = ctypes.c_int
            return gomp, libc, ctypes.cast(libc.sem_wait, ctypes.c_void_p).value
    return None


def _openmp_libraries() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (libgomp, LLVM's libomp, Intel's libiomp5)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:  # not Linux
        return []
    return sorted(p for p in paths if any(n in p.rsplit("/", 1)[-1] for n in ("libgomp", "libomp", "libiomp5")))


def compute_elsewhere() -> None:
    """This thread's torch work runs on one core from now on, and its OpenMP workers end (see the module's
    docstring: another team in the process makes every team's workers sleep between parallel regions). Only
    this thread changes: other threads keep their counts, and threads started later take torch's."""
    import torch
    torch.get_num_threads()  # torch sets up this thread's counts on first use: first, so that it undoes nothing here
    runtime = _runtime()
    if runtime is None or runtime[0].omp_in_parallel():
        return
    gomp = runtime[0]
    gomp.omp_set_num_threads(1)  # an OpenMP count is the calling thread's own
    mkl = _mkl()
    if mkl is not None:
        mkl.MKL_Set_Num_Threads_Local(1)  # MKL's GEMMs take their count from here, not from OpenMP's
    end_team()


def end_team() -> None:
    """End this thread's OpenMP workers (its next parallel region starts new ones). For a thread that computes now
    and then beside another that computes all the time (a client's spot check beside its generate())."""
    runtime = _runtime()
    if runtime is not None and not runtime[0].omp_in_parallel():
        runtime[0].omp_pause_resource_all(OMP_PAUSE_HARD)  # libgomp: ends the calling thread's pool of workers


def team_ended_after(function: Callable[..., T], *args) -> T:
    """``function(*args)``, then ``end_team()``: for work handed to a pool's thread, which stays alive after it."""
    try:
        return function(*args)
    finally:
        end_team()


@functools.cache
def _mkl():
    """The library holding torch's MKL (linked into libtorch_cpu in the Linux wheels), or None."""
    import torch
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        library.MKL_Set_Num_Threads_Local.restype = ctypes.c_int  # (its lower-case name takes a pointer)
        return library
    except (OSError, AttributeError):
        return None


def asleep_while(wait: Callable[[], T]) -> T:
    """``wait()``, run in this thread while this thread's OpenMP workers sleep instead of spinning. Torch code that
    ``wait`` runs meanwhile runs on this thread alone (a region inside a region is not parallel): keep it short."""
    import torch
    threads = torch.get_num_threads()
    runtime = _runtime() if threads > 1 else None
    if runtime is None or runtime[0].omp_in_parallel():
        return wait()
    gomp, libc, sem_wait = runtime
    semaphore = _semaphore(libc)
    if semaphore is None:
        return wait()
    while libc.sem_trywait(semaphore) == 0:  # a worker woken early by a signal (EINTR) left a post behind
        pass
    # The team's workers run sem_wait(semaphore): asleep, in C (no Python, so no wait for the GIL to end it).
    # This thread, its master, does not run it: it waits here, then wakes them and closes the region.
    gomp.GOMP_parallel_start(sem_wait, ctypes.addressof(semaphore), threads)
    try:
        return wait()
    finally:
        for _ in range(threads - 1):
            libc.sem_post(semaphore)
        gomp.GOMP_parallel_end()


_local = threading.local()


def _semaphore(libc) -> ctypes.Array | None:
    """This thread's semaphore for its parked workers, kept for the thread's life: a KeyboardInterrupt that lands
    between opening the region and the ``try`` leaves the region open (later waits are plain ones, torch runs on
    one thread), and its workers must not wait on freed memory."""
    semaphore = getattr(_local, "semaphore", None)
    if semaphore is None:
        semaphore = ctypes.create_string_buffer(SEM_T_BYTES)
        if libc.sem_init(semaphore, 0, 0) != 0:
            return None
        _local.semaphore = semaphore
    return semaphore
