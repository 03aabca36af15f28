"""Servers paid per processed token, end to end: real server processes, a client, vouchers, and the
settlement contract on anvil over HTTP (a real node; every process reaches it)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from incentives.contract import Settlement
from incentives.devnode import DevNode, anvil_path
from incentives.ledger_file import ledger_path, read_ledger_json
from incentives.wallet import create_wallet
from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm
from swarm.wire.codes import ErrorCode, RemoteError

pytestmark = pytest.mark.slow
ETH = 10**18
PRICES = {(0, 1): 3 * 10**9, (1, 4): 5 * 10**9}  # wei per token x block: servers set their own price


@pytest.fixture(scope="module")
def node():
    try:
        anvil_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    with DevNode() as node:
        yield node


def test_each_server_is_paid_exactly_units_times_price(node, checkpoints, tmp_path, monkeypatch, caplog):
    """...and a server of the whole model paid through another contract is skipped, with a log line: the client's
    own configuration says which contract it pays through, never a server's record."""
    path = checkpoints("llama")
    monkeypatch.setenv("COCOON_PASSPHRASE", "test passphrase")
    client, settlement = funded_client(node)
    _, other = funded_client(node)

    payouts, server_args = priced_servers(node, settlement, tmp_path)
    _, foreign_args = priced_servers(node, other, tmp_path / "other")
    before = {span: node.w3.eth.get_balance(address) for span, address in payouts.items()}
    first_block = node.w3.eth.block_number + 1

    prompt, new_tokens = 20, 24  # a prompt long enough to take the by-push path, were the servers free
    with LocalSwarm(path) as swarm:
        foreign = swarm.add_server((0, 4), *foreign_args[(0, 1)])  # one hop for the whole model, were it usable
        servers, model = paying_client(swarm, path, server_args, client, settlement, node)
        ids = torch.randint(3, 128, (1, prompt), generator=torch.Generator().manual_seed(0))
        output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert torch.equal(output, local.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None))
        channel = model.swarm.payments.channel_id
        model.shutdown()  # sends final vouchers
        assert f"skipping server {foreign.peer_id}: it is paid through contract {other.address}" in caplog.text
        for server in servers:
            server.stop()  # SIGTERM: the server redeems what it holds before leaving
            assert "Redeemed" in "".join(server.output), "".join(server.output)

    tokens = prompt + new_tokens - 1  # every token but the last generated one went through every block
    for span, price in PRICES.items():
        units = tokens * (span[1] - span[0])
        assert settlement.paid(client.address, payouts[span], channel) == units * price
        gas = gas_spent(node.w3, payouts[span], first_block)  # the server sent its redemptions itself
        assert node.w3.eth.get_balance(payouts[span]) - before[span] == units * price - gas
    total = sum(tokens * (b - a) * price for (a, b), price in PRICES.items())
    reserved = sum(settlement.reserved(client.address, payouts[span], channel) for span in PRICES)
    assert settlement.escrow(client.address) + reserved == 10 * ETH - total  # the rest is held for each server


def test_a_speculative_session_pays_every_position_computed_rolled_back_or_not(node, checkpoints, tmp_path,
                                                                              monkeypatch):
    """Drafted tokens the client did not accept were computed all the same: a rollback is no refund."""
    import copy
    path = checkpoints("llama")
    monkeypatch.setenv("COCOON_PASSPHRASE", "test passphrase")
    client, settlement = funded_client(node)
    payouts, server_args = priced_servers(node, settlement, tmp_path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    draft = copy.deepcopy(local)  # agrees with the target on about half the tokens
    with torch.no_grad():
        draft.model.layers[3].mlp.down_proj.weight.mul_(2.0)
    greedy = dict(max_new_tokens=24, do_sample=False, eos_token_id=None)
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with LocalSwarm(path) as swarm:
        servers, model = paying_client(swarm, path, server_args, client, settlement, node)
        with model.inference_session(max_length=32) as session:
            assert torch.equal(model.generate(ids, assistant_model=draft, **greedy), local.generate(ids, **greedy))
            computed, rolled_back = session.position + session.rolled_back, session.rolled_back
        channel = model.swarm.payments.channel_id
        model.shutdown()
        for server in servers:
            server.stop()
            assert "Redeemed" in "".join(server.output), "".join(server.output)
    assert rolled_back > 0
    for span, price in PRICES.items():
        units = computed * (span[1] - span[0])
        assert settlement.paid(client.address, payouts[span], channel) == units * price


def test_servers_sharing_one_escrow_are_never_owed_more_than_it_holds(node, checkpoints, tmp_path, monkeypatch):
    """The second audit's attack: one escrow, three priced servers of one chain at once. Each server works only
    against escrow the client reserved for it, so when the escrow is spent the chain stops, and what the
    servers did (their own ledgers) is what the contract paid them, to within 1% of the escrow."""
    path = checkpoints("llama")
    monkeypatch.setenv("COCOON_PASSPHRASE", "test passphrase")
    monkeypatch.setenv("COCOON_CACHE_DIR", str(tmp_path / "cache"))  # the servers' ledgers, read below
    escrow, price = 10**6, 1000  # about 8 generations of 30 tokens x 4 blocks
    owner, client = node.new_account(), node.new_account()
    settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
    settlement.deposit(client, escrow)
    spans, payouts, servers = [(0, 1), (1, 2), (2, 4)], [], []
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    with LocalSwarm(path) as swarm:
        for span in spans:
            keystore = tmp_path / f"shared-{span[0]}.json"
            account = create_wallet(keystore, "test passphrase")
            node.fund(account.address, 2 * ETH)
            settlement.register(account, ETH)
            payouts.append(account.address)
            servers.append(swarm.add_server(span, "--price", str(price), "--credit-limit", "10000", "--payout",
                                            str(keystore), "--chain-rpc", node.url, "--contract", settlement.address,
                                            "--redeem-period", "1", wait=False))
        for server in servers:
            server.wait_for("Server ready", 180)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, wallet=client, contract=settlement.address,
            chain_id=node.w3.eth.chain_id)
        with pytest.raises(RemoteError, match="reserved for this server") as refused:
            for _ in range(30):
                model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert refused.value.code == ErrorCode.PAYMENT_REQUIRED
        channel = model.swarm.payments.channel_id
        model.shutdown()  # sends final vouchers
        for server in servers:
            server.stop()  # redeems what it holds
    served = sum(c["owed"] for payout in payouts for c in read_ledger_json(ledger_path(payout))["channels"])
    paid = sum(settlement.paid(client.address, payout, channel) for payout in payouts)
    assert paid <= escrow and served - paid <= escrow // 100  # every wei of the work was paid, or 1% at most
    # The chain stops when the first server's reservation runs dry, while the others still hold some (641,000
    # of 1,000,000 wei worked on the first run): what is left stays the client's, to release.
    assert served > escrow // 2
    assert settlement.escrow(client.address) + sum(settlement.reserved(client.address, p, channel)
                                                   for p in payouts) == escrow - paid


def funded_client(node):
    """A client account with 10 ETH of escrow in a newly deployed settlement contract."""
    owner, client = node.new_account(), node.new_account()
    settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
    settlement.deposit(client, 10 * ETH)
    return client, settlement


def paying_client(swarm, path, server_args, client, settlement, node):
    """The priced servers of PRICES started in ``swarm``, and a client paying them from ``client``'s escrow."""
    servers = [swarm.add_server(span, *server_args[span], wait=False) for span in PRICES]
    for server in servers:
        server.wait_for("Server ready", 180)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=swarm.initial_peers, exact_wire=True, wallet=client, contract=settlement.address,
        chain_id=node.w3.eth.chain_id)
    return servers, model


def priced_servers(node, settlement, tmp_path) -> tuple[dict, dict]:
    """A funded, registered payout wallet and the `cocoon serve` flags for each span of PRICES."""
    payouts, server_args = {}, {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    for span, price in PRICES.items():
        keystore = tmp_path / f"server-{span[0]}.json"
        account = create_wallet(keystore, "test passphrase")
        node.fund(account.address, 2 * ETH)
        settlement.register(account, ETH)
        payouts[span] = account.address
        server_args[span] = ["--price", str(price), "--payout", str(keystore), "--chain-rpc", node.url,
                             "--contract", settlement.address, "--redeem-period", "1", "--announce-period", "2"]
    return payouts, server_args


def gas_spent(w3, address, first_block):
    spent = 0
    for number in range(first_block, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True).transactions:
            if tx["from"] == address:
                receipt = w3.eth.get_transaction_receipt(tx["hash"])
                spent += receipt.gasUsed * receipt.effectiveGasPrice
    return spent
