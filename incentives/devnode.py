"""A local development chain for the demo and integration tests: anvil, from the npm package
@foundry-rs/anvil (installed by `make install` into .tools/). It is a real node over HTTP JSON-RPC, so
every process of a local swarm (servers, clients) reaches the same chain, which the in-process
eth-tester chain cannot offer."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

REPO_TOOLS = Path(__file__).resolve().parent.parent / ".tools" / "node_modules" / ".bin" / "anvil"


def anvil_path() -> str:
    for candidate in (os.environ.get("COCOON_ANVIL"), str(REPO_TOOLS), shutil.which("anvil")):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("anvil not found: run `make install` (npm install @foundry-rs/anvil into .tools/) "
                            "or set COCOON_ANVIL")


class DevNode:
    """``with DevNode() as node:`` an anvil chain on 127.0.0.1; ``node.fund(account, wei)`` gives money."""

    def __init__(self):
        self.process = subprocess.Popen([anvil_path(), "--host", "127.0.0.1", "--port", "0"],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.process.stdout:
            found = re.search(r"Listening on ([\d.]+:\d+)", line)
            if found:
                self.url = f"http://{found.group(1)}"
                break
        else:
            raise RuntimeError("anvil exited before listening")
        self.w3 = Web3(Web3.HTTPProvider(self.url))

    def fund(self, address: str, wei: int) -> None:
        self.w3.provider.make_request("anvil_setBalance", [address, hex(wei)])

    def new_account(self, wei: int = 10**21) -> LocalAccount:
        account = Account.create()
        self.fund(account.address, wei)
        return account

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)

    def __enter__(self) -> "DevNode":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
