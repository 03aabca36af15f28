"""BlockSpan: decoder blocks [start, end) of one model, computed by transformers' own layers.

A span holds only its own blocks' weights, and a KV cache per inference session. The math of every
block is the decoder-layer module of transformers, so the reference for correctness is transformers'
full model on the same weights.
"""
from __future__ import annotations

import copy
import logging
import os
import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from shards.checkpoint import Checkpoint
from shards.decode_graphs import MAX_BATCH, DecodeGraphs
from shards.errors import MissingWeightsError, SpanOutOfRangeError
from shards.families import Family, get_family
from shards.precision import check_quant, quantize_linears, resolve_dtype

logger = logging.getLogger(__name__)


class BlockSpan(nn.Module):
    def __init__(self, config: PretrainedConfig, start: int, end: int, layers: nn.ModuleList,
                 rotary_emb: nn.Module, *, dtype: torch.dtype, quant: str = "none"):
        super().__init__()
        self.config, self.start, self.end = config, start, end
        self.dtype_, self.quant = dtype, quant
        self.layers = layers
        self.rotary_emb = rotary_emb
        self.layer_types = _layer_types(config)[start:end]
        self.span_config = _span_config(config, start, end)
        self.rope_per_layer_type = get_family(config).rope_per_layer_type
        self.decode_graphs: DecodeGraphs | None = None  # CUDA graphs of decode steps (shards.decode_graphs)
        self.lora_hooks = 0  # LoRA applied through forward hooks (shards.lora), which graphs would not run
        self.decode_plan = None  # how its decode steps run on this machine (shards.decode_paths.use_plan)
        self.packed_linears: dict | None = None  # linear -> its forward through oneDNN-packed weights (None: not made)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | Checkpoint, start: int, end: int, *,
                        dtype: str | torch.dtype = "auto", quant: str = "none",
                        device: str | torch.device | None = None, attn_implementation: str | None = None,
                        progress: bool = False, cuda_graphs: bool = True, **hub_kwargs) -> "BlockSpan":
        """Load blocks [start, end) of ``model`` (directory, hub cache dir or repo id), reading nothing else.
        On CUDA, decode steps of Llama-shaped blocks run through CUDA graphs unless ``cuda_graphs=False``."""
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model, **hub_kwargs)
        config = copy.deepcopy(checkpoint.config)
        # SDPA, as transformers picks it, unless the family's attention soft-caps its logits (Gemma 2): eager
        config._attn_implementation = attn_implementation or (
            "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa")
        family = get_family(config)
        num_blocks = config.num_hidden_layers
        if not (0 <= start < end <= num_blocks):
            raise SpanOutOfRangeError(
                f"span [{start}, {end}) is outside the model's {num_blocks} blocks: use 0 <= start < end <= {num_blocks}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, device)
        check_quant(quant, torch_dtype, device)
        span_config = _span_config(config, start, end)

        layers = nn.ModuleList()
        blocks = range(start, end)
        if progress:
            from tqdm.auto import tqdm
            blocks = tqdm(blocks, desc=f"loading blocks {start}:{end}", unit="block")
        for index in blocks:
            layers.append(_load_block(checkpoint, family, span_config, index, index - start, torch_dtype, quant, device))
        rotary_emb = family.rotary_embedding(config=config).to(device)
        span = cls(config, start, end, layers, rotary_emb, dtype=torch_dtype, quant=quant)
        if cuda_graphs and device.type == "cuda" and quant == "none" and DecodeGraphs.supports(layers):
            span.decode_graphs = DecodeGraphs(layers, rotary_emb)
        return span.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.rotary_emb.buffers()).device

    # ------------------------------------------------------------------ compute
    def forward(self, hidden_states: torch.Tensor, *, cache: DynamicCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                blocks: tuple[int, int] | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [batch, new_tokens, hidden] -> the same shape after every block of the span.

        ``attention_mask`` is 2D [batch, past + new] (1 = attend, 0 = padding), ``position_ids`` is
        [batch, new]; both default to "no padding". With ``cache``, keys and values are appended to it.
        ``blocks`` = (first, last) runs only blocks [first, last) of the span (absolute indices).
        ``prompts`` [last - first, batch, prefix, hidden] are added to the first ``prefix`` positions
        before each block (deep prompt tuning).
        """
        first, last = blocks or (self.start, self.end)
        if not self.start <= first < last <= self.end:
            raise SpanOutOfRangeError(f"blocks [{first}, {last}) are not inside this span [{self.start}, {self.end})")
        local = range(first - self.start, last - self.start)
        batch, length = hidden_states.shape[:2]
        if position_ids is None:
            past = cache.get_seq_length(local.start) if cache is not None else 0
            position_ids = torch.arange(past, past + length, device=hidden_states.device).expand(batch, -1)
        masks = {}
        for kind, make_mask in (("full_attention", create_causal_mask),
                                ("sliding_attention", create_sliding_window_causal_mask)):
            first_of_kind = next((i for i in local if self.layer_types[i] == kind), None)
            if first_of_kind is not None:  # the mask's past length is read from a layer of that kind
                masks[kind] = make_mask(config=self.span_config, inputs_embeds=hidden_states,
                                        attention_mask=attention_mask, cache=cache, position_ids=position_ids,
                                        layer_idx=first_of_kind)
        if length == 1 and batch <= MAX_BATCH and cache is not None and prompts is None and \
                self.decode_graphs is not None and not self.lora_hooks and not torch.is_grad_enabled():
            return self.decode_graphs(hidden_states, position_ids, cache, [masks[self.layer_types[i]] for i in local],
                                      local)
        if self.rope_per_layer_type:  # e.g. Gemma 3: local and global layers rotate with different bases
            rope = {kind: self.rotary_emb(hidden_states, position_ids, kind) for kind in masks}
        else:
            rope = dict.fromkeys(masks, self.rotary_emb(hidden_states, position_ids))
        for n, i in enumerate(local):
            if prompts is not None:  # out of place, so gradients reach the prompts
                prefix = prompts.shape[2]
                hidden_states = torch.cat([hidden_states[:, :prefix] + prompts[n], hidden_states[:, prefix:]], dim=1)
            kind = self.layer_types[i]
            hidden_states = self.layers[i](hidden_states, attention_mask=masks[kind], position_ids=position_ids,
                                           position_embeddings=rope[kind], cache=cache, use_cache=cache is not None)
        return hidden_states

    # ------------------------------------------------------------------ KV caches
    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.span_config)

    def cache_bytes_per_token(self) -> int:
        """KV-cache bytes one token of one sequence takes in this span (for memory budgets)."""
        config = self.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * len(self.layers) * config.num_key_value_heads * head_dim * self.dtype_.itemsize

    def parameters_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def _load_block(checkpoint: Checkpoint, family: Family, span_config: PretrainedConfig, index: int,
                local_index: int, dtype: torch.dtype, quant: str, device: torch.device) -> nn.Module:
    prefix = family.layer_prefix.format(index)
    names = checkpoint.names_with_prefix(prefix)
    if not names:
        raise MissingWeightsError(f"the checkpoint {checkpoint.name_or_path!r} has no tensors for block {index} "
                                  f"(prefix {prefix!r}); it does not match its config")
    state = family.convert_block({name[len(prefix):]: t for name, t in checkpoint.load(names, dtype).items()})
    with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters
        layer = family.decoder_layer(span_config, layer_idx=local_index)
    try:
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise MissingWeightsError(f"block {index} of {checkpoint.name_or_path!r} does not match its config: {e}") from e
    return quantize_linears(layer, quant, dtype).to(device)


def _layer_types(config: PretrainedConfig) -> list[str]:
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


def _span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """The config of a model made of blocks [start, end) alone: its caches and masks then fit the span."""
    span_config = copy.deepcopy(config)
    span_config.num_hidden_layers = end - start
    if getattr(config, "layer_types", None):
        span_config.layer_types = list(config.layer_types[start:end])
    return span_config
