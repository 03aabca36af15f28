"""A server's ledger on disk (~/.cache/cocoon/ledger-<payout>.json), for `cocoon earnings` and `cocoon redeem`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from incentives.credit import ServerLedger
from incentives.vouchers import Voucher


def ledger_path(payout: str) -> Path:
    root = Path(os.environ.get("COCOON_CACHE_DIR", Path.home() / ".cache" / "cocoon"))
    return root / f"ledger-{payout.lower()}.json"


def write_ledger(ledger: ServerLedger) -> Path:
    path = ledger_path(ledger.payout)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ledger.to_json(), indent=1))
    tmp.replace(path)
    return path


def read_ledger(path: str | os.PathLike) -> dict:
    data = json.loads(Path(path).read_text())
    for channel in data["channels"]:
        if channel["voucher"]:
            channel["voucher"] = Voucher.from_wire(channel["voucher"])
            channel["signature"] = bytes.fromhex(channel["signature"])
    return data
