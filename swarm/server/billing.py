"""What a request costs its caller, and the server's signature on what it computed.

``admit`` before any compute: who pays (swarm.server.payments checks the voucher and the credit), so that
no session opens for free. ``attest`` signs the hashes of a step's input (chained onto the session's) and
output as they crossed the wire (incentives.verification), which a client's spot check holds the server to.
``receipt`` records the work and returns what the client now owes. A free server (no payments) does none.
"""
from __future__ import annotations

import torch

from incentives.metering import Receipt
from incentives.verification import Attestation, array_hash, chain_hash
from swarm.server.payments import ServerPayments
from swarm.wire.payloads import Payment
from swarm.wire.tensors import dtype_name


class Billing:
    def __init__(self, payments: ServerPayments | None, computed_in: str):
        self.payments = payments  # None: this server works for free
        self.computed_in = computed_in  # what attestations name: the span's dtype, or its 8-bit/4-bit weights

    async def admit(self, peer: str, payment: Payment | None, hidden: torch.Tensor | None = None, blocks: int = 0,
                    backward: bool = False):
        """Who pays for this request, which computes ``hidden``'s tokens through ``blocks`` blocks (no credit is
        checked without them: a payment alone); None on a free server."""
        if self.payments is None:
            return None
        if hidden is None:
            return await self.payments.admit(peer, payment, check_credit=False)
        prices = self.payments.ledger.prices
        cost = hidden.shape[0] * hidden.shape[1] * blocks * (prices.backward if backward else prices.forward)
        return await self.payments.admit(peer, payment, cost=cost)

    def attest(self, chain: bytes, wire_input: torch.Tensor, wire_output: torch.Tensor, start: int, end: int
               ) -> tuple[bytes, Attestation | None]:
        """(the input chain with this input, the signed attestation); servers with no payout key sign nothing."""
        if self.payments is None:
            return chain, None
        ledger = self.payments.ledger
        chain = self.rechain(chain, wire_input)
        attestation = Attestation(ledger.payout, start, end, chain, array_hash(wire_output.float().numpy()),
                                  self.computed_in, dtype_name(wire_output.dtype))
        return chain, attestation.signed(ledger.signer.key)

    @staticmethod
    def rechain(chain: bytes, wire_input: torch.Tensor) -> bytes:
        """The input chain with ``wire_input`` chained on, as ``attest`` chains it (a session cut back into a step
        chains the part of its input kept, as the client does)."""
        return chain_hash(chain, wire_input.float().numpy())

    def receipt(self, payer, hidden: torch.Tensor, start: int, end: int, backward: bool = False) -> Receipt | None:
        if payer is None:
            return None
        return self.payments.record(payer, hidden.shape[0] * hidden.shape[1], end - start, backward)
