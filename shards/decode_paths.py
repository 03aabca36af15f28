"""How a span computes its decode steps on this machine, chosen by timing the candidates once.

What is fastest differs between machines, and guesses measured elsewhere were wrong here: on the 2-core
development machine oneDNN's packed weights (shards.packed_linears) are slower than MKL's plain path at both
model sizes, against 1.7x faster on another CPU. So a server times what it could do and keeps the fastest:

- the path: transformers' own layers (``plain``), the packed copies of the weights (``packed``, float32 on a
  CPU), or CUDA graphs (``cuda-graphs``, on a GPU: shards.decode_graphs);
- the path of steps of several rows (a batch of sessions' steps, a verify step), timed on a batch of 8: on
  the development machine MKL re-packs each weight matrix for a GEMM of a few rows, oneDNN's copies do not;
- the path of a prompt (a prefill, a chunk of one), timed on PROMPT_TOKENS tokens on every core: MKL's GEMM of
  16 to 64 rows was the slowest of all on the machine of 2026-12-08 (bench/RESULTS.md, "Issue 25, stop 48");
- on a CPU, its torch thread count (all cores, or half of them);
- not timed: whether a CPU server's OpenMP workers are parked while it has nothing queued (shards.openmp) or
  left spinning. A spinning worker costs the next process of the chain its compute, which a measurement in
  one process does not see: timed in turns with a partner thread, spinning won for 5 of the 7 servers of one
  bench run, and paired runs of whole chains put it 2 to 10 ms a token behind (bench/RESULTS.md, "Parked
  OpenMP workers"). Servers park; ``spin`` can still be asked for.

Paths and thread counts are timed together by rounds, one step of each candidate in turn, and compared by
their medians: on a shared VM the speed drifts within seconds, and timed one after the other, the candidate
timed during a lull would win. The choice is cached per machine, model shape, dtype and quantization (like
shards.throughput); the single steps keep to a budget of about 2 s, and batches and prompts add about as much
again. ``DecodePlan.parse`` reads a plan given on the command line: any part it fixes is not measured.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from shards.packed_linears import drop_packed_forwards, packed_forwards, packed_linears, packing_possible
from shards.span import BlockSpan
from shards.throughput import cache_path as throughput_cache_path, measuring, read_cache, write_cache

logger = logging.getLogger(__name__)
PATHS = ("plain", "packed", "cuda-graphs")
POLICIES = {"park": True, "spin": False}
BUDGET_S = 2.0
PLAN_VERSION = 8  # of what is measured: a plan cached by another version is measured again
BATCH_ROWS = 8  # rows of the batched step timed for the path of batches
MARGIN = 0.03  # how much faster than the default a candidate must be to be chosen
PAST_TOKENS = 16  # the length of the cache the steps are timed on
PROMPT_TOKENS = 32  # the prompt timed for the path of prompts


@dataclass(frozen=True)
class DecodePlan:
    path: str = "plain"
    threads: int = 0            # torch threads on a CPU (0: on a GPU, not chosen here)
    park_idle: bool = False     # park the OpenMP workers whenever nothing is queued (CPU: shards.openmp)
    batch_path: str = ""        # the path of a step of several rows (batched sessions, a verify step); "": path
    step_ms: float = 0.0        # the span's decode step alone, as measured (0: not measured)
    prefill_threads: int = 0    # torch threads of every other step (prefill, backward): all cores unless fixed
    prompt_path: str = "plain"  # the path of a prompt's forward (a prefill)

    def path_for(self, rows: int) -> str:
        """The path of a decode step of ``rows`` rows x new tokens."""
        return self.path if rows == 1 or not self.batch_path else self.batch_path

    @classmethod
    def parse(cls, text: str) -> dict:
        """``auto`` or PATH[:THREADS[:park|spin]], e.g. ``plain:2:park``; each part may be ``auto``. Returns
        the fixed parts, as DecodePlan fields."""
        parts = [p.strip() for p in text.lower().split(":")]
        if len(parts) > 3 or parts[0] not in (*PATHS, "auto") or \
                (len(parts) > 1 and not (parts[1] == "auto" or parts[1].isdigit() and int(parts[1]) > 0)) or \
                (len(parts) > 2 and parts[2] not in (*POLICIES, "auto")):
            raise ValueError(f"{text!r} is not a decode path: use auto or PATH[:THREADS[:park|spin]] with PATH one "
                             f"of {', '.join(PATHS)}, e.g. plain:2:park")
        fixed = {}
        if parts[0] != "auto":
            fixed["path"] = parts[0]
        if len(parts) > 1 and parts[1] != "auto":  # the cores a server may use: its prefills keep to them too
            fixed["threads"] = fixed["prefill_threads"] = int(parts[1])
        if len(parts) > 2 and parts[2] != "auto":
            fixed["park_idle"] = POLICIES[parts[2]]
        return fixed

    @property
    def spec(self) -> str:
        return self.path if not self.threads else \
            f"{self.path}:{self.threads}:{'park' if self.park_idle else 'spin'}"

    def __str__(self) -> str:
        batches = f", batches {self.batch_path}" if self.batch_path and self.batch_path != self.path else ""
        prompts = f", prompts {self.prompt_path}" if self.prompt_path != "plain" else ""
        measured = f", {self.step_ms:.2f} ms a step" if self.step_ms else ""
        return f"decode path {self.spec}{batches}{prompts}{measured}"


def candidate_paths(span: BlockSpan) -> list[str]:
    paths = ["plain"]
    if packing_possible(span):
        paths.append("packed")
    if span.decode_graphs is not None:
        paths.append("cuda-graphs")
    return paths


def use_plan(span: BlockSpan, plan: DecodePlan) -> None:
    """Make ``plan`` the way this span's decode steps run: only the chosen path's extra state is kept. The calling
    thread's torch threads stay as they are: the thread that computes takes the plan's (swarm.server.engine)."""
    if "packed" in (plan.path, plan.batch_path, plan.prompt_path):
        packed_forwards(span)
    else:
        drop_packed_forwards(span)
    if plan.path != "cuda-graphs":
        span.decode_graphs = None
    span.decode_plan = plan  # read by shards.throughput, to measure decode steps as they will run


def decode_step(span: BlockSpan, path: str, rows: int = 1) -> Callable[[], None]:
    """A function that runs one decode step of ``rows`` sequences through ``path`` (the cache stays at PAST_TOKENS)."""
    hidden = torch.randn(rows, PAST_TOKENS + 1, span.config.hidden_size, dtype=span.dtype_, device=span.device)
    cache, graphs = span.new_cache(), span.decode_graphs
    sync = torch.cuda.synchronize if span.device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), _through(span, "plain", graphs):
        span(hidden[:, :PAST_TOKENS], cache=cache)
    past = [copy.copy(layer) for layer in cache.layers]  # an update makes new tensors: these stay as they are

    def step() -> None:
        with torch.inference_mode(), _through(span, path, graphs):
            span(hidden[:, PAST_TOKENS:], cache=cache)
            sync()
        cache.layers[:] = [copy.copy(layer) for layer in past]  # (crop cannot undo a sliding window's step)

    return step


def prompt_step(span: BlockSpan, path: str, tokens: int = PROMPT_TOKENS) -> Callable[[], None]:
    """A function that runs a prompt of ``tokens`` tokens through ``path`` onto an empty cache."""
    hidden = torch.randn(1, tokens, span.config.hidden_size, dtype=span.dtype_, device=span.device)

    def step() -> None:
        with torch.inference_mode(), _through(span, path, span.decode_graphs):
            span(hidden, cache=span.new_cache())

    return step


@contextlib.contextmanager
def _through(span: BlockSpan, path: str, graphs) -> Iterator[None]:
    """Within this block the span's decode steps take ``path`` (its CUDA graphs, when it has them, are ``graphs``)."""
    span.decode_graphs = graphs if path == "cuda-graphs" else None
    try:
        with packed_linears(span) if path == "packed" else contextlib.nullcontext():
            yield
    finally:
        span.decode_graphs = graphs


def choose_plan(span: BlockSpan, fixed: dict, budget_s: float = BUDGET_S) -> DecodePlan:
    """Time the candidates that ``fixed`` leaves open and return the fastest plan."""
    cpu = span.device.type == "cpu"
    cores = _cores()
    paths = [fixed["path"]] if "path" in fixed else candidate_paths(span)
    threads = [fixed["threads"]] if "threads" in fixed else sorted({cores, max(1, cores // 2)}, reverse=True)
    threads = threads if cpu else [0]
    park = fixed.get("park_idle", True) if cpu else False
    if "packed" in paths and not packing_possible(span):
        raise ValueError("the packed path needs float32 weights on a CPU with oneDNN and memory for a second copy")
    if "cuda-graphs" in paths and span.decode_graphs is None:
        raise ValueError("the cuda-graphs path needs Llama-shaped, unquantized blocks on CUDA")
    if "packed" in paths:
        packed_forwards(span)  # the copies to time (use_plan lets them go if the plan does not take them)
    batch_paths = [p for p in paths if p != "cuda-graphs"] if cpu and len(paths) > 1 else []
    steps = {path: decode_step(span, path) for path in paths}
    batches = {path: decode_step(span, path, BATCH_ROWS) for path in batch_paths}
    prompts = {path: prompt_step(span, path) for path in batch_paths}
    prefill_threads = fixed.get("prefill_threads", cores) if cpu else 0
    saved_threads = torch.get_num_threads()
    set_threads = torch.set_num_threads if cpu else (lambda n: None)
    try:
        set_threads(threads[0])
        first = _timed(steps[paths[0]], 2)  # warm-up, and a first figure for the budget
        if first * 3 * (len(paths) + len(threads) + 8) > 4 * budget_s:  # steps too slow to time every candidate
            threads = threads[:1]  # the default: all cores
        combos = [(p, n) for n in threads for p in paths]  # the first: the plain path on all cores
        timings = len(combos) + 2 * len(batch_paths)
        reps = max(3, min(15, int(budget_s / max(first, 1e-4) / max(timings, 1))))
        by_combo = _in_rounds({combo: (steps[combo[0]], combo[1]) for combo in combos}, reps, set_threads)
        path, chosen_threads = _fastest(by_combo, combos[0])
        by_path = {p: by_combo[p, chosen_threads] for p in paths}
        by_threads = {n: by_combo[path, n] for n in threads}
        by_batch = _in_rounds({p: (batches[p], chosen_threads) for p in batch_paths}, reps, set_threads)
        batch_path = _fastest(by_batch, batch_paths[0]) if by_batch else path
        prompt_reps = 3 if first * 24 <= budget_s else 1  # 8 prompts of ~3 steps each, or one round when too slow
        by_prompt = _in_rounds({p: (prompts[p], prefill_threads) for p in batch_paths}, prompt_reps, set_threads)
        prompt_path = _fastest(by_prompt, batch_paths[0]) if by_prompt else "plain"
        set_threads(chosen_threads)
    finally:
        torch.set_num_threads(saved_threads)
    logger.info(f"decode paths: {_ms(by_path)}; batches of {BATCH_ROWS}: {_ms(by_batch)}; prompts of "
                f"{PROMPT_TOKENS}: {_ms(by_prompt)}; threads: {_ms(by_threads)}")
    # a decode step of a small span may run faster on fewer threads; a prefill's large matrices take every core
    return DecodePlan(path, chosen_threads if cpu else 0, park, batch_path, by_threads[chosen_threads] * 1000,
                      prefill_threads, prompt_path)


def _fastest(seconds: dict, default):
    """The fastest candidate; ``default`` (the plain path, all cores) unless another beats it by
    more than MARGIN: a tie measured on a noisy machine is no reason for a special path."""
    best = min(seconds, key=seconds.get)
    return best if seconds[best] < (1 - MARGIN) * seconds[default] else default


def _timed(step: Callable[[], None], reps: int) -> float:
    """The fastest of ``reps`` steps: another process's work (a server starting beside this one) only ever adds
    time, so the minimum is the figure it disturbs least."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


def _in_rounds(candidates: dict, reps: int, set_threads: Callable[[int], None]) -> dict:
    """Each candidate's median step, for candidates {key: (step, threads)} timed one after the other in every
    round, after a round of warm-up. This machine's speed drifts within seconds (other tenants of a VM): timed
    one candidate after the other, a drift would favour whichever ran while it lasted."""
    times: dict = {key: [] for key in candidates}
    for round_ in range(reps + 1):
        for key, (step, threads) in candidates.items():
            set_threads(threads)
            started = time.perf_counter()
            step()
            if round_:
                times[key].append(time.perf_counter() - started)
    return {key: statistics.median(values) for key, values in times.items()}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ms(seconds: dict) -> str:
    return ", ".join(f"{key} {value * 1000:.2f} ms" for key, value in seconds.items())


# ---------------------------------------------------------------------- cache
def _cache_path():
    return throughput_cache_path().with_name("decode_plans.json")


def _key(span: BlockSpan, fixed: dict) -> str:
    config = span.config
    if span.device.type == "cuda":
        hardware = torch.cuda.get_device_name(span.device)
    else:
        hardware = f"{platform.processor() or platform.machine()}-{_cores()}cores"
    shape = (f"{config.model_type}-h{config.hidden_size}-i{getattr(config, 'intermediate_size', 0)}-"
             f"a{config.num_attention_heads}-kv{getattr(config, 'num_key_value_heads', 0)}-b{len(span.layers)}")
    spin = f"spin{os.environ.get('GOMP_SPINCOUNT', 'default')}"  # OpenMP's spin, read when torch loaded
    return "|".join([f"v{PLAN_VERSION}", hardware, spin, f"torch{torch.__version__}", shape,
                     str(span.dtype_).removeprefix("torch."), span.quant, json.dumps(fixed, sort_keys=True)])


def get_plan(span: BlockSpan, fixed: dict | None = None, *, force: bool = False) -> tuple[DecodePlan, bool]:
    """This machine's plan for the span's decode steps, from the cache or measured now; (plan, measured now)."""
    fixed = fixed or {}
    if {"path", "threads", "park_idle"} <= fixed.keys() or (span.device.type != "cpu" and "path" in fixed):
        return DecodePlan(**fixed), False  # nothing left to choose
    path, key = _cache_path(), _key(span, fixed)
    if key in (cached := read_cache(path)) and not force:
        return DecodePlan(**cached[key]), False
    with measuring():  # one server at a time: servers starting together would time each other's contention
        cached = read_cache(path)
        if key in cached and not force:
            return DecodePlan(**cached[key]), False
        plan = choose_plan(span, fixed)
        cached[key] = asdict(plan)
        write_cache(path, cached)
    return plan, True
