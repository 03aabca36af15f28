"""How far apart honest computations of a span are, and how far a cheating server's is, on real weights: the
relative error of the whole output (what spot checks compared until 2026-12-06) against the relative error of
what the span adds (output minus input), for every token as a decode step would send it.

    python bench/verification_deltas.py [--spans 12:20,0:8,22:30,28:30,0:15,15:30,0:30]

SmolLM2-135M-Instruct (`cocoon fetch smollm2`), bfloat16 weights as the hub has them. The span's input is the
model's real hidden state before its first block, for a few chat prompts. A reference runs the span in float32 on
the CPU (a client's own copy: swarm.client.evidence.LocalBlocks); honest servers compute in float32 or in
bfloat16; every output crosses the wire in bfloat16 (the default). Cheats: the output scaled by 1.05, and Gaussian
noise of 6% of each row's norm added to it. The first table shows, per span and comparison, the largest error of
an honest server and the smallest of a cheat, over all tokens.

The second table is what spot checks compare since: each decode step's output against the tolerance a client
with its own copy measures on the same inputs (incentives.verification.measured_tolerance: the span run in float32
and in the server's dtype, every position, as one forward). The honest servers here decode as a server does, the
prompt's first half at once and then one token at a time with a KV cache, so their rounding takes another path
than the checker's; a ratio below 1 passes, above 1 convicts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["Explain how a rainbow forms.", "Write a haiku about the sea.", "What is 17 times 23?",
           "List three uses of copper and why.", "Translate 'good morning' into French and Spanish."]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", default="12:20,0:8,22:30,28:30,0:15,15:30,0:30")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shards import BlockSpan, Checkpoint
    from swarm.apps.models import fetch

    path = fetch("smollm2", dtype="bfloat16")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    checkpoint = Checkpoint(str(path))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for spec in args.spans.split(","):
        start, end = map(int, spec.split(":"))
        spans = {dtype: BlockSpan.from_pretrained(checkpoint, start, end, dtype=dtype, device="cpu")
                 for dtype in ("float32", "bfloat16")}
        worst = {k: 0.0 for k in ("fp32 whole", "fp32 delta", "bf16 whole", "bf16 delta")}
        best = {k: float("inf") for k in ("scale whole", "scale delta", "noise whole", "noise delta")}
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                hidden = model(ids, output_hidden_states=True).hidden_states[start]
                wire_in = hidden.to(torch.bfloat16)  # what the server received
                reference = spans["float32"](wire_in.float()).to(torch.bfloat16).float()
                outputs = {"fp32": spans["float32"](wire_in.float()).to(torch.bfloat16).float(),
                           "bf16": spans["bfloat16"](wire_in).to(torch.bfloat16).float()}
                honest = outputs["bf16"]
                noise = torch.randn(honest.shape, generator=generator)
                noise = noise / noise.norm(dim=-1, keepdim=True) * 0.06 * honest.norm(dim=-1, keepdim=True)
                cheats = {"scale": (honest * 1.05).to(torch.bfloat16).float(),
                          "noise": (honest + noise).to(torch.bfloat16).float()}
            base = wire_in.float()
            for t in range(ids.shape[1]):  # each position as the one new token of a decode step
                ref, inp = reference[:, t].numpy(), base[:, t].numpy()
                for name, out in outputs.items():
                    o = out[:, t].numpy()
                    worst[f"{name} whole"] = max(worst[f"{name} whole"], rel(o, ref))
                    worst[f"{name} delta"] = max(worst[f"{name} delta"], rel(o - inp, ref - inp))
                for name, out in cheats.items():
                    o = out[:, t].numpy()
                    best[f"{name} whole"] = min(best[f"{name} whole"], rel(o, ref))
                    best[f"{name} delta"] = min(best[f"{name} delta"], rel(o - inp, ref - inp))
        change = float((reference - base).norm() / base.norm())
        rows.append((spec, change, worst, best))
        print(spec, change, worst, best, flush=True)
    measured_table(args.spans, model, tokenizer, checkpoint)
    print("\n| blocks | span changes its input by | compared | honest fp32, worst | honest bf16, worst | "
          "scaled 1.05, least | 6% noise, least |\n|---|---|---|---|---|---|---|")
    for spec, change, worst, best in rows:
        for what in ("whole", "delta"):
            print(f"| {spec} | {change:.1%} | {'output' if what == 'whole' else 'output - input'} | "
                  f"{worst[f'fp32 {what}']:.2e} | {worst[f'bf16 {what}']:.2e} | {best[f'scale {what}']:.2e} | "
                  f"{best[f'noise {what}']:.2e} |")


def decoded(span, wire_in: torch.Tensor) -> torch.Tensor:
    """The span's output as a server computes it: half the prompt at once, then a token at a time, cached."""
    cache, half = span.new_cache(), wire_in.shape[1] // 2
    dtype = span.dtype_
    outputs = [span(wire_in[:, :half].to(dtype), cache=cache)]
    outputs += [span(wire_in[:, t:t + 1].to(dtype), cache=cache) for t in range(half, wire_in.shape[1])]
    return torch.cat(outputs, dim=1).to(torch.bfloat16).float()


def measured_table(spans: str, model, tokenizer, checkpoint) -> None:
    from incentives.verification import measured_tolerance
    from shards import BlockSpan
    generator = torch.Generator().manual_seed(1)
    rows = []
    for spec in spans.split(","):
        start, end = map(int, spec.split(":"))
        span = {dtype: BlockSpan.from_pretrained(checkpoint, start, end, dtype=dtype, device="cpu")
                for dtype in ("float32", "bfloat16")}
        tolerances, worst, least = [], {"fp32": 0.0, "bf16": 0.0}, {"scale": float("inf"), "noise": float("inf")}
        for prompt in PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                wire_in = model(ids, output_hidden_states=True).hidden_states[start].to(torch.bfloat16)
                reference = span["float32"](wire_in.float()).to(torch.bfloat16).float()
                checker = span["bfloat16"](wire_in).to(torch.bfloat16).float()
                servers = {"fp32": decoded(span["float32"], wire_in), "bf16": decoded(span["bfloat16"], wire_in)}
            honest = servers["bf16"]
            noise = torch.randn(honest.shape, generator=generator)
            noise = noise / noise.norm(dim=-1, keepdim=True) * 0.06 * honest.norm(dim=-1, keepdim=True)
            cheats = {"scale": (honest * 1.05).to(torch.bfloat16).float(),
                      "noise": (honest + noise).to(torch.bfloat16).float()}
            limit = {"fp32": measured_tolerance(reference.numpy(), reference.numpy(), "bfloat16"),
                     "bf16": measured_tolerance(reference.numpy(), checker.numpy(), "bfloat16")}
            tolerances.append(limit["bf16"])
            for t in range(wire_in.shape[1] // 2, wire_in.shape[1]):  # the decode steps
                ref = reference[:, t].numpy()
                for name, out in servers.items():
                    worst[name] = max(worst[name], rel(out[:, t].numpy(), ref) / limit[name])
                for name, out in cheats.items():
                    least[name] = min(least[name], rel(out[:, t].numpy(), ref) / limit["bf16"])
        rows.append((spec, float(np.median(tolerances)), worst, least))
        print(rows[-1], flush=True)
    print("\n| blocks | bfloat16 tolerance measured (median) | honest fp32, worst / tolerance | "
          "honest bf16, worst / tolerance | scaled 1.05, least / tolerance | 6% noise, least / tolerance |\n"
          "|---|---|---|---|---|---|")
    for spec, tolerance, worst, least in rows:
        print(f"| {spec} | {tolerance:.2e} | {worst['fp32']:.2f} | {worst['bf16']:.2f} | {least['scale']:.2f} | "
              f"{least['noise']:.2f} |")


if __name__ == "__main__":
    main()
