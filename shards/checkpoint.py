"""Read a Hugging Face checkpoint lazily: config, weight index, and only the tensors asked for.

A checkpoint is a local directory, a Hugging Face hub cache directory (``models--org--name``), or a hub
repo id. For a hub repo id only ``config.json``, the weight index and the weight files that hold the
requested tensors are downloaded (or found in the local hub cache when offline).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from shards.errors import CheckpointNotFoundError, HubUnreachableError, MissingWeightsError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Config keys that describe where or how a checkpoint was written, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "architectures"}


class Checkpoint:
    """Config and weight map of one checkpoint; tensors are read only when asked for."""

    def __init__(self, name_or_path: str | os.PathLike, *, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, token: str | None = None):
        self.name_or_path = str(name_or_path)
        self.revision, self.cache_dir, self.token = revision, cache_dir, token
        self.local_dir = _resolve_local_dir(Path(name_or_path), revision)
        config_path = self.file("config.json")
        self.config: PretrainedConfig = AutoConfig.from_pretrained(config_path.parent)
        self.weight_map = self._read_weight_map()

    # ---------------------------------------------------------------- files
    def file(self, filename: str, required: bool = True) -> Path | None:
        """Path of one file of the checkpoint, downloading it from the hub if this is a repo id."""
        if self.local_dir is not None:
            path = self.local_dir / filename
            if path.exists():
                return path
            if required:
                raise MissingWeightsError(
                    f"{path} does not exist. Is the checkpoint {self.name_or_path!r} complete? "
                    f"Copy or download {filename} into {self.local_dir}.")
            return None
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
        unreachable = _hub_unreachable()
        if unreachable:  # huggingface_hub would retry each file for ~30 s, then blame the file
            cached = try_to_load_from_cache(self.name_or_path, filename, cache_dir=self.cache_dir,
                                            revision=self.revision)
            if isinstance(cached, str):
                return Path(cached)
            if cached is not None and not required:  # the cache knows that the repo has no such file
                return None
            raise HubUnreachableError(
                f"{self.name_or_path!r} is not in the local hub cache, and {unreachable}: check this machine's "
                f"network (or HF_ENDPOINT), or download the checkpoint elsewhere and give its directory")
        try:
            return Path(hf_hub_download(self.name_or_path, filename, revision=self.revision,
                                        cache_dir=self.cache_dir, token=self.token))
        except EntryNotFoundError:
            if required:
                raise MissingWeightsError(f"the hub repo {self.name_or_path!r} has no file {filename}") from None
            return None
        except LocalEntryNotFoundError as e:
            if not required:
                return None
            raise MissingWeightsError(
                f"{filename} of {self.name_or_path!r} is neither in the local hub cache nor downloadable "
                f"({e}). Check the repo id, your network, or HF_HUB_OFFLINE.") from None

    def _read_weight_map(self) -> dict[str, str]:
        index = self.file(INDEX_FILE, required=False)
        if index is not None:
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.file(SINGLE_FILE, required=False)
        if single is None:
            raise MissingWeightsError(
                f"{self.name_or_path!r} has neither {INDEX_FILE} nor {SINGLE_FILE}: only safetensors "
                f"checkpoints are supported (convert with `model.save_pretrained(dir)`).")
        with safe_open(single, framework="pt") as f:
            return {name: SINGLE_FILE for name in f.keys()}

    # ---------------------------------------------------------------- identity
    @property
    def model_id(self) -> str:
        """Stable name of these weights wherever they lie on disk: model type + hash of config and index."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(json.dumps(sorted(self.weight_map.items())).encode())
        return f"{self.config.model_type}-{digest.hexdigest()[:16]}"

    # ---------------------------------------------------------------- tensors
    def has(self, name: str) -> bool:
        return name in self.weight_map

    def files_are_local(self, names: Iterable[str]) -> bool:
        """Whether the files holding these tensors are on this machine (a directory, or the hub cache)."""
        if self.local_dir is None:
            return False
        return all(name in self.weight_map and (self.local_dir / self.weight_map[name]).exists() for name in names)

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.weight_map if name.startswith(prefix)]

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read exactly these tensors, opening only the files that hold them."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise MissingWeightsError(
                    f"tensor {name!r} is not in the weight index of {self.name_or_path!r}; the checkpoint "
                    f"does not match its config or is incomplete.")
            by_file[self.weight_map[name]].append(name)
        tensors = {}
        for filename, file_names in by_file.items():
            path = self.file(filename)
            try:
                with safe_open(path, framework="pt") as f:
                    for name in file_names:
                        tensor = f.get_tensor(name)
                        tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            except (OSError, SafetensorError) as e:
                raise MissingWeightsError(f"cannot read {path}: {e}. Re-download this file.") from e
        return tensors


_hub_probe: dict[str, str] = {}


def _hub_unreachable() -> str:
    """Why the hub cannot be reached ("" when it can), asked once per process with one short TCP connect."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    if endpoint.geturl() not in _hub_probe:
        host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=5).close()
            _hub_probe[endpoint.geturl()] = ""
        except OSError as e:
            _hub_probe[endpoint.geturl()] = f"the Hugging Face hub is unreachable ({host}:{port}: {e.strerror or e})"
    return _hub_probe[endpoint.geturl()]


def _resolve_local_dir(path: Path, revision: str | None) -> Path | None:
    """A directory holding config.json, or None when ``path`` names a hub repo id."""
    if (path / "config.json").exists():
        return path
    if path.is_dir() and (path / "snapshots").is_dir():  # a hub cache repo dir: models--org--name
        ref = revision or "main"
        ref_file = path / "refs" / ref
        commit = ref_file.read_text().strip() if ref_file.exists() else ref
        snapshot = path / "snapshots" / commit
        if not snapshot.is_dir():
            raise MissingWeightsError(f"hub cache {path} has no snapshot for revision {ref!r}")
        return snapshot
    if path.exists():
        raise CheckpointNotFoundError(f"{path} exists but holds no config.json: not a Hugging Face checkpoint")
    if path.is_absolute() or str(path).startswith(".") or str(path).count("/") > 1:
        raise CheckpointNotFoundError(f"no checkpoint at {path}: give a local directory or a hub repo id (org/name)")
    return None
