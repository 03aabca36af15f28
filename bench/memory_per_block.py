"""How many blocks fit in N GB: the memory of one block by model and dtype, and what --cache-tokens costs.

The same arithmetic as `cocoon serve --num-blocks auto` (shards/memory.py): each block built on the meta device
from the model's config (transformers' own config classes with the published shapes; nothing is downloaded).
Prints a table for the README's "Serving from a home GPU" section.

    python bench/memory_per_block.py
"""
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from shards.memory import block_cost

GB = 2**30
MODELS = {
    "SmolLM2-135M": LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, vocab_size=49152),
    "Llama-3.1-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "Mistral-7B": MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
    "Qwen2.5-32B": Qwen2Config(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                               num_attention_heads=40, num_key_value_heads=8, vocab_size=152064),
    "Llama-3.1-70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "Llama-3.1-405B": LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                  num_attention_heads=128, num_key_value_heads=8, vocab_size=128256),
}
CACHE_TOKENS = 16384  # the default --cache-tokens
GPUS = (8, 12, 24)  # GB of a home GPU


def main() -> None:
    print(f"{'model':<16} {'blocks':>6} {'bf16 GB':>8} {'int8 GB':>8} {'nf4 GB':>8} {'KV MB/1k tok':>13} "
          + " ".join(f"{f'{g} GB: nf4':>10}" for g in GPUS) + f" {'24 GB: bf16':>11}")
    for name, config in MODELS.items():
        costs = {quant: block_cost(config, dtype="bfloat16", quant=quant, device="cuda") for quant in
                 ("none", "int8", "nf4")}
        kv = block_cost(config, dtype="bfloat16", device="cuda", cache_tokens=1024).cache
        with_cache = costs["nf4"].weights + kv * CACHE_TOKENS / 1024
        fits = [f"{min(int(g * GB * 0.95 // with_cache), config.num_hidden_layers):>10}" for g in GPUS]
        bf16 = min(int(24 * GB * 0.95 // (costs["none"].weights + kv * CACHE_TOKENS / 1024)), config.num_hidden_layers)
        fits.append(f"{bf16:>11}")
        print(f"{name:<16} {config.num_hidden_layers:>6} {costs['none'].weights / GB:>8.3f} "
              f"{costs['int8'].weights / GB:>8.3f} {costs['nf4'].weights / GB:>8.3f} {kv / 2**20:>13.1f} "
              + " ".join(fits))
    print(f"\n'N GB: nf4' ('24 GB: bf16'): blocks of nf4 (bfloat16) weights that fit with the default --cache-tokens {CACHE_TOKENS} "
          f"(bfloat16 KV) in 95% of N GB; a CPU server counts float32 weights twice (packed copies).")


if __name__ == "__main__":
    main()
