"""Both ends of a payment channel: the server's ledger of what each client owes and has signed for, and
the client's own count from which it signs cumulative vouchers (never for more than it counted)."""
from __future__ import annotations

from dataclasses import dataclass, field

from eth_account.signers.local import LocalAccount

from incentives.metering import Prices, Receipt, Tally
from incentives.vouchers import Domain, Voucher, sign, signer_of


RECEIPT_EVERY = 16


class CreditLimitExceeded(RuntimeError):
    pass


class InvalidVoucher(ValueError):
    pass


@dataclass
class ClientAccount:
    """What one client owes this server on one channel, and the best voucher it has given for it."""
    tally: Tally = field(default_factory=Tally)
    voucher: Voucher | None = None
    signature: bytes = b""
    requests: int = 0

    @property
    def covered(self) -> int:
        return self.voucher.total_amount if self.voucher else 0


class ServerLedger:
    """Server side: serve a client only while its unpaid amount stays within ``credit_limit`` wei."""

    def __init__(self, payout: str, prices: Prices, domain: Domain, credit_limit: int, signer: LocalAccount):
        self.payout, self.prices, self.domain = payout, prices, domain
        self.credit_limit, self.signer = credit_limit, signer
        self.accounts: dict[tuple[str, int], ClientAccount] = {}

    def account(self, client: str, channel: int) -> ClientAccount:
        return self.accounts.setdefault((client.lower(), channel), ClientAccount())

    def check_credit(self, client: str, channel: int) -> None:
        account = self.account(client, channel)
        unpaid = account.tally.amount(self.prices) - account.covered
        if unpaid > self.credit_limit:
            raise CreditLimitExceeded(
                f"credit limit reached: {unpaid} wei unpaid beyond the latest voucher (limit {self.credit_limit}); "
                f"send a newer voucher")

    def accept_voucher(self, voucher: Voucher, signature: bytes) -> None:
        """Keep the voucher if it is valid, for us, and newer than the one we hold."""
        if voucher.server.lower() != self.payout.lower():
            raise InvalidVoucher(f"voucher is for {voucher.server}, not this server's payout address {self.payout}")
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
        """Count the work; every RECEIPT_EVERY-th receipt of a channel is signed (a signature is 0.2 ms)."""
        account = self.account(client, channel)
        account.tally.add(tokens, blocks, backward)
        account.requests += 1
        receipt = Receipt(client, self.payout, channel, account.tally.forward_units, account.tally.backward_units)
        return receipt.signed(self.signer.key) if account.requests % RECEIPT_EVERY == 0 else receipt

    def redeemable(self) -> list[tuple[Voucher, bytes]]:
        return [(a.voucher, a.signature) for a in self.accounts.values() if a.voucher is not None]

    def to_json(self) -> dict:
        """What `cocoon earnings` and `cocoon redeem` read: per client channel, units, owed, best voucher."""
        return {"payout": self.payout, "chain_id": self.domain.chain_id, "contract": self.domain.contract,
                "channels": [{"client": client, "channel": channel, "forward_units": a.tally.forward_units,
                              "backward_units": a.tally.backward_units, "owed": a.tally.amount(self.prices),
                              "voucher": a.voucher.to_wire() if a.voucher else None,
                              "signature": a.signature.hex()} for (client, channel), a in self.accounts.items()]}


class ClientChannel:
    """Client side, one per server: counts the units it asked for and signs cumulative vouchers for them."""

    def __init__(self, account: LocalAccount, server: str, channel: int, prices: Prices, domain: Domain):
        self.account, self.server, self.channel = account, server, channel
        self.prices, self.domain = prices, domain
        self.tally = Tally()
        self.signed_amount = 0

    def record(self, tokens: int, blocks: int, backward: bool = False) -> None:
        self.tally.add(tokens, blocks, backward)

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
