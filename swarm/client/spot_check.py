"""Spot-checks of inference steps: a sampled fraction of steps is re-run, and a server whose output is wrong
is convicted only on a recomputation the client trusts.

- A client with its own copy of the blocks re-runs the step itself, in float32 and in the server's dtype: the
  second run measures how far honest rounding goes on exactly these inputs, so the tolerance follows the span
  (a few blocks in the middle of a model change the hidden state by a few percent, and bfloat16 rounding with
  them) instead of one bound per dtype that a cheat hides under.
- Otherwise checkers are servers other than the checked one whose payout addresses differ from its and each
  other's, picked at random (weighted by stake when the client can read stakes from the chain), compared within
  the bound of the dtypes involved. A checker that agrees ends the check; a disagreement convicts only when
  QUORUM independent checkers all agree with each other and not with the server, and are a majority of those
  asked. Anything less convicts nobody, so a few colluding servers cannot frame an honest one.
- A conviction bans the server for good, stops its vouchers, and publishes the evidence (its signed
  attestation and the inputs) in the DHT and in the cache directory, for anyone to re-check with
  `cocoon verify`.
"""
from __future__ import annotations

import asyncio
import logging
import random

import torch
from hivemind.utils import get_dht_time

from incentives.verification import TOLERANCE, Evidence, measured_tolerance, relative_error, tolerance
from shards.openmp import team_ended_after
from swarm.client.evidence import LocalBlocks, save_evidence
from swarm.client.failover import Failover, WrongOutputError
from swarm.dht.records import evidence_key, in_dht
from swarm.wire import int8_rows
from swarm.wire.replies import SpanReply
from swarm.wire.requests import SpanRequest
from swarm.wire.tensors import dtype_name

logger = logging.getLogger(__name__)
EVIDENCE_TTL = 7 * 24 * 3600
QUORUM = 3


class SpotChecker:
    def __init__(self, client, rate: float, seed: int | None = None, local: LocalBlocks | None = None):
        self.client, self.rate, self.local = client, rate, local
        self.rng = random.Random(seed)
        self.checked = 0
        self.steps: dict[str, int] = {}            # steps answered, per server
        self.convicted_after: dict[str, int] = {}  # steps a server had answered when it was convicted
        self.convicted: dict[str, Evidence | None] = {}
        self.unsettled = 0                         # disagreements nobody could settle

    async def maybe_check(self, session, output: torch.Tensor, reply: SpanReply) -> None:
        """Called after ``session`` answered a step with ``output`` (in the wire dtype, as are the session's
        inputs); raises WrongOutputError when the checked server is convicted."""
        self.steps[session.link.peer_id] = self.steps.get(session.link.peer_id, 0) + 1
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return
        if any(t is not None for t in session.block_inputs.values()):
            return  # the client's own prompts or LoRA weights: re-checking would need them too (not yet)
        if any(extra.get("position_ids") is not None or extra.get("attention_mask") is not None
               for _, extra in session.history):
            return  # padded batches are not re-checked (the evidence format covers plain sequences)
        link = session.link
        inputs = torch.cat([h for h, _ in session.history], dim=1)
        new = output.shape[1]
        claimed = output.float()[:, -new:]  # the wire's values, as the server attested them
        if self.local is not None and self.local.has(link.start, link.end):
            reference, limit = await self._own_copy(link, inputs, reply)
            reference = reference[:, -new:]
        else:
            settled = await self._by_checkers(link, inputs, claimed)
            if settled is None:
                return
            reference, limit = settled
        if int8_rows.is_rounded(output):  # it crossed in 8-bit rows: the server rounded it, as it should
            limit += int8_rows.rounding_bound(output)
        if _agree(claimed, reference, limit):
            return
        error = relative_error(claimed.numpy(), reference.numpy())
        evidence = self._evidence(session, claimed, reply, error)
        await self._convict(link.peer_id, evidence)
        raise WrongOutputError(f"server {link.peer_id} returned a wrong output for blocks {link.start}:{link.end} "
                               f"(relative error {error:.2e} > {limit:.1e}); banned, unpaid, evidence published")

    async def _own_copy(self, link, inputs: torch.Tensor, reply: SpanReply) -> tuple[torch.Tensor, float]:
        """The client's own copy of the blocks decides alone: (its float32 output of every position, the
        tolerance measured by running the span in the server's dtype as well)."""
        dtype = self._computed_in(link.peer_id)
        if reply.attestation is not None:  # what it signed, or what it announced: the stricter (both are its word)
            dtype = min(dtype, reply.attestation.dtype, key=lambda d: TOLERANCE.get(d, TOLERANCE["bfloat16"]))
        reference, same_dtype = await asyncio.get_running_loop().run_in_executor(  # (ended: shards.openmp)
            None, team_ended_after, self.local.honest, link.start, link.end, inputs, dtype, inputs.dtype)
        self.checked += 1
        wire = dtype_name(inputs.dtype)
        if same_dtype is None:
            return reference, tolerance(dtype, wire)
        return reference, measured_tolerance(reference.numpy(), same_dtype.numpy(), wire)

    async def _by_checkers(self, link, inputs: torch.Tensor, claimed: torch.Tensor
                           ) -> tuple[torch.Tensor, float] | None:
        """(the output the client trusts for the claimed positions, the tolerance) from other servers; None when
        they agree with the claim, nobody else holds the blocks, or nothing settles a disagreement."""
        new = claimed.shape[1]
        first = await self._opinion(link, inputs, exclude={self._identity(link.peer_id)})
        if first is None:
            return None  # nobody else (reachable) holds these blocks
        self.checked += 1
        limit = tolerance(*(self._computed_in(p) for p in (link.peer_id, first[0])), dtype_name(inputs.dtype))
        if _agree(claimed, first[1][:, -new:], limit):
            return None
        reference = await self._settle(link, inputs, new, claimed, first, limit)
        if reference is None:
            self.unsettled += 1
            logger.warning(f"{link.peer_id} and a checker disagree on blocks {link.start}:{link.end} and nothing "
                           f"the client trusts settles it: no verdict")
            return None
        return reference, limit

    # ------------------------------------------------------------------ opinions
    async def _settle(self, link, inputs, new: int, claimed, first, limit) -> torch.Tensor | None:
        """The output of a quorum of independent checkers for the last ``new`` positions, or None."""
        opinions = [first]
        used = {self._identity(link.peer_id), self._identity(first[0])}
        while len(opinions) < QUORUM + 2:
            opinion = await self._opinion(link, inputs, exclude=used, single_hop=True)
            if opinion is None:
                break
            opinions.append(opinion)
            used.add(self._identity(opinion[0]))
        against = [o[1][:, -new:] for o in opinions if not _agree(claimed, o[1][:, -new:], limit)]
        for candidate in against:
            agreeing = sum(_agree(candidate, other, limit) for other in against)
            if agreeing >= QUORUM and 2 * agreeing > len(opinions):
                return candidate
        return None

    async def _opinion(self, link, inputs: torch.Tensor, exclude: set[str], single_hop: bool = False):
        """(peer id, output) of a server independent of ``exclude`` (identities) for blocks [start, end)."""
        peer = self._pick(link, exclude)
        if peer is None:
            if single_hop:
                return None
            try:  # no one server holds exactly these blocks: a chain of others
                hops = [(l.peer_id, l.start, l.end) for l in await self.client.chain(
                    link.start, link.end, avoid=tuple(p for p in self._servers() if self._identity(p) in exclude))]
            except LookupError:
                return None
            if len(hops) != 1:
                output = await self._recompute(hops, inputs)
                return None if output is None else (hops[0][0], output)
            peer = hops[0][0]
        output = await self._recompute([(peer, link.start, link.end)], inputs)
        return None if output is None else (peer, output)

    def _pick(self, link, exclude: set[str]) -> str | None:
        """A random online server holding all of [start, end), of an identity not in ``exclude``, weighted
        by stake when stakes are known."""
        state = self.client.known_state
        if state is None:
            return None
        banned = self.client.bans.banned()
        candidates = [p for p, info in state.online().items() if info.start <= link.start and link.end <= info.end
                      and p not in banned and self._identity(p) not in exclude]
        if not candidates:
            return None
        weights = [self.client.stake_of(state.servers[p].payout_address) for p in candidates]
        if any(w is None for w in weights) or not any(weights):
            weights = [1] * len(candidates)
        return self.rng.choices(candidates, weights=weights)[0]

    def _servers(self) -> dict:
        return self.client.known_state.servers if self.client.known_state else {}

    def _identity(self, peer_id: str) -> str:
        """Servers paid to the same address are one party; a free server is its own."""
        info = self._servers().get(peer_id)
        return info.payout_address.lower() if info is not None and info.payout_address else peer_id

    async def _recompute(self, hops, inputs: torch.Tensor) -> torch.Tensor | None:
        """The checkers' output (float32 values of the wire dtype), or None when one of them failed: it is
        banned or skipped by the failover policy, and the checked server is not blamed."""
        hidden = inputs
        failover = Failover(self.client, "a spot check")
        for peer_id, start, end in hops:
            request = SpanRequest(hidden, start, end, payment=self.client.payment(peer_id))
            try:
                reply = await self.client.call_span(peer_id, "forward", request)
            except Exception as e:
                failover.failed(peer_id, e)  # raises the caller's errors
                return None
            hidden = reply.outputs[0]
            self.client.record_work(peer_id, reply, hidden.shape[0] * hidden.shape[1], end - start)
        return hidden.float()

    def _computed_in(self, peer_id: str) -> str:
        """What a server announces it computes in: its quantization, else its dtype (bfloat16 when unknown)."""
        info = self._servers().get(peer_id)
        if info is None:
            return "bfloat16"
        return info.quant if info.quant not in ("", "none") else (info.dtype or "bfloat16")

    # ------------------------------------------------------------------ verdicts
    async def _convict(self, peer_id: str, evidence: Evidence | None) -> None:
        self.convicted[peer_id] = evidence
        self.convicted_after[peer_id] = self.steps.get(peer_id, 0)
        self.client.bans.ban_forever(peer_id)
        if self.client.payments is not None:
            self.client.payments.stop(peer_id)
        if evidence is not None:
            await self._publish(evidence)

    def _evidence(self, session, claimed: torch.Tensor, reply: SpanReply, error: float):
        if reply.attestation is None or session.reordered:
            # a free server signs nothing; after a beam reorder the server's signed input chain names rows in
            # the order it received them, not the reordered history: banned by this client, no public evidence
            return None
        steps = [h.float().numpy() for h, _ in session.history]
        return Evidence(self.client.model_id, session.link.peer_id, reply.attestation,
                        [s.tobytes() for s in steps], [tuple(s.shape) for s in steps],
                        claimed.float().numpy().tobytes(), error)

    async def _publish(self, evidence: Evidence) -> None:
        path = save_evidence(evidence)
        logger.warning(f"evidence against {evidence.peer_id} saved to {path}")
        try:
            await in_dht(self.client.dht.store, evidence_key(self.client.model_id), evidence.to_wire(),
                         get_dht_time() + EVIDENCE_TTL, subkey=evidence.digest.hex())
        except Exception as e:
            logger.warning(f"could not publish evidence against {evidence.peer_id}: {e}")


def _agree(a: torch.Tensor, b: torch.Tensor, limit: float) -> bool:
    return relative_error(a.numpy(), b.numpy()) <= limit
