"""Metering, credit and vouchers without a network: both ends of a payment channel."""
import pytest
from eth_account import Account

from incentives.credit import RECEIPT_EVERY, ClientChannel, CreditLimitExceeded, InvalidVoucher, ServerLedger
from incentives.metering import Prices, Tally
from incentives.verification import (Attestation, Evidence, array_hash, chain_hash, measured_tolerance, relative_error,
                                     tolerance)
from incentives.vouchers import Domain, Voucher, sign, signer_of

DOMAIN = Domain(1337, "0x" + "ab" * 20)


def test_units_are_tokens_times_blocks_and_backward_is_priced_apart():
    tally = Tally()
    tally.add(tokens=10, blocks=4)
    tally.add(tokens=3, blocks=4, backward=True)
    assert (tally.forward_units, tally.backward_units) == (40, 12)
    assert tally.amount(Prices(forward=5, backward=7)) == 40 * 5 + 12 * 7


def test_server_serves_within_credit_and_client_signs_only_what_it_counted():
    server, client = Account.create(), Account.create()
    ledger = ServerLedger(server.address, Prices(10, 20), DOMAIN, credit_limit=1000, signer=server)
    channel = ClientChannel(client, server.address, 7, Prices(10, 20), DOMAIN)
    for step in range(RECEIPT_EVERY):
        ledger.check_credit(client.address, 7)
        receipt = ledger.record(client.address, 7, tokens=1, blocks=4)
        channel.record(tokens=1, blocks=4)
        assert channel.check_receipt(receipt)
    assert receipt.signature and receipt.signer() == server.address  # every RECEIPT_EVERY-th is signed
    ledger.record(client.address, 7, tokens=25, blocks=4)  # owed 640 + 1000 > limit
    with pytest.raises(CreditLimitExceeded, match="credit limit reached"):
        ledger.check_credit(client.address, 7)
    channel.record(tokens=25, blocks=4)
    voucher, signature = channel.voucher()
    assert voucher.total_amount == 10 * 4 * (RECEIPT_EVERY + 25) and voucher.total_units == 4 * (RECEIPT_EVERY + 25)
    assert channel.voucher() is None  # nothing new to sign
    ledger.accept_voucher(voucher, signature)
    ledger.check_credit(client.address, 7)  # paid up: served again

    inflated = ledger.record(client.address, 7, tokens=1000, blocks=4)  # a server claiming work not asked for
    assert not channel.check_receipt(inflated)


def test_credit_is_per_address_whatever_the_channel_and_backed_by_its_reservation():
    server, client, other = Account.create(), Account.create(), Account.create()
    ledger = ServerLedger(server.address, Prices(10, 10), DOMAIN, credit_limit=1000, signer=server)
    served = 0
    with pytest.raises(CreditLimitExceeded, match="credit limit reached"):
        for channel in range(100):  # a new channel for every request: the same credit
            ledger.check_credit(client.address, channel)
            ledger.record(client.address, channel, tokens=10, blocks=1)
            served += 1
    assert served * 100 <= 1000 + 100  # one request beyond the limit at most
    ledger.check_credit(other.address, 0)  # another address has its own
    with pytest.raises(CreditLimitExceeded, match="credit limit reached"):
        ledger.check_credit(other.address, 0, same_peer=(client.address,))  # ... unless the same peer pays from both

    voucher = Voucher(client.address, server.address, 0, 1000, served * 100)
    ledger.accept_voucher(voucher, sign(voucher, client.key, DOMAIN))
    ledger.check_credit(client.address, 0)  # covered by a voucher; no reservation read: not checked
    ledger.backing[(client.address.lower(), 0)] = 0  # nothing reserved backs nothing, vouchers or not
    with pytest.raises(CreditLimitExceeded, match="send a larger reservation"):
        ledger.check_credit(client.address, 0)
    ledger.backing[(client.address.lower(), 0)] = 99  # less than the 100 wei this channel owes
    with pytest.raises(CreditLimitExceeded, match="100 wei of work not yet paid on channel 0 .* and 99 wei reserved"):
        ledger.check_credit(client.address, 0)
    ledger.backing[(client.address.lower(), 0)] = 100
    ledger.check_credit(client.address, 0)


def test_ledger_refuses_signatures_the_contract_would_refuse():
    from incentives.payer import HALF_N
    server, client = Account.create(), Account.create()
    ledger = ServerLedger(server.address, Prices(1, 1), DOMAIN, credit_limit=0, signer=server)
    voucher = Voucher(client.address, server.address, 1, 100, 100)
    signature = sign(voucher, client.key, DOMAIN)
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    high_s = r + (2 * HALF_N + 1 - s).to_bytes(32, "big") + bytes([55 - v])  # the same signer, malleated
    for bad in (high_s, signature[:64] + bytes([v - 27]), signature[:64], signature + b"\0"):
        with pytest.raises(InvalidVoucher, match="not canonical"):
            ledger.accept_voucher(voucher, bad)
    ledger.accept_voucher(voucher, signature)


def test_ledger_rejects_forged_or_misaddressed_vouchers_and_keeps_the_best():
    server, client, thief = Account.create(), Account.create(), Account.create()
    ledger = ServerLedger(server.address, Prices(1, 1), DOMAIN, credit_limit=0, signer=server)
    good = Voucher(client.address, server.address, 1, 100, 100)
    with pytest.raises(InvalidVoucher, match="not signed by its client"):
        ledger.accept_voucher(good, sign(good, thief.key, DOMAIN))
    elsewhere = Voucher(client.address, thief.address, 1, 100, 100)
    with pytest.raises(InvalidVoucher, match="not this server"):
        ledger.accept_voucher(elsewhere, sign(elsewhere, client.key, DOMAIN))
    ledger.accept_voucher(good, sign(good, client.key, DOMAIN))
    older = Voucher(client.address, server.address, 1, 50, 50)
    ledger.accept_voucher(older, sign(older, client.key, DOMAIN))
    assert ledger.account(client.address, 1).voucher == good
    assert signer_of(good, ledger.account(client.address, 1).signature, DOMAIN) == client.address


def test_tolerances_and_evidence_consistency():
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    assert relative_error(x * (1 + 1e-6), x) < tolerance("float32") < relative_error(x * 1.01, x)
    assert tolerance("float32", "bfloat16") == tolerance("bfloat16")
    server = Account.create()
    steps = [x[:, :2], x[:, 2:]]
    chain = chain_hash(chain_hash(b"", steps[0]), steps[1])
    claimed = x[:, 2:] * 1.05
    attestation = Attestation(server.address, 0, 4, chain, array_hash(claimed)).signed(server.key)
    assert attestation.valid() and attestation.signature  # (tests/test_eip712.py: the signature is EIP-712's)
    evidence = Evidence("m", "peer", attestation, [s.tobytes() for s in steps], [s.shape for s in steps],
                        claimed.tobytes(), 0.05)
    assert evidence.consistent() and evidence.recheck(x, x)
    assert not evidence.recheck(np.concatenate([x[:, :2], claimed], axis=1), x)  # honest servers computed the same
    # bfloat16: the tolerance is measured from the span run in bfloat16 by the checker itself, on every position
    noise = rng.standard_normal(x.shape).astype(np.float32)
    same_dtype = x + 0.01 * noise * np.linalg.norm(x, axis=-1, keepdims=True) / np.linalg.norm(noise, axis=-1,
                                                                                              keepdims=True)
    measured = measured_tolerance(x, same_dtype, "bfloat16")
    assert 2.5e-2 < measured < 3.5e-2 and measured < relative_error(claimed, x[:, 2:])
    assert measured_tolerance(x, x * 1.02, "bfloat16") > relative_error(claimed, x[:, 2:])  # rounding that large
    forged = Evidence("m", "peer", Attestation(server.address, 0, 4, chain, array_hash(x[:, 2:]),
                                               attestation.signature), evidence.steps, evidence.shapes,
                      x[:, 2:].tobytes(), 0.05)
    assert not forged.consistent()  # the signature does not cover a different output
    assert Evidence.from_wire(evidence.to_wire()) == evidence
