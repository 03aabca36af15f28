"""Keys: an Ethereum account in an encrypted keystore file (the standard JSON keystore, scrypt)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount


class WalletError(ValueError):
    """A wallet that cannot be opened; the message says what to do."""


def create_wallet(path: str | os.PathLike, passphrase: str, private_key: str | None = None) -> LocalAccount:
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; not overwriting a wallet")
    account = Account.from_key(private_key) if private_key else Account.create()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(Account.encrypt(account.key, passphrase)))
    path.chmod(0o600)
    return account


def load_wallet(path: str | os.PathLike, passphrase: str) -> LocalAccount:
    try:
        keystore = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise WalletError(f"cannot read the wallet {path}: {e}. Create one with `cocoon wallet create {path}`.")
    try:
        return Account.from_key(Account.decrypt(keystore, passphrase))
    except ValueError:
        raise WalletError(f"wrong passphrase for {path} (set COCOON_PASSPHRASE)") from None
