"""No orphans: a `cocoon` command signalled at any moment after it starts leaves no DHT process and no p2p
daemon behind."""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def processes_of_session(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (OSError, psutil.Error):
            pass
    return found


def signalled_after(args, delay: float, sig: int) -> list[str]:
    """Start `cocoon ARGS` in a session of its own, signal it after ``delay`` s; what of it is left after it exits."""
    # as a user's foreground command starts: a suite launched as a background job (`make test &`) ignores SIGINT,
    # and an ignored signal stays ignored across exec, so the command would not hear an early Ctrl-C at all
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(delay)
    process.send_signal(sig)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")  # the venv's: not on PATH under make
        dump = subprocess.run([py_spy, "dump", "--pid", str(process.pid)], capture_output=True, text=True)
        raise AssertionError(f"still running {delay}s + 60s after signal {sig}:\n{dump.stdout}{dump.stderr}")
    finally:
        left = left_of_session(process.pid)
    return left


def left_of_session(sid: int) -> list[str]:
    """What of a session is still running 10 s on (then killed)."""
    deadline = time.monotonic() + 10
    while processes_of_session(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [" ".join(p.cmdline())[:80] for p in processes_of_session(sid)]
    for leftover in processes_of_session(sid):
        leftover.kill()
    return left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cocoon_dht_signalled_at_any_moment_leaves_nothing(sig):
    for delay in (0.05, 0.2, 0.6, 1.2, 2.5, 5.0):
        left = signalled_after(["dht", "--host", "127.0.0.1", "--port", "0"], delay, sig)
        assert left == [], f"signal {sig} after {delay}s left {left}"


def test_cocoon_serve_signalled_while_starting_or_serving_leaves_nothing(checkpoints):
    from swarm.apps.local_swarm import LocalSwarm
    path = str(checkpoints("llama"))
    with LocalSwarm(path) as swarm:
        for delay in (0.2, 2.0, 4.0, 4.8, 5.6, 9.0):
            left = signalled_after(["serve", path, "--initial-peers", *swarm.initial_peers, "--blocks", "0:2",
                                    "--host", "127.0.0.1", "--shutdown-grace", "0.5"], delay, signal.SIGTERM)
            assert left == [], f"SIGTERM after {delay}s left {left}"


def group_signalled_at(args, line: str, grace: float, before_signal=None, leave_first: bool = False
                       ) -> tuple[float, list[str], str]:
    """Start `cocoon ARGS` as a process group of its own (as systemd or `timeout` do), and SIGTERM the whole group
    as soon as it prints a line starting with ``line`` (``leave_first``: once it is ready, SIGTERM its main process
    first, then the group when it prints ``line``); (seconds it took to exit, what of it was left, its output)."""
    # stdin stays open (`cocoon chat` would end at once on an empty one, as under CI)
    process = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.PIPE, text=True, start_new_session=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()

    def wait_for(start: str) -> None:
        deadline = time.monotonic() + 120
        while not any(text.startswith(start) for text in list(output)):
            if process.poll() is not None:  # it ended by itself (`cocoon status` does): its output is all there
                reader.join(5)
                assert start == "" or any(text.startswith(start) for text in output), "".join(output)
                return
            assert time.monotonic() < deadline, "".join(output)
            time.sleep(0.01)

    if leave_first:
        wait_for("Server ready")
        if before_signal is not None:
            before_signal()
        process.send_signal(signal.SIGTERM)
    wait_for(line)
    if before_signal is not None and not leave_first:
        before_signal()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    signalled = time.monotonic()
    try:
        process.wait(timeout=grace + 30)
    except subprocess.TimeoutExpired:
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")  # where it hangs, for the assertion
        dump = subprocess.run([py_spy, "dump", "--pid", str(process.pid)], capture_output=True, text=True)
        output.append(f"\nstill running {grace + 30} s after SIGTERM:\n{dump.stdout}{dump.stderr}")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    took = time.monotonic() - signalled
    reader.join(5)
    return took, left_of_session(process.pid), "".join(output)


PHASES = {"loading": "Loading blocks", "joining the DHT": "Joining the swarm", "measuring": "Measuring throughput",
          "announcing": "Reachability", "serving": "Server ready"}


def test_cocoon_serve_stops_on_a_process_group_sigterm_in_every_phase(checkpoints):
    """As `systemctl stop` or `timeout` stop it: the DHT child gets the signal too, and dies first. In each phase
    of its life, as it prints it; while it leaves (its final announce then meets a dead DHT); and with a client's
    session open."""
    import torch

    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm
    path = str(checkpoints("llama"))
    grace = 2.0
    with LocalSwarm(path, [(2, 4)]) as swarm:
        serve = ["serve", path, "--initial-peers", *swarm.initial_peers, "--blocks", "0:2", "--host", "127.0.0.1",
                 "--shutdown-grace", str(grace)]
        for phase, line in PHASES.items():
            took, left, output = group_signalled_at(serve, line, grace)
            assert left == [] and took <= grace + 10 and "Traceback" not in output, (phase, took, left, output)
        took, left, output = group_signalled_at(serve, "Leaving", grace, leave_first=True)
        assert left == [] and took <= grace + 10 and "Traceback" not in output, ("leaving", took, left, output)

        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
        session = None

        def open_a_session():  # once the server is ready: a client holds a session on it when the signal comes
            nonlocal session
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    session = model.inference_session(max_length=16).__enter__()
                    model(torch.tensor([[5, 6, 7]]))
                    return
                except Exception:
                    session = None
                    time.sleep(0.5)

        took, left, output = group_signalled_at(serve, "Server ready", grace, open_a_session)
        assert session is not None, output
        assert left == [] and took <= grace + 10 and "Traceback" not in output, (took, left, output)
        # the same with the session open while it leaves: the group's signal comes within its grace period
        took, left, output = group_signalled_at(serve, "Leaving", grace, open_a_session, leave_first=True)
        assert left == [] and took <= grace + 10 and "Traceback" not in output, ("leaving", took, left, output)
        model.shutdown()


OWNER = """
import sys, time
from swarm.apps.local_swarm import LocalSwarm
swarm = LocalSwarm(sys.argv[1], [(0, 2)]).__enter__()
print("up", flush=True)
time.sleep(600)
"""


def test_a_local_swarm_outlives_no_script_that_owns_it(checkpoints):
    """A script holding a LocalSwarm, killed outright (no `with` exit runs): its DHT and server stop on their
    own, with their DHT processes and p2p daemons."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(checkpoints("llama"))], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert owner.stdout.readline() == "up\n"
        started = psutil.Process(owner.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in started]
        assert any("swarm.apps.cli serve" in c for c in commands) and any("swarm.apps.cli dht" in c for c in commands)
        assert any("p2pd" in c for c in commands)
    finally:
        owner.kill()
        owner.wait()
    _, alive = psutil.wait_procs(started, timeout=30)
    left = [command[:80] for process, command in zip(started, commands) if process in alive]
    for process in alive:
        process.kill()
    assert left == []


def test_a_command_killed_outright_leaves_no_dht_process(checkpoints):
    """`cocoon serve` killed with SIGKILL (no handler of its own runs): its forked DHT process stops with it, and
    stops its p2p daemon."""
    from swarm.apps.local_swarm import LocalSwarm
    path = str(checkpoints("llama"))
    with LocalSwarm(path) as swarm:
        process = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", "serve", path, "--initial-peers",
                                    *swarm.initial_peers, "--blocks", "0:2", "--host", "127.0.0.1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not any("p2pd" in " ".join(p.cmdline()) for p in processes_of_session(process.pid)):
                assert time.monotonic() < deadline and process.poll() is None, "the server started no DHT"
                time.sleep(0.1)
            process.kill()
            process.wait()
            deadline = time.monotonic() + 10
            while processes_of_session(process.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = [" ".join(p.cmdline())[:80] for p in processes_of_session(process.pid)]
        finally:
            for leftover in processes_of_session(process.pid):
                leftover.kill()
        assert left == []


def test_every_other_command_stops_on_a_process_group_sigterm_within_10_s(checkpoints):
    """`cocoon api`, `monitor`, `generate` (mid-answer), `chat` and `status`, stopped as `timeout` or systemd stop
    them: the whole process group at once, their DHT processes included."""
    from swarm.apps.local_swarm import LocalSwarm
    path = str(checkpoints("llama"))
    with LocalSwarm(path, [(0, 4)]) as swarm:
        peers = ["--initial-peers", *swarm.initial_peers]
        cases = {"api": (["api", path, *peers, "--port", "0"], "API ready"),
                 "monitor": (["monitor", *peers, "--port", "0"], "Monitor ready"),
                 "generate": (["generate", path, "hello", *peers, "--raw", "--max-new-tokens", "1000"], "hello"),
                 "chat": (["chat", path, *peers], ""),
                 "status": (["status", path, *peers], "")}
        for name, (args, line) in cases.items():
            took, left, output = group_signalled_at(args, line, 0.0)
            assert left == [] and took <= 10 and "Traceback" not in output, (name, took, left, output)
