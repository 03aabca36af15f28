"""The steps of inference sessions: opening one, each step the client sends, and the steps pushed to it.

A session opens with its first step (blocks, max_length, LoRA or deep prompts for its whole life). Each step
is checked against the session (its position, batch, length), charged, computed by the engine, pushed on to
the next server when the client asked (swarm.server.push), attested and answered.

A pushed step (from the previous server of the client's chain) is computed as soon as it arrives and
answered to the client at once, with the digest of its input. The client still sends its own copy: equal
digests mean it was answered already; different ones mean the previous server pushed something other than
what it gave the client, and the session goes back (``Session.truncate``) and computes the client's.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Protocol

import torch

from shards.lora import LoraWeights
from swarm.wire import compact, int8_rows
from swarm.wire.compact import CompactFrame
from swarm.wire.framing import write_frame
from swarm.server.billing import Billing
from swarm.server.engine import MAX_DECODE_TOKENS, Engine
from swarm.server.push import PushSender
from swarm.server.sessions import PushedStep, Session, SessionTable
from swarm.server.streams import Stream, pack_reply
from swarm.wire.codes import ErrorCode, WireError, bad
from swarm.wire.payloads import Accept
from swarm.wire.replies import PushRefusal, SpanReply
from swarm.wire.requests import Bounds, InferenceStep, PushStep, SpanRequest

logger = logging.getLogger(__name__)


class StepServer(Protocol):
    """What a session's steps need of the span handler that owns them (swarm.server.handler.SpanHandler)."""
    engine: Engine
    sessions: SessionTable
    billing: Billing
    pushes: PushSender | None
    accepting: bool

    @property
    def bounds(self) -> Bounds: ...

    def lora(self, request: SpanRequest) -> LoraWeights | None: ...

    def count(self, rpc: str, hidden: torch.Tensor, blocks: int) -> None: ...


class SessionSteps:
    def __init__(self, server: StepServer):
        self.server = server  # its engine, sessions, billing, LoRA weights and metrics
        self.routes: dict[str, Session] = {}  # route id -> the session that takes pushes under it
        # steps pushed on, taken from a push, answered from a push, pushed steps refused, differing from the client's
        self.push_counts = dict.fromkeys(("sent", "taken", "answered", "refused", "differed"), 0)
        # drafted tokens of verify steps (all but the first token of a step of 2 to 8 onto a session), and those of
        # them the client kept: where its next step starts says so (speculative decoding)
        self.drafts = dict.fromkeys(("proposed", "accepted"), 0)

    async def inference(self, message, stream: Stream) -> SpanReply | None:
        """A client's step; None when it was answered already, from a push."""
        server, session = self.server, stream.session
        if not isinstance(message, CompactFrame):
            step = InferenceStep.parse(message, server.bounds, opening=session is None)
        elif session is None:
            raise bad("a session opens with a full step (swarm.wire.requests), not a compact frame")
        else:
            step = compact.parse_step(message, server.bounds, push=False)
        batch = step.hidden.shape[0]
        blocks = session.end - session.start if session is not None else step.end - step.start
        payer = await server.billing.admit(stream.peer, step.payment, step.hidden, blocks)  # before a session opens
        if session is None:
            if not server.accepting:
                raise WireError(ErrorCode.SHUTTING_DOWN, "server is shutting down: open the session elsewhere")
            lora = server.lora(step)  # deep prompts, LoRA weights or an adapter hold for the whole session
            session = server.sessions.open(peer=stream.peer, start=step.start, end=step.end, batch_size=batch,
                                           max_length=step.max_length, cache=server.engine.span.new_cache())
            session.lora, session.writer, session.compact = lora, stream.writer, bool(step.compact)
            session.codec = step.codec
            stream.session = session
        else:
            server.sessions.check_open(session)
            if batch != session.batch_size:
                raise bad(f"batch of {batch} in a session opened with {session.batch_size}")
        if step.payment is not None:
            session.payment = dataclasses.replace(step.payment, voucher=None)
        if step.push is not None:
            session.push = step.push or None
        if step.accept is not None:
            self.set_accept(session, step.accept)
        if step.by_push:  # each piece answered when the previous server's push of it is computed (push, below)
            session.by_push_end = step.by_push
            return None
        session.push_next = max(session.push_next, session.by_push_end)  # no more pieces of a prompt after this
        async with session.lock:
            pushed, session.pushed = session.pushed, None
            if pushed is not None and step.position == pushed.position and \
                    session.length == pushed.position + step.hidden.shape[1]:
                if pushed.digest == step.digest():
                    self.push_counts["answered"] += 1
                    return None  # taken from the push and answered then
                self.push_counts["differed"] += 1
                session.truncate(pushed.position)  # the client's counts, not what the previous server pushed
                logger.info(f"a pushed step of a session of {session.peer} differed from the client's: recomputed")
            if step.position is not None:
                self._count_drafts(session, step.position)
                if step.position != session.length:
                    self.roll_back(session, step.position)
            reply = await self.step(session, step, stream.peer, payer)
            if step.compact:
                reply.compact = True  # the client may send its later decode steps compact
            return reply

    async def step(self, session: Session, step: InferenceStep, peer: str, payer, digest: str | None = None
                   ) -> SpanReply:
        server, length = self.server, step.hidden.shape[1]
        if session.length + length > session.max_length:
            raise bad(f"{session.length} + {length} tokens exceed the session's max_length {session.max_length}")
        check_mask_length(step, session.length)
        if step.reorder is not None:
            await server.engine.call(peer, session.cache.reorder_cache,
                                     torch.tensor(step.reorder, device=server.engine.span.device))
        output = await server.engine.span_output(peer, step, session.cache, (session.start, session.end),
                                                 session.lora, past=session.length)
        output = int8_rows.maybe_round(session.codec, output)  # before its digests: what the next server gets
        position = session.advance(step)
        if session.push is not None and server.pushes is not None:  # the next server's input first
            if await server.pushes.send(session.push, step, output, position, session.end):
                self.push_counts["sent"] += 1
            else:
                session.push = None
        server.sessions.touch(session)  # only a step that succeeds keeps a session alive
        server.count("inference", step.hidden, session.end - session.start)
        session.input_chain, attestation = server.billing.attest(session.input_chain, step.hidden, output,
                                                                 session.start, session.end)
        reply = SpanReply([output], length=session.length, digest=digest, attestation=attestation)
        reply.receipt = server.billing.receipt(payer, step.hidden, session.start, session.end)
        return reply

    def roll_back(self, session: Session, position: int) -> None:
        """The client goes back to ``position`` (it did not accept the drafted tokens after it). Positions given up
        were computed and paid for all the same; they count against the session's rollback allowance."""
        if position > session.length:
            raise bad(f"a step at position {position} in a session of length {session.length}")
        allowance = self.server.engine.quotas.rollback_factor * session.max_length
        if session.rolled_back + session.length - position > allowance:
            raise bad(f"this session rolled back {session.rolled_back} positions; {session.length - position} more "
                      f"would pass its allowance of {allowance:.0f} (--rollback-factor x max_length): open a new "
                      f"session")  # the caller's doing: raised to it, not a reason to fail over
        rejected = session.length - position
        try:
            session.truncate(position, self.server.billing.rechain)
        except ValueError as e:
            raise bad(f"cannot go back to position {position}: {e}") from None
        session.rolled_back += rejected

    def _count_drafts(self, session: Session, position: int) -> None:
        """The session's latest step, when a verify step (2 to 8 tokens after the first step), proposed all its
        tokens but the first; the client kept those before ``position``, where its next step starts."""
        if not session.steps:
            return
        start = next(reversed(session.steps))
        step = session.steps[start].step
        if start == 0 or step is None or step.hidden.shape[1] < 2:
            return
        tokens = step.hidden.shape[1]
        self.drafts["proposed"] += tokens - 1
        self.drafts["accepted"] += max(min(position, start + tokens) - start - 1, 0)

    def _rolls_back(self, session: Session, step: PushStep, digest: str) -> bool:
        """Whether a pushed step at an earlier position than the session's length is a rollback the client asked of
        the previous server (then the session goes back to it) and not a late copy of a step already taken from the
        client: that one starts a kept step with the same input."""
        record = session.step_at(step.position)
        if record is not None and (record.step is None or record.step.digest() == digest):
            return False
        self._count_drafts(session, step.position)
        self.roll_back(session, step.position)
        return True

    # ------------------------------------------------------------------ push (swarm.server.push)
    def set_accept(self, session: Session, accept: Accept) -> None:
        if session.accept is not None and self.routes.get(session.accept.id) is session:
            del self.routes[session.accept.id]
        session.accept = accept or None
        if accept:
            if self.routes.get(accept.id, session) is not session:
                session.accept = None
                raise bad(f"route id {accept.id} is taken: pick another")
            self.routes[accept.id] = session

    async def push(self, message, stream: Stream) -> PushRefusal | None:
        """A step pushed by the previous server of a session's chain: computed and answered to the client. Only a
        refusal is answered on the push stream: acknowledging every step would wake the pusher once more per token."""
        server = self.server
        if isinstance(message, CompactFrame):
            step = compact.parse_step(message, server.bounds, push=True)
        else:
            step = PushStep.parse(message, server.bounds, opening=False)
        session = self.routes.get(step.route_id)
        if session is None or session.accept.sender != stream.peer or \
                session.session_id not in server.sessions.sessions:
            self.push_counts["refused"] += 1
            return PushRefusal(step.route_id, f"no session here takes pushes from you under route {step.route_id}")
        if step.hidden.shape[0] != session.batch_size:
            raise bad(f"batch of {step.hidden.shape[0]} in a session opened with {session.batch_size}")
        if step.position == session.push_next < session.by_push_end:  # a piece of the prompt: after the one before
            session.push_next = min(step.position + step.hidden.shape[1], session.by_push_end)
            session.push_task = asyncio.create_task(self._pushed_in_turn(session.push_task, session, step))
        elif step.position <= session.length and (session.push_task is None or session.push_task.done()):
            if session.pushed is None and step.hidden.shape[1] <= MAX_DECODE_TOKENS and server.engine.lone_decoder():
                await self._pushed_step(session, step)  # a lone session's step runs inline, holding the loop anyway
            else:  # one at a time, and after the client's copy of the last pushed step when that is waiting too
                session.push_task = asyncio.create_task(self._pushed_step(session, step))
        return None

    async def _pushed_in_turn(self, previous: asyncio.Task | None, session: Session, step: PushStep) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        await self._pushed_step(session, step)

    async def _pushed_step(self, session: Session, step: PushStep) -> None:
        async with session.lock:
            copy_due = session.pushed is not None and session.pushed.position >= session.by_push_end
            if step.position > session.length or copy_due or session.session_id not in self.server.sessions.sessions:
                return  # the client's own step came first, or its copy of the last pushed step is still to come
            if step.position < session.by_push_end and step.position != session.length:
                return  # a piece of the prompt that the client's own copy of it overtook
            digest = step.digest()
            try:
                if step.position < session.length and not self._rolls_back(session, step, digest):
                    return
            except WireError as e:  # the client's own copy of the step will meet the refusal
                logger.info(f"a pushed rollback was refused ({e.message}); waiting for the client's step")
                return
            if step.position == session.length:
                self._count_drafts(session, step.position)
            try:
                payer = await self.server.billing.admit(session.peer, session.payment, step.hidden,
                                                        session.end - session.start)
                reply = await self.step(session, step, session.peer, payer, digest=digest)
            except Exception as e:  # the client's own copy of the step will meet the error
                logger.info(f"a pushed step failed ({type(e).__name__}: {e}); waiting for the client's")
                with contextlib.suppress(ValueError):  # else the client's copy meets a session that moved on
                    session.truncate(step.position)
                return
            # the client's copy of the step is still to come; or, for the pieces the session opened to take by push,
            # it comes only if the client fell back to sending it (then the pieces are undone and it is computed)
            session.pushed = PushedStep(step.position, digest)
            reply.push_proof = step.push_proof  # the pusher's words on what it pushed, for the client to judge
            self.push_counts["taken"] += 1
            with contextlib.suppress(ConnectionError):
                await write_frame(session.writer, pack_reply(session, reply))


def check_mask_length(request, past: int) -> None:
    mask, length = request.attention_mask, request.hidden.shape[1]
    if mask is not None and mask.shape[1] != past + length:
        raise bad(f"attention_mask must cover the {past} past and {length} new tokens, got {mask.shape[1]} columns")
