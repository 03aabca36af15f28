"""One failover policy for every request a client makes (inference steps, forward, backward, spot checks).

What a failure means decides what happens next:
- the caller's error (a malformed request, an unpaid one): raised at once with the server's message and
  code; nobody is banned, nothing is retried;
- the server is busy (full, this peer's quota used up, shutting down): another holder of the span gets the
  request and nobody is banned; when every holder is busy, wait with backoff and try again;
- the server failed (timeout, disconnect, unreachable, internal error, a reply that breaks the contract, a
  wrong output caught by a spot check): it is banned with backoff and a replacement takes over;
- the session expired or LoRA weights were let go: retried (the session replayed, the weights resent).
A request gives up after ``max_retries`` failures with an error that names the servers that failed.
"""
from __future__ import annotations

import asyncio
import logging
from enum import Enum

from hivemind.p2p import P2PDaemonError, P2PHandlerError

from routing import ChainLink, NoChainError
from swarm.client.attestations import BadAttestation
from swarm.wire.codes import CALLER_ERRORS, SKIP, ErrorCode, InvalidReply, RemoteError

logger = logging.getLogger(__name__)
BACKOFF_BASE, BACKOFF_MAX = 0.5, 8.0  # seconds to wait when only busy or failed servers hold some blocks


class ServerFailure(RuntimeError):
    """A server stopped answering or broke the protocol (e.g. closed a stream mid-request)."""


class SwarmError(RuntimeError):
    """A request could not be served by the swarm: the message says which blocks, which servers, and why."""


class Verdict(Enum):
    RAISE = "the caller's error"
    BAN = "the server failed"
    SKIP = "the server is busy"
    RETRY = "retry"


class WrongOutputError(RuntimeError):
    """A server's output was proven wrong (swarm.client.spot_check): it was convicted and replaced."""


SERVER_FAILURES = (InvalidReply, ServerFailure, TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                   P2PDaemonError, P2PHandlerError, OSError)


def judge(error: BaseException) -> Verdict:
    if isinstance(error, RemoteError):
        if error.code in CALLER_ERRORS:
            return Verdict.RAISE
        if error.code in SKIP:
            return Verdict.SKIP
        if error.code in (ErrorCode.SESSION_EXPIRED, ErrorCode.LORA_NOT_CACHED):
            return Verdict.RETRY
        return Verdict.BAN  # internal errors, deadlines
    if isinstance(error, (*SERVER_FAILURES, WrongOutputError)):
        return Verdict.BAN
    return Verdict.RAISE  # a bug or a bad argument on this side: not a server's fault


class Failover:
    """The failures of one request (one inference step, one forward or backward, one spot check)."""

    def __init__(self, client, what: str):
        self.client, self.what = client, what
        self.failures: list[tuple[str, BaseException]] = []
        self.busy: set[str] = set()  # skipped for this request, not banned
        self.waits = 0

    def failed(self, peer_id: str, error: BaseException) -> Verdict:
        """Record that ``peer_id`` failed with ``error``: raises the caller's errors and, after too many
        failures, SwarmError; otherwise bans or skips the server and returns, for the caller to retry."""
        verdict = judge(error)
        if verdict is Verdict.RAISE:
            raise error
        self.failures.append((peer_id, error))
        if isinstance(error, BadAttestation):  # a priced server that will not say what it did: never again
            self.client.bans.ban_forever(peer_id)
            if self.client.payments is not None:
                self.client.payments.stop(peer_id)
            logger.warning(f"server {peer_id} is banned for good and paid no further: {error}")
        elif verdict is Verdict.BAN:
            self.client.report_failure(peer_id, error)
        elif verdict is Verdict.SKIP:
            self.busy.add(peer_id)
            logger.info(f"server {peer_id} is busy ({error}); trying another holder")
        if len(self.failures) > self.client.max_retries:
            raise SwarmError(self._give_up()) from error
        return verdict

    async def chain(self, start: int, end: int, **kwargs) -> list[ChainLink]:
        """A chain for blocks [start, end) avoiding banned and busy servers. When only those hold some of
        the blocks, wait (with backoff) and try them again; NoChainError when no server holds them at all."""
        try:
            return await self.client.chain(start, end, avoid=self.busy, **kwargs)
        except NoChainError as e:
            if not getattr(e, "excluded", None):
                raise
            delay = min(BACKOFF_BASE * 2 ** self.waits, BACKOFF_MAX)
            self.waits += 1
            if self.waits > self.client.max_retries:
                raise SwarmError(self._give_up()) from e
            logger.info(f"{self.what}: only busy or failed servers hold blocks {start}:{end}; retrying in {delay:.1f}s")
        await asyncio.sleep(delay)
        self.busy.clear()
        return await self.client.chain(start, end, include_banned=True, **kwargs)

    def _give_up(self) -> str:
        seen: dict[str, str] = {}
        for peer_id, error in self.failures:
            seen[peer_id] = f"{type(error).__name__}: {error}"
        servers = "; ".join(f"{peer_id}: {text}" for peer_id, text in seen.items())
        return (f"{self.what}: gave up after {len(self.failures)} failed attempts ({servers or 'no server answered'}). "
                f"Check that these servers are reachable from here (`cocoon status`).")
