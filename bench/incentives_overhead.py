"""What payments cost: generation tokens/s of a free swarm against the same swarm with metering and
vouchers (priced servers, signed receipts and attestations, a settlement contract on anvil), and with 5%
spot-checks on top; then gas per redemption and per slash.

    python bench/incentives_overhead.py

Same weights, same servers, same process, greedy, float32, batch 1. Each row is the median of 3 runs.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

ETH = 10**18


def tokens_per_s(model, ids, new_tokens=48, repeats=3) -> float:
    model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    from incentives.contract import Settlement
    from incentives.devnode import DevNode
    from incentives.vouchers import Verdict, Voucher, sign
    from incentives.wallet import create_wallet
    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm

    os.environ["COCOON_PASSPHRASE"] = "bench"
    rows = []
    with tempfile.TemporaryDirectory() as tmp, DevNode() as node:
        save_random_checkpoint(tmp, "llama", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=4, vocab_size=32000)
        owner, client = node.new_account(), node.new_account()
        settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600, min_stake=0, verdict_threshold=1)
        settlement.deposit(client, 10 * ETH)
        ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        spans = [(0, 4), (4, 8), (0, 4), (4, 8)]  # two of each, so spot-checks have somewhere to go
        for priced in (False, True):
            args = []
            for i in range(len(spans)):
                if priced:
                    keystore = Path(tmp) / f"s{i}-{time.monotonic_ns()}.json"
                    account = create_wallet(keystore, "bench")
                    node.fund(account.address, ETH)
                    settlement.register(account, 1)
                    args.append(["--price", "1000", "--payout", str(keystore), "--chain-rpc", node.url,
                                 "--contract", settlement.address])
                else:
                    args.append([])
            with LocalSwarm(tmp) as swarm:
                servers = [swarm.add_server(span, *a, wait=False) for span, a in zip(spans, args)]
                for server in servers:
                    server.wait_for("Server ready", 180)
                configs = [("free swarm", {})] if not priced else [
                    ("metering + vouchers", dict(wallet=client, contract=settlement.address,
                                                 chain_id=node.w3.eth.chain_id)),
                    ("metering + vouchers + 5% spot-checks", dict(wallet=client, contract=settlement.address,
                                                                  chain_id=node.w3.eth.chain_id, spot_check_rate=0.05,
                                                                  spot_check_seed=0))]
                for name, kwargs in configs:
                    model = AutoDistributedModelForCausalLM.from_pretrained(tmp, initial_peers=swarm.initial_peers,
                                                                            **kwargs)
                    with torch.no_grad():
                        rows.append((name, tokens_per_s(model, ids)))
                    model.shutdown()
                    print(f"  {name}: {rows[-1][1]:.1f} tokens/s", flush=True)

        # gas: one redemption of a fresh channel, one of a channel already paid once, one slash
        server, reporter = node.new_account(), node.new_account()
        verifier = node.new_account()
        settlement.register(server, ETH)
        settlement.add_verifier(owner, verifier.address)
        gas = {}
        for i, amount in enumerate((10**12, 2 * 10**12)):
            voucher = Voucher(client.address, server.address, 42, amount, amount)
            receipt = settlement.redeem(server, voucher, sign(voucher, client.key, settlement.domain))
            gas["redeem (first on a channel)" if i == 0 else "redeem (later on a channel)"] = receipt.gasUsed
        verdict = Verdict(server.address, b"\x01" * 32, reporter.address)
        receipt = settlement.slash(reporter, server.address, b"\x01" * 32, reporter.address,
                                   [sign(verdict, verifier.key, settlement.domain)])
        gas["slash (1 verifier signature)"] = receipt.gasUsed

    base = rows[0][1]
    print("\n| configuration | tokens/s | vs free swarm |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {100 * (rate / base - 1):+.1f}% |")
    print("\n| transaction | gas |")
    print("|---|---|")
    for name, used in gas.items():
        print(f"| {name} | {used} |")


if __name__ == "__main__":
    main()
