"""Who pays is proven, not claimed. A client proves to a server that the peer it talks from acts for an
Ethereum address: it signs (EIP-712, incentives.eip712) the server's peer id, its own peer id, the address and
an expiry.
The proof is bound to both peers, so a server cannot replay it elsewhere and nobody else can use it from
another peer; libp2p authenticates the peer ids themselves."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from incentives.eip712 import Typed, sign, signer_of

HALF_N = 57896044618658097711785492504343953926418782139537452191302581570759080747168  # secp256k1 n / 2


def canonical_signature(signature: bytes) -> bool:
    """What the settlement contract accepts: 65 bytes (r, s, v), v in {27, 28}, 0 < s <= n/2, r != 0."""
    if not isinstance(signature, bytes) or len(signature) != 65:
        return False
    r, s, v = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:64], "big"), signature[64]
    return v in (27, 28) and 0 < r and 0 < s <= HALF_N


@dataclass(frozen=True)
class PayerProof(Typed):
    address: str
    server_peer: str
    client_peer: str
    expires: int          # unix time
    signature: bytes = b""

    EIP712_NAME = "PayerProof"
    EIP712_FIELDS = (("address", "address"), ("serverPeer", "string"), ("clientPeer", "string"),
                     ("expires", "uint256"))

    def signed(self, account) -> "PayerProof":
        return dataclasses.replace(self, signature=sign(self, bytes(account.key)))

    def valid(self, now: float) -> bool:
        """Signed by ``address``, canonically, and not expired."""
        if self.expires < now or not canonical_signature(self.signature):
            return False
        try:
            return signer_of(self, self.signature).lower() == self.address.lower()
        except Exception:
            return False
