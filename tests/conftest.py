import logging
import os
import time

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on CI: every checkpoint is built here
os.environ.setdefault("HIVEMIND_MEMORY_SHARING_STRATEGY", "file_descriptor")  # as `cocoon` sets it (swarm/apps/cli.py)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

FAMILIES = ["llama", "mistral", "qwen2", "mixtral"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> directory of a small random checkpoint, sharded so that each block lies in its own files."""
    from shards.testing import save_random_checkpoint

    made = {}

    def get(family: str = "llama", **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"ckpt-{family}")
            made[key] = save_random_checkpoint(path, family, max_shard_size="40KB", **kwargs)
        return made[key]

    return get


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COCOON_CACHE_DIR", str(tmp_path / "cocoon-cache"))


PROJECT_PROCESSES = ("swarm.apps.cli", "p2pd", "anvil", "tests.malicious_server")


def project_processes() -> dict[int, str]:
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if process.pid != os.getpid() and any(name in command for name in PROJECT_PROCESSES):
            found[process.pid] = command[:160]
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """The suite ends with no server, DHT, p2p daemon or chain node of its own alive."""
    before = set(project_processes())
    yield
    deadline = time.monotonic() + 20
    while (left := {pid: c for pid, c in project_processes().items() if pid not in before}) and \
            time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        for pid in left:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        pytest.fail("processes left behind by the test suite:\n" + "\n".join(left.values()))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct as a checkpoint (`cocoon fetch smollm2`: converted once per machine): float32, and a
    bfloat16 copy."""
    from swarm.apps.models import fetch
    return {"float32": fetch("smollm2", progress=False), "bfloat16": fetch("smollm2", "bfloat16", progress=False)}
