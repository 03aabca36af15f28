"""A priced server signs every reply: which input it received (chained over a session's steps) and which
output it returned. The client checks that on arrival; a priced server whose attestation is missing or
wrong is banned by this client for good and paid no further. That is a local decision: garbage bytes prove
nothing to anyone else, so nothing is published and nobody is slashed."""
from __future__ import annotations

import torch

from incentives.verification import Attestation, array_hash, chain_hash
from swarm.wire.codes import BadAttestation

__all__ = ["BadAttestation", "check_attestation"]


def check_attestation(attestation: Attestation | None, payout: str, start: int, end: int, input_chain: bytes,
                      wire_input: torch.Tensor, wire_output: torch.Tensor, dtype: str | None = None) -> bytes:
    """The session's input chain after this step; raises BadAttestation unless the server signed exactly what
    crossed the wire, with its payout key, for these blocks, in the dtype it advertises (``dtype``)."""
    chain = chain_hash(input_chain, wire_input.float().numpy())
    try:
        valid = (attestation is not None and attestation.server.lower() == payout.lower()
                 and (attestation.start, attestation.end) == (start, end) and attestation.input_hash == chain
                 and attestation.output_hash == array_hash(wire_output.float().numpy())
                 and attestation.wire_dtype == str(wire_output.dtype).removeprefix("torch.")
                 and (not dtype or attestation.dtype == dtype) and attestation.valid())
    except (TypeError, ValueError, AttributeError):
        valid = False
    if not valid:
        raise BadAttestation(f"server with payout address {payout} sent a missing or invalid attestation")
    return chain
