"""Small random checkpoints written with transformers' own config classes, for tests, benches and the demo."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GraniteConfig, LlamaConfig,
                          MistralConfig, MixtralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config,
                          Qwen3MoeConfig)

CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "mixtral": MixtralConfig,
           "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig, "gemma2": Gemma2Config, "gemma3_text": Gemma3TextConfig,
           "phi3": Phi3Config, "olmo2": Olmo2Config, "granite": GraniteConfig}
# what makes each family's particularities show on a tiny model
FAMILY_EXTRAS = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "qwen3": dict(head_dim=16),
    "gemma2": dict(head_dim=16, sliding_window=6, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(head_dim=16, sliding_window=6, final_logit_softcapping=30.0,
                        layer_types=None),  # set from the number of layers: local and global alternating
    "granite": dict(embedding_multiplier=6.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.1),
}


def tiny_config(family: str = "llama", *, hidden_size: int = 64, num_hidden_layers: int = 4,
                num_attention_heads: int = 4, num_key_value_heads: int = 2, vocab_size: int = 128, **overrides):
    extra = {"intermediate_size": 2 * hidden_size, **FAMILY_EXTRAS.get(family, {}), **overrides}
    if family == "gemma3_text" and extra.get("layer_types") is None:
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(num_hidden_layers)]
    extra = {"max_position_embeddings": 1024, **extra}
    return CONFIGS[family](
        hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


def save_random_checkpoint(path: str | Path, family: str = "llama", *, seed: int = 0,
                           max_shard_size: str | int = "5GB", dtype: torch.dtype = torch.float32,
                           scale: dict[str, float] | None = None, **config_kwargs) -> Path:
    """Write a randomly initialised model of ``family`` to ``path`` with ``save_pretrained`` (safetensors), its
    weights in ``dtype`` (hub checkpoints are mostly bfloat16, with config.dtype saying so); ``scale``
    multiplies the named tensors (e.g. to make some block's activations huge)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **config_kwargs), dtype=torch.float32)
    with torch.no_grad():  # larger than the default init so that blocks change hidden states visibly
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
        for name, factor in (scale or {}).items():
            model.get_parameter(name).mul_(factor)
    path = Path(path)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    if model.config.vocab_size >= 128:
        ascii_tokenizer().save_pretrained(path)
    return path


def ascii_tokenizer():
    """One token per ASCII character (ids 3..127), with <pad>=0, <s>=1, </s>=2: text in and out of tiny models."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(i): i for i in range(3, 128)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<pad>")


def deep_prompt_hooks(model, prompts, prefix: int) -> list:
    """Make transformers' ``model`` add ``prompts[i]`` to the first ``prefix`` positions before decoder
    layer i, as deep prompt tuning does through the swarm: the local reference. Returns hook handles."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        def add(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :prefix] + prompts[i], hidden[:, prefix:]], dim=1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
        handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    return handles
