"""Cheaters on both sides and an unlucky operator, against real priced servers and the settlement contract on
anvil: rotating channels gets no extra credit; nothing reserved gets no request; servers sharing one escrow
are never owed more than it holds; a payer must prove its key;
signatures the contract would refuse are refused; a priced server without valid attestations is banned and
paid no further; two colluders cannot convict an honest server; a chain that errors or hangs stops neither
serving nor announcing, and once it is back every voucher is redeemed in full."""
import http.server
import threading
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from incentives.contract import Settlement
from incentives.devnode import DevNode
from incentives.payer import HALF_N, PayerProof
from incentives.vouchers import Reservation, Voucher, sign
from incentives.wallet import create_wallet
from shards import Checkpoint
from swarm import AutoDistributedModelForCausalLM
from swarm.client import loop
from swarm.client.swarm_client import SwarmClient
from swarm.apps.local_swarm import LocalSwarm
from swarm.wire.codes import ErrorCode, RemoteError
from swarm.wire.payloads import PayerSignature, Payment, SignedReservation, SignedVoucher
from swarm.wire.requests import SpanRequest

pytestmark = pytest.mark.slow
ETH = 10**18
PRICE = 1000  # wei per token x block
HIDDEN = 64


class ChainProxy:
    """JSON-RPC in front of a node that can be made to fail: 'ok', 'error' (HTTP 500) or 'hang'."""

    def __init__(self, upstream: str):
        self.mode = "ok"
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                while proxy.mode == "hang":
                    time.sleep(0.1)
                if proxy.mode == "error":
                    self.send_response(500)
                    self.end_headers()
                    return
                request = urllib.request.Request(upstream, body, {"Content-Type": "application/json"})
                answer = urllib.request.urlopen(request, timeout=30).read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.mode = "ok"
        self.server.shutdown()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    with DevNode() as node:
        owner = node.new_account()
        settlement = Settlement.deploy(node.w3, owner, withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
        yield node, settlement, tmp_path_factory.mktemp("wallets")


def priced_server_args(chain, name: str, rpc: str | None = None, *extra: str) -> tuple[str, list[str]]:
    node, settlement, wallets = chain
    keystore = wallets / f"{name}.json"
    account = create_wallet(keystore, "pw")
    node.fund(account.address, 5 * ETH)
    settlement.register(account, 2 * ETH)
    return account.address, ["--price", str(PRICE), "--payout", str(keystore), "--chain-rpc", rpc or node.url,
                              "--contract", settlement.address, *extra]


def add_priced_server(swarm, chain, name: str, mischief: str, throughput: str | None = None):
    """A priced server of blocks 0:4 that misbehaves as tests.malicious_server's ``mischief`` says (or not:
    "none"), advertising ``throughput`` tokens/s when given; not waited for."""
    env = {"COCOON_MISCHIEF": mischief, **({"COCOON_ADVERTISE_THROUGHPUT": throughput} if throughput else {})}
    return swarm.add_server((0, 4), *priced_server_args(chain, name)[1], wait=False, module="tests.malicious_server",
                            env=env)


def paying_client(chain, escrow: int):
    node, settlement, _ = chain
    account = node.new_account()
    if escrow:
        settlement.deposit(account, escrow)
    return account


def test_credit_is_proven_per_address_and_backed_by_escrow(chain, checkpoints, monkeypatch):
    node, settlement, _ = chain
    monkeypatch.setenv("COCOON_PASSPHRASE", "pw")
    path = checkpoints("llama")
    payout, args = priced_server_args(chain, "credit", None, "--credit-limit", str(10 * 4 * PRICE * 10))
    x = torch.randn(1, 10, HIDDEN)  # 10 tokens x 4 blocks x PRICE = 40,000 wei a request
    with LocalSwarm(path, [(0, 4)], server_args=args) as swarm:
        peers = [SwarmClient(swarm.initial_peers, Checkpoint(path).model_id, 4) for _ in range(3)]
        try:
            (server,) = peers[0].swarm_state().online()

            def forward(client, account, channel, proof=True, voucher=None, proof_peer=None, reserve=10**9):
                proven = PayerProof(account.address, server, proof_peer or str(client.p2p.peer_id),
                                    int(time.time()) + 600).signed(account)
                reservation = Reservation(account.address, payout, channel, reserve)
                payment = Payment(account.address, channel, voucher,
                                  PayerSignature(proven.expires, proven.signature) if proof else None,
                                  SignedReservation(reserve, sign(reservation, account.key, settlement.domain))
                                  if reserve else None)
                return loop.run(client.call_span(server, "forward", SpanRequest(x, 0, 4, payment=payment)))

            rotator, rich = peers[0], paying_client(chain, ETH)
            with pytest.raises(RemoteError, match="prove that your peer pays") as error:
                forward(rotator, rich, 1, proof=False)
            assert error.value.code == ErrorCode.PAYMENT_REQUIRED
            with pytest.raises(RemoteError, match="invalid or expired"):
                forward(rotator, rich, 1, proof_peer="QmSomebodyElse")  # a proof made for another peer
            served = 0
            with pytest.raises(RemoteError, match="credit limit reached") as error:
                for channel in range(100):  # a new channel for every request, never a voucher
                    forward(rotator, rich, channel)
                    served += 1
            assert error.value.code == ErrorCode.PAYMENT_REQUIRED
            assert served == 11  # 10 requests of credit and the one that crossed the line: no more
            with pytest.raises(RemoteError, match="credit limit reached"):  # nor from another address of its own
                forward(rotator, paying_client(chain, ETH), 1)

            empty = paying_client(chain, 0)  # a client with no escrow: its reservation moves nothing
            with pytest.raises(RemoteError, match="0 wei reserved for this server") as error:
                forward(peers[1], empty, 1)
            assert error.value.code == ErrorCode.PAYMENT_REQUIRED
            with pytest.raises(RemoteError, match="this request carried none"):  # nor without a reservation
                forward(peers[1], paying_client(chain, ETH), 2, reserve=0)
            small = paying_client(chain, ETH)  # 50,000 wei reserved: one request of 40,000 and no more
            forward(peers[1], small, 3, reserve=50_000)
            with pytest.raises(RemoteError, match="80000 wei of work not yet paid on channel 3 .* 50000 wei"):
                forward(peers[1], small, 3, reserve=50_000)

            honest = paying_client(chain, ETH)
            forward(peers[2], honest, 5)
            voucher = Voucher(honest.address, payout, 5, 40, 40_000)
            signature = sign(voucher, honest.key, settlement.domain)
            r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
            malleated = r + (2 * HALF_N + 1 - s).to_bytes(32, "big") + bytes([55 - v])  # ecrecover takes it
            for bad in (malleated, signature[:64] + bytes([v - 27])):
                with pytest.raises(RemoteError, match="not canonical") as error:
                    forward(peers[2], honest, 5, voucher=SignedVoucher(**voucher.to_wire(), signature=bad))
                assert error.value.code == ErrorCode.PAYMENT_REQUIRED
            forward(peers[2], honest, 5, voucher=SignedVoucher(**voucher.to_wire(), signature=signature))
        finally:
            for client in peers:
                client.shutdown()


def test_a_failing_or_hanging_chain_stops_nothing_and_loses_no_voucher(chain, checkpoints, monkeypatch):
    node, settlement, _ = chain
    monkeypatch.setenv("COCOON_PASSPHRASE", "pw")
    path = checkpoints("llama")
    proxy = ChainProxy(node.url)
    payout, args = priced_server_args(chain, "outage", proxy.url, "--redeem-period", "1", "--announce-period", "1")
    client = paying_client(chain, ETH)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    try:
        with LocalSwarm(path, [(0, 4)], server_args=args) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, wallet=client, contract=settlement.address,
                chain_id=node.w3.eth.chain_id)
            for mode in ("error", "hang"):
                proxy.mode = mode
                for _ in range(3):  # vouchers keep coming; the server cannot redeem them
                    model.generate(ids, max_new_tokens=8, do_sample=False)
                    time.sleep(1.0)
                state = model.swarm.swarm_state(refresh=True)  # still announcing
                assert list(state.online()) == [swarm.servers[0].peer_id]
            channel = model.swarm.payments.channels[swarm.servers[0].peer_id]
            proxy.mode = "ok"
            model.settle()
            owed = channel.tally.amount(channel.prices)
            deadline = time.monotonic() + 60
            while settlement.paid(client.address, payout, channel.channel) < owed and time.monotonic() < deadline:
                time.sleep(1.0)
            assert settlement.paid(client.address, payout, channel.channel) == owed == channel.tally.total_units * PRICE
            assert swarm.servers[0].process.poll() is None
            model.shutdown()
    finally:
        proxy.close()


def test_a_priced_server_without_valid_attestations_is_banned_and_paid_no_further(chain, checkpoints, monkeypatch):
    node, settlement, _ = chain
    monkeypatch.setenv("COCOON_PASSPHRASE", "pw")
    path = checkpoints("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    with LocalSwarm(path) as swarm:
        honest = add_priced_server(swarm, chain, "attested", "none", throughput="1")  # tried last
        liars = [add_priced_server(swarm, chain, mischief, mischief, throughput="1e5")
                 for mischief in ("no_attestation", "bad_attestation")]
        for server in [honest, *liars]:
            server.wait_for("Server ready", 180)
        client = paying_client(chain, ETH)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, wallet=client, contract=settlement.address,
            chain_id=node.w3.eth.chain_id, exact_wire=True)
        output = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(output, local.generate(ids, max_new_tokens=10, do_sample=False))
        for liar in liars:
            assert model.swarm.bans.is_banned(liar.peer_id) and liar.peer_id in model.swarm.payments.stopped
            assert liar.peer_id not in model.swarm.payments.channels
        model.generate(ids, max_new_tokens=4, do_sample=False)
        assert {peer for peer, _ in model.swarm.payments.settle_requests()} <= {honest.peer_id}
        model.shutdown()


@pytest.mark.parametrize("own_copy", [False, True])
def test_two_colluders_cannot_convict_an_honest_server(chain, checkpoints, monkeypatch, own_copy):
    """Two servers with their own payout addresses and stakes return the same wrong output. Checking the honest
    server, they disagree with it, but two are not the quorum of three independent checkers: nobody is
    convicted. A client with its own copy of the blocks checks against it alone, and agrees with the honest
    server."""
    node, settlement, _ = chain
    monkeypatch.setenv("COCOON_PASSPHRASE", "pw")
    path = checkpoints("llama")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with LocalSwarm(path) as swarm:
        honest = add_priced_server(swarm, chain, f"honest-{own_copy}", "none", throughput="1e5")
        colluders = [add_priced_server(swarm, chain, f"colluder{i}-{own_copy}", "scale", throughput="1")
                     for i in range(2)]  # the honest server is chosen first, the colluders check it
        for server in [honest, *colluders]:
            server.wait_for("Server ready", 180)
        client = paying_client(chain, ETH)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, wallet=client, contract=settlement.address,
            chain_id=node.w3.eth.chain_id, exact_wire=True, spot_check_rate=1.0, spot_check_local=own_copy)
        with model.inference_session(max_length=16) as session:
            output = model.generate(ids, max_new_tokens=8, do_sample=False)
            assert [link.peer_id for link in session.chain] == [honest.peer_id]
        assert torch.equal(output, local.generate(ids, max_new_tokens=8, do_sample=False))
        checker = model.swarm.spot_checker
        assert honest.peer_id not in checker.convicted and not model.swarm.bans.is_banned(honest.peer_id)
        assert not checker.convicted and checker.checked > 0
        assert (checker.unsettled == 0) if own_copy else (checker.unsettled > 0)
        model.shutdown()


def test_batched_sessions_are_charged_and_spot_checked_as_each_alone(chain, checkpoints, monkeypatch):
    """Three paying clients decode at once, each spot-checking every step, on two priced servers of the same
    blocks: the servers run steps of different sessions as one batch, yet each client gets transformers'
    tokens, nobody is convicted, and each client is charged exactly its own units: every token but the last
    through the 4 blocks of its chain, and each checked step's whole input again on the checker."""
    node, settlement, _ = chain
    monkeypatch.setenv("COCOON_PASSPHRASE", "pw")
    path = checkpoints("llama")
    prompt, new_tokens, clients = 6, 10, 3
    prompts = [torch.randint(3, 128, (1, prompt), generator=torch.Generator().manual_seed(i)) for i in range(clients)]
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = [local.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None) for ids in prompts]
    with LocalSwarm(path) as swarm:
        # (a wide window: on a loaded machine, 30 ms once let every step of the three clients run alone)
        servers = [swarm.add_server((0, 4), *priced_server_args(chain, f"batched-{i}")[1], "--batch-window-ms", "150",
                                    wait=False) for i in range(2)]
        for server in servers:
            server.wait_for("Server ready", 180)
        models = [AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, exact_wire=True, wallet=paying_client(chain, ETH),
            contract=settlement.address, chain_id=node.w3.eth.chain_id, spot_check_rate=1.0,
            spot_check_local=False) for _ in prompts]
        outputs = [None] * clients
        barrier = threading.Barrier(clients)

        def run(i):
            barrier.wait()
            outputs[i] = models[i].generate(prompts[i], max_new_tokens=new_tokens, do_sample=False,
                                            eos_token_id=None)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        batched = sum(count for server in servers
                      for size, count in loop.run(models[0].swarm.info(server.peer_id))["batches"].items()
                      if int(size) > 1)
        assert batched > 0  # steps of different sessions (generation or checks) shared a forward
        for model, output, want in zip(models, outputs, expected):
            assert torch.equal(output, want)
            checker = model.swarm.spot_checker
            assert checker.checked == new_tokens and checker.convicted == {} and checker.unsettled == 0
            charged = sum(channel.tally.total_units for channel in model.swarm.payments.channels.values())
            generated = prompt + new_tokens - 1
            rechecked = sum(range(prompt, prompt + new_tokens))  # the input so far, at each step
            assert charged == 4 * (generated + rechecked)
            model.shutdown()
