"""Fine-tune a soft prompt or a LoRA adapter through a loopback swarm on a small synthetic task, against the
same run done locally with transformers (+ peft), and print both loss curves and training throughput
(forward + backward).

    python bench/finetune.py [--steps 30] [--mode ptune deep_ptune lora]

The task: continue a fixed repeating pattern of tokens. The blocks stay frozen on the servers; only the
prompt (a few embeddings, or one prefix per block with deep_ptune) or the LoRA weights of every block
(rank 8 on q_proj and v_proj) are trained, with Adam, from the same initial values.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mode", nargs="+", default=["ptune", "lora"], choices=["ptune", "deep_ptune", "lora"],
                        help="what to train; each mode is a run of its own (default: a soft prompt, then LoRA)")
    parser.add_argument("--prefix", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=20, help="tokens per sequence (batches of 2)")
    args = parser.parse_args()
    for mode in args.mode:
        run(argparse.Namespace(**{**vars(args), "mode": mode}))


def run(args):
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, "llama", hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=8, num_key_value_heads=4)
        pattern = torch.tensor([5, 17, 42, 99, 7, 64])
        data = pattern.repeat(8, args.length // 6 + 1)[:, :args.length]  # 8 sequences of a repeating pattern
        data = torch.roll(data, shifts=1, dims=1)
        local = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        half = args.layers // 2
        with LocalSwarm(tmp, [(0, half), (half, args.layers)]) as swarm:
            lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
            model = AutoDistributedModelForCausalLM.from_pretrained(
                tmp, initial_peers=swarm.initial_peers, exact_wire=True, tuning_mode=args.mode,
                pre_seq_len=args.prefix, lora_config=lora)
            trainable = [p for p in model.parameters() if p.requires_grad]
            if args.mode == "lora":  # peft with the same initial weights, through the adapter file format
                lr = 0.01
                model.save_pretrained(f"{tmp}/initial-adapter")
                local = PeftModel.from_pretrained(local, f"{tmp}/initial-adapter", is_trainable=True)
                local_params = [p for p in local.parameters() if p.requires_grad]
                args.prefix = 0
            else:
                lr = 0.05
                local_params = [torch.nn.Parameter(p.detach().clone()) for p in trainable]
            curves, seconds = {"swarm": [], "local": []}, {"swarm": 0.0, "local": 0.0}
            optimizers = {"swarm": torch.optim.Adam(trainable, lr=lr), "local": torch.optim.Adam(local_params, lr=lr)}
            for step in range(args.steps):
                batch = data[step % 4 * 2:step % 4 * 2 + 2]
                for name in ("swarm", "local"):
                    optimizers[name].zero_grad()
                    start = time.perf_counter()
                    if name == "swarm":
                        logits = model(batch).logits
                    elif args.mode == "lora":
                        logits = local(input_ids=batch).logits
                    else:
                        logits = _local_logits(local, batch, local_params, args)
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
                    loss.backward()
                    seconds[name] += time.perf_counter() - start
                    optimizers[name].step()
                    curves[name].append(loss.item())
            lora_bytes = model.lora_weights.numel() * 4 if args.mode == "lora" else 0
            model.shutdown()

    size = f"hidden {args.hidden}, {args.layers} blocks, batch 2 x {args.length} tokens"
    what = "LoRA rank 8 on q_proj, v_proj" if args.mode == "lora" else f"Soft prompt ({args.mode}, {args.prefix} tokens)"
    print(f"\n## {what} trained through 2 servers vs locally ({size})\n")
    print("| step | swarm loss | local loss |")
    print("|---|---|---|")
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"| {step} | {curves['swarm'][step]:.4f} | {curves['local'][step]:.4f} |")
    print(f"| {args.steps - 1} | {curves['swarm'][-1]:.4f} | {curves['local'][-1]:.4f} |")
    tokens = 2 * (args.length + args.prefix) * args.steps
    print("\n| training | tokens/s (forward + backward) |")
    print("|---|---|")
    for name in ("swarm", "local"):
        print(f"| {name} | {tokens / seconds[name]:.0f} |")
    print(f"\nswarm / local: {seconds['local'] / seconds['swarm']:.2f}x")
    if args.mode == "lora":
        print(f"LoRA weights: {lora_bytes / 1024:.0f} KiB per update, sent with the forward only (the backward "
              f"names them by hash)")
    print(f"\nfinal loss gap: {100 * abs(curves['swarm'][-1] - curves['local'][-1]) / curves['local'][-1]:.3f}%")


def _local_logits(local, batch, params, args):
    prefix = args.prefix
    embeds = torch.cat([params[0].expand(batch.shape[0], -1, -1), local.get_input_embeddings()(batch)], dim=1)
    handles = []
    if args.mode == "deep_ptune":
        from shards.testing import deep_prompt_hooks
        handles = deep_prompt_hooks(local, params[1].view(prefix, len(local.model.layers), -1).permute(1, 0, 2), prefix)
    logits = local(inputs_embeds=embeds).logits[:, prefix:]
    for handle in handles:
        handle.remove()
    return logits


if __name__ == "__main__":
    main()
