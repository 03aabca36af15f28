"""Model families: which transformers modules compute a block, and how checkpoint names map onto them.

Every supported family is a decoder-only transformer laid out as transformers does it
(``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``), so an adapter is only the
classes plus, where the hub format differs from the module layout, a renaming of one block's tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.mixtral import modeling_mixtral
from transformers.models.qwen2 import modeling_qwen2

from shards.errors import UnknownFamilyError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    norm: type[nn.Module]
    # Renames one block's checkpoint tensors (names relative to the block) to the module's names.
    convert_block: Callable[[StateDict], StateDict] = field(default=lambda state: state)
    layer_prefix: str = "model.layers.{}."
    embed_key: str = "model.embed_tokens.weight"
    norm_key: str = "model.norm.weight"
    head_key: str = "lm_head.weight"


def _mixtral_block(state: StateDict) -> StateDict:
    """Hub Mixtral keeps one w1/w2/w3 per expert; transformers 5 fuses them into gate_up_proj/down_proj."""
    state = {name.replace("block_sparse_moe.", "mlp."): t for name, t in state.items()}
    expert = re.compile(r"mlp\.experts\.(\d+)\.(w[123])\.weight")
    per_expert: dict[int, dict[str, torch.Tensor]] = {}
    for name in [n for n in state if expert.fullmatch(n)]:
        index, which = expert.fullmatch(name).groups()
        per_expert.setdefault(int(index), {})[which] = state.pop(name)
    if per_expert:
        experts = [per_expert[i] for i in sorted(per_expert)]
        state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e["w1"], e["w3"]], dim=0) for e in experts])
        state["mlp.experts.down_proj"] = torch.stack([e["w2"] for e in experts])
    return state


FAMILIES: dict[str, Family] = {
    "llama": Family(modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding,
                    modeling_llama.LlamaRMSNorm),
    "mistral": Family(modeling_mistral.MistralDecoderLayer, modeling_mistral.MistralRotaryEmbedding,
                      modeling_mistral.MistralRMSNorm),
    "qwen2": Family(modeling_qwen2.Qwen2DecoderLayer, modeling_qwen2.Qwen2RotaryEmbedding,
                    modeling_qwen2.Qwen2RMSNorm),
    "mixtral": Family(modeling_mixtral.MixtralDecoderLayer, modeling_mixtral.MixtralRotaryEmbedding,
                      modeling_mixtral.MixtralRMSNorm, convert_block=_mixtral_block),
}


def get_family(config: PretrainedConfig) -> Family:
    try:
        return FAMILIES[config.model_type]
    except KeyError:
        raise UnknownFamilyError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}. "
            f"Adding a family is a short entry in shards/families.py.") from None
