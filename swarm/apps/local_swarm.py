"""A swarm of real processes on this machine: a DHT peer and servers on 127.0.0.1.

Used by ``cocoon demo``, the end-to-end tests and the benches. Each process is a ``cocoon`` CLI call.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

from swarm import processes


class SwarmProcess:
    """One child process whose output is collected line by line."""

    def __init__(self, args: Sequence[str], name: str, env: dict | None = None, echo: bool = False,
                 prefix: Sequence[str] = (), module: str = "swarm.apps.cli"):
        self.name, self.echo = name, echo
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        env = {**os.environ, **(env or {})}  # `cocoon` sets its own defaults (swarm/apps/cli.py), as for a user
        env[processes.OWNER_ENV] = processes.owner_token()  # it stops when this process is gone, however it ends
        self.process = subprocess.Popen([*prefix, sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env,
                                        start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
            if self.echo:
                print(f"[{self.name}] {line}", end="", flush=True)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise RuntimeError(f"{self.name} did not print {text!r} within {timeout}s; its output:\n" + "".join(self.output))

    @property
    def peer_id(self) -> str | None:
        """The peer id a server printed when it became ready."""
        for line in reversed(self.output):
            if "Server ready" in line:
                return line.split(" as peer ")[-1].strip()
        return None

    def signal(self, sig: int) -> None:
        """SIGKILL takes the whole process group (the DHT and p2p daemons too); other signals only the
        main process, which shuts its children down itself."""
        if self.process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0, signalled: bool = False) -> int:
        """SIGTERM (unless ``signalled`` already: a second one tells a `cocoon` process to stop at once, before a
        server has redeemed its vouchers), then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        if not signalled:
            self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.process.wait()
        try:  # whatever the process left behind in its group (DHT workers, p2p daemons) goes too
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return code


class LocalSwarm:
    """Start with ``with LocalSwarm(model, spans=[(0, 2), (2, 4)]) as swarm:``; ``swarm.initial_peers`` to connect."""

    def __init__(self, model: str | os.PathLike, spans: Sequence[tuple[int, int]] = (), *, dtype: str = "float32",
                 server_args: Sequence[str] = (), echo: bool = False, startup_timeout: float = 180.0,
                 dht_host: str = "127.0.0.1", dht_netns: str | None = None):
        self.model, self.dtype, self.server_args = str(model), dtype, list(server_args)
        self.echo, self.startup_timeout = echo, startup_timeout
        self.spans = list(spans)
        self.servers: list[SwarmProcess] = []
        self.dht: SwarmProcess | None = None
        self.initial_peers: list[str] = []
        self.dht_host, self.dht_netns = dht_host, dht_netns
        self._tmp = tempfile.TemporaryDirectory(prefix="cocoon-swarm-")

    def __enter__(self) -> "LocalSwarm":
        try:
            self.start_dht()
            started = [self.add_server(span, wait=False) for span in self.spans]  # load in parallel
            for server in started:
                server.wait_for("Server ready", self.startup_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def start_dht(self) -> None:
        maddr_file = Path(self._tmp.name) / "dht.maddrs"
        self.dht = SwarmProcess(["dht", "--host", self.dht_host, "--port", "0", "--maddr-file", str(maddr_file)],
                                "dht", echo=self.echo,
                                prefix=["ip", "netns", "exec", self.dht_netns] if self.dht_netns else ())
        self.dht.wait_for("DHT running", self.startup_timeout)
        self.initial_peers = maddr_file.read_text().split()

    def add_server(self, span: tuple[int, int] | None = None, *extra: str, num_blocks: int | None = None,
                   wait: bool = True, host: str = "127.0.0.1", netns: str | None = None,
                   module: str = "swarm.apps.cli", env: dict | None = None, model: str | None = None) -> SwarmProcess:
        """A server for blocks ``span`` (or ``num_blocks`` wherever the swarm needs them) of the swarm's model (or
        of ``model``: one DHT may hold several); ``netns`` runs it inside that network namespace (a host of its
        own, for tests that cut hosts off)."""
        where = ["--blocks", f"{span[0]}:{span[1]}"] if span else ["--num-blocks", str(num_blocks)] if num_blocks \
            else []  # --num-blocks auto
        name = f"server{len(self.servers)}"
        server = SwarmProcess(["serve", str(model or self.model), "--initial-peers", *self.initial_peers, *where,
                               "--host", host, "--dtype", self.dtype, "--public-name", name,
                               *self.server_args, *extra], name, env=env, echo=self.echo,
                              prefix=["ip", "netns", "exec", netns] if netns else (), module=module)
        self.servers.append(server)
        if wait:
            server.wait_for("Server ready", self.startup_timeout)
        return server

    def server_of(self, peer_id: str) -> SwarmProcess:
        return next(server for server in self.servers if server.peer_id == peer_id)

    def close(self) -> None:
        processes = self.servers + ([self.dht] if self.dht else [])
        for process in processes:  # all at once: each takes a moment to leave the DHT (and servers, to redeem)
            process.signal(signal.SIGTERM)
        for process in processes:
            process.stop(timeout=20.0, signalled=True)
        self._tmp.cleanup()

    def __exit__(self, *exc) -> None:
        self.close()
