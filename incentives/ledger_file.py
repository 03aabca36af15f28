"""A server's ledger on disk (~/.cache/cocoon/ledger-<payout>.json), for `cocoon earnings` and `cocoon redeem`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from incentives.credit import ServerLedger
from incentives.vouchers import Reservation, Voucher


def ledger_path(payout: str) -> Path:
    root = Path(os.environ.get("COCOON_CACHE_DIR", Path.home() / ".cache" / "cocoon"))
    return root / f"ledger-{payout.lower()}.json"


def write_ledger(ledger: ServerLedger) -> Path:
    """Atomically: a reader (or a restarted server) sees the old file or the new one, never half of one."""
    path = ledger_path(ledger.payout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ledger.to_json(), indent=1))
    tmp.replace(path)
    return path


def read_ledger_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def read_ledger(path: str | os.PathLike) -> dict:
    """The ledger with its vouchers and reservations parsed (for `cocoon earnings` and `cocoon redeem`)."""
    data = read_ledger_json(path)
    for channel in data["channels"]:
        if channel["voucher"]:
            channel["voucher"] = Voucher.from_wire(channel["voucher"])
            channel["signature"] = bytes.fromhex(channel["signature"])
        if channel.get("reservation"):
            total, signature = channel["reservation"]
            channel["reservation"] = (Reservation(channel["client"], data["payout"], channel["channel"], total),
                                      bytes.fromhex(signature))
    return data
