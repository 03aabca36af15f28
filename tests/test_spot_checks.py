"""Spot-checks with real processes: a server that perturbs its outputs is caught within the steps the
sampling rate predicts, banned, unpaid, replaced without changing the output, and its published evidence
re-checks and gets it slashed; honest servers are never flagged over 1000 checked steps."""
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from incentives.contract import Settlement
from incentives.devnode import DevNode
from incentives.verification import Evidence
from incentives.vouchers import Verdict, sign
from incentives.wallet import create_wallet
from shards import BlockSpan
from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm

pytestmark = pytest.mark.slow
ETH = 10**18
RATE = 0.2


def test_cheating_server_is_caught_banned_unpaid_and_slashed(checkpoints, tmp_path, monkeypatch):
    path = checkpoints("llama")
    monkeypatch.setenv("COCOON_PASSPHRASE", "pw")
    with DevNode() as node:
        owner, client, reporter = node.new_account(), node.new_account(), node.new_account()
        verifiers = sorted([node.new_account() for _ in range(2)], key=lambda a: int(a.address, 16))
        settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
        for verifier in verifiers:
            settlement.add_verifier(owner, verifier.address)
        settlement.deposit(client, 10 * ETH)

        def priced(name):
            keystore = tmp_path / f"{name}.json"
            account = create_wallet(keystore, "pw")
            node.fund(account.address, 5 * ETH)
            settlement.register(account, 2 * ETH)
            return account, ["--price", "1000", "--payout", str(keystore), "--chain-rpc", node.url,
                             "--contract", settlement.address, "--redeem-period", "3600"]

        cheat_account, cheat_args = priced("cheat")
        with LocalSwarm(path) as swarm:
            cheat = swarm.add_server((0, 4), *cheat_args, wait=False, module="tests.malicious_server")
            honest = [swarm.add_server(span, *priced(f"honest{i}")[1], wait=False)
                      for i, span in enumerate([(0, 4), (0, 2), (2, 4)])]
            for server in [cheat, *honest]:
                server.wait_for("Server ready", 180)
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, exact_wire=True, wallet=client, contract=settlement.address,
                chain_id=node.w3.eth.chain_id, spot_check_rate=RATE, spot_check_seed=0)
            checker = model.swarm.spot_checker
            # the cheat looks like the nearest server, so that chains go through it
            now = time.monotonic()
            model.swarm.rtt = {server.peer_id: (1e-4 if server is cheat else 0.5, now) for server in [cheat, *honest]}
            model.swarm.swarm_state(refresh=True)
            local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            for attempt in range(8):  # each generation picks its chain at random among equivalent servers
                ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(attempt))
                output = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None)
                assert torch.equal(output, local.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None))
                if cheat.peer_id in checker.convicted:
                    break
            assert cheat.peer_id in checker.convicted, checker.steps
            assert checker.convicted_after[cheat.peer_id] <= 8 / RATE  # geometric: mean 1/rate steps
            assert model.swarm.bans.is_banned(cheat.peer_id)
            assert model.swarm.payments.channel(cheat.peer_id, model.swarm.swarm_state().servers[cheat.peer_id]) is None
            for honest_server in honest:
                assert honest_server.peer_id not in checker.convicted

            # the evidence is in the DHT; anyone re-checks it with the same blocks and verifiers slash
            found = model.swarm.dht.get(f"{model.swarm.model_id}.evidence", latest=True)
            (record,) = [v.value for v in found.value.values()]
            evidence = Evidence.from_wire(record)
            assert evidence.peer_id == cheat.peer_id and evidence.consistent()
            span = BlockSpan.from_pretrained(path, 0, 4)
            with torch.no_grad():
                honest_output = span(torch.from_numpy(evidence.inputs().copy())).numpy()
            assert evidence.recheck(honest_output, honest_output)  # float32: the reference is its own dtype
            # `cocoon verify` does the same from the saved file, and from the DHT
            import os
            import subprocess
            import sys
            from swarm.client.evidence import evidence_dir
            saved = evidence_dir() / f"{evidence.digest.hex()}.msgpack"
            verify = subprocess.run([sys.executable, "-m", "swarm.apps.cli", "verify", str(path), str(saved),
                                     "--initial-peers", *swarm.initial_peers], capture_output=True, text=True,
                                    timeout=120, env=os.environ)
            assert verify.returncode == 0, verify.stdout + verify.stderr
            assert verify.stdout.count("PROVEN WRONG") == 2, verify.stdout
            until = node.w3.eth.get_block("latest").timestamp + 3600
            verdict = Verdict(cheat_account.address, evidence.digest, reporter.address, until)
            settlement.slash(reporter, cheat_account.address, evidence.digest, reporter.address, until,
                             [sign(verdict, v.key, settlement.domain) for v in verifiers])
            assert settlement.stake(cheat_account.address) == 0
            model.shutdown()


def test_a_server_wrong_only_in_verify_steps_is_caught_with_evidence_that_rechecks(checkpoints, tmp_path,
                                                                                   monkeypatch):
    """Speculative decoding: spot checks cover verify steps, and the evidence holds across rollbacks (the input
    chain names the steps as kept: a verify step cut back is chained as its kept part)."""
    import copy
    path = checkpoints("llama")
    monkeypatch.setenv("COCOON_PASSPHRASE", "pw")
    monkeypatch.setenv("COCOON_MISCHIEF", "perturb_verify")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    draft = copy.deepcopy(local)  # agrees with the target on about half the tokens
    with torch.no_grad():
        draft.model.layers[3].mlp.down_proj.weight.mul_(2.0)
    greedy = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    with DevNode() as node:
        owner, client = node.new_account(), node.new_account()
        settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
        settlement.deposit(client, 10 * ETH)
        args = {}
        for name in ("cheat", "honest"):
            keystore = tmp_path / f"{name}.json"
            account = create_wallet(keystore, "pw")
            node.fund(account.address, 5 * ETH)
            settlement.register(account, 2 * ETH)
            args[name] = ["--price", "1000", "--payout", str(keystore), "--chain-rpc", node.url,
                          "--contract", settlement.address, "--redeem-period", "3600"]
        with LocalSwarm(path) as swarm:
            cheat = swarm.add_server((0, 4), *args["cheat"], wait=False, module="tests.malicious_server")
            honest = swarm.add_server((0, 4), *args["honest"], wait=False)
            for server in (cheat, honest):
                server.wait_for("Server ready", 180)
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, exact_wire=True, wallet=client, contract=settlement.address,
                chain_id=node.w3.eth.chain_id, spot_check_rate=1.0, spot_check_seed=0)
            now = time.monotonic()
            model.swarm.rtt = {cheat.peer_id: (1e-4, now), honest.peer_id: (0.5, now)}  # chains go through the cheat
            model.swarm.swarm_state(refresh=True)
            ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
            with model.inference_session(max_length=32) as session:
                output = model.generate(ids, assistant_model=draft, **greedy)
                assert session.rolled_back > 0
            assert torch.equal(output, local.generate(ids, **greedy))
            checker = model.swarm.spot_checker
            assert cheat.peer_id in checker.convicted and honest.peer_id not in checker.convicted
            evidence = checker.convicted[cheat.peer_id]
            assert evidence is not None and evidence.consistent()
            with torch.no_grad():
                honest_output = BlockSpan.from_pretrained(path, 0, 4)(torch.from_numpy(evidence.inputs().copy()))
            assert evidence.recheck(honest_output.numpy(), honest_output.numpy())
            model.shutdown()


@pytest.mark.parametrize("dtype,own_copy", [("float32", False), ("bfloat16", False), ("bfloat16", True)])
def test_honest_servers_are_never_flagged_over_1000_checked_steps(checkpoints, dtype, own_copy):
    """Checked by other servers (the bound of their dtypes), or by the client's own copy (the tolerance it
    measures by running the span in the servers' dtype too)."""
    path = checkpoints("llama")
    with LocalSwarm(path, [(0, 4), (0, 4), (0, 2), (2, 4)], dtype=dtype) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                exact_wire=dtype == "float32", spot_check_rate=1.0,
                                                                spot_check_local=own_copy)
        checker = model.swarm.spot_checker
        seed = 0
        while checker.checked < 1000:
            ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(seed))
            model.generate(ids, max_new_tokens=60, do_sample=False, eos_token_id=None)
            seed += 1
        assert checker.convicted == {}
        model.shutdown()


def test_own_copy_keeps_its_spans_loaded_within_its_byte_budget(checkpoints):
    """A client re-runs the same spans at every checked step: each (blocks, dtype) loads once, and the least
    recently used span goes when the copies pass the budget. The outputs are transformers' blocks' own."""
    from shards.checkpoint import Checkpoint
    from swarm.client.evidence import LocalBlocks
    path = checkpoints("llama")
    blocks = LocalBlocks(Checkpoint(path))
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    first = blocks.output(0, 2, x)
    loaded = blocks._span(0, 2, "float32")
    blocks.output(2, 4, x)
    assert blocks._span(0, 2, "float32") is loaded  # not loaded again
    expected = BlockSpan.from_pretrained(path, 0, 2, dtype="float32")(x)
    assert torch.equal(first, expected.detach())
    one_span = loaded.parameters_bytes()
    small = LocalBlocks(Checkpoint(path), max_bytes=int(1.5 * one_span))
    small.output(0, 2, x)
    small.output(2, 4, x)
    assert list(small._spans) == [(2, 4, "float32")]  # the older span let go
