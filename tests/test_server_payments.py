"""A server's redemptions on an in-process chain (eth-tester + py-evm): what it reports is what the chain paid."""
import asyncio
import threading
import time

from eth_account import Account
from web3 import EthereumTesterProvider, Web3

from incentives.contract import Settlement
from incentives.credit import ServerLedger
from incentives.metering import Prices
from incentives.vouchers import Reservation, Voucher, sign
from swarm.server.payments import ServerPayments

ETH = 10**18


class SlowRedeem(Settlement):
    """The contract as it is, with each redemption arriving a while after it was sent (a busy node)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.sent = threading.Event()

    def redeem(self, *args):
        self.sent.set()
        time.sleep(0.5)
        return super().redeem(*args)


def test_a_server_leaving_mid_redemption_reports_what_the_chain_paid(capsys):
    """Cancelling the periodic redemption (a server leaving) must not hide one already sent: its chain call runs
    on in a thread, and the last redemption then finds nothing left to pay, so it reports nothing either."""
    w3 = Web3(EthereumTesterProvider())
    owner, client, server = (Account.create() for _ in range(3))
    for account in (owner, client, server):
        w3.eth.send_transaction({"from": w3.eth.accounts[0], "to": account.address, "value": 100 * ETH})
    deployed = Settlement.deploy(w3, owner, withdrawal_delay=3600, min_stake=ETH, verdict_threshold=2)
    settlement = SlowRedeem(w3, deployed.address)
    settlement.register(server, ETH)
    settlement.deposit(client, ETH)

    channel, amount = 7, 12 * 10**9
    ledger = ServerLedger(server.address, Prices(10**9, 0), settlement.domain, 10**12, server)
    reservation = Reservation(client.address, server.address, channel, 10 * amount)
    ledger.accept_reservation(client.address, channel, 10 * amount, sign(reservation, client.key, settlement.domain))
    ledger.record(client.address, channel, tokens=4, blocks=3)
    voucher = Voucher(client.address, server.address, channel, 12, amount)
    ledger.accept_voucher(voucher, sign(voucher, client.key, settlement.domain))

    async def leave():
        payments = ServerPayments(ledger, settlement, server, "peer", redeem_period=0.01)
        redeeming = asyncio.create_task(payments.redeem_forever())
        while not settlement.sent.is_set():
            await asyncio.sleep(0.01)
        redeeming.cancel()  # as Server._shutdown does, then redeems a last time
        await asyncio.gather(redeeming, return_exceptions=True)
        assert await payments.redeem()
        return payments

    payments = asyncio.run(leave())
    assert settlement.paid(client.address, server.address, channel) == amount
    assert payments.redeemed_wei == amount
    assert f"Redeemed {amount} wei from {client.address}" in capsys.readouterr().out
