"""A pusher's proof of what it pushed, for which of its inputs, in words the receiving server cannot forge.

The client gives each pusher a random key with its route (``Route.key``) and keeps it; the receiving server never
sees it. With every pushed step the pusher sends ``proof = tag + input digest``, where ``tag`` is an HMAC under
that key of the route id, the step's position, the digest of the pusher's own input for the step and the digest
of the step it pushed. The receiver returns the proof with the reply it computed from the push. So when such a
reply differs from what the client expected (``judge``):
- a proof that verifies and names the client's own input to the pusher for this position proves that the pusher
  pushed something other than what it returned: the pusher is to blame;
- a proof that does not verify for this position, or none, was not made by the pusher for this step: the
  receiver is to blame, since an honest receiver takes a pushed step only at the position the client's step
  then has;
- a proof that verifies for another input is a push the pusher computed honestly from an input the client did
  not send it (its own predecessor's lie, caught there): nobody is proven wrong by it.

A MAC and not a signature: the client is the only judge of it, and HMAC-SHA256 costs microseconds a step where
an RSA signature of the handshake's kind costs about a millisecond (bench/RESULTS.md, hostile peers).
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os

from swarm.wire.codes import bad

KEY_BYTES = 16
TAG_BYTES = 16
DIGEST_BYTES = 32  # InferenceStep.digest(): 64 hex digits
PROOF_BYTES = TAG_BYTES + DIGEST_BYTES


class Blame(enum.Enum):
    PUSHER = "pusher"
    RECEIVER = "receiver"
    NOBODY = "nobody"


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _tag(key: bytes, route_id: str, position: int, input_digest: bytes, pushed_digest: str) -> bytes:
    message = bytes.fromhex(route_id) + position.to_bytes(8, "little") + input_digest + bytes.fromhex(pushed_digest)
    return hmac.new(key, message, hashlib.sha256).digest()[:TAG_BYTES]


def make(key: bytes, route_id: str, position: int, input_digest: str, pushed_digest: str) -> bytes:
    """The pusher's proof that it pushed the step of ``pushed_digest`` at ``position``, computed from its input
    of ``input_digest``."""
    own = bytes.fromhex(input_digest)
    return _tag(key, route_id, position, own, pushed_digest) + own


def judge(proof: bytes | None, key: bytes, route_id: str, position: int, pushed_digest: str, input_digest: str
          ) -> Blame:
    """Who a reply computed from a push of ``pushed_digest`` proves wrong, when it differs from the client's own
    step at ``position`` and ``input_digest`` is the digest of the client's step to the pusher there."""
    if proof is None or len(proof) != PROOF_BYTES:
        return Blame.RECEIVER
    tag, named = proof[:TAG_BYTES], proof[TAG_BYTES:]
    try:
        valid = hmac.compare_digest(tag, _tag(key, route_id, position, named, pushed_digest))
    except ValueError:  # a digest that is not hex
        return Blame.RECEIVER
    if not valid:
        return Blame.RECEIVER
    return Blame.PUSHER if named == bytes.fromhex(input_digest) else Blame.NOBODY


def read(meta: dict) -> bytes | None:
    """An untrusted ``push_proof`` field of a record's metadata."""
    proof = meta.get("push_proof")
    if proof is None:
        return None
    if not isinstance(proof, bytes) or len(proof) != PROOF_BYTES:
        raise bad(f"metadata 'push_proof' must be {PROOF_BYTES} bytes")
    return proof
