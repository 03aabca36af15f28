"""The local baseline of the benches: transformers as a user runs it, in a process that never imported the project.

    python bench/local_baseline.py CHECKPOINT [--new-tokens 32] [--repeats 1] [--layers] [--device cpu]
        [--ids 1,2,3] [--prompt-lookup N | --self-draft N | --half-draft N]

Prints one JSON line: seconds per token of greedy generate() (batch 1, a 16-token prompt), one figure per
repeat, after a warm-up, and the tokens generated (--ids: that prompt instead; --prompt-lookup, --self-draft, --half-draft: transformers'
assisted generation, drafting N tokens from the prompt, with the model's own weights, or with its last block's
MLP doubled, as bench/push.py --speculative drafts); with --layers also the seconds of one decode step of the model's decoder layers
alone (transformers' own layers, as a span of all blocks computes them), median of 20; with --layers-in-generate
the decoder layers' part of each decode step inside generate() (after the LM head and the rest of a step ran, as
in a user's generation), median over the steps. Torch's defaults:
nothing here sets threads or OpenMP's environment. The benches run it with ``subprocess`` on purpose:
importing swarm in the same process must not be able to change what is measured.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

PROMPT_TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--layers-in-generate", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ids", help="the prompt's token ids, comma-separated (default: 16 random ones)")
    parser.add_argument("--prompt-lookup", type=int)
    parser.add_argument("--self-draft", type=int)
    parser.add_argument("--half-draft", type=int)
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype)).to(args.device)
    model.eval()
    if args.ids:
        ids = torch.tensor([[int(i) for i in args.ids.split(",")]], device=args.device)
    else:
        ids = torch.randint(3, model.config.vocab_size, (1, PROMPT_TOKENS),
                            generator=torch.Generator().manual_seed(0)).to(args.device)
    assisted = assisted_kwargs(args)
    result = {"generate_s_per_token": [], "threads": torch.get_num_threads()}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, **assisted)
        for _ in range(args.repeats):
            sync()
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, **assisted)
            sync()
            assert out.shape[1] == ids.shape[1] + args.new_tokens
            result["generate_s_per_token"].append((time.perf_counter() - started) / args.new_tokens)
        result["tokens"] = out[0].tolist()  # what the benches compare their own generations with
        if args.layers:
            result["layers_step_s"] = layers_step(model, sync)
        if args.layers_in_generate:
            result["layers_in_generate_s"] = layers_in_generate(model, ids, args.new_tokens, sync)
    print(json.dumps(result), flush=True)


def assisted_kwargs(args) -> dict:
    if args.prompt_lookup:
        return dict(prompt_lookup_num_tokens=args.prompt_lookup)
    tokens = args.self_draft or args.half_draft
    if not tokens:
        return {}
    draft = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype)).to(args.device)
    if args.half_draft:
        with torch.no_grad():
            draft.model.layers[-1].mlp.down_proj.weight.mul_(2.0)
    config = draft.generation_config
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = tokens, "constant"
    config.assistant_confidence_threshold = 0.0
    return dict(assistant_model=draft.eval())


def layers_step(model, sync) -> float:
    """One decode step of the decoder layers (and final norm) on a 16-token cache, as generate() runs them."""
    hidden = torch.randn(1, PROMPT_TOKENS + 1, model.config.hidden_size, dtype=model.dtype, device=model.device)
    cache = DynamicCache(config=model.config)
    model.model(inputs_embeds=hidden[:, :PROMPT_TOKENS], past_key_values=cache, use_cache=True)
    times = []
    for _ in range(23):
        sync()
        started = time.perf_counter()
        model.model(inputs_embeds=hidden[:, PROMPT_TOKENS:], past_key_values=cache, use_cache=True)
        sync()
        times.append(time.perf_counter() - started)
        cache.crop(-1)
    return statistics.median(times[3:])


def layers_in_generate(model, ids, new_tokens: int, sync) -> float:
    """The decoder layers' part of each decode step of generate(), median over the steps: from the first layer's
    input to the last layer's output, the work a chain's servers do for a token."""
    layers, started, times = model.get_decoder().layers, [], []

    def start(module, args) -> None:  # (a hook that returns something replaces the layer's inputs or output)
        sync()
        started.append(time.perf_counter())

    def stop(module, args, output) -> None:
        sync()
        times.append(time.perf_counter() - started[-1])

    first, last = layers[0].register_forward_pre_hook(start), layers[-1].register_forward_hook(stop)
    try:
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    finally:
        first.remove()
        last.remove()
    return statistics.median(times[1:])  # (the first is the prompt's)


if __name__ == "__main__":
    main()
