"""Both ends of a payment channel: the server's ledger of what each client owes and has signed for, and
the client's own count from which it signs cumulative vouchers (never for more than it counted).

Credit is per client address, whatever channels it uses: the work a client has not yet covered by a voucher
stays within the server's credit limit. And the work not yet redeemed on a channel stays within what the
client has reserved for this server on that channel (the contract's `backing`, read from the chain): escrow
that no other server can be paid from, so servers sharing one client's escrow are never owed more than it
held. A voucher is kept only if the contract would pay it: a canonical signature by its client, for this
server, in this domain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from incentives.metering import Prices, Receipt, Tally
from incentives.payer import canonical_signature
from incentives.vouchers import Domain, Reservation, Voucher, sign, signer_of

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

RECEIPT_EVERY = 16
MAX_CHANNELS_PER_CLIENT = 64


class CreditLimitExceeded(RuntimeError):
    pass


class InvalidVoucher(ValueError):
    pass


@dataclass
class ClientAccount:
    """What one client owes this server on one channel, and the best voucher and reservation it has given for it."""
    tally: Tally = field(default_factory=Tally)
    voucher: Voucher | None = None
    signature: bytes = b""
    reservation: Reservation | None = None
    reservation_signature: bytes = b""
    requests: int = 0
    redeemed: int = 0  # wei the contract has paid on this channel

    @property
    def covered(self) -> int:
        return self.voucher.total_amount if self.voucher else 0


class ServerLedger:
    """Server side: serve a client only within its credit (see the module's doc)."""

    def __init__(self, payout: str, prices: Prices, domain: Domain, credit_limit: int, signer: LocalAccount):
        self.payout, self.prices, self.domain = payout, prices, domain
        self.credit_limit, self.signer = credit_limit, signer
        self.accounts: dict[tuple[str, int], ClientAccount] = {}
        self.backing: dict[tuple[str, int], int] = {}  # (client, channel) -> its reservation, as last read

    def account(self, client: str, channel: int) -> ClientAccount:
        key = (client.lower(), channel)
        if key not in self.accounts:
            if sum(c == key[0] for c, _ in self.accounts) >= MAX_CHANNELS_PER_CLIENT:
                raise CreditLimitExceeded(f"{client} has {MAX_CHANNELS_PER_CLIENT} channels with this server: use one "
                                          f"of them")
            self.accounts[key] = ClientAccount()
        return self.accounts[key]

    def _channels(self, client: str) -> list[ClientAccount]:
        client = client.lower()
        return [a for (c, _), a in self.accounts.items() if c == client]

    def unvouchered(self, client: str) -> int:
        """Wei of work no voucher covers yet."""
        return sum(max(a.tally.amount(self.prices) - a.covered, 0) for a in self._channels(client))

    def unredeemed(self, client: str, channel: int) -> int:
        """Wei of work on the channel that the contract has not paid yet (covered by vouchers or not)."""
        account = self.accounts.get((client.lower(), channel))
        return account.tally.amount(self.prices) - account.redeemed if account else 0

    def check_credit(self, client: str, channel: int, same_peer: tuple[str, ...] = (), cost: int = 0) -> None:
        """Raise CreditLimitExceeded unless work costing ``cost`` may be done for ``client`` on ``channel``
        (``same_peer``: the other addresses the same peer pays from, which share its credit limit)."""
        unvouchered = sum(self.unvouchered(c) for c in {client.lower(), *(c.lower() for c in same_peer)})
        if unvouchered > self.credit_limit:
            raise CreditLimitExceeded(f"credit limit reached: {unvouchered} wei of work not covered by a voucher "
                                      f"(limit {self.credit_limit}); send a newer voucher")
        backing = self.backing.get((client.lower(), channel))
        unpaid = self.unredeemed(client, channel) + cost
        if backing is not None and (backing == 0 or unpaid > backing):
            raise CreditLimitExceeded(f"{unpaid} wei of work not yet paid on channel {channel} (with this request) "
                                      f"and {backing} wei reserved for this server there: send a larger reservation "
                                      f"(and deposit more if the escrow is empty)")

    def accept_reservation(self, client: str, channel: int, total: int, signature: bytes) -> None:
        """Keep the client's reservation for this server's channel if the contract would take it and it is for
        more than the one we hold (verified only then: resending the same one costs nothing)."""
        account = self.account(client, channel)
        if account.reservation is not None and total <= account.reservation.total:
            return
        reservation = Reservation(client, self.payout, channel, total)
        try:
            valid = canonical_signature(signature) and signer_of(reservation, signature, self.domain).lower() == \
                client.lower()
        except Exception:
            valid = False
        if not valid:
            raise InvalidVoucher("reservation not signed canonically by the paying client over Reservation(client, "
                                 "this server's payout address, channel, total)")
        account.reservation, account.reservation_signature = reservation, signature

    def accept_voucher(self, voucher: Voucher, signature: bytes) -> None:
        """Keep the voucher if the contract would pay it and it is newer than the one we hold."""
        if voucher.server.lower() != self.payout.lower():
            raise InvalidVoucher(f"voucher is for {voucher.server}, not this server's payout address {self.payout}")
        if not canonical_signature(signature):
            raise InvalidVoucher("voucher signature is not canonical (65 bytes, v 27 or 28, low s): the contract "
                                 "would refuse it")
        try:
            signer = signer_of(voucher, signature, self.domain)
        except Exception as e:
            raise InvalidVoucher(f"voucher signature does not verify: {e}") from None
        if signer.lower() != voucher.client.lower():
            raise InvalidVoucher("voucher is not signed by its client")
        account = self.account(voucher.client, voucher.channel)
        if voucher.total_amount > account.covered:
            account.voucher, account.signature = voucher, signature

    def record(self, client: str, channel: int, tokens: int, blocks: int, backward: bool = False) -> Receipt:
        """Count the work; every RECEIPT_EVERY-th receipt of a channel is signed (signatures are not free: bench/incentives_overhead.py)."""
        account = self.account(client, channel)
        account.tally.add(tokens, blocks, backward)
        account.requests += 1
        receipt = Receipt(client, self.payout, channel, account.tally.forward_units, account.tally.backward_units)
        return receipt.signed(self.signer.key) if account.requests % RECEIPT_EVERY == 0 else receipt

    def redeemable(self) -> list[tuple[Voucher, bytes]]:
        """Vouchers worth more than what their channel was paid."""
        return [(a.voucher, a.signature) for a in self.accounts.values()
                if a.voucher is not None and a.voucher.total_amount > a.redeemed]

    def paid(self, voucher: Voucher, total: int) -> None:
        """The contract has paid ``total`` wei in all on the voucher's channel."""
        account = self.account(voucher.client, voucher.channel)
        account.redeemed = max(account.redeemed, total)

    def to_json(self) -> dict:
        """What `cocoon earnings` and `cocoon redeem` read, and a restarted server reloads."""
        return {"payout": self.payout, "chain_id": self.domain.chain_id, "contract": self.domain.contract,
                "channels": [{"client": client, "channel": channel, "forward_units": a.tally.forward_units,
                              "backward_units": a.tally.backward_units, "owed": a.tally.amount(self.prices),
                              "redeemed": a.redeemed, "voucher": a.voucher.to_wire() if a.voucher else None,
                              "signature": a.signature.hex(),
                              "reservation": [a.reservation.total, a.reservation_signature.hex()] if a.reservation
                              else None} for (client, channel), a in self.accounts.items()]}

    def load(self, data: dict) -> None:
        """Take back the accounts of a ledger written before (by a server with the same payout address)."""
        if data.get("payout", "").lower() != self.payout.lower():
            return
        for channel in data.get("channels", []):
            account = self.accounts.setdefault((channel["client"].lower(), channel["channel"]), ClientAccount())
            account.tally = Tally(channel["forward_units"], channel["backward_units"])
            account.redeemed = channel.get("redeemed", 0)
            if channel.get("voucher"):
                account.voucher = Voucher.from_wire(channel["voucher"])
                account.signature = bytes.fromhex(channel["signature"])
            if channel.get("reservation"):
                total, signature = channel["reservation"]
                account.reservation = Reservation(channel["client"], self.payout, channel["channel"], total)
                account.reservation_signature = bytes.fromhex(signature)


class ClientChannel:
    """Client side, one per server: counts the units it asked for and signs cumulative vouchers for them."""

    def __init__(self, account: LocalAccount, server: str, channel: int, prices: Prices, domain: Domain):
        self.account, self.server, self.channel = account, server, channel
        self.prices, self.domain = prices, domain
        self.tally = Tally()
        self.signed_amount = 0

    def record(self, tokens: int, blocks: int, backward: bool = False) -> None:
        self.tally.add(tokens, blocks, backward)

    @property
    def unsigned(self) -> int:
        """Wei counted but not yet in a voucher."""
        return self.tally.amount(self.prices) - self.signed_amount

    def check_receipt(self, receipt: Receipt) -> bool:
        """A receipt must claim no more than we counted, and a signed one must be the server's payout key's."""
        if receipt.signature and receipt.signer().lower() != self.server.lower():
            return False
        return receipt.forward_units <= self.tally.forward_units and receipt.backward_units <= self.tally.backward_units

    def voucher(self) -> tuple[Voucher, bytes] | None:
        """A voucher for everything counted so far, or None when nothing new is owed."""
        owed = self.tally.amount(self.prices)
        if owed <= self.signed_amount:
            return None
        voucher = Voucher(self.account.address, self.server, self.channel, self.tally.total_units, owed)
        self.signed_amount = owed
        return voucher, sign(voucher, self.account.key, self.domain)
