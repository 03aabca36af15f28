"""A server's side of settlement: redeem the newest voucher of every channel when it pays something new."""
from __future__ import annotations

import logging

from eth_account.signers.local import LocalAccount

from incentives.contract import ChainError, Settlement
from incentives.credit import ServerLedger

logger = logging.getLogger(__name__)


class Redeemer:
    def __init__(self, settlement: Settlement, account: LocalAccount, ledger: ServerLedger):
        self.settlement, self.account, self.ledger = settlement, account, ledger
        self.redeemed: dict[tuple[str, int], int] = {}  # channel -> amount already redeemed
        self.gas_used: list[int] = []

    def redeem_new(self) -> int:
        """Redeem every voucher worth more than what was redeemed on its channel; returns wei received."""
        received = 0
        for voucher, signature in self.ledger.redeemable():
            key = (voucher.client.lower(), voucher.channel)
            if voucher.total_amount <= self.redeemed.get(key, 0):
                continue
            try:
                before = self.settlement.paid(voucher.client, voucher.server, voucher.channel)
                receipt = self.settlement.redeem(self.account, voucher, signature)
            except ChainError as e:
                logger.warning(f"could not redeem the voucher of {voucher.client}: {e}")
                continue
            self.gas_used.append(receipt.gasUsed)
            paid = self.settlement.paid(voucher.client, voucher.server, voucher.channel)
            self.redeemed[key] = paid
            received += paid - before
        return received
