"""How far apart honest computations of a span are, and how far a cheating server's is, on real weights: the
relative error of the whole output (what spot checks compared until 2026-12-06) against the relative error of
what the span adds (output minus input), for every token as a decode step would send it.

    python bench/verification_deltas.py [--spans 12:20,0:8,22:30]

SmolLM2-135M-Instruct (`cocoon fetch smollm2`), bfloat16 weights as the hub has them. The span's input is the
model's real hidden state before its first block, for a few chat prompts. A reference runs the span in float32 on
the CPU (a client's own copy: swarm.client.spot_check.LocalBlocks); honest servers compute in float32 or in
bfloat16; every output crosses the wire in bfloat16 (the default). Cheats: the output scaled by 1.05, and Gaussian
noise of 6% of each row's norm added to it. The table shows, per span and comparison, the largest error of an
honest server and the smallest of a cheat, over all tokens.
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
    parser.add_argument("--spans", default="12:20,0:8,22:30")
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
    print("\n| blocks | span changes its input by | compared | honest fp32, worst | honest bf16, worst | "
          "scaled 1.05, least | 6% noise, least |\n|---|---|---|---|---|---|---|")
    for spec, change, worst, best in rows:
        for what in ("whole", "delta"):
            print(f"| {spec} | {change:.1%} | {'output' if what == 'whole' else 'output - input'} | "
                  f"{worst[f'fp32 {what}']:.2e} | {worst[f'bf16 {what}']:.2e} | {best[f'scale {what}']:.2e} | "
                  f"{best[f'noise {what}']:.2e} |")


if __name__ == "__main__":
    main()
