"""The server's compute: schedule, execute, update. The one place that decides how a step runs.

Shaped like vLLM v1's engine core (vllm/v1/engine/core.py). A request for the span's output becomes
``SpanTask`` records: one, or for a prefill longer than a chunk, one per chunk, so that other peers' decode
steps go between them (when nobody else waits or decodes here, the rest of the prefill runs as one). The
scheduler (swarm.server.scheduler) decides when each task runs, fair between peers, and which tasks share one
forward (their batch key: swarm.server.batching). ``execute`` runs a task or a batch the way this machine's
decode plan says (shards.decode_paths: the path, the threads, whether the OpenMP workers are parked whenever
nothing is queued). ``update`` learns the prefill rate from the chunks that ran, which sizes the next chunks.

A decode step is any step of at most MAX_DECODE_TOKENS new tokens onto a session's cache: one token, or the
few tokens a client verifies at once (speculative decoding). All of them take the decode plan's path, run
inline when one session decodes here (on a plan of one thread), and batch with other sessions' steps of as many
tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache

from shards import BlockSpan
from shards.decode_paths import DecodePlan, use_plan
from shards.lora import LoraWeights, applied_lora
from shards.openmp import asleep_while
from shards.packed_linears import packed_linears
from swarm.wire.limits import Quotas
from swarm.server import threads
from swarm.server.batching import can_batch, run_batched
from swarm.server.scheduler import FairScheduler
from swarm.server.sessions import SessionTable
from swarm.wire.requests import BackwardRequest, SpanRequest

MAX_DECODE_TOKENS = 8  # new tokens of a step that still runs as a decode step (a verify step)
BATCH_TOKENS = 128  # tokens of one batch of steps at most (a batch of prefills runs for ~8 chunks' time)
TIMED_TOKENS = 64  # tasks of at least this many tokens teach the prefill rate


@dataclass
class SpanTask:
    """One forward of the span, decided and ready to execute."""
    request: SpanRequest        # its inputs, on the CPU as they arrived (for a chunk: that chunk's)
    cache: DynamicCache | None  # the session's KV cache, or a stateless forward's own across its chunks
    blocks: tuple[int, int]
    lora: LoraWeights | None
    decode: bool                # a decode step: at most MAX_DECODE_TOKENS new tokens onto a session's cache

    @property
    def tokens(self) -> int:
        return self.request.hidden.shape[0] * self.request.hidden.shape[1]

    @property
    def cost(self) -> int:
        return self.tokens * (self.blocks[1] - self.blocks[0])


class Engine:
    def __init__(self, span: BlockSpan, plan: DecodePlan, sessions: SessionTable, quotas: Quotas, *,
                 prefill_rate: float, batch_window: float, max_batch_sessions: int):
        self.span, self.plan, self.sessions, self.quotas = span, plan, sessions, quotas
        self.prefill_rate = prefill_rate  # tokens x blocks per second of prefill, learned from the chunks run
        self.batching = max_batch_sessions > 1
        self.scheduler = FairScheduler(quotas.max_queued_per_peer, batch_window=batch_window,
                                       max_batch=max_batch_sessions, active=sessions.decoding,
                                       max_batch_cost=BATCH_TOKENS * (span.end - span.start),
                                       run_batch=self._execute_batch if self.batching else None,
                                       park=asleep_while if plan.park_idle and plan.threads > 1 else None)

    def use_span(self, span: BlockSpan) -> None:
        """Compute with ``span`` from now on (the server moved); call it in the compute thread (``call``)."""
        use_plan(span, self.plan)
        self.span = span

    # ------------------------------------------------------------------ schedule
    async def span_output(self, peer: str, request: SpanRequest, cache: DynamicCache | None,
                          blocks: tuple[int, int], lora: LoraWeights | None, past: int) -> torch.Tensor:
        """The span's output for a request, in the request's dtype on the CPU. A step longer than a chunk runs as
        chunks; a stateless forward keeps a KV cache of its own across its chunks."""
        batch, length = request.hidden.shape[:2]
        chunk = max(1, self._chunk_tokens(blocks[1] - blocks[0]) // batch)
        prefix = request.prompts.shape[2] if request.prompts is not None else 0
        if length <= chunk or prefix > chunk:  # the deep prompts' prefix must lie in one chunk
            task = SpanTask(request, cache, blocks, lora, decode=cache is not None and length <= MAX_DECODE_TOKENS)
            # a session's step can share a forward with other sessions' steps of as many tokens: decode and verify
            # steps, and the prompts of clients that start together (swarm.server.batching)
            shares = cache is not None and lora is None and request.prompts is None
            return await self._schedule(peer, task, shares)
        own = int(cache is not None)  # the session of this step counts among those decoding
        cache = self.span.new_cache() if cache is None else cache
        outputs, first = [], 0
        while first < length:
            # chunks only make room for others: alone, the rest runs at once (each chunk re-reads the cache so far)
            alone = self.sessions.decoding() <= own and not self.scheduler.others_waiting(peer)
            last = length if alone else min(first + chunk, length)
            part = dataclasses.replace(
                request, hidden=request.hidden[:, first:last],
                position_ids=None if request.position_ids is None else request.position_ids[:, first:last],
                attention_mask=None if request.attention_mask is None else request.attention_mask[:, :past + last],
                prompts=request.prompts if first == 0 else None)
            outputs.append(await self._schedule(peer, SpanTask(part, cache, blocks, lora, decode=False), False))
            first, chunk = last, max(1, self._chunk_tokens(blocks[1] - blocks[0]) // batch)
        return torch.cat(outputs, dim=1)

    async def backward(self, peer: str, request: BackwardRequest, blocks: tuple[int, int],
                       lora: LoraWeights | None) -> list[torch.Tensor]:
        cost = 3 * request.hidden.shape[0] * request.hidden.shape[1] * (blocks[1] - blocks[0])
        return await self.scheduler.run(peer, cost, self._backward, request, blocks, lora)

    async def call(self, peer: str, fn: Callable, *args):
        """A short piece of work in the compute thread, in ``peer``'s turn (a beam reorder, a new span)."""
        return await self.scheduler.run(peer, 0, fn, *args)

    async def _schedule(self, peer: str, task: SpanTask, shares: bool) -> torch.Tensor:
        shares = shares and self.batching and can_batch(self.span)
        key = (task.blocks, task.request.hidden.shape[1]) if shares else None
        # inline on plans of one thread only: more threads park the compute thread's workers, and a team on the event
        # loop would slow every team's steps (shards.openmp)
        inline = task.decode and self.lone_decoder() and self.plan.threads <= 1
        return await self.scheduler.run(peer, task.cost, self._execute, task, batch_key=key, inline=inline)

    def lone_decoder(self) -> bool:
        """One session decodes here: its decode steps run on the event loop when the compute thread has nothing to
        do (a longer step there would hold up every other caller of this server: pings, new sessions, prompts)."""
        return self.sessions.decoding() <= 1

    def _chunk_tokens(self, blocks: int) -> int:
        """Tokens of a prefill chunk that takes about --prefill-chunk-ms of compute (at least 16)."""
        return max(16, int(self.prefill_rate * self.quotas.prefill_chunk_ms / 1000 / blocks))

    # ------------------------------------------------------------------ execute (in the compute thread, or inline)
    @torch.inference_mode()
    def _execute(self, task: SpanTask) -> torch.Tensor:
        self._threads(task.decode)
        started, request = time.perf_counter(), task.request
        with self._lora_applied(task.blocks, task.lora), self._path(task):  # positions continue the cache
            output = self.span(self._to_span(request.hidden), cache=task.cache,
                               position_ids=self._to_span(request.position_ids),
                               attention_mask=self._to_span(request.attention_mask), blocks=task.blocks,
                               prompts=self._to_span(request.prompts))
        self._update(task, time.perf_counter() - started)
        return output.to(device="cpu", dtype=request.dtype)

    @torch.inference_mode()
    def _execute_batch(self, tasks: list[tuple[SpanTask]]) -> list[torch.Tensor]:
        """Several sessions' steps with the same blocks and as many new tokens, no LoRA, as one forward."""
        self._threads(all(t.decode for (t,) in tasks))
        with self._path(tasks[0][0], rows=sum(t.tokens for (t,) in tasks)):
            return run_batched(self.span, [(t.request, t.cache, t.blocks) for (t,) in tasks], self._to_span)

    def _path(self, task: SpanTask, rows: int | None = None):
        """How this task (or a batch of ``rows`` rows) runs: through the packed weights where the plan chose them, for
        a decode step of its number of rows or for a prompt (CUDA graphs, when chosen, are the span's own for steps
        of one token); otherwise through the plain layers."""
        rows = task.tokens if rows is None else rows
        path = self.plan.path_for(rows) if task.decode else self.plan.prompt_path
        return packed_linears(self.span) if path == "packed" else contextlib.nullcontext()

    def _threads(self, decode: bool = False) -> None:
        """Decode steps take the plan's measured threads; prefills and backward passes every core it allows."""
        count = self.plan.threads if decode else self.plan.prefill_threads or self.plan.threads
        if count:
            threads.use(count)

    def _backward(self, request: BackwardRequest, blocks: tuple[int, int], lora: LoraWeights | None
                  ) -> list[torch.Tensor]:
        """Gradients w.r.t. the span's input, and w.r.t. the deep prompts and the client's LoRA weights when the
        request has them (a served adapter is frozen)."""
        self._threads()
        with torch.enable_grad():
            hidden = self._to_span(request.hidden).requires_grad_(True)
            prompts = self._to_span(request.prompts)
            prompts = None if prompts is None else prompts.requires_grad_(True)
            trained = None
            if lora is not None and request.adapter is None:
                trained = lora.weights.detach().requires_grad_(True)
                lora = LoraWeights(lora.targets, lora.rank, lora.scale, trained)
            with self._lora_applied(blocks, lora):
                output = self.span(hidden, attention_mask=self._to_span(request.attention_mask),
                                   position_ids=self._to_span(request.position_ids), blocks=blocks, prompts=prompts)
            leaves = [t for t in (hidden, prompts, trained) if t is not None]
            grads = list(torch.autograd.grad(output, leaves, self._to_span(request.grad_output)))
        dtypes = [request.dtype] * (len(grads) - (trained is not None)) + [torch.float32] * (trained is not None)
        return [g.to(device="cpu", dtype=dtype) for g, dtype in zip(grads, dtypes)]

    def _to_span(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        dtype = self.span.dtype_ if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.span.device, dtype=dtype)

    def _lora_applied(self, blocks: tuple[int, int], lora: LoraWeights | None):
        return contextlib.nullcontext() if lora is None else applied_lora(self.span, blocks, lora)

    # ------------------------------------------------------------------ update
    def _update(self, task: SpanTask, seconds: float) -> None:
        if not task.decode and task.tokens >= TIMED_TOKENS:  # decode steps say nothing of prefill
            rate = task.cost / max(seconds, 1e-6)
            self.prefill_rate = 0.5 * self.prefill_rate + 0.5 * rate  # later chunks attend to more: slower
