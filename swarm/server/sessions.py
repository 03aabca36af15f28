"""Inference sessions on a server: KV caches under a token budget reserved up front, with idle expiry.

A session goes back to an earlier position with ``truncate``: a pushed step the client's own copy of it
contradicts is undone so (swarm.server.session_steps), and so are the tokens a client's verify step did not
accept (speculative decoding: the client's next step starts at an earlier position than the session's length).
Positions rolled back were computed all the same: they were metered, are not refunded, and count against
the session's rollback allowance, so that no client has the same positions recomputed for free without end.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from transformers.cache_utils import DynamicCache

from swarm.wire.codes import ErrorCode, WireError
from swarm.wire.payloads import Accept, Route


KEPT_STEPS = 16  # records of the latest steps kept, for truncate
KEPT_INPUT_TOKENS = 8  # a step of at most this many tokens (a verify step) keeps its input: truncate may cut into it


@dataclass(frozen=True)
class PushedStep:
    """The latest step a session took from a push, until the client's own copy of it arrives."""
    position: int  # where it started
    digest: str    # of its input, as swarm.wire.requests.InferenceStep.digest computes it


@dataclass(frozen=True)
class StepRecord:
    """One of a session's latest steps, as truncate needs it."""
    chain: bytes      # the session's input chain before the step
    step: Any = None  # the step itself (swarm.wire.requests.InferenceStep or PushStep) when short, else None


@dataclass
class Session:
    session_id: str
    peer: str
    start: int
    end: int
    batch_size: int
    max_length: int
    cache: DynamicCache
    length: int = 0
    input_chain: bytes = b""  # chained hash of every step's input (see incentives.verification)
    lora: Any = None          # shards.lora.LoraWeights given when the session opened
    last_active: float = field(default_factory=time.monotonic)
    # server-to-server push (swarm.server.push)
    writer: Any = None        # the client's stream: where a step computed from a push is answered
    payment: Any = None       # the client's latest payment, without its voucher: who pays for pushed steps
    push: Route | None = None    # where to push this session's outputs
    accept: Accept | None = None  # whose pushes to take
    pushed: PushedStep | None = None  # the last step taken from a push, until the client's copy arrives
    push_task: Any = None       # the pushed step being computed (or the last piece queued, below)
    by_push_end: int = 0        # the session's first tokens come pushed in pieces (requests.piece_bounds), no copies
    push_next: int = 0          # where the next piece of them starts
    compact: bool = False       # the client reads replies in swarm.wire.compact's layout
    codec: str | None = None    # "int8": long outputs (replies and pushes) cross in 8-bit rows (swarm.wire.int8_rows)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one step at a time, pushed or the client's
    steps: dict[int, StepRecord] = field(default_factory=dict)  # the latest steps, by the position they start at
    rolled_back: int = 0  # positions computed and then given up by the client (speculative decoding)

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length

    def advance(self, step) -> int:
        """``step``'s tokens are in the cache now (its input is chained onto ``input_chain`` next); returns where they
        start."""
        position, tokens = self.length, step.hidden.shape[1]
        self.steps[position] = StepRecord(self.input_chain, step if tokens <= KEPT_INPUT_TOKENS else None)
        while len(self.steps) > KEPT_STEPS:
            del self.steps[next(iter(self.steps))]
        self.length += tokens
        return position

    def step_at(self, position: int) -> StepRecord | None:
        """The record of the kept step that starts at ``position``."""
        return self.steps.get(position)

    def truncate(self, position: int, rechain: Callable[[bytes, Any], bytes] | None = None) -> None:
        """Forget every token from ``position`` on: the KV cache, the length and the input chain are as they were
        there. Back to the start of one of the latest KEPT_STEPS steps or into one of them that kept its input
        (``rechain(chain, input)`` chains the part kept), or anywhere when nothing is attested (a free server
        chains nothing); a sliding-window cache only while it is shorter than its window."""
        if not 0 <= position <= self.length:
            raise ValueError(f"cannot truncate a session of length {self.length} to {position}")
        if position == self.length:
            return
        chain = self._chain_at(position, rechain)
        for layer in self.cache.layers:
            if getattr(layer, "is_sliding", False) and layer.get_seq_length() >= layer.sliding_window:
                raise ValueError("a sliding-window cache past its window cannot go back: open a new session")
        self.cache.crop(position - self.length)
        self.length, self.input_chain = position, chain
        self.steps = {at: record for at, record in self.steps.items() if at < position}

    def _chain_at(self, position: int, rechain) -> bytes:
        if not self.input_chain:
            return b""
        start = max((at for at in self.steps if at <= position), default=None)
        if start is None:
            raise ValueError(f"position {position} is before the latest {KEPT_STEPS} steps of the session")
        record = self.steps[start]
        if start == position:
            return record.chain
        if record.step is None or rechain is None:
            raise ValueError(f"position {position} lies inside a step of more than {KEPT_INPUT_TOKENS} tokens")
        return rechain(record.chain, record.step.hidden[:, :position - start])


class SessionTable:
    """Every open session; a new one is admitted only if its whole KV cache fits in the budget."""

    def __init__(self, *, cache_tokens: int, max_sessions: int, max_length: int, timeout: float,
                 max_sessions_per_peer: int | None = None):
        self.cache_tokens, self.max_sessions = cache_tokens, max_sessions
        self.max_per_peer = max_sessions_per_peer or max_sessions
        self.max_length, self.timeout = max_length, timeout
        self.sessions: dict[str, Session] = {}

    @property
    def tokens_left(self) -> int:
        return self.cache_tokens - sum(s.reserved_tokens for s in self.sessions.values())

    def open(self, *, peer: str, start: int, end: int, batch_size: int, max_length: int,
             cache: DynamicCache) -> Session:
        if max_length > self.max_length:
            raise WireError(ErrorCode.BAD_REQUEST,
                            f"max_length {max_length} exceeds this server's limit of {self.max_length} tokens")
        mine = sum(s.peer == peer for s in self.sessions.values())
        if mine >= self.max_per_peer:
            raise WireError(ErrorCode.QUOTA_EXCEEDED, f"{mine} sessions of your peer are open here (the limit per "
                                                      f"peer): close some or use another server")
        if len(self.sessions) >= self.max_sessions:
            raise WireError(ErrorCode.SERVER_FULL,
                            f"server full: {len(self.sessions)} sessions open (--max-sessions {self.max_sessions})")
        if batch_size * max_length > self.tokens_left:
            raise WireError(ErrorCode.SERVER_FULL, f"server full: {batch_size} x {max_length} cache tokens asked, "
                                                   f"{self.tokens_left} of {self.cache_tokens} left")
        session = Session(uuid.uuid4().hex, peer, start, end, batch_size, max_length, cache)
        self.sessions[session.session_id] = session
        return session

    def check_open(self, session: Session) -> None:
        if session.session_id not in self.sessions:
            raise WireError(ErrorCode.SESSION_EXPIRED,
                            f"session {session.session_id} expired (idle for over {self.timeout:.0f} s): open a new one")

    @staticmethod
    def touch(session: Session) -> None:
        session.last_active = time.monotonic()

    def decoding(self, within: float = 1.0) -> int:
        """Sessions that took a step within the last ``within`` seconds (those worth waiting for to batch)."""
        since = time.monotonic() - within
        return sum(s.last_active >= since for s in list(self.sessions.values()))  # list(): one atomic copy

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def expire(self) -> list[str]:
        """Close sessions idle for longer than the timeout; returns their ids."""
        deadline = time.monotonic() - self.timeout
        expired = [sid for sid, s in self.sessions.items() if s.last_active < deadline]
        for sid in expired:
            self.close(sid)
        return expired
