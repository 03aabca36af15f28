"""Throughput of a span, measured once per (hardware, model, dtype, quantization) and cached on disk."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from shards.packed_linears import packed_linears
from shards.span import BlockSpan

CACHE_ENV = "COCOON_CACHE_DIR"


@dataclass(frozen=True)
class Throughput:
    """Tokens per second of one block; a span of n blocks runs at these rates divided by n."""
    decode_tokens_per_s: float   # one new token per step, batch of one sequence
    prefill_tokens_per_s: float  # a prefill of many tokens

    def for_blocks(self, num_blocks: int) -> "Throughput":
        return Throughput(self.decode_tokens_per_s / num_blocks, self.prefill_tokens_per_s / num_blocks)


def cache_dir() -> Path:
    """Where cocoon keeps what it measured and remembers on this machine ($COCOON_CACHE_DIR)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "cocoon"))


def cache_path() -> Path:
    return cache_dir() / "throughput.json"


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """One measurement at a time on this machine: servers that start together (the demo, a box of GPUs) would
    otherwise time their candidates against each other's and keep what the contention favoured."""
    path = cache_path().with_name("measuring.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}-{os.cpu_count()}cpu-{torch.get_num_threads()}threads"


def _key(device: torch.device, model_id: str, dtype: torch.dtype, quant: str) -> str:
    return "|".join([hardware_name(device), model_id, str(dtype).removeprefix("torch."), quant])


def read_cache(path: Path | None = None) -> dict:
    """A JSON cache of measurements (this module's by default); {} when missing or damaged."""
    path = path or cache_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}  # a damaged cache is measured again, not fatal


def cached_throughput(model_id: str, dtype: str, quant: str, device: str | None = None) -> Throughput | None:
    """The per-block throughput measured earlier on this hardware, if any (without loading anything)."""
    from shards.precision import resolve_dtype
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    entry = read_cache().get(_key(torch_device, model_id, resolve_dtype(dtype, torch_device), quant))
    return Throughput(**entry) if entry else None


def get_throughput(span: BlockSpan, model_id: str, *, force: bool = False, decode_steps: int = 32,
                   prefill_tokens: int = 256, progress: bool = True) -> Throughput:
    """Per-block throughput of this span's model on this hardware: read from the cache or measured now."""
    key = _key(span.device, model_id, span.dtype_, span.quant)
    path = cache_path()
    if key in (cached := read_cache()) and not force:
        return Throughput(**cached[key])
    with measuring():
        cached = read_cache()  # another server may have measured it meanwhile
        if key in cached and not force:
            return Throughput(**cached[key])
        measured = measure(span, decode_steps=decode_steps, prefill_tokens=prefill_tokens, progress=progress)
        per_block = Throughput(measured.decode_tokens_per_s * len(span.layers),
                               measured.prefill_tokens_per_s * len(span.layers))
        cached[key] = asdict(per_block)
        write_cache(path, cached)
    return per_block


def write_cache(path: Path, entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)  # atomic: a reader never sees half a file


@torch.inference_mode()
def measure(span: BlockSpan, *, decode_steps: int = 32, prefill_tokens: int = 256, progress: bool = True) -> Throughput:
    """Tokens/s of the whole span: decode (batch 1, with a KV cache) and one prefill of ``prefill_tokens``."""
    hidden = span.config.hidden_size
    sync = torch.cuda.synchronize if span.device.type == "cuda" else (lambda: None)
    bar = tqdm(total=decode_steps + 2, desc=f"measuring throughput of blocks {span.start}:{span.end}",
               disable=not progress, unit="step")
    x = torch.randn(1, prefill_tokens, hidden, dtype=span.dtype_, device=span.device)
    plan = getattr(span, "decode_plan", None)  # shards.decode_paths.use_plan: the threads of each kind of step
    saved = torch.get_num_threads()
    try:
        if plan is not None and plan.prefill_threads:
            torch.set_num_threads(plan.prefill_threads)
        packed = plan is not None and plan.prompt_path == "packed"
        with packed_linears(span) if packed else contextlib.nullcontext():  # as a server computes prompts
            span(x[:, :8])  # warm-up
            sync()
            bar.update()
            start = time.perf_counter()
            span(x)
            sync()
        prefill = prefill_tokens / (time.perf_counter() - start)
        bar.update()
        torch.set_num_threads(plan.threads if plan is not None and plan.threads else saved)
        cache = span.new_cache()
        span(x[:, :16], cache=cache)
        sync()
        start = time.perf_counter()
        packed = packed_linears(span) if plan is not None and plan.path == "packed" else contextlib.nullcontext()
        with packed:  # as a server computes decode steps (CUDA graphs, if any, are the span's own)
            for i in range(decode_steps):
                span(x[:, i:i + 1], cache=cache)
                bar.update()
        sync()
        decode = decode_steps / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)
    bar.close()
    return Throughput(decode, prefill)
