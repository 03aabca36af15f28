"""`cocoon wallet|chain|deposit|stake|release|earnings|redeem`: keys and settlement from the command line."""
from __future__ import annotations

import contextlib
import getpass
import os


def add_parsers(commands) -> None:
    wallet = commands.add_parser("wallet", help="create or show an encrypted key (passphrase: $COCOON_PASSPHRASE)")
    wallet.add_argument("action", choices=["create", "show"])
    wallet.add_argument("path")
    wallet.add_argument("--chain-rpc", help="with show: also print the balance on this chain")

    chain = commands.add_parser("chain", help="deploy the settlement contract")
    chain.add_argument("action", choices=["deploy"])
    _chain_args(chain, contract=False)
    chain.add_argument("--withdrawal-delay", type=int, default=3600,
                       help="seconds a withdrawal or unstake request waits (servers redeem meanwhile)")
    chain.add_argument("--request-window", type=int, default=86400,
                       help="seconds a matured withdrawal or unstake request stays usable")
    chain.add_argument("--min-stake", type=int, default=0, help="wei")
    chain.add_argument("--verdict-threshold", type=int, default=2)

    for name, text in (("deposit", "put wei in escrow to pay servers"), ("stake", "stake wei to serve for pay")):
        parser = commands.add_parser(name, help=text)
        parser.add_argument("amount", type=int, help="wei")
        _chain_args(parser)

    release = commands.add_parser("release", help="take back the escrow reserved for servers: the first run asks, "
                                  "a run after the withdrawal delay returns it to your escrow")
    _chain_args(release)
    earnings = commands.add_parser("earnings", help="units served, paid and pending per client")
    earnings.add_argument("ledger", help="the server's ledger file (printed by `cocoon serve`)")
    earnings.add_argument("--chain-rpc", required=True)

    redeem = commands.add_parser("redeem", help="redeem the vouchers of a server's ledger now")
    redeem.add_argument("ledger")
    _chain_args(redeem)


def _chain_args(parser, contract: bool = True) -> None:
    parser.add_argument("--chain-rpc", required=True, help="JSON-RPC URL of the chain")
    parser.add_argument("--wallet", required=True, help="keystore file (see `cocoon wallet create`)")
    if contract:
        parser.add_argument("--contract", required=True, help="settlement contract address")


def passphrase() -> str:
    return os.environ.get("COCOON_PASSPHRASE") or getpass.getpass("wallet passphrase: ")


def run(args) -> int:
    from web3 import Web3

    from incentives.contract import ChainError, Settlement
    from incentives.wallet import create_wallet, load_wallet
    w3 = Web3(Web3.HTTPProvider(args.chain_rpc)) if getattr(args, "chain_rpc", None) else None
    if args.command == "wallet":
        account = create_wallet(args.path, passphrase()) if args.action == "create" else load_wallet(args.path, passphrase())
        print(f"address {account.address}" + (f"  balance {w3.eth.get_balance(account.address)} wei" if w3 else ""))
    elif args.command == "chain":
        settlement = Settlement.deploy(w3, load_wallet(args.wallet, passphrase()), withdrawal_delay=args.withdrawal_delay,
                                       request_window=args.request_window,
                                       min_stake=args.min_stake, verdict_threshold=args.verdict_threshold)
        print(f"settlement contract {settlement.address} on chain {settlement.domain.chain_id}")
    elif args.command in ("deposit", "stake"):
        settlement, account = Settlement(w3, args.contract), load_wallet(args.wallet, passphrase())
        if args.command == "deposit":
            settlement.deposit(account, args.amount)
            print(f"escrow of {account.address}: {settlement.escrow(account.address)} wei")
        else:
            settlement.register(account, args.amount)
            print(f"stake of {account.address}: {settlement.stake(account.address)} wei")
    elif args.command == "release":
        release(Settlement(w3, args.contract), load_wallet(args.wallet, passphrase()))
    elif args.command == "earnings":
        print(format_earnings(args.ledger, w3))
    elif args.command == "redeem":
        from incentives.ledger_file import read_ledger
        settlement, account = Settlement(w3, args.contract), load_wallet(args.wallet, passphrase())
        for channel in read_ledger(args.ledger)["channels"]:
            voucher = channel["voucher"]
            if voucher and voucher.total_amount > settlement.paid(voucher.client, voucher.server, voucher.channel):
                if channel.get("reservation"):
                    with contextlib.suppress(ChainError):  # already applied, or the escrow is empty
                        settlement.reserve(account, *channel["reservation"])
                settlement.redeem(account, voucher, channel["signature"])
                print(f"redeemed {voucher.client} channel {voucher.channel}: "
                      f"{settlement.paid(voucher.client, voucher.server, voucher.channel)} wei paid in all")
    return 0


def release(settlement, account) -> None:
    """Every channel of this client that still holds reserved escrow: ask for it back, or take it back once the
    delay has passed (the servers redeem what they are owed meanwhile)."""
    from incentives.contract import ChainError
    logs = settlement.contract.events.Reserved.get_logs(argument_filters={"client": account.address}, from_block=0)
    for server, channel in sorted({(log.args.server, log.args.channel) for log in logs}):
        held = settlement.reserved(account.address, server, channel)
        if held == 0:
            continue
        try:
            settlement.release(account, server, channel)
            print(f"released {held} wei reserved for {server} on channel {channel}: back in your escrow")
        except ChainError as e:
            if "no release requested" not in str(e):
                print(f"{held} wei reserved for {server} on channel {channel}: {e}")
                continue
            settlement.request_release(account, server, channel)
            print(f"asked for the {held} wei reserved for {server} on channel {channel}: run `cocoon release` again "
                  f"after the withdrawal delay ({settlement.contract.functions.withdrawal_delay().call()} s)")
    print(f"escrow of {account.address}: {settlement.escrow(account.address)} wei")


def format_earnings(ledger_file: str, w3) -> str:
    from incentives.contract import Settlement
    from incentives.ledger_file import read_ledger
    data = read_ledger(ledger_file)
    settlement = Settlement(w3, data["contract"])
    lines = [f"server {data['payout']} on chain {data['chain_id']}, contract {data['contract']}",
             f"{'client':<44} {'channel':>20} {'units':>10} {'owed wei':>14} {'paid wei':>14} {'pending wei':>14}"]
    for channel in data["channels"]:
        paid = settlement.paid(channel["client"], data["payout"], channel["channel"])
        units = channel["forward_units"] + channel["backward_units"]
        lines.append(f"{channel['client']:<44} {channel['channel']:>20} {units:>10} {channel['owed']:>14} "
                     f"{paid:>14} {channel['owed'] - paid:>14}")
    return "\n".join(lines)
