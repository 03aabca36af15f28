"""InferenceSession: one open stream per server of a chain, each holding a KV cache for this client.

Every server session remembers the inputs it was sent (as they crossed the wire). When a server fails,
the client fails over (swarm.client.failover): it asks routing for a replacement chain for exactly the
blocks the server covered, replays those inputs to the new server(s) to rebuild their KV caches, and goes
on: the output is the same as with no failure.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import torch

from incentives.verification import chain_hash
from routing import ChainLink
from swarm.client import loop
from swarm.client.attestations import check_attestation
from swarm.client.failover import Failover, ServerFailure
from swarm.client.inputs import block_slice, concat_history, cut_inputs, optional_inputs, wire_bytes
from swarm.client.push import PushOrigin, new_route_id, route_changes
from swarm.client.server_stream import ServerStream
from swarm.client.swarm_client import SwarmClient
from swarm.wire import int8_rows, push_proof
from swarm.wire.framing import write_frame
from swarm.wire.payloads import Accept, LoraSpec, Route
from swarm.wire.requests import InferenceStep, piece, piece_bounds
from swarm.wire.tensors import wire_dtype

logger = logging.getLogger(__name__)
BY_PUSH_TOKENS = 16  # a first step at least this long goes along the chain by push


class _ServerSession:
    def __init__(self, link: ChainLink, stream: ServerStream, max_length: int, block_inputs: dict | None = None,
                 lora_spec: LoraSpec | None = None):
        self.link, self.stream, self.max_length = link, stream, max_length
        # deep prompts / LoRA weights for this server's blocks, sent with the first step only
        self.block_inputs, self.lora_spec = block_inputs or {}, lora_spec
        self.opened = False
        self.history: list[tuple[torch.Tensor, dict]] = []  # (wire hidden, extra) of every step sent here
        self.input_chain = b""  # what a priced server's attestations chain (see swarm.client.attestations)
        self.chains: list[bytes] = []  # input_chain before each step of history
        self.pending_reorder: list[int] | None = None  # beam search: rows to reorder the cache by, next step
        self.reordered = False  # the server's attestations name inputs in an older row order than history
        self.length = 0  # tokens this server has taken
        # server-to-server push: the id under which this session takes pushes, and the route the server knows
        self.route_id, self.route_key = new_route_id(), push_proof.new_key()
        self.last_step: InferenceStep | None = None  # the step last sent here (a pushed reply is judged by it)
        self.pushing: Route = Route.STOP     # where the server pushes its outputs
        self.accepting: Accept = Accept.STOP  # whose pushes it takes

    async def step(self, hidden: torch.Tensor, extra: dict, *, timeout: float, client: SwarmClient,
                   route: tuple[Route | None, Accept | None] = (None, None), origin: PushOrigin | None = None
                   ) -> torch.Tensor:
        """``hidden`` in its wire dtype -> this server's output, in the same dtype. ``route``: (push, accept)
        to tell the server, when they changed (see swarm.server.push); ``origin``: the push it may answer from."""
        request = InferenceStep(hidden, **extra, payment=client.payment(self.link.peer_id), position=self.length,
                                push=route[0], accept=route[1])
        if not self.opened:
            self._opening(request, client)
        if self.pending_reorder is not None:
            # the history follows the rows first: a replacement replaying it then needs no reorder
            order = self.pending_reorder
            self.history = [(h[order], {k: None if v is None else v[order] for k, v in e.items()})
                            for h, e in self.history]
            request.reorder, self.pending_reorder, self.reordered = order, None, True
        started = time.perf_counter()
        self.last_step = request
        reply = await self.stream.span(request, timeout, origin=origin)
        if self.opened and hidden.shape[1] == 1:
            client.measured_step(self.link.peer_id, time.perf_counter() - started, self.link.end - self.link.start)
        self.pushing = self.pushing if route[0] is None else route[0]
        self.accepting = self.accepting if route[1] is None else route[1]
        return await self._accepted(hidden, extra, reply, client)

    async def open_by_push(self, hidden: torch.Tensor, *, client: SwarmClient,
                           route: tuple[Route | None, Accept | None]) -> None:
        """Open the session with a first step whose input (like ``hidden``) the previous server pushes: a long
        prompt then crosses each hop once. The server answers when it has computed it: ``take_pushed``."""
        empty = hidden.new_empty(hidden.shape[0], 0, hidden.shape[2])
        request = self._opening(InferenceStep(empty, payment=client.payment(self.link.peer_id), position=0,
                                              push=route[0], accept=route[1], by_push=hidden.shape[1]), client)
        await write_frame(self.stream.writer, request.pack())
        # a server that takes by_push takes compact frames (one refusing by_push fails this step): the previous
        # server may push to it now, before any reply of its own could say so
        self.opened, self.stream.compact = True, True
        self.pushing = self.pushing if route[0] is None else route[0]
        self.accepting = self.accepting if route[1] is None else route[1]

    async def take_pushed(self, hidden: torch.Tensor, extra: dict, *, timeout: float, client: SwarmClient,
                          origin: PushOrigin | None) -> torch.Tensor:
        """The answers to the step opened by push, a piece at a time as its pusher cut it (piece_bounds), whose
        input must be ``hidden`` (what the previous server gave us): checked, and kept as one step."""
        self.last_step = step = InferenceStep(hidden, **extra, position=0)
        cuts = piece_bounds(hidden.shape[1], hidden.shape[2], 0)
        pusher = origin.pusher_step if origin is not None else None
        outputs, reply = [], None
        async with asyncio.timeout(timeout):
            for a, b in cuts:  # a piece's proof names the pusher's piece of its own input
                at = origin if pusher is None or len(cuts) == 1 else \
                    dataclasses.replace(origin, pusher_step=piece(pusher, pusher.hidden, a, b))
                reply = await self.stream.answer(piece(step, hidden, a, b) if len(cuts) > 1 else step, timeout,
                                                 origin=at)
                outputs.append(reply.outputs[0])
        reply = dataclasses.replace(reply, outputs=[int8_rows.join_tokens(outputs)])
        return await self._accepted(hidden, extra, reply, client)

    def _opening(self, request: InferenceStep, client: SwarmClient) -> InferenceStep:
        request.start, request.end, request.max_length = self.link.start, self.link.end, self.max_length
        request.prompts, request.lora = self.block_inputs.get("prompts"), self.block_inputs.get("lora")
        request.lora_spec, request.adapter = self.lora_spec, client.adapter
        request.compact = True  # later decode steps and their replies in swarm.wire.compact's layout
        request.codec = client.codec  # long outputs of this session (replies, pushes) in 8-bit rows
        return request

    async def _accepted(self, hidden: torch.Tensor, extra: dict, reply, client: SwarmClient) -> torch.Tensor:
        """This server's checked output for a step of input ``hidden``: attested, recorded and spot-checked."""
        self.opened, self.length = True, reply.length
        output = reply.outputs[0]
        paid = client.paid_server(self.link.peer_id)
        chain = self.input_chain
        if paid is not None:
            self.input_chain = check_attestation(reply.attestation, paid.payout_address, self.link.start,
                                                 self.link.end, self.input_chain, hidden, output, paid.dtype)
        client.record_work(self.link.peer_id, reply, hidden.shape[0] * hidden.shape[1], self.link.end - self.link.start)
        self.history.append((hidden, extra))
        self.chains.append(chain)
        if client.spot_checker is not None:
            try:
                await client.spot_checker.maybe_check(self, output, reply)
            except Exception:
                self.history.pop()  # the step is not kept: the replacement replays only good history
                self.chains.pop()
                raise
        return output

    def truncate(self, position: int) -> None:
        """Forget every token from ``position`` on, as the server will when it gets the next step (which starts
        there): the history a replacement replays, and the input chain, as if the kept part had been sent alone."""
        start = 0
        for index, (hidden, extra) in enumerate(self.history):
            length = hidden.shape[1]
            if start + length > position:
                kept = position - start
                chain = self.chains[index]
                del self.history[index:], self.chains[index:]
                if kept:
                    part = hidden[:, :kept]
                    self.history.append((part, cut_inputs(extra, position, kept)))
                    self.chains.append(chain)
                    if self.input_chain:  # a priced server's: it chains the kept part as it chains a step
                        chain = chain_hash(chain, part.float().numpy())
                self.input_chain = chain
                break
            start += length
        self.length = min(self.length, position)


class InferenceSession:
    """Generation state across the swarm. Use as a context manager; ``step`` sends new tokens' hidden states."""

    def __init__(self, client: SwarmClient, *, max_length: int, exact: bool = False):
        self.client, self.max_length, self.exact = client, max_length, exact
        self.position = 0
        self._sessions: list[_ServerSession] = []
        self.block_inputs: dict[str, torch.Tensor | None] = {}  # name -> [num_blocks, ...], see step()
        self.lora_spec: LoraSpec | None = None
        self.failovers = 0
        self.steps = 0  # steps sent (a prefill, a decode step or a verify step each)
        self.rolled_back = 0  # positions computed and then given up (drafted tokens not accepted)
        self.closed = False

    @property
    def chain(self) -> list[ChainLink]:
        return [s.link for s in self._sessions]

    def reorder(self, order: torch.Tensor) -> None:
        """Row i of the batch continues what row ``order[i]`` was (beam search): every server reorders its
        KV cache with the next step."""
        order = [int(i) for i in order]
        if not all(0 <= i < len(order) for i in order):
            raise ValueError(f"reorder takes one row index per row of the batch, got {order}")
        for session in self._sessions:
            session.pending_reorder = order if session.pending_reorder is None else \
                [session.pending_reorder[i] for i in order]

    def rollback(self, position: int) -> None:
        """Go back to ``position``: the tokens from there on are forgotten here and, with the next step (which starts
        at ``position``), on every server. Speculative decoding does so with the drafted tokens it did not accept
        (transformers crops the cache: SessionCache.crop). The positions given up were computed and are paid."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll a session of {self.position} tokens back to {position}")
        self.rolled_back += self.position - position
        for session in self._sessions:
            session.truncate(position)
        self.position = position

    def step(self, hidden: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None, block_inputs: dict | None = None,
             lora_spec: LoraSpec | None = None) -> torch.Tensor:
        """hidden [batch, new_tokens, hidden_size] of the new tokens -> the last block's output for them, in
        hidden's dtype and device.

        On the first step, ``block_inputs`` (deep "prompts" [num_blocks, batch, prefix, hidden] and/or "lora"
        weights [num_blocks, per-block numel], read by ``lora_spec``) go to each server for its blocks and
        hold for the whole session (a replacement server gets them again)."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        if self.position == 0 and (block_inputs or lora_spec):
            self.block_inputs = {k: None if v is None else v.detach().cpu() for k, v in (block_inputs or {}).items()}
            self.lora_spec = lora_spec
        batch, length = hidden.shape[:2]
        if self.position + length > self.max_length:
            raise ValueError(f"{self.position} + {length} tokens exceed the session's max_length {self.max_length}; "
                             f"open the session with a larger max_length")
        extra = optional_inputs(batch, self.position, length, attention_mask, position_ids)
        wire = (hidden.detach() if hidden.requires_grad else hidden).to(device="cpu",
                                                                         dtype=wire_dtype(hidden.dtype, self.exact))
        wire = int8_rows.maybe_round(self.client.codec, wire)  # before anything hashes or keeps it
        output = loop.run(self._step(wire, extra))
        self.position += length
        self.steps += 1
        return output.to(device=hidden.device, dtype=hidden.dtype)

    async def _step(self, hidden: torch.Tensor, extra: dict) -> torch.Tensor:
        failover = Failover(self.client, f"an inference step of blocks 0:{self.client.num_blocks}")
        block, index, by_push = 0, 0, set()
        while block < self.client.num_blocks:
            if index == len(self._sessions):  # first step, or the chain was cut: open sessions from `block` on
                self._sessions.extend(await self._open_chain(block, self.client.num_blocks, [], failover))
                if self.position == 0 and index == 0:
                    by_push = await self._open_by_push(hidden)
            session = self._sessions[index]
            try:
                timeout = self.client.step_timeout(session.link.peer_id, hidden.shape[0] * hidden.shape[1],
                                                   session.link.end - session.link.start, wire_bytes(hidden))
                if index in by_push:
                    output = await session.take_pushed(hidden, extra, timeout=timeout, client=self.client,
                                                       origin=self._origin(index))
                else:
                    output = await session.step(hidden, extra, timeout=timeout, client=self.client,
                                                route=self._route(index), origin=self._origin(index))
                self.client.bans.succeeded(session.link.peer_id)
            except Exception as e:
                failover.failed(session.link.peer_id, e)  # raises the caller's errors and gives up in the end
                by_push = {i for i in by_push if i < index}  # those after it are sent the step as usual
                session.stream.close()
                replacement = await self._open_chain(session.link.start, session.link.end, session.history, failover)
                self._sessions[index:index + 1] = replacement
                self.failovers += 1
                continue
            if session.stream.push_differed and index > 0:
                index += await self._replace_pusher(index - 1, failover)
            hidden, block, index = output, session.link.end, index + 1
        return hidden

    async def _open_by_push(self, hidden: torch.Tensor) -> set[int]:
        """A long first step through a new chain: every server but the first is opened now to take its input by
        push, so the prompt crosses each hop once (not from the client to every server). The indices opened so."""
        if not self.client.push or hidden.shape[1] < BY_PUSH_TOKENS or len(self._sessions) < 2:
            return set()
        if any(self.client.paid_server(s.link.peer_id) is not None for s in self._sessions[1:]):
            return set()  # a paid server bills a pushed step against a reservation, which a first step has not made
        opened = set()
        for index in reversed(range(1, len(self._sessions))):  # each server takes pushes before its pusher is told
            try:
                await self._sessions[index].open_by_push(hidden, client=self.client, route=self._route(index))
            except (ConnectionError, OSError):
                break  # the step meets the failed stream and fails over
            opened.add(index)
        return opened

    async def _replace_pusher(self, index: int, failover: Failover) -> int:
        """The server after session ``index`` took a pushed step other than what session ``index`` returned to
        us: it is replaced (its replacement replays its history, this step included). Returns how many sessions
        were added."""
        self._sessions[index + 1].stream.push_differed = False
        pusher = self._sessions[index]
        failover.failed(pusher.link.peer_id, ServerFailure(
            f"server {pusher.link.peer_id} pushed to the next server something other than what it returned"))
        pusher.stream.close()
        replacement = await self._open_chain(pusher.link.start, pusher.link.end, pusher.history, failover)
        self._sessions[index:index + 1] = replacement
        self.failovers += 1
        return len(replacement) - 1

    def _origin(self, index: int) -> PushOrigin | None:
        """The push the server of session ``index`` may answer its next step from: the previous session's, when
        that server was told to push there."""
        if index == 0:
            return None
        session, pusher = self._sessions[index], self._sessions[index - 1]
        if pusher.pushing.to != session.link.peer_id or pusher.last_step is None:
            return None
        return PushOrigin(session.route_id, session.route_key, pusher.last_step)

    def _route(self, index: int) -> tuple[Route | None, Accept | None]:
        """What the server of session ``index`` must be told about pushes (swarm.client.push; None: nothing new)."""
        if not self.client.push:
            return None, None
        session, sessions = self._sessions[index], self._sessions
        previous = sessions[index - 1] if index > 0 else None
        following = sessions[index + 1] if index + 1 < len(sessions) else None
        addresses = self.client.direct_addresses(following.link.peer_id) if following is not None else {}
        return route_changes(session, previous, following, addresses)

    async def _open_chain(self, start: int, end: int, history: list[tuple[torch.Tensor, dict]],
                          failover: Failover) -> list[_ServerSession]:
        """Sessions on a chain for blocks [start, end); when ``history`` holds the inputs of earlier steps,
        they are replayed (as one prefill) so the new servers' KV caches match the lost one's."""
        sessions, block = [], start
        replay = concat_history(history)
        if replay is None:  # nothing to replay through them in turn: connect to every server of the chain at once
            sessions, block = await self._connect_chain(start, end, failover)
        while block < end:
            link = (await failover.chain(block, end))[0]
            session = None
            try:
                session = self._new_session(link, await self.client.open_stream(link.peer_id, "inference"))
                if replay is not None:
                    timeout = self.client.step_timeout(link.peer_id, replay[0].shape[0] * replay[0].shape[1],
                                                       link.end - link.start, wire_bytes(replay[0]))
                    output = await session.step(*replay, timeout=timeout, client=self.client)
                    replay = (output, replay[1])
            except Exception as e:
                if session is not None:
                    session.stream.close()
                failover.failed(link.peer_id, e)
                continue
            sessions.append(session)
            block = link.end
        return sessions

    async def _connect_chain(self, start: int, end: int, failover: Failover) -> tuple[list[_ServerSession], int]:
        """Sessions on the servers of a chain for [start, end), their streams opened concurrently (each opening is
        a few round trips), up to the first server that could not be reached; and the block after them."""
        links = await failover.chain(start, end)
        streams = await asyncio.gather(*(self.client.open_stream(link.peer_id, "inference") for link in links),
                                       return_exceptions=True)
        sessions, block = [], start
        for i, (link, stream) in enumerate(zip(links, streams)):
            if isinstance(stream, BaseException):
                for later in streams[i + 1:]:
                    if isinstance(later, ServerStream):
                        later.close()
                try:
                    if not isinstance(stream, Exception):
                        raise stream
                    failover.failed(link.peer_id, stream)  # (raises what is not the server's fault)
                except BaseException:
                    for session in sessions:
                        session.stream.close()
                    raise
                break  # from this server's blocks on, one by one, as after any failure
            sessions.append(self._new_session(link, stream))
            block = link.end
        return sessions, block

    def _new_session(self, link: ChainLink, stream: ServerStream) -> _ServerSession:
        return _ServerSession(link, stream, self.max_length, block_slice(self.block_inputs, link.start, link.end),
                              self.lora_spec)

    def close(self) -> None:
        if not self.closed:
            for session in self._sessions:
                loop.call_soon(session.stream.close)
            self.closed = True
            loop.run(self.client.settle())

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
