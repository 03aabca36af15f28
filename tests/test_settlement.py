"""The settlement contract on an in-process chain (eth-tester + py-evm), attack by attack."""
import pytest
from eth_account import Account
from hypothesis import HealthCheck, given, settings, strategies as st
from web3 import EthereumTesterProvider, Web3

from incentives.contract import ChainError, Settlement, advance_time
from incentives.vouchers import Domain, Reservation, Verdict, Voucher, sign

ETH = 10**18
HALF_N = 57896044618658097711785492504343953926418782139537452191302581570759080747168
N = 2 * HALF_N + 1


@pytest.fixture(scope="module")
def chain():
    w3 = Web3(EthereumTesterProvider())
    funder = w3.eth.accounts[0]
    accounts = [Account.create() for _ in range(8)]
    for account in accounts:
        w3.eth.send_transaction({"from": funder, "to": account.address, "value": 1000 * ETH})
    return w3, accounts


@pytest.fixture
def setup(chain):
    w3, (owner, client, server, other, verifier1, verifier2, verifier3, reporter) = chain
    settlement = Settlement.deploy(w3, owner, withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
    for verifier in (verifier1, verifier2, verifier3):
        settlement.add_verifier(owner, verifier.address)
    settlement.register(server, 10 * ETH)
    settlement.deposit(client, 5 * ETH)
    return w3, settlement, client, server, other, [verifier1, verifier2, verifier3], reporter


def voucher(client, server, units, amount, channel=1):
    return Voucher(client.address, server.address, channel, units, amount)


def reserve(settlement, client, server, total, channel=1, sender=None):
    """The client signs a reservation of ``total`` in all for ``server``; ``sender`` (the server) submits it."""
    r = Reservation(client.address, server.address, channel, total)
    return settlement.reserve(sender or server, r, sign(r, client.key, settlement.domain))


def test_cumulative_vouchers_pay_only_the_increase(setup):
    w3, settlement, client, server, other, _, _ = setup
    reserve(settlement, client, server, ETH, sender=other)  # anyone may submit a reservation
    before = w3.eth.get_balance(server.address)
    v1 = voucher(client, server, 100, 10**15)
    receipt = settlement.redeem(other, v1, sign(v1, client.key, settlement.domain))  # anyone may submit it
    v2 = voucher(client, server, 250, 25 * 10**14)
    settlement.redeem(other, v2, sign(v2, client.key, settlement.domain))
    assert w3.eth.get_balance(server.address) - before == 25 * 10**14
    assert settlement.paid(client.address, server.address, 1) == 25 * 10**14
    assert settlement.escrow(client.address) == 4 * ETH  # paid from the reservation, not the escrow
    assert settlement.reserved(client.address, server.address, 1) == ETH - 25 * 10**14
    assert receipt.gasUsed < 150_000


def test_old_voucher_after_newer_one_and_replay_are_refused(setup):
    _, settlement, client, server, other, _, _ = setup
    old, new = voucher(client, server, 10, 1000), voucher(client, server, 20, 2000)
    reserve(settlement, client, server, ETH)
    old_signature = sign(old, client.key, settlement.domain)
    settlement.redeem(server, new, sign(new, client.key, settlement.domain))
    with pytest.raises(ChainError, match="voucher already redeemed"):
        settlement.redeem(server, old, old_signature)
    with pytest.raises(ChainError, match="voucher already redeemed"):
        settlement.redeem(server, new, sign(new, client.key, settlement.domain))


def test_voucher_for_another_chain_or_contract_is_refused(setup, chain):
    w3, settlement, client, server, other, _, _ = setup
    v = voucher(client, server, 10, 1000)
    other_chain = Domain(settlement.domain.chain_id + 1, settlement.address)
    with pytest.raises(ChainError, match="not signed by its client"):
        settlement.redeem(server, v, sign(v, client.key, other_chain))
    twin = Settlement.deploy(w3, chain[1][0], withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
    with pytest.raises(ChainError, match="not signed by its client"):
        settlement.redeem(server, v, sign(v, client.key, twin.domain))


def test_forged_and_malleated_signatures_are_refused(setup):
    _, settlement, client, server, other, _, _ = setup
    v = voucher(client, server, 10, 1000)
    with pytest.raises(ChainError, match="not signed by its client"):
        settlement.redeem(server, v, sign(v, other.key, settlement.domain))
    signature = sign(v, client.key, settlement.domain)
    r, s, recovery = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    twin = r + (N - s).to_bytes(32, "big") + bytes([55 - recovery])  # the other valid (r, s, v) of the same key
    with pytest.raises(ChainError, match="malleable signature"):
        settlement.redeem(server, v, twin)
    with pytest.raises(ChainError, match="bad signature v"):
        settlement.redeem(server, v, signature[:64] + bytes([3]))
    tampered = voucher(client, server, 10, 10**6)  # the amount changed after signing
    with pytest.raises(ChainError, match="not signed by its client"):
        settlement.redeem(server, tampered, signature)
    with pytest.raises(ChainError, match="nothing reserved on this channel"):
        settlement.redeem(server, v, signature)
    reserve(settlement, client, server, 1000)
    settlement.redeem(server, v, signature)


def test_redeeming_beyond_the_reservation_pays_only_the_reservation(setup):
    w3, settlement, client, server, _, _, _ = setup
    big = voucher(client, server, 10**6, 8 * ETH)
    before = w3.eth.get_balance(server.address)
    reserve(settlement, client, server, 3 * ETH)
    settlement.redeem(server, big, sign(big, client.key, settlement.domain))
    assert settlement.paid(client.address, server.address, 1) == 3 * ETH
    with pytest.raises(ChainError, match="nothing reserved on this channel"):
        settlement.redeem(server, big, sign(big, client.key, settlement.domain))
    reserve(settlement, client, server, 8 * ETH)  # moves what the escrow holds: 2 of the 5 more signed for
    assert settlement.escrow(client.address) == 0
    with pytest.raises(ChainError, match="client escrow is empty"):
        reserve(settlement, client, server, 8 * ETH)
    settlement.deposit(client, ETH)  # the same signed reservation takes the rest once the client pays in again
    reserve(settlement, client, server, 8 * ETH)
    settlement.redeem(server, big, sign(big, client.key, settlement.domain))
    assert settlement.paid(client.address, server.address, 1) == 6 * ETH
    assert w3.eth.get_balance(server.address) - before < 6 * ETH and w3.eth.get_balance(server.address) > before


def test_a_withdrawal_cannot_take_what_is_reserved(setup):
    w3, settlement, client, server, _, _, _ = setup
    settlement.request_withdrawal(client, 5 * ETH)
    reserve(settlement, client, server, 2 * ETH)  # within the delay: the escrow can still be reserved
    with pytest.raises(ChainError, match="withdrawal delay has not passed"):
        settlement.withdraw(client)
    advance_time(w3, 3601)
    before = w3.eth.get_balance(client.address)
    settlement.withdraw(client)
    assert settlement.escrow(client.address) == 0
    assert 2 * ETH < w3.eth.get_balance(client.address) - before <= 3 * ETH  # only what was left, minus gas
    v = voucher(client, server, 1000, 2 * ETH)
    settlement.redeem(server, v, sign(v, client.key, settlement.domain))  # after the withdrawal: paid in full
    assert settlement.paid(client.address, server.address, 1) == 2 * ETH


def test_servers_sharing_one_escrow_are_reserved_no_more_than_it_holds(setup, chain):
    w3, settlement, client, server, other, _, _ = setup
    third = chain[1][7]
    settlement.register(other, ETH)
    reserve(settlement, client, server, 3 * ETH)
    reserve(settlement, client, other, 3 * ETH)  # 2 of the 3 signed for are left
    with pytest.raises(ChainError, match="client escrow is empty"):
        reserve(settlement, client, third, 3 * ETH)
    assert settlement.backing(client.address, server.address, 1) == 3 * ETH
    assert settlement.backing(client.address, other.address, 1) == 2 * ETH
    assert settlement.backing(client.address, third.address, 1) == 0
    with pytest.raises(ChainError, match="reservation already applied"):  # replayed
        reserve(settlement, client, server, 3 * ETH)
    forged = Reservation(client.address, server.address, 2, ETH)
    with pytest.raises(ChainError, match="not signed by its client"):
        settlement.reserve(server, forged, sign(forged, other.key, settlement.domain))
    for_other = Reservation(client.address, other.address, 1, 9 * ETH)
    with pytest.raises(ChainError, match="not signed by its client"):  # a signature for another server
        settlement.reserve(server, Reservation(client.address, server.address, 1, 9 * ETH),
                           sign(for_other, client.key, settlement.domain))

    v = voucher(client, server, 1000, ETH)
    settlement.request_release(client, server.address, 1)
    assert settlement.backing(client.address, server.address, 1) == 0  # no new credit ...
    settlement.redeem(server, v, sign(v, client.key, settlement.domain))  # ... but what is owed is paid
    with pytest.raises(ChainError, match="releasing"):
        reserve(settlement, client, server, 4 * ETH)
    with pytest.raises(ChainError, match="release delay has not passed"):
        settlement.release(client, server.address, 1)
    advance_time(w3, 3601)
    settlement.release(client, server.address, 1)
    assert settlement.escrow(client.address) == 2 * ETH  # the 2 ETH the server was not owed came back
    assert settlement.reserved(client.address, server.address, 1) == 0


def test_unregistered_server_cannot_redeem_and_unstake_waits(setup):
    w3, settlement, client, server, other, _, _ = setup
    v = voucher(client, other, 1, 1)
    with pytest.raises(ChainError, match="server is not registered"):
        settlement.redeem(other, v, sign(v, client.key, settlement.domain))
    settlement.request_unstake(server)
    with pytest.raises(ChainError, match="unstake delay has not passed"):
        settlement.unstake(server)
    advance_time(w3, 3601)
    settlement.unstake(server)
    assert settlement.stake(server.address) == 0


def verdict_signatures(verdict, verifiers, domain):
    return [sign(verdict, v.key, domain) for v in sorted(verifiers, key=lambda a: int(a.address, 16))]


def deadline(w3, seconds=3600):
    return w3.eth.get_block("latest").timestamp + seconds


def test_slashing_needs_a_threshold_of_distinct_verifiers_and_happens_once(setup):
    w3, settlement, client, server, other, verifiers, reporter = setup
    evidence = bytes(range(32))
    until = deadline(w3)
    verdict = Verdict(server.address, evidence, reporter.address, until)
    with pytest.raises(ChainError, match="too few verifier signatures"):
        settlement.slash(other, server.address, evidence, reporter.address, until,
                         verdict_signatures(verdict, verifiers[:1], settlement.domain))
    with pytest.raises(ChainError, match="signer is not a verifier"):
        settlement.slash(other, server.address, evidence, reporter.address, until,
                         verdict_signatures(verdict, [verifiers[0], other], settlement.domain))
    one = verdict_signatures(verdict, verifiers[:1], settlement.domain)
    with pytest.raises(ChainError, match="distinct and sorted"):
        settlement.slash(other, server.address, evidence, reporter.address, until, one + one)
    wrong_server = Verdict(other.address, evidence, reporter.address, until)
    with pytest.raises(ChainError, match="not a verifier"):
        settlement.slash(other, server.address, evidence, reporter.address, until,
                         verdict_signatures(wrong_server, verifiers[:2], settlement.domain))

    before = w3.eth.get_balance(reporter.address)
    receipt = settlement.slash(other, server.address, evidence, reporter.address, until,
                               verdict_signatures(verdict, verifiers[:2], settlement.domain))
    assert settlement.stake(server.address) == 0
    assert w3.eth.get_balance(reporter.address) - before == 5 * ETH
    assert receipt.gasUsed < 200_000
    with pytest.raises(ChainError, match="evidence already used"):
        settlement.slash(other, server.address, evidence, reporter.address, until,
                         verdict_signatures(verdict, verifiers[1:], settlement.domain))
    fresh = Verdict(server.address, bytes(32), reporter.address, until)
    with pytest.raises(ChainError, match="nothing to slash"):
        settlement.slash(other, server.address, bytes(32), reporter.address, until,
                         verdict_signatures(fresh, verifiers[:2], settlement.domain))


def test_a_withdrawal_requested_long_ago_cannot_front_run_a_redemption(setup):
    w3, settlement, client, server, other, _, _ = setup
    settlement.request_withdrawal(client, 5 * ETH)  # day 0
    advance_time(w3, 3600 + 86400 + 1)  # the delay, then the whole window: the request lapsed
    with pytest.raises(ChainError, match="withdrawal request lapsed: request again"):
        settlement.withdraw(client)
    v = voucher(client, server, 1000, 4 * ETH)
    reserve(settlement, client, server, 4 * ETH)
    settlement.redeem(server, v, sign(v, client.key, settlement.domain))  # the server is paid in full
    assert settlement.paid(client.address, server.address, 1) == 4 * ETH
    settlement.request_withdrawal(client, ETH)  # a fresh request waits the delay again, in plain sight
    assert settlement.pending_withdrawal(client.address) == ETH
    with pytest.raises(ChainError, match="withdrawal delay has not passed"):
        settlement.withdraw(client)
    advance_time(w3, 3601)
    settlement.withdraw(client)
    assert settlement.escrow(client.address) == 0


def test_an_unstaking_server_cannot_redeem_and_stays_slashable_until_it_leaves(setup):
    w3, settlement, client, server, other, verifiers, reporter = setup
    settlement.request_unstake(server)  # day 0, then it keeps serving
    v = voucher(client, server, 10, 10**15)
    with pytest.raises(ChainError, match="server is unstaking: it cannot redeem"):
        settlement.redeem(server, v, sign(v, client.key, settlement.domain))
    advance_time(w3, 3601)  # it could leave now, but a verdict comes first
    evidence = bytes(range(1, 33))
    until = deadline(w3)
    verdict = Verdict(server.address, evidence, reporter.address, until)
    settlement.slash(other, server.address, evidence, reporter.address, until,
                     verdict_signatures(verdict, verifiers[:2], settlement.domain))
    with pytest.raises(ChainError, match="nothing staked"):
        settlement.unstake(server)  # nothing left to take
    assert settlement.stake(server.address) == 0

    settlement.register(other, 2 * ETH)
    settlement.request_unstake(other)
    advance_time(w3, 3600 + 86400 + 1)
    with pytest.raises(ChainError, match="unstake request lapsed"):
        settlement.unstake(other)
    settlement.register(other, 0)  # registering again cancels the request: it may redeem again
    v = voucher(client, other, 10, 10**15)
    reserve(settlement, client, other, 10**15)
    settlement.redeem(other, v, sign(v, client.key, settlement.domain))


def test_slashed_funds_go_to_the_owner_set_destination_and_verdicts_expire(setup, chain):
    w3, settlement, client, server, other, verifiers, reporter = setup
    owner = chain[1][0]
    evidence = bytes(range(2, 34))
    expired = Verdict(server.address, evidence, reporter.address, deadline(w3, -1))
    with pytest.raises(ChainError, match="verdict expired"):
        settlement.slash(other, server.address, evidence, reporter.address, expired.deadline,
                         verdict_signatures(expired, verifiers[:2], settlement.domain))
    until = deadline(w3)
    verdict = Verdict(server.address, evidence, reporter.address, until)
    settlement.slash(other, server.address, evidence, reporter.address, until,
                     verdict_signatures(verdict, verifiers[:2], settlement.domain))
    assert settlement.treasury() == 5 * ETH
    with pytest.raises(ChainError, match="only the owner"):
        settlement.set_treasury_destination(other, other.address)
    destination = Account.create().address
    settlement.set_treasury_destination(owner, destination)
    settlement.sweep_treasury(other)  # anyone may send it on its way
    assert w3.eth.get_balance(destination) == 5 * ETH and settlement.treasury() == 0


operations = st.lists(st.tuples(st.sampled_from(["deposit", "reserve", "sign", "redeem", "release", "withdraw"]),
                                st.integers(0, 2), st.integers(1, 10**6)), min_size=1, max_size=12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations)
def test_total_paid_never_exceeds_deposits_or_what_clients_signed(chain, ops):
    w3, (owner, client, server, other, *_rest) = chain
    settlement = Settlement.deploy(w3, owner, withdrawal_delay=0, min_stake=0, verdict_threshold=1)
    settlement.register(server, 1)
    deposited, withdrawn, signed, vouchers, reserving = 0, 0, {0: 0, 1: 0, 2: 0}, {}, {0: 0, 1: 0, 2: 0}
    for op, channel, amount in ops:
        if op == "deposit":
            settlement.deposit(client, amount)
            deposited += amount
        elif op == "reserve":
            reserving[channel] += amount
            try:
                reserve(settlement, client, server, reserving[channel], channel)
            except ChainError:
                pass
        elif op == "release" and settlement.reserved(client.address, server.address, channel) > 0:
            settlement.request_release(client, server.address, channel)
            settlement.release(client, server.address, channel)
        elif op == "sign":  # vouchers may go up or (maliciously replayed old ones) down
            total = max(0, signed[channel] + amount - 5 * 10**5)
            vouchers[channel] = voucher(client, server, total, total, channel)
            signed[channel] = max(signed[channel], total)
        elif op == "redeem" and channel in vouchers:
            v = vouchers[channel]
            try:
                settlement.redeem(server, v, sign(v, client.key, settlement.domain))
            except ChainError:
                pass
        elif op == "withdraw" and settlement.escrow(client.address) > 0:
            request = min(amount, settlement.escrow(client.address))
            settlement.request_withdrawal(client, request)
            settlement.withdraw(client)
            withdrawn += request
        paid = {c: settlement.paid(client.address, server.address, c) for c in signed}
        assert all(paid[c] <= signed[c] for c in signed)  # never more than the client signed
        assert sum(paid.values()) <= deposited  # never more than was deposited
        reserved = sum(settlement.reserved(client.address, server.address, c) for c in signed)
        held = settlement.escrow(client.address) + reserved
        assert sum(paid.values()) + held + withdrawn == deposited  # nothing lost
        assert w3.eth.get_balance(settlement.address) == held + 1  # + the stake


actions = st.lists(st.tuples(
    st.sampled_from(["deposit", "reserve", "sign", "redeem", "request_release", "release", "request_withdrawal",
                     "withdraw", "request_unstake", "unstake", "register", "slash", "sweep", "wait"]),
    st.integers(0, 1), st.integers(1, 10**6)), min_size=1, max_size=16)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions)
def test_no_sequence_of_actions_pays_more_than_deposited_or_strands_ether(chain, ops):
    """Deposits, reservations, vouchers, redemptions, releases, withdrawals, unstakes and slashes in any order:
    the contract never pays more than was deposited, a server never gets more than its best voucher, and every
    wei in the contract has a way out (escrow: withdraw; a reservation: release; stake: unstake; treasury: the
    owner-set destination)."""
    w3, (owner, client, server, other, verifier, *_rest) = chain
    settlement = Settlement.deploy(w3, owner, withdrawal_delay=10, min_stake=0, verdict_threshold=1,
                                   request_window=100)
    settlement.add_verifier(owner, verifier.address)
    servers = [server, other]
    deposited, staked, best = 0, 0, {0: 0, 1: 0}
    vouchers, used, reserving = {}, 0, {0: 0, 1: 0}
    out_before = {a.address: w3.eth.get_balance(a.address) for a in (client, server, other, owner)}
    for op, who, amount in ops:
        target = servers[who]
        try:
            if op == "deposit":
                settlement.deposit(client, amount)
                deposited += amount
            elif op == "reserve":
                reserving[who] += amount
                reserve(settlement, client, target, reserving[who], 7)
            elif op == "request_release":
                settlement.request_release(client, target.address, 7)
            elif op == "release":
                settlement.release(client, target.address, 7)
            elif op == "register":
                settlement.register(target, amount)
                staked += amount
            elif op == "sign":
                total = best[who] + amount
                vouchers[who] = voucher(client, target, total, total, 7)
                best[who] = total
            elif op == "redeem" and who in vouchers:
                settlement.redeem(target, vouchers[who], sign(vouchers[who], client.key, settlement.domain))
            elif op == "request_withdrawal" and settlement.escrow(client.address) > 0:
                settlement.request_withdrawal(client, min(amount, settlement.escrow(client.address)))
            elif op == "withdraw":
                settlement.withdraw(client)
            elif op == "request_unstake":
                settlement.request_unstake(target)
            elif op == "unstake":
                settlement.unstake(target)
            elif op == "slash":
                used += 1
                evidence, until = used.to_bytes(32, "big"), deadline(w3)
                verdict = Verdict(target.address, evidence, owner.address, until)
                settlement.slash(owner, target.address, evidence, owner.address, until,
                                 [sign(verdict, verifier.key, settlement.domain)])
            elif op == "sweep":
                settlement.sweep_treasury(owner)
            elif op == "wait":
                advance_time(w3, amount % 150)
        except ChainError:
            pass  # refused: allowed; what matters is what was paid
        for who_, srv in enumerate(servers):
            assert settlement.paid(client.address, srv.address, 7) <= best[who_]
        paid = sum(settlement.paid(client.address, srv.address, 7) for srv in servers)
        assert paid <= deposited
        held = settlement.escrow(client.address) + sum(settlement.stake(s.address) for s in servers) + \
            settlement.treasury() + sum(settlement.reserved(client.address, s.address, 7) for s in servers)
        assert w3.eth.get_balance(settlement.address) == held  # all of it is escrow, reserved, stake or treasury
