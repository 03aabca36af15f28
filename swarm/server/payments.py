"""A priced server's side of payment: who pays (proven), how much credit they get (backed by escrow on chain),
and redemption that never loses a voucher.

- A request's payer is an address the requesting peer has proven it acts for (incentives.payer); a peer may
  pay from a few addresses, which share its credit limit.
- Credit on a channel is backed by the escrow the client reserved for this server on it (the contract's
  ``backing``), read from the chain before the channel's first request and again when the reading is older
  than ``escrow_ttl``. The client signs reservations in-band; the server submits one when the channel needs
  it: before a request that would overrun the backing, in the background once half of it is owed. It tries
  the same total once per ``escrow_ttl``, so a client cannot make it spend gas at will. Reserved escrow pays
  this server only: servers sharing one client's escrow are never owed more than it held.
- The ledger is written to disk before every redemption and reloaded at start. Chain calls run in a thread
  with a timeout; a chain that errors or hangs delays redemption (retried with backoff), never serving or
  announcing. A client whose unpaid work nears its escrow is redeemed early.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from incentives.credit import CreditLimitExceeded, InvalidVoucher, ServerLedger
from incentives.ledger_file import ledger_path, read_ledger_json, write_ledger
from incentives.payer import PayerProof
from incentives.metering import Receipt
from incentives.vouchers import Voucher
from swarm.wire.codes import ErrorCode, WireError
from swarm.wire.payloads import Payment

logger = logging.getLogger(__name__)
MAX_ADDRESSES_PER_PEER = 8
MAX_PROOFS = 4096
CHAIN_TIMEOUT = 15.0


def payment_required(message: str) -> WireError:
    return WireError(ErrorCode.PAYMENT_REQUIRED, message)


class ServerPayments:
    def __init__(self, ledger: ServerLedger, settlement, account, peer_id: str, *, redeem_period: float = 60.0,
                 escrow_ttl: float = 10.0):
        self.ledger, self.settlement, self.account, self.peer_id = ledger, settlement, account, peer_id
        self.redeem_period, self.escrow_ttl = redeem_period, escrow_ttl
        self.proven: OrderedDict[tuple[str, str], int] = OrderedDict()  # (peer, address) -> proof expiry
        self.addresses: dict[str, list[str]] = {}  # peer -> addresses it pays from
        self.backing_read: dict[tuple[str, int], float] = {}  # (client, channel) -> when its backing was read
        self.reserved_at: dict[tuple[str, int], tuple[float, int]] = {}  # (client, channel) -> (when, total) tried
        self.redeemed_wei = 0
        self.metrics = None  # swarm.server.metrics.ServerMetrics, with --metrics-port
        self._redeem_soon = asyncio.Event()
        self._redeeming = asyncio.Lock()  # one redemption at a time: a second would find the first's unconfirmed
        path = ledger_path(ledger.payout)
        if path.exists():
            ledger.load(read_ledger_json(path))
            logger.info(f"reloaded the ledger of {ledger.payout}: {len(ledger.redeemable())} vouchers to redeem")

    # ------------------------------------------------------------------ admitting a request
    async def admit(self, peer: str, payment: Payment | None, check_credit: bool = True, cost: int = 0
                    ) -> tuple[str, int]:
        """The (client, channel) that pays for a request of ``peer`` costing ``cost`` wei; raises PAYMENT_REQUIRED
        otherwise."""
        if payment is None:
            raise payment_required(f"this server charges {self.ledger.prices.forward} wei per token x block: send "
                                   f"'payment' (see from_pretrained(wallet=...))")
        client = payment.client.lower()
        self._check_proof(peer, client, payment)
        if payment.voucher is not None:
            signed = payment.voucher
            voucher = Voucher(signed.client, signed.server, signed.channel, signed.total_units, signed.total_amount)
            try:
                self.ledger.accept_voucher(voucher, signed.signature)
            except (InvalidVoucher, ValueError, CreditLimitExceeded) as e:
                raise payment_required(f"invalid voucher: {e}") from None
            if self.metrics is not None:
                self.metrics.vouchers.inc()
        key = (client, payment.channel)
        if key not in self.backing_read:
            await self._read_backing(key)  # before the channel's first request: no credit on nothing reserved
        elif time.monotonic() - self.backing_read[key] > self.escrow_ttl:
            self.backing_read[key] = time.monotonic()
            asyncio.create_task(self._read_backing(key))
        if payment.reservation is not None:
            try:
                self.ledger.accept_reservation(client, payment.channel, payment.reservation.total,
                                               payment.reservation.signature)
            except (InvalidVoucher, CreditLimitExceeded) as e:
                raise payment_required(f"invalid reservation: {e}") from None
        await self._maybe_reserve(key, cost)
        if check_credit:
            try:
                self.ledger.account(client, payment.channel)
                self.ledger.check_credit(client, payment.channel, tuple(self.addresses.get(peer, ())), cost)
            except CreditLimitExceeded as e:
                missing = "" if payment.reservation else " (this request carried none: see from_pretrained(wallet=...))"
                raise payment_required(f"{e}{missing}") from None
        if self.ledger.backing.get(key) == 0 and self.ledger.unredeemed(*key) > 0:
            self._redeem_soon.set()  # the client is releasing its reservation: redeem before the delay ends
        return key

    async def _maybe_reserve(self, key: tuple[str, int], cost: int) -> None:
        """Submit the channel's best reservation when the channel needs it: now when this request would overrun
        what backs it, in the background when more than half is owed. A total is tried once per ``escrow_ttl``."""
        account = self.ledger.account(*key)
        if account.reservation is None:
            return
        backing, unpaid = self.ledger.backing.get(key), self.ledger.unredeemed(*key) + cost
        tried_at, tried_total = self.reserved_at.get(key, (-1e9, 0))
        if account.reservation.total <= tried_total and time.monotonic() - tried_at < self.escrow_ttl:
            return
        if backing is not None and unpaid > backing:
            await self._reserve(key)
        elif backing is None or 2 * unpaid >= backing:  # unknown (the chain is failing) or half used
            self.reserved_at[key] = (time.monotonic(), account.reservation.total)
            asyncio.create_task(self._reserve(key))

    async def _reserve(self, key: tuple[str, int]) -> None:
        """Submit the client's reservation for this server's channel, then read the channel's backing again. A
        reservation the contract refuses (already applied, an empty escrow) or a failing chain leaves the credit
        as it was."""
        from incentives.contract import ChainError  # web3 is loaded by priced servers only
        account = self.ledger.account(*key)
        if account.reservation is None:
            return
        self.reserved_at[key] = (time.monotonic(), account.reservation.total)
        try:
            await self._chain(self.settlement.reserve, self.account, account.reservation,
                              account.reservation_signature)
        except ChainError as e:
            logger.info(f"the reservation of {key[0]} on channel {key[1]} was refused: {e}")
        except Exception as e:
            logger.warning(f"the chain failed while reserving ({type(e).__name__}: {e})")
            return
        await self._read_backing(key)

    def _check_proof(self, peer: str, client: str, payment: Payment) -> None:
        now = time.time()
        if self.proven.get((peer, client), 0) > now:
            self.proven.move_to_end((peer, client))
            return
        proof = payment.proof
        if proof is None:
            raise payment_required(f"prove that your peer pays for {payment.client}: send 'proof' (see "
                                   f"incentives.payer)")
        if not PayerProof(client, self.peer_id, peer, proof.expires, proof.signature).valid(now):
            raise payment_required(f"the proof that your peer pays for {payment.client} is invalid or expired")
        addresses = self.addresses.setdefault(peer, [])
        if client not in addresses:
            if len(addresses) >= MAX_ADDRESSES_PER_PEER:
                raise payment_required(f"your peer already pays from {len(addresses)} addresses here")
            addresses.append(client)
        self.proven[(peer, client)] = proof.expires
        while len(self.proven) > MAX_PROOFS:
            self.proven.popitem(last=False)

    def record(self, payer: tuple[str, int], tokens: int, blocks: int, backward: bool = False) -> Receipt:
        return self.ledger.record(*payer, tokens=tokens, blocks=blocks, backward=backward)

    # ------------------------------------------------------------------ the chain
    async def _chain(self, fn, *args):
        """A chain call in a thread, bounded in time (a node that never answers costs a timeout, no more)."""
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, fn, *args), CHAIN_TIMEOUT)

    async def _read_backing(self, key: tuple[str, int]) -> None:
        self.backing_read[key] = time.monotonic()
        try:
            backing = await self._chain(self.settlement.backing, key[0], self.ledger.payout, key[1])
        except Exception as e:  # the chain is down: known channels keep their last reading; new ones their credit
            logger.warning(f"could not read what {key[0]} reserved on channel {key[1]}: {type(e).__name__}: {e}")
            return
        self.ledger.backing[key] = backing

    async def redeem_forever(self) -> None:
        """Redeem every `redeem_period` (or sooner when a client nears its escrow), retrying with backoff
        while the chain fails, until cancelled."""
        delay = self.redeem_period
        while True:
            try:
                await asyncio.wait_for(self._redeem_soon.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            self._redeem_soon.clear()
            # Shielded: a chain call runs on in its thread when its awaiter is cancelled, so a redemption stopped
            # halfway would still pay, unseen; cancelling this loop lets the one under way finish (and report).
            delay = self.redeem_period if await asyncio.shield(self.redeem()) else min(delay * 2, 600.0)

    async def redeem(self) -> bool:
        """Redeem every voucher worth more than its channel was paid; False when the chain failed (try later).
        The ledger is on disk before each attempt, so nothing is lost if this process dies meanwhile."""
        async with self._redeeming:
            return await self._redeem()

    async def _redeem(self) -> bool:
        from incentives.contract import ChainError  # web3 is loaded by priced servers only
        write_ledger(self.ledger)
        for voucher, signature in self.ledger.redeemable():
            try:
                before = await self._chain(self.settlement.paid, voucher.client, voucher.server, voucher.channel)
                if voucher.total_amount > before:
                    key = (voucher.client.lower(), voucher.channel)
                    backing = self.ledger.backing.get(key)
                    if backing is None or voucher.total_amount - before > backing:  # more than is reserved there
                        await self._reserve(key)
                    await self._chain(self.settlement.redeem, self.account, voucher, signature)
                total = await self._chain(self.settlement.paid, voucher.client, voucher.server, voucher.channel)
            except Exception as e:
                if isinstance(e, ChainError):  # refused (e.g. the escrow is empty): try again later
                    logger.warning(f"could not redeem the voucher of {voucher.client}: {e}")
                    continue
                logger.warning(f"the chain failed while redeeming ({type(e).__name__}: {e}); retrying later")
                write_ledger(self.ledger)
                return False
            self.ledger.paid(voucher, total)
            key = (voucher.client.lower(), voucher.channel)
            if key in self.ledger.backing:  # paid from the reservation: what backs the channel went down as much
                self.ledger.backing[key] = max(self.ledger.backing[key] - max(total - before, 0), 0)
            if total > before:
                self.redeemed_wei += total - before
                if self.metrics is not None:
                    self.metrics.earned.inc(total - before)
                print(f"Redeemed {total - before} wei from {voucher.client} (total paid to {self.ledger.payout}: "
                      f"{self.redeemed_wei} wei)", flush=True)
        write_ledger(self.ledger)
        return True
