"""What payments cost: generation tokens/s of a free swarm against the same swarm with metering and
vouchers (priced servers, signed receipts and attestations, a settlement contract on anvil), and with 5%
spot-checks on top; then gas per redemption and per slash.

    python bench/incentives_overhead.py

Same weights, greedy, float32, batch 1, 48 new tokens. A free swarm and a priced one run side by side and
the configurations take turns; each row is the median of 7 rounds.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

ETH = 10**18
ROUNDS = 7


def tokens_per_s(model, ids, new_tokens=48) -> float:
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return new_tokens / (time.perf_counter() - start)


def _price_args(priced: bool, index: int, tmp: str, node, settlement) -> list[str]:
    if not priced:
        return []
    from incentives.wallet import create_wallet
    keystore = Path(tmp) / f"server{index}.json"
    account = create_wallet(keystore, "bench")
    node.fund(account.address, ETH)
    settlement.register(account, 1)
    return ["--price", "1000", "--payout", str(keystore), "--chain-rpc", node.url, "--contract", settlement.address]


def main():
    from incentives.contract import Settlement
    from incentives.devnode import DevNode
    from incentives.vouchers import Reservation, Verdict, Voucher, sign
    from shards.testing import save_random_checkpoint
    from swarm import AutoDistributedModelForCausalLM
    from swarm.apps.local_swarm import LocalSwarm

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
        # both swarms stay up and the configurations take turns, so that drift in the machine's load
        # falls on all of them alike
        with contextlib.ExitStack() as stack:
            swarms = {}
            for priced in (False, True):
                swarm = stack.enter_context(LocalSwarm(tmp))
                servers = [swarm.add_server(span, *_price_args(priced, i, tmp, node, settlement), wait=False)
                           for i, span in enumerate(spans)]
                for server in servers:
                    server.wait_for("Server ready", 180)
                swarms[priced] = swarm
            paying = dict(wallet=client, contract=settlement.address, chain_id=node.w3.eth.chain_id)
            configs = [("free swarm", False, {}), ("metering + vouchers", True, paying),
                       ("metering + vouchers + 5% spot-checks", True,
                        dict(paying, spot_check_rate=0.05, spot_check_seed=0))]
            models = {name: AutoDistributedModelForCausalLM.from_pretrained(
                tmp, initial_peers=swarms[priced].initial_peers, **kwargs) for name, priced, kwargs in configs}
            rates = {name: [] for name in models}
            with torch.no_grad():
                for model in models.values():
                    model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)  # warm-up
                for round_ in range(ROUNDS):
                    for name, model in models.items():
                        rates[name].append(tokens_per_s(model, ids))
                    print(f"  round {round_ + 1}/{ROUNDS}: " + ", ".join(
                        f"{name} {rates[name][-1]:.1f}" for name in models), flush=True)
            for model in models.values():
                model.shutdown()
            rows = [(name, statistics.median(r)) for name, r in rates.items()]

        # gas: one redemption of a fresh channel, one of a channel already paid once, one slash
        server, reporter = node.new_account(), node.new_account()
        verifier = node.new_account()
        settlement.register(server, ETH)
        settlement.add_verifier(owner, verifier.address)
        gas = {}
        reservation = Reservation(client.address, server.address, 42, 10**13)
        receipt = settlement.reserve(server, reservation, sign(reservation, client.key, settlement.domain))
        gas["reserve (first on a channel)"] = receipt.gasUsed
        for i, amount in enumerate((10**12, 2 * 10**12)):
            voucher = Voucher(client.address, server.address, 42, amount, amount)
            receipt = settlement.redeem(server, voucher, sign(voucher, client.key, settlement.domain))
            gas["redeem (first on a channel)" if i == 0 else "redeem (later on a channel)"] = receipt.gasUsed
        until = node.w3.eth.get_block("latest").timestamp + 3600
        verdict = Verdict(server.address, b"\x01" * 32, reporter.address, until)
        receipt = settlement.slash(reporter, server.address, b"\x01" * 32, reporter.address, until,
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
