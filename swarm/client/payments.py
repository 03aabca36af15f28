"""The client's wallet across the swarm: one payment channel per priced server, with a reservation of escrow for
it and vouchers, both signed and sent in-band.

A server gives credit only against escrow reserved for it (incentives/Settlement.vy), which it moves on chain
itself from the reservation this client signs. The first reservation for a server is RESERVE_CREDITS of its
credit limits (its DHT record says), and each next one doubles it once half is owed, so a long session costs
a few transactions and the escrow set aside stays within twice what was used (plus the first reservation).
"""
from __future__ import annotations

import logging
import random
import time

from eth_account.signers.local import LocalAccount

from incentives.credit import ClientChannel
from incentives.metering import Prices
from incentives.payer import PayerProof
from incentives.vouchers import Domain, Reservation, sign
from routing import ServerInfo
from swarm.client.config import ClientConfig
from swarm.wire.payloads import PayerSignature, Payment, SignedReservation, SignedVoucher
from swarm.wire.replies import SpanReply
from swarm.wire.requests import PayRequest

logger = logging.getLogger(__name__)
VOUCHER_EVERY = 16  # requests between in-band vouchers to one server (and one at every settle())
PROOF_LIFETIME = 3600  # seconds a proof that this peer pays for the wallet's address holds
RESERVE_CREDITS = 16  # a server's first reservation, in its credit limits


class Payments:
    def __init__(self, account: LocalAccount, domain: Domain, client_peer: str, settlement=None):
        self.account, self.domain, self.client_peer = account, domain, client_peer
        self.channel_id = random.getrandbits(63)  # one channel per client run; vouchers are cumulative in it
        self.channels: dict[str, ClientChannel] = {}  # by peer id
        self.credit: dict[str, int] = {}  # peer id -> the server's credit limit (its record says)
        self._requests: dict[str, int] = {}
        self._proofs: dict[str, PayerProof] = {}
        self._reservations: dict[str, SignedReservation] = {}  # peer id -> the latest reservation signed for it
        self.stopped: set[str] = set()
        self.settlement = settlement  # incentives.contract.Settlement, when this client reads the chain
        self._stakes: dict[str, tuple[int, float]] = {}

    @classmethod
    def from_config(cls, config: ClientConfig, client_peer: str) -> "Payments":
        """The wallet's payments in the config's contract, reading the chain when the config names a node."""
        settlement, chain_id = None, config.chain_id
        if config.chain_rpc is not None:
            from web3 import Web3

            from incentives.contract import Settlement
            settlement = Settlement(Web3(Web3.HTTPProvider(config.chain_rpc, request_kwargs={"timeout": 10})),
                                    config.contract)
            chain_id = settlement.w3.eth.chain_id if chain_id is None else chain_id
        return cls(config.wallet, Domain(chain_id, config.contract), client_peer, settlement)

    def stake_of(self, payout: str) -> int | None:
        """A server's stake, when this client reads the chain (``settlement`` set), cached for ten minutes."""
        if self.settlement is None or not payout:
            return None
        cached = self._stakes.get(payout.lower())
        if cached is None or time.monotonic() - cached[1] > 600:
            try:
                cached = (self.settlement.stake(payout), time.monotonic())
            except Exception as e:
                logger.info(f"could not read the stake of {payout}: {e}")
                return None
            self._stakes[payout.lower()] = cached
        return cached[0]

    def stop(self, peer_id: str) -> None:
        """No more vouchers for this server (convicted of wrong work): what it did since the last one is unpaid."""
        self.stopped.add(peer_id)
        self.channels.pop(peer_id, None)

    def channel(self, peer_id: str, info: ServerInfo) -> ClientChannel | None:
        if peer_id in self.stopped or (info.price_per_unit == 0 and info.backward_price_per_unit == 0):
            return None
        if peer_id not in self.channels:
            self.channels[peer_id] = ClientChannel(self.account, info.payout_address, self.channel_id,
                                                   Prices(info.price_per_unit, info.backward_price_per_unit),
                                                   self.domain)
        self.credit[peer_id] = info.credit_limit
        return self.channels[peer_id]

    def payment(self, peer_id: str, info: ServerInfo | None) -> Payment | None:
        """What a request to this server carries: who pays, and now and then a voucher for all counted so far."""
        channel = self.channel(peer_id, info) if info is not None else None
        if channel is None:
            return None
        self._requests[peer_id] = self._requests.get(peer_id, 0) + 1
        due = self._requests[peer_id] % VOUCHER_EVERY == 0 or 2 * channel.unsigned > self.credit.get(peer_id, 0)
        voucher = self._voucher(channel) if due else None
        return Payment(self.account.address, self.channel_id, voucher, self._proof(peer_id),
                       self._reservation(peer_id, channel))

    def _reservation(self, peer_id: str, channel: ClientChannel) -> SignedReservation:
        """The escrow to set aside for this server: more, signed anew, once half of the last one is owed."""
        owed = channel.tally.amount(channel.prices)
        latest = self._reservations.get(peer_id)
        if latest is None or 2 * owed >= latest.total:
            total = max(2 * latest.total if latest else 0, RESERVE_CREDITS * self.credit.get(peer_id, 0), 4 * owed, 1)
            reservation = Reservation(self.account.address, channel.server, self.channel_id, total)
            latest = SignedReservation(total, sign(reservation, self.account.key, self.domain))
            self._reservations[peer_id] = latest
        return latest

    def _proof(self, peer_id: str) -> PayerSignature:
        """That this client's peer pays for its address, bound to this server (signed once an hour)."""
        proof = self._proofs.get(peer_id)
        if proof is None or proof.expires < time.time() + 60:
            proof = PayerProof(self.account.address, peer_id, self.client_peer,
                               int(time.time()) + PROOF_LIFETIME).signed(self.account)
            self._proofs[peer_id] = proof
        return PayerSignature(proof.expires, proof.signature)

    def record(self, peer_id: str, reply: SpanReply, tokens: int, blocks: int, backward: bool = False) -> None:
        channel = self.channels.get(peer_id)
        if channel is None:
            return
        channel.record(tokens, blocks, backward)
        receipt = reply.receipt
        if receipt is None:
            logger.warning(f"{peer_id} sent no receipt")
            return
        try:
            if not channel.check_receipt(receipt):
                logger.warning(f"{peer_id} sent a receipt for more than this client counted: {receipt}")
        except ValueError as e:  # a signature that recovers no key
            logger.warning(f"{peer_id} sent no valid receipt ({e})")

    def settle_requests(self) -> list[tuple[str, PayRequest]]:
        """A `pay` request for every server owed more than its latest voucher covers."""
        requests = []
        for peer_id, channel in self.channels.items():
            voucher = self._voucher(channel)
            if voucher is not None:
                requests.append((peer_id, PayRequest(Payment(self.account.address, self.channel_id, voucher,
                                                             self._proof(peer_id),
                                                             self._reservation(peer_id, channel)))))
        return requests

    @staticmethod
    def _voucher(channel: ClientChannel) -> SignedVoucher | None:
        signed = channel.voucher()
        if signed is None:
            return None
        voucher, signature = signed
        return SignedVoucher(**voucher.to_wire(), signature=signature)
