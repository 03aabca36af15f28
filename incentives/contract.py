"""The settlement contract: compiled from Settlement.vy by the vyper package, deployed and driven with web3."""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Sequence

from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractLogicError

from incentives.vouchers import Domain, Reservation, Voucher

SOURCE = Path(__file__).with_name("Settlement.vy")


class ChainError(RuntimeError):
    """A transaction was refused by the contract or the node; the message says why."""


@functools.lru_cache(maxsize=1)
def compiled() -> tuple[list, str]:
    import vyper
    out = vyper.compile_code(SOURCE.read_text(), output_formats=["abi", "bytecode"])
    return out["abi"], out["bytecode"]


class Settlement:
    def __init__(self, w3: Web3, address: str):
        abi, _ = compiled()
        self.w3 = w3
        self.contract = w3.eth.contract(address=Web3.to_checksum_address(address), abi=abi)
        self.address = self.contract.address
        self.domain = Domain(w3.eth.chain_id, self.address)

    @classmethod
    def deploy(cls, w3: Web3, deployer: LocalAccount, *, withdrawal_delay: int = 3600, min_stake: int = 0,
               verdict_threshold: int = 2, request_window: int = 86400) -> "Settlement":
        abi, bytecode = compiled()
        factory = w3.eth.contract(abi=abi, bytecode=bytecode)
        receipt = send(w3, deployer, factory.constructor(withdrawal_delay, min_stake, verdict_threshold,
                                                         request_window))
        return cls(w3, receipt.contractAddress)

    # ---------------------------------------------------------------- transactions
    def deposit(self, client: LocalAccount, amount: int):
        return send(self.w3, client, self.contract.functions.deposit(), value=amount)

    def request_withdrawal(self, client: LocalAccount, amount: int):
        return send(self.w3, client, self.contract.functions.request_withdrawal(amount))

    def withdraw(self, client: LocalAccount):
        return send(self.w3, client, self.contract.functions.withdraw())

    def reserve(self, sender: LocalAccount, reservation: Reservation, signature: bytes):
        r = reservation
        call = self.contract.functions.reserve((_address(r.client), _address(r.server), r.channel, r.total), signature)
        return send(self.w3, sender, call)

    def request_release(self, client: LocalAccount, server: str, channel: int):
        return send(self.w3, client, self.contract.functions.request_release(_address(server), channel))

    def release(self, client: LocalAccount, server: str, channel: int):
        return send(self.w3, client, self.contract.functions.release(_address(server), channel))

    def register(self, server: LocalAccount, stake: int):
        return send(self.w3, server, self.contract.functions.register(), value=stake)

    def request_unstake(self, server: LocalAccount):
        return send(self.w3, server, self.contract.functions.request_unstake())

    def unstake(self, server: LocalAccount):
        return send(self.w3, server, self.contract.functions.unstake())

    def redeem(self, sender: LocalAccount, voucher: Voucher, signature: bytes):
        return send(self.w3, sender, self.contract.functions.redeem(voucher.as_tuple(), signature))

    def add_verifier(self, owner: LocalAccount, verifier: str):
        return send(self.w3, owner, self.contract.functions.add_verifier(verifier))

    def slash(self, sender: LocalAccount, server: str, evidence: bytes, reporter: str, deadline: int,
              signatures: Sequence[bytes]):
        return send(self.w3, sender, self.contract.functions.slash(server, evidence, reporter, deadline,
                                                                   list(signatures)))

    def set_treasury_destination(self, owner: LocalAccount, destination: str):
        return send(self.w3, owner, self.contract.functions.set_treasury_destination(_address(destination)))

    def sweep_treasury(self, sender: LocalAccount):
        return send(self.w3, sender, self.contract.functions.sweep_treasury())

    # ---------------------------------------------------------------- views
    def escrow(self, client: str) -> int:
        return self.contract.functions.escrow(_address(client)).call()

    def backing(self, client: str, server: str, channel: int) -> int:
        """What the channel's vouchers can still be paid from (0 while the client is releasing it)."""
        return self.contract.functions.backing(_address(client), _address(server), channel).call()

    def reserved(self, client: str, server: str, channel: int) -> int:
        key = self.contract.functions.channel_key(_address(client), _address(server), channel).call()
        return self.contract.functions.reserved(key).call()

    def stake(self, server: str) -> int:
        return self.contract.functions.stake(_address(server)).call()

    def pending_withdrawal(self, client: str) -> int:
        return self.contract.functions.withdrawal_amount(_address(client)).call()

    def unstaking(self, server: str) -> bool:
        return self.contract.functions.unstake_time(_address(server)).call() != 0

    def treasury(self) -> int:
        return self.contract.functions.treasury().call()

    def paid(self, client: str, server: str, channel: int) -> int:
        key = self.contract.functions.channel_key(_address(client), _address(server), channel).call()
        return self.contract.functions.paid(key).call()


def _address(address: str) -> str:
    return Web3.to_checksum_address(address)


_senders: dict[str, threading.Lock] = {}
_senders_lock = threading.Lock()


def send(w3: Web3, account: LocalAccount, call, value: int = 0):
    """Sign locally, send, wait; a revert becomes a ChainError carrying the contract's reason. One transaction
    of an account at a time in this process: two threads would take the same nonce."""
    with _senders_lock:
        lock = _senders.setdefault(account.address, threading.Lock())
    with lock:
        return _send(w3, account, call, value)


def _send(w3: Web3, account: LocalAccount, call, value: int):
    try:
        tx = call.build_transaction({"from": account.address, "value": value,
                                     "nonce": w3.eth.get_transaction_count(account.address, "pending")})
    except ContractLogicError as e:
        raise ChainError(f"refused: {_reason(e)}") from None
    except Exception as e:  # eth-tester raises its own TransactionFailed while estimating gas
        if "revert" not in str(e):
            raise
        raise ChainError(f"refused: {_reason(e)}") from None
    signed = account.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))
    if receipt.status != 1:
        raise ChainError(f"transaction {receipt.transactionHash.hex()} reverted")
    return receipt


def _reason(error: Exception) -> str:
    message = str(getattr(error, "message", None) or error)
    return message.split("execution reverted: ")[-1]


def advance_time(w3: Web3, seconds: int) -> None:
    """Move the chain's clock forward (in-process eth-tester or a development node such as anvil)."""
    tester = getattr(w3.provider, "ethereum_tester", None)
    if tester is not None:
        target = w3.eth.get_block("latest").timestamp + seconds
        # the pending block may already be ahead of latest + seconds (e.g. seconds = 0): never travel back
        tester.time_travel(max(target, tester.get_block_by_number("pending")["timestamp"]))
        tester.mine_blocks(1)
    else:
        w3.provider.make_request("evm_increaseTime", [seconds])
        w3.provider.make_request("evm_mine", [])
