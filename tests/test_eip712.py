"""Every record Cocoon signs is EIP-712 typed data (incentives.eip712): its hash equals eth-account's own encoder's,
its signer is recovered, and a record read from the network is bounded: any garbage is a ValueError, nothing
else."""
import dataclasses
import math

import numpy as np
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from hypothesis import HealthCheck, given, settings, strategies as st

from incentives.eip712 import Domain, _snake, signable, signer_of
from incentives.metering import Receipt
from incentives.payer import PayerProof
from incentives.verification import Attestation, Evidence, array_hash
from incentives.vouchers import Verdict, Voucher

ACCOUNT = Account.from_key(b"\x01" * 32)
OTHER = "0x" + "ab" * 20
DOMAIN = Domain(31337, "0x" + "cd" * 20)
RECORDS = [
    (Voucher(ACCOUNT.address, OTHER, 7, 100, 10**20), DOMAIN),
    (Verdict(OTHER, b"\x07" * 32, ACCOUNT.address, 1_900_000_000), DOMAIN),
    (Receipt(OTHER, ACCOUNT.address, 2**63 - 5, 5, 6), None),
    (Attestation(ACCOUNT.address, 2, 6, b"\x01" * 32, b"\x02" * 32, "bfloat16", "float16"), None),
    (PayerProof(ACCOUNT.address, "QmServer", "QmClient", 1_900_000_000), None),
]


def _reference(record, domain) -> object:
    """The same record through eth-account's general encoder."""
    domain_fields = [("name", "string"), ("version", "string")] + \
        ([("chainId", "uint256"), ("verifyingContract", "address")] if domain is not None else [])
    return encode_typed_data(full_message={
        "types": {"EIP712Domain": [{"name": n, "type": t} for n, t in domain_fields],
                  record.EIP712_NAME: [{"name": n, "type": t} for n, t in record.EIP712_FIELDS]},
        "primaryType": record.EIP712_NAME,
        "domain": domain.to_eip712() if domain is not None else {"name": "Cocoon", "version": "1"},
        "message": record.eip712_message()})


@pytest.mark.parametrize("record, domain", RECORDS, ids=lambda r: type(r).__name__)
def test_every_signed_record_is_eip712_as_eth_account_hashes_it(record, domain):
    assert signable(record, domain) == _reference(record, domain)
    signature = bytes(Account.sign_message(_reference(record, domain), ACCOUNT.key).signature)
    assert signer_of(record, signature, domain) == ACCOUNT.address
    number = next(_snake(name) for name, kind in record.EIP712_FIELDS if kind == "uint256")
    changed = dataclasses.replace(record, **{number: getattr(record, number) + 1})  # another value, another signer
    assert signer_of(changed, signature, domain) != ACCOUNT.address


def test_records_sign_and_verify_themselves():
    attestation = RECORDS[3][0].signed(ACCOUNT.key)
    assert attestation.valid() and not dataclasses.replace(attestation, end=7).valid()
    receipt = RECORDS[2][0].signed(ACCOUNT.key)
    assert receipt.signer() == ACCOUNT.address
    proof = RECORDS[4][0].signed(ACCOUNT)
    assert proof.valid(now=0) and not dataclasses.replace(proof, client_peer="QmOther").valid(now=0)


def _evidence() -> Evidence:
    steps = [np.ones((1, 2, 4), np.float32), np.full((1, 1, 4), 2, np.float32)]
    attestation = Attestation(ACCOUNT.address, 0, 2, b"\x01" * 32, array_hash(steps[1])).signed(ACCOUNT.key)
    return Evidence("m", "QmPeer", attestation, [s.tobytes() for s in steps], [s.shape for s in steps],
                    steps[1].tobytes(), 0.5)


garbage = st.recursive(st.none() | st.booleans() | st.integers(-2**300, 2**300) | st.floats() | st.text(max_size=50)
                       | st.binary(max_size=80), lambda children: st.lists(children, max_size=4)
                       | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["receipt", "attestation", "evidence", "evidence.attestation", "voucher"]), st.data())
def test_garbage_in_any_field_of_a_record_from_the_network_is_a_value_error(kind, data):
    records = {"receipt": (Receipt, RECORDS[2][0].signed(ACCOUNT.key).to_wire()),
               "attestation": (Attestation, RECORDS[3][0].signed(ACCOUNT.key).to_wire()),
               "evidence": (Evidence, _evidence().to_wire()), "evidence.attestation": (Evidence, _evidence().to_wire()),
               "voucher": (Voucher, RECORDS[0][0].to_wire())}
    cls, record = records[kind]
    assert cls.from_wire(record).to_wire() == record  # as sent, it reads back
    target = record["attestation"] if kind == "evidence.attestation" else record
    field = data.draw(st.sampled_from(sorted(target) + ["extra"]))
    target[field] = data.draw(garbage)
    try:
        parsed = cls.from_wire(record)
    except ValueError as e:
        assert "malformed" in str(e)
    else:  # only a value that is itself valid gets through, and it reads back as sent
        assert field != "extra" and parsed.to_wire() == record


def test_evidence_bounds_what_it_holds():
    record = _evidence().to_wire()
    record["shapes"][0] = [1, 2, 5]  # bytes that do not hold the shape
    with pytest.raises(ValueError, match="do not hold"):
        Evidence.from_wire(record)
    record = _evidence().to_wire()
    record["steps"] = [b"\0" * 16] * 5000
    record["shapes"] = [[1, 1, 4]] * 5000
    with pytest.raises(ValueError, match="1 to"):
        Evidence.from_wire(record)
    assert math.isfinite(Evidence.from_wire(_evidence().to_wire()).reference_error)
