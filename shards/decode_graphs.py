"""CUDA graphs for a span's decode steps: the work of its blocks between two attentions replayed as one graph.

On a GPU, a decode step of one token is bound by the CPU launching kernels, not by the GPU: transformers'
eager loop issues some 30 small kernels per Llama block, each after Python work, and for 16 blocks of
Llama-7B shape that takes longer than the GPU needs to read their weights. A CUDA graph launches a recorded
run of kernels with one call. The attention of each block and its KV-cache append stay eager, between the
graphs, because the cache grows every step while a graph's shapes are fixed. So a step runs the kernels of
the eager step, on the same values, in the same order: its output is bit-identical, and the session's
DynamicCache is what every other path (prefill, beam reorder, batching, pushes, failover) sees.

For blocks 0..n-1 of a step (Llama-shaped blocks, SDPA attention):
    graph 0:      input norm, q/k/v projections and rotary of block 0
    graph i:      the o projection, residual and MLP of block i-1, then the same as graph 0 for block i
    graph n:      the rest of block n-1
    between them: the cache append and SDPA of block i, eager, as transformers runs them
"""
from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

logger = logging.getLogger(__name__)

# blocks whose forward is exactly: norm, attention (q/k/v, rotary, cache, SDPA, o), residual, norm, MLP, residual
LLAMA_SHAPED = (LlamaDecoderLayer, MistralDecoderLayer, Qwen2DecoderLayer)
MAX_SHAPES = 8  # graph sets kept at once (batch sizes x block ranges); the least recently used goes first
MAX_BATCH = 8  # larger batches of decode steps run eagerly: captures of many sizes would cost more than they save


class DecodeGraphs:
    """Runs decode steps (one new token per sequence) of a span through CUDA graphs, one set per batch size
    and block range, captured on first use. ``capture=False`` runs the same pieces eagerly through the same
    static buffers, which is how the decomposition is checked on a machine without a GPU."""

    def __init__(self, layers: nn.ModuleList, rotary_emb: nn.Module, *, capture: bool = True):
        self.layers, self.rotary_emb, self.capture = layers, rotary_emb, capture
        self._sets: OrderedDict[tuple, _GraphSet] = OrderedDict()

    @staticmethod
    def supports(layers: nn.ModuleList) -> bool:
        return all(type(layer) in LLAMA_SHAPED and layer.self_attn.config._attn_implementation == "sdpa"
                   for layer in layers)

    def __call__(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache, masks: list,
                 local: range) -> torch.Tensor:
        """The output of blocks ``local`` (span-local indices) for a [batch, 1, hidden] step; ``masks[n]``
        is the attention mask of block ``local[n]`` as transformers made it (None: attend to everything)."""
        key = (hidden.shape[0], local.start, local.stop)
        graphs = self._sets.get(key)
        if graphs is None:
            graphs = self.prepare(hidden.shape[0], local, hidden.dtype)
        self._sets.move_to_end(key)
        cos, sin = self.rotary_emb(hidden, position_ids)
        return graphs.run(hidden, cos, sin, cache, masks)

    def prepare(self, batch: int, local: range, dtype: torch.dtype) -> "_GraphSet":
        """Capture the graphs of a batch size and block range now (a server does batch 1 at start-up)."""
        key = (batch, local.start, local.stop)
        if key not in self._sets:
            with torch.inference_mode(False), torch.no_grad():  # buffers any later step may write into
                self._sets[key] = self._capture(batch, local, dtype)
            while len(self._sets) > MAX_SHAPES:
                self._sets.popitem(last=False)
        return self._sets[key]

    def _capture(self, batch: int, local: range, dtype: torch.dtype) -> "_GraphSet":
        device = next(self.rotary_emb.buffers()).device
        hidden = torch.zeros(batch, 1, self.layers[0].self_attn.config.hidden_size, dtype=dtype, device=device)
        cos, sin = self.rotary_emb(hidden, torch.zeros(batch, 1, dtype=torch.long, device=device))
        return _GraphSet([self.layers[i] for i in local], hidden, cos, sin, self.capture)


class _GraphSet:
    """The graphs of one batch size and block range, with the static buffers they read and write."""

    def __init__(self, layers: list[nn.Module], hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 capture: bool):
        self.layers = layers
        self.hidden, self.cos, self.sin = hidden.clone(), cos.clone(), sin.clone()
        # each block's attention output, written between the graphs: [batch, 1, heads, head_dim]
        self.attention = [torch.zeros(*hidden.shape[:2], layer.self_attn.config.num_attention_heads,
                                      layer.self_attn.head_dim, dtype=hidden.dtype, device=hidden.device)
                          for layer in layers]
        first = layers[0]
        self.pieces = [_Piece(lambda h: _before_attention(first, h, self.cos, self.sin), [self.hidden], capture)]
        pool = self.pieces[0].pool
        for n in range(1, len(layers)):
            previous, layer, residual = layers[n - 1], layers[n], self.pieces[-1].outputs[0]
            self.pieces.append(_Piece(
                lambda a, r, previous=previous, layer=layer: _before_attention(
                    layer, _after_attention(previous, r, a), self.cos, self.sin),
                [self.attention[n - 1], residual], capture, pool))
        last = layers[-1]
        self.pieces.append(_Piece(lambda a, r: (_after_attention(last, r, a),),
                                  [self.attention[-1], self.pieces[-1].outputs[0]], capture, pool))

    def run(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, masks: list) -> torch.Tensor:
        self.hidden.copy_(hidden)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for n, layer in enumerate(self.layers):
            self.pieces[n].replay()
            _, query, key, value = self.pieces[n].outputs
            self.attention[n].copy_(_attention(layer, query, key, value, cache, masks[n]))
        self.pieces[-1].replay()
        return self.pieces[-1].outputs[0].clone()  # the buffer is overwritten by the next step


class _Piece:
    """``fn`` over static inputs whose outputs are static buffers refreshed by ``replay()``. The pieces of a
    set share one memory pool: they are always replayed in the order they were captured."""

    def __init__(self, fn: Callable, inputs: list[torch.Tensor], capture: bool, pool=None):
        self.fn, self.inputs, self.graph = fn, inputs, None
        if not capture:
            self.outputs = fn(*inputs)
            return
        # on a side stream, as torch.cuda.graph does, without its gc.collect() and empty_cache() per capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture: cuBLAS sets up its workspace on first use
                fn(*inputs)
            self.graph = torch.cuda.CUDAGraph()
            self.graph.capture_begin(pool, capture_error_mode="thread_local")
            try:
                self.outputs = fn(*inputs)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(stream)

    @property
    def pool(self):
        return None if self.graph is None else self.graph.pool()

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            for buffer, value in zip(self.outputs, self.fn(*self.inputs)):
                buffer.copy_(value)


# The pieces of a Llama-shaped block, the same calls in the same order as its forward in transformers.
def _before_attention(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    attention = layer.self_attn
    normed = layer.input_layernorm(hidden)
    shape = (*normed.shape[:-1], -1, attention.head_dim)
    query = attention.q_proj(normed).view(shape).transpose(1, 2)
    key = attention.k_proj(normed).view(shape).transpose(1, 2)
    value = attention.v_proj(normed).view(shape).transpose(1, 2)
    query, key = _rotary(layer)(query, key, cos, sin)
    return hidden, query, key, value


def _attention(layer: nn.Module, query, key, value, cache, mask) -> torch.Tensor:
    attention = layer.self_attn
    key, value = cache.update(key, value, attention.layer_idx)
    return sdpa_attention_forward(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)[0]


def _after_attention(layer: nn.Module, residual: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
    hidden = residual + layer.self_attn.o_proj(attention_output.reshape(*residual.shape[:-1], -1).contiguous())
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _rotary(layer: nn.Module) -> Callable:
    return sys.modules[type(layer).__module__].apply_rotary_pos_emb
