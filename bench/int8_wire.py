"""8-bit activations against the 16-bit wire on real weights: SmolLM2-135M-Instruct through a pushed chain of
three `cocoon serve` servers (defaults, float32 weights: the 16-bit wire is bfloat16), one client with default
arguments but wire_codec.

    python bench/int8_wire.py [--prompts 8] [--new-tokens 64]

For each of --prompts chat prompts: the greedy tokens with the 16-bit wire and with wire_codec="int8" (the prompt
crosses every hop in 8-bit rows; decode steps stay 16-bit), and the prompt's logits of both against local
transformers in float32. Then one LoRA step (peft LoraConfig r=8 on q_proj, v_proj; loss on a 48-token batch of
2): the cosine of the LoRA weights' gradient with 8 bits against 16 bits.
"""
from __future__ import annotations

import argparse

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTIONS = ["What is the capital of France?", "Explain how a rainbow forms.", "Write a haiku about the sea.",
             "What is 17 times 23?", "List three uses of copper.", "Why is the sky blue?",
             "Translate 'good morning' into Spanish.", "Name a prime number above 50.",
             "What do bees make?", "How many legs does a spider have?"]
SPANS = [(0, 10), (10, 20), (20, 30)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm
    from swarm.apps.models import fetch

    path = fetch("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
               for q in QUESTIONS[:args.prompts]]
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    greedy = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    batch = torch.randint(3, 40000, (2, 48), generator=torch.Generator().manual_seed(0))
    results = {}
    with LocalSwarm(path, SPANS) as swarm:
        for codec in (None, "int8"):
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                    wire_codec=codec)
            with torch.no_grad():
                tokens = [model.generate(ids, **greedy) for ids in prompts]
                logits = [model(ids).logits for ids in prompts]
            model.shutdown()
            torch.manual_seed(0)  # the same LoRA weights for both
            trained = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                      wire_codec=codec, tuning_mode="lora",
                                                                      lora_config=lora)
            with torch.no_grad():
                trained.lora_weights.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))  # B != 0 too
            trained(batch, labels=batch).loss.backward()
            results[codec] = tokens, logits, trained.lora_weights.grad.flatten().clone()
            trained.shutdown()
    with torch.no_grad():
        reference = [local(ids).logits for ids in prompts]

    print(f"\nSmolLM2-135M-Instruct, blocks {SPANS} on 3 servers (float32, push on); {args.prompts} chat prompts, "
          f"{args.new_tokens} greedy tokens each\n")
    print("| prompt | prompt tokens | same greedy tokens as the 16-bit wire | first differing token | "
          "logits vs local, 16-bit | logits vs local, int8 |")
    print("|---|---|---|---|---|---|")
    (tokens16, logits16, grad16), (tokens8, logits8, grad8) = results[None], results["int8"]
    same = 0
    for i, ids in enumerate(prompts):
        equal = torch.equal(tokens16[i], tokens8[i])
        same += equal
        differ = "-" if equal else str(int((tokens16[i][0] != tokens8[i][0]).nonzero()[0]) - ids.shape[1])
        error = lambda logits: float((logits - reference[i]).norm() / reference[i].norm())
        print(f"| {i} | {ids.shape[1]} | {'yes' if equal else 'no'} | {differ} | {error(logits16[i]):.2e} | "
              f"{error(logits8[i]):.2e} |")
    cosine = float(torch.nn.functional.cosine_similarity(grad8, grad16, dim=0))
    print(f"\nsame greedy tokens: {same} of {len(prompts)}")
    print(f"LoRA step: gradient cosine int8 vs 16-bit {cosine:.5f}; relative difference "
          f"{float((grad8 - grad16).norm() / grad16.norm()):.2e}")


if __name__ == "__main__":
    main()
