"""What a server's error reply says, and whose problem it is: the codes of swarm.wire.replies.ErrorReply and the
exceptions that carry them (no torch here: the command line uses these)."""
from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    BAD_REQUEST = "bad_request"            # malformed or unacceptable: the caller's error, nobody is banned
    TOO_LARGE = "too_large"                # a frame beyond the server's size limit: the caller's error
    PAYMENT_REQUIRED = "payment_required"  # no payer, no valid voucher, or credit used up: the caller's error
    SESSION_EXPIRED = "session_expired"    # the server closed the session (idle): open it again
    LORA_NOT_CACHED = "lora_not_cached"    # weights named by hash are gone: send them again
    SERVER_FULL = "server_full"            # no room now: try another holder, ban nobody
    QUOTA_EXCEEDED = "quota_exceeded"      # this peer's share of the server is in use: try another holder
    SHUTTING_DOWN = "shutting_down"        # the server is leaving: try another holder
    DEADLINE = "deadline"                  # a frame did not arrive in time
    INTERNAL = "internal"                  # the server failed: it is to blame
    VERSION_MISMATCH = "version_mismatch"  # the peers speak different protocols (swarm.wire.protocol): try another


CALLER_ERRORS = frozenset({ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.PAYMENT_REQUIRED})
BUSY = frozenset({ErrorCode.SERVER_FULL, ErrorCode.QUOTA_EXCEEDED, ErrorCode.SHUTTING_DOWN})
# not this server, for reasons that are nobody's fault: skip it for this request, ban nobody
SKIP = BUSY | {ErrorCode.VERSION_MISMATCH}


class WireError(ValueError):
    """Something the peer sent breaks the contract; ``code`` says whose problem it is."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):
        return type(self), (self.code, self.message)


def bad(message: str) -> WireError:
    return WireError(ErrorCode.BAD_REQUEST, message)


class RemoteError(RuntimeError):
    """A server answered a request with an ErrorReply."""

    def __init__(self, code: ErrorCode, message: str, peer_id: str | None = None):
        super().__init__(message if peer_id is None else f"{message} (server {peer_id})")
        self.code, self.message, self.peer_id = code, message, peer_id

    def __reduce__(self):
        return type(self), (self.code, self.message, self.peer_id)


class InvalidReply(RuntimeError):
    """A server's reply broke the contract (size, shape, dtype, non-finite values): the server failed."""


class BadAttestation(InvalidReply):
    """A priced server's reply came without a valid attestation of its input and output (swarm.client.attestations):
    the client bans it for good and pays it no further."""
