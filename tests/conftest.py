import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on CI: every checkpoint is built here
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
