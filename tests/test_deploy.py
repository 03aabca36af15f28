"""What systemd and Docker would do with deploy/: neither runs on these machines (no systemd, no image registry), so
the unit's own ExecStart, with its example config, is started as its own process group and stopped as systemd's
KillMode=control-group stops it; the Dockerfile is held to the commands the Makefile runs."""
import configparser
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from swarm.apps.local_swarm import LocalSwarm
from test_processes import left_of_session

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def unit() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string((DEPLOY / "cocoon-server.service").read_text())
    return parser["Service"]


@pytest.mark.slow
def test_the_systemd_unit_starts_the_example_config_and_stops_within_its_timeout(checkpoints, tmp_path):
    service = unit()
    assert service["KillMode"] == "control-group" and service["KillSignal"] == "SIGTERM"
    timeout = float(service["TimeoutStopSec"])
    command = shlex.split(service["ExecStart"])
    assert command[:2] == ["/opt/cocoon/.venv/bin/cocoon", "serve"]
    config_path = Path(command[command.index("--config") + 1])
    assert config_path == Path("/etc/cocoon/server.yaml")
    # the example config, as a user fills it in: this machine's model and swarm, ports left to the system
    config = yaml.safe_load((DEPLOY / "server.yaml").read_text())
    assert config["initial-peers"] and config["model"]
    path = checkpoints("llama")
    with LocalSwarm(path, [(2, 4)]) as swarm:
        config.update({"model": str(path), "initial-peers": swarm.initial_peers, "port": 0, "direct-port": 0,
                       "host": "127.0.0.1", "identity": str(tmp_path / "identity.key"), "blocks": "0:2"})
        mine = tmp_path / "server.yaml"
        mine.write_text(yaml.safe_dump(config))
        environment = {k.split("=", 1)[0]: k.split("=", 1)[1] for k in service.get("Environment", "").split()}
        assert "COCOON_CACHE_DIR" in environment
        process = subprocess.Popen([sys.executable, "-m", "swarm.apps.cli", *command[1:command.index("--config")],
                                    "--config", str(mine)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True,
                                   env={**os.environ, "COCOON_CACHE_DIR": str(tmp_path / "cache")})
        output = []
        deadline = time.monotonic() + 120
        while not any(line.startswith("Server ready") for line in output):
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(output)
            output.append(line)
        assert "[0, 2)" in output[-1]
        os.killpg(process.pid, signal.SIGTERM)  # `systemctl stop`: the whole control group at once
        stopped = time.monotonic()
        try:
            rest, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"still running {timeout} s after SIGTERM: systemd would SIGKILL it")
        took = time.monotonic() - stopped
    assert took <= config["shutdown-grace"] + 10 and left_of_session(process.pid) == [], took
    assert "Traceback" not in "".join(output) + rest and "Server stopped" in rest, rest


def test_the_dockerfile_runs_what_the_makefile_runs():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN make ")]
    assert runs == ["RUN make install PYTHON=python3 TORCH_INDEX=${TORCH_INDEX}"]
    makefile = (DEPLOY.parent / "Makefile").read_text()
    assert re.search(r"^install:", makefile, re.M) and "TORCH_INDEX ?=" in makefile
    assert 'ENTRYPOINT ["/opt/cocoon/.venv/bin/cocoon"]' in dockerfile and "STOPSIGNAL SIGTERM" in dockerfile
    ignored = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".tools" in ignored  # the image builds its own
