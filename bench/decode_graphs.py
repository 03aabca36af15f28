"""A server's own decode step on a GPU: transformers' eager model, the eager span, the span through CUDA graphs.

    python bench/decode_graphs.py [--hidden 4096 --blocks 16 --intermediate 14336] [--steps 64]

The same random bfloat16 weights (Llama-7B-shaped blocks by default) serve all three: transformers' LlamaModel
(its decoder layers and final norm) decoding with a DynamicCache, the BlockSpan over those same layers eager,
and the BlockSpan with shards.decode_graphs. Prints milliseconds per decode step (batch 1, after a 32-token
prompt; median of 3 runs of --steps steps), the time to capture the graphs, and whether the graphed span's
outputs equal the eager span's bit for bit over every step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaModel
from transformers.cache_utils import DynamicCache

from shards.decode_graphs import DecodeGraphs
from shards.span import BlockSpan


def per_step(step, steps: int, prefill) -> tuple[float, list[torch.Tensor]]:
    cache = prefill()
    outputs = []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        outputs.append(step(i, cache))
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps, outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.blocks, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=128)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaModel(config).to(torch.bfloat16).eval()
    span = BlockSpan(config, 0, args.blocks, model.layers, model.rotary_emb, dtype=torch.bfloat16)
    prompt = torch.randn(1, 32, args.hidden, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randn(1, args.steps, args.hidden, device="cuda", dtype=torch.bfloat16)

    def span_prefill():
        cache = span.new_cache()
        span(prompt, cache=cache)
        return cache

    def model_prefill():
        cache = DynamicCache(config=config)
        model(inputs_embeds=prompt, cache=cache, use_cache=True)
        return cache

    def span_step(i, cache):
        return span(tokens[:, i:i + 1], cache=cache)

    def model_step(i, cache):
        return model(inputs_embeds=tokens[:, i:i + 1], cache=cache, use_cache=True).last_hidden_state

    runs = {"transformers LlamaModel, eager": [], "BlockSpan, eager": [], "BlockSpan, CUDA graphs": []}
    with torch.inference_mode():
        start = time.perf_counter()
        graphs = DecodeGraphs(span.layers, span.rotary_emb)
        graphs.prepare(1, range(args.blocks), torch.bfloat16)
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - start
        for _ in range(4):  # the first round warms up every path
            span.decode_graphs = None
            runs["transformers LlamaModel, eager"].append(per_step(model_step, args.steps, model_prefill)[0])
            eager_ms, eager_out = per_step(span_step, args.steps, span_prefill)
            runs["BlockSpan, eager"].append(eager_ms)
            span.decode_graphs = graphs
            graphs_ms, graphs_out = per_step(span_step, args.steps, span_prefill)
            runs["BlockSpan, CUDA graphs"].append(graphs_ms)
            identical = all(torch.equal(a, b) for a, b in zip(eager_out, graphs_out))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.blocks} blocks, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, bfloat16, batch 1, {args.steps} decode steps after 32 tokens, median of 3")
    print(f"capture of the graphs for batch 1: {capture_s:.2f} s; graphed outputs equal the eager span's bit for "
          f"bit over every step: {'yes' if identical else 'NO'}\n")
    baseline = statistics.median(runs["transformers LlamaModel, eager"][1:])
    print("| decode step | ms/token | against transformers |")
    print("|---|---|---|")
    for name, times in runs.items():
        ms = statistics.median(times[1:])
        print(f"| {name} | {ms:.2f} | {baseline / ms:.2f}x |")


if __name__ == "__main__":
    main()
