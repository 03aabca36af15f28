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

        embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id, _weight=state[family.embed_key])
        with torch.device("meta"):
            norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
            lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        norm.load_state_dict({"weight": state[family.norm_key]}, assign=True)
        lm_head.weight = embed_tokens.weight if tied else nn.Parameter(state[family.head_key])
        return cls(config, embed_tokens, norm, lm_head).to(device).requires_grad_(False)

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden_states))
