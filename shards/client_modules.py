"""The pieces of a model that stay with the client: input embeddings, final norm and LM head."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from shards.checkpoint import Checkpoint
from shards.families import get_family
from shards.precision import resolve_dtype


class ClientModules(nn.Module):
    def __init__(self, config, embed_tokens: nn.Embedding, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.config = config
        self.family = get_family(config)
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike | Checkpoint, *, dtype: str | torch.dtype = "auto",
                        device: str | torch.device | None = None, **hub_kwargs) -> "ClientModules":
        """Load only the embeddings, final norm and LM head (the head tied to the embeddings when the config says so)."""
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model, **hub_kwargs)
        config = copy.deepcopy(checkpoint.config)
        family = get_family(config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, device)
        tied = getattr(config, "tie_word_embeddings", False) or not checkpoint.has(family.head_key)
        names = [family.embed_key, family.norm_key] + ([] if tied else [family.head_key])
        state = checkpoint.load(names, torch_dtype)

        with torch.device("meta"):  # no random init: the checkpoint's tensors become the parameters
            embed_tokens = family.embedding(config)
            norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
            lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        buffers = {name: b for name, b in embed_tokens.named_buffers()}  # e.g. Gemma's embed_scale
        embed_tokens.load_state_dict({"weight": state[family.embed_key]}, assign=True, strict=False)
        for name in buffers:
            embed_tokens.register_buffer(name, torch.tensor(getattr(embed_tokens, f"scalar_{name}")), persistent=False)
        norm.load_state_dict({"weight": state[family.norm_key]}, assign=True)
        lm_head.weight = embed_tokens.weight if tied else nn.Parameter(state[family.head_key])
        return cls(config, embed_tokens, norm, lm_head).to(device).requires_grad_(False)

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def scale_inputs(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """What the family's model does to input embeddings, looked up or given, before the first block."""
        return self.family.scale_inputs(self.config, inputs_embeds)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.family.finish_logits(self.config, self.lm_head(self.norm(hidden_states)))
