"""No process left behind. A `cocoon` command starts helpers (hivemind's DHT process, which starts a p2p
daemon); however the command ends, at any moment after it starts, it stops them.

Until a command reaches a state with a graceful way out (a server that serves: announce offline, finish
sessions, redeem), SIGTERM and SIGINT stop its helpers and exit at once. A thread does that, woken by the
byte the interpreter's C-level signal handler writes to a wakeup fd: a Python-level handler would run only
when the main thread returns to the interpreter, which it may not do for a long while (it can sit in
torch's or hivemind's C code), and an exception raised from one can land in code that ignores it or holds a
lock. Whatever is still running when a command returns is terminated too."""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import traceback
import time

import psutil

_TERMINATING = (signal.SIGTERM, signal.SIGINT)
OWNER_ENV = "COCOON_OWNER"  # "pid:start time" of the process a command must not outlive (swarm.apps.local_swarm)
_wakeup: socket.socket | None = None
terminating = threading.Event()  # set once a signal is being acted on: what breaks meanwhile is no error
_raising = False  # interrupts_raise() is in force: the main thread's KeyboardInterrupt handles the signals
_forking_pid = 0  # the process that forks, as seen by its child
_forked_by_main_thread = False
_PR_SET_PDEATHSIG = 1


def quiet_peer_resets() -> None:
    """A helper process (the DHT's) that dies while handing this one a file descriptor (torch's file_descriptor
    sharing goes through multiprocessing's resource_sharer thread, which reports errors to sys.excepthook) makes
    that thread raise ConnectionError, or EOFError when the helper dies before its request arrives: the process
    group is being stopped, and the traceback would only alarm.
    Set by the `cocoon` command only."""
    default = sys.excepthook

    def hook(kind, error, trace) -> None:
        frames = traceback.extract_tb(trace) if trace else []
        if issubclass(kind, (ConnectionError, EOFError)) and \
                any(f.filename.endswith("resource_sharer.py") for f in frames):
            return
        default(kind, error, trace)
    sys.excepthook = hook
    # a signal that interrupts_raise() turns into KeyboardInterrupt may land inside an event loop's callback: the
    # loop logs it with a traceback before passing it on, and the command then stops as it should
    logging.getLogger("asyncio").addFilter(
        lambda record: not (record.exc_info and record.exc_info[0] in (KeyboardInterrupt, SystemExit)))


def exit_on_termination() -> None:
    """From now on (and until asyncio or ``interrupts_raise`` take the signals over), SIGTERM or SIGINT reap
    this process's children and exit with 128 + the signal. Call from the main thread."""
    global _wakeup, _raising
    _raising = False
    if _wakeup is None:
        reader, _wakeup = socket.socketpair()
        _wakeup.setblocking(False)
        threading.Thread(target=_watch, args=(reader,), name="cocoon-signals", daemon=True).start()
        os.register_at_fork(before=_before_fork, after_in_child=_stop_with_parent)
    # the wakeup fd first: a signal arriving between the two would meet Python's default handler and no fd to
    # tell the watcher (a command signalled ~50 ms after it started ran on)
    signal.set_wakeup_fd(_wakeup.fileno(), warn_on_full_buffer=False)
    for sig in _TERMINATING:
        signal.signal(sig, _hand_to_watcher)


def _hand_to_watcher(signum: int, frame) -> None:
    """The Python-level handler while the watcher acts. The signal's byte has mostly reached the watcher already,
    through the wakeup fd; but an event loop that the main thread runs meanwhile (swarm.client.loop's, which
    starts `cocoon dht`'s relay) takes the wakeup fd over while it runs, and drops a signal it has no handler
    for (a `cocoon dht` signalled at that moment ran on): the loop still runs this handler, which hands the
    signal on. A second byte for one signal does no harm: the watcher exits on the first."""
    if _wakeup is not None:
        try:
            _wakeup.send(bytes([signum]))
        except OSError:  # its buffer is full of signals already
            pass


def _before_fork() -> None:
    global _forking_pid, _forked_by_main_thread
    _forking_pid = os.getpid()
    _forked_by_main_thread = threading.current_thread() is threading.main_thread()


def _stop_with_parent() -> None:
    """In a forked helper (hivemind's DHT process): SIGTERM and SIGINT stop its own children (its p2p daemon) and
    exit, and so does its parent's death. Left as inherited, the handler would do nothing, and the signal's byte
    would go to the parent's watcher; a helper forked after that watcher's last look would outlive the command."""
    global _wakeup
    _wakeup = None  # the parent's; this process has no watcher thread
    signal.set_wakeup_fd(-1)
    for sig in _TERMINATING:
        signal.signal(sig, _reap_and_exit)  # run by the main thread, which here is an event loop that returns often
    if sys.platform.startswith("linux") and _forked_by_main_thread:
        # (a death signal fires when the forking *thread* ends: only the main thread lives as long as the process)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != _forking_pid:  # the parent died before the death signal was set
            _reap_and_exit(signal.SIGTERM, None)


def _reap_and_exit(signum: int, frame) -> None:
    reap_children(grace=2.0)
    os._exit(128 + signum)


def exit_with_owner() -> None:
    """A command that a script started (through swarm.apps.local_swarm, which sets OWNER_ENV) stops as on SIGTERM
    once that script is gone, even killed outright: a test or bench killed with SIGKILL leaves no server or
    DHT serving on. The command's own children do not inherit the watch."""
    owner = os.environ.pop(OWNER_ENV, None)
    if not owner:
        return
    pid, _, started = owner.partition(":")

    def watch() -> None:
        while is_running(int(pid), float(started)):
            time.sleep(1.0)
        with contextlib.suppress(OSError):  # its end of our output may be gone with it
            print(f"cocoon: the process that started this one (pid {pid}) is gone: stopping", file=sys.stderr,
                  flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="cocoon-owner", daemon=True).start()


def owner_token() -> str:
    """OWNER_ENV's value for this process."""
    return f"{os.getpid()}:{psutil.Process().create_time():.2f}"


def is_running(pid: int, started: float) -> bool:
    """The process ``pid`` that started at ``started`` (not a later one given the same pid) has not exited. The
    start time is compared within a second: psutil derives it from the boot time, which moves when the clock is
    set, and a later process given the same pid started long after."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def interrupts_raise() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread (its `finally` blocks run): for a command
    that is past its start-up, such as a client generating text, which pays its servers when it stops."""
    global _raising
    _raising = True
    signal.set_wakeup_fd(-1)
    for sig in _TERMINATING:
        signal.signal(sig, signal.default_int_handler)


def _watch(reader: socket.socket) -> None:
    while True:
        data = reader.recv(64)
        if not data:
            return
        for signum in data:
            # (not "is the handler still Python's default": a signal arriving while the main thread installs the
            # watcher's handler is written here, then run by the main thread with the new handler: both would pass)
            if signum in _TERMINATING and not _raising:
                terminating.set()
                reap_children(grace=2.0)
                time.sleep(0.2)  # a child the main thread forked while the first pass listed (a DHT starting)
                reap_children(grace=2.0)
                os._exit(128 + signum)


def exit_quickly(code: int | None) -> None:
    """Exit with ``code`` as the interpreter does, less its teardown of every module and object: with torch,
    transformers and hivemind loaded that took 1.2-1.5 s of CPU, which every stopping server and every command
    spent after its work was done (and a test, or a script stopping a swarm, waited out). What teardown is for
    still runs, in the interpreter's order: the wait for non-daemon threads, the atexit handlers (logging's
    flush, temporary directories, multiprocessing's finalizers), the flush of stdout and stderr."""
    threading._shutdown()  # (what Py_FinalizeEx calls first; concurrent.futures' executors stop here)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: as at a normal exit, nothing to flush to
            pass
    os._exit(code or 0)


def reap_children(grace: float = 5.0) -> None:
    """Terminate every descendant of this process, then kill what is left after ``grace`` seconds. All are
    found before any is signalled: a grandchild whose parent dies first is still on the list."""
    for _ in range(3):
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        if not children:
            return
        for child in children:
            try:
                child.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(children, timeout=grace)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace)
