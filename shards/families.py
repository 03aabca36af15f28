"""Model families: which transformers modules compute a block, and what differs around the blocks.

Every supported family is a decoder-only transformer laid out as transformers does it
(``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``), so a family is the classes, plus
where needed: a renaming of one block's checkpoint tensors into the module's (fused MoE experts), what the
client does to embeddings and logits (Gemma's scaled embeddings and soft-capped logits, Granite's
multipliers), and rotary embeddings computed per attention type (Gemma 3's local and global layers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.gemma2 import modeling_gemma2
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.granite import modeling_granite
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.mixtral import modeling_mixtral
from transformers.models.olmo2 import modeling_olmo2
from transformers.models.phi3 import modeling_phi3
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3
from transformers.models.qwen3_moe import modeling_qwen3_moe

from shards.errors import UnknownFamilyError

StateDict = dict[str, torch.Tensor]


def _same(config: PretrainedConfig, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Family:
    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    norm: type[nn.Module]
    # Renames one block's checkpoint tensors (names relative to the block) to the module's names.
    convert_block: Callable[[StateDict], StateDict] = field(default=lambda state: state)
    # The client's side, as transformers' model does it: the embedding module (Gemma's scales by sqrt(hidden)),
    # what the model's forward does to input embeddings (given or looked up), and to the LM head's output.
    embedding: Callable[[PretrainedConfig], nn.Embedding] = field(default=lambda config: nn.Embedding(
        config.vocab_size, config.hidden_size, config.pad_token_id))
    scale_inputs: Callable[[PretrainedConfig, torch.Tensor], torch.Tensor] = _same
    finish_logits: Callable[[PretrainedConfig, torch.Tensor], torch.Tensor] = _same
    rope_per_layer_type: bool = False  # the rotary embedding takes the layer type (local and global bases)
    layer_prefix: str = "model.layers.{}."
    embed_key: str = "model.embed_tokens.weight"
    norm_key: str = "model.norm.weight"
    head_key: str = "lm_head.weight"


def _fused_experts(gate: str, up: str, down: str, rename: tuple[str, str] | None = None):
    """Hub MoE checkpoints keep one gate/up/down per expert; transformers 5 fuses them into
    ``experts.gate_up_proj`` [experts, 2 x intermediate, hidden] and ``experts.down_proj``."""
    expert = re.compile(rf"mlp\.experts\.(\d+)\.({gate}|{up}|{down})\.weight")

    def convert(state: StateDict) -> StateDict:
        if rename is not None:
            state = {name.replace(*rename): t for name, t in state.items()}
        per_expert: dict[int, dict[str, torch.Tensor]] = {}
        for name in [n for n in state if expert.fullmatch(n)]:
            index, which = expert.fullmatch(name).groups()
            per_expert.setdefault(int(index), {})[which] = state.pop(name)
        if per_expert:
            experts = [per_expert[i] for i in sorted(per_expert)]
            state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e[gate], e[up]], dim=0) for e in experts])
            state["mlp.experts.down_proj"] = torch.stack([e[down] for e in experts])
        return state

    return convert


def _scaled_embedding(cls: type[nn.Embedding]):
    def make(config: PretrainedConfig) -> nn.Embedding:
        return cls(config.vocab_size, config.hidden_size, config.pad_token_id, embed_scale=config.hidden_size ** 0.5)
    return make


def _gemma_logits(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


FAMILIES: dict[str, Family] = {
    "llama": Family(modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaRotaryEmbedding,
                    modeling_llama.LlamaRMSNorm),
    "mistral": Family(modeling_mistral.MistralDecoderLayer, modeling_mistral.MistralRotaryEmbedding,
                      modeling_mistral.MistralRMSNorm),
    "qwen2": Family(modeling_qwen2.Qwen2DecoderLayer, modeling_qwen2.Qwen2RotaryEmbedding,
                    modeling_qwen2.Qwen2RMSNorm),
    "mixtral": Family(modeling_mixtral.MixtralDecoderLayer, modeling_mixtral.MixtralRotaryEmbedding,
                      modeling_mixtral.MixtralRMSNorm,
                      convert_block=_fused_experts("w1", "w3", "w2", rename=("block_sparse_moe.", "mlp."))),
    "qwen3": Family(modeling_qwen3.Qwen3DecoderLayer, modeling_qwen3.Qwen3RotaryEmbedding,
                    modeling_qwen3.Qwen3RMSNorm),
    "qwen3_moe": Family(modeling_qwen3_moe.Qwen3MoeDecoderLayer, modeling_qwen3_moe.Qwen3MoeRotaryEmbedding,
                        modeling_qwen3_moe.Qwen3MoeRMSNorm,
                        convert_block=_fused_experts("gate_proj", "up_proj", "down_proj")),
    "gemma2": Family(modeling_gemma2.Gemma2DecoderLayer, modeling_gemma2.Gemma2RotaryEmbedding,
                     modeling_gemma2.Gemma2RMSNorm, finish_logits=_gemma_logits,
                     embedding=_scaled_embedding(modeling_gemma2.Gemma2TextScaledWordEmbedding)),
    "gemma3_text": Family(modeling_gemma3.Gemma3DecoderLayer, modeling_gemma3.Gemma3RotaryEmbedding,
                          modeling_gemma3.Gemma3RMSNorm, finish_logits=_gemma_logits, rope_per_layer_type=True,
                          embedding=_scaled_embedding(modeling_gemma3.Gemma3TextScaledWordEmbedding)),
    "phi3": Family(modeling_phi3.Phi3DecoderLayer, modeling_phi3.Phi3RotaryEmbedding, modeling_phi3.Phi3RMSNorm),
    "olmo2": Family(modeling_olmo2.Olmo2DecoderLayer, modeling_olmo2.Olmo2RotaryEmbedding,
                    modeling_olmo2.Olmo2RMSNorm),
    "granite": Family(modeling_granite.GraniteDecoderLayer, modeling_granite.GraniteRotaryEmbedding,
                      modeling_granite.GraniteRMSNorm,
                      scale_inputs=lambda config, embeds: embeds * config.embedding_multiplier,
                      finish_logits=lambda config, logits: logits / config.logits_scaling),
}

# Architectures people ask for that a span of transformers' decoder layers cannot serve as they are.
NOT_SUPPORTED = {
    "gemma3": "Gemma 3 with vision: serve its language model (a gemma3_text checkpoint, Gemma3ForCausalLM)",
    "gemma": "Gemma 1 is not wired up yet (gemma2 and gemma3_text are)",
}


def get_family(config: PretrainedConfig) -> Family:
    model_type = config.model_type
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    reason = NOT_SUPPORTED.get(model_type, "")
    raise UnknownFamilyError(
        f"architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) is not supported"
        f"{': ' + reason if reason else ''}; supported: {', '.join(sorted(FAMILIES))}. Adding a family is a short "
        f"entry in shards/families.py.")
