"""Spot-checks of inference steps: a sampled fraction of steps is re-run elsewhere, and a server whose output
is wrong is convicted only on a recomputation the client trusts.

- Checkers are servers other than the checked one whose payout addresses differ from its and each other's,
  picked at random (weighted by stake when the client can read stakes from the chain).
- A checker that agrees, within the tolerance of the dtypes involved, ends the check. A disagreement is
  settled by the client's own copy of the blocks when it has one (whoever disagrees with it is convicted:
  the checked server, or the checker), or else by QUORUM independent checkers that all agree with each other
  and not with the server, and are a majority of those asked. Anything less convicts nobody, so a few
  colluding servers cannot frame an honest one.
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

from incentives.verification import Evidence, relative_error, tolerance
from swarm.client.failover import Failover, WrongOutputError
from swarm.dht.records import evidence_key, in_dht
from swarm.wire.replies import SpanReply
from swarm.wire.requests import SpanRequest
from swarm.wire.tensors import dtype_name

logger = logging.getLogger(__name__)
EVIDENCE_TTL = 7 * 24 * 3600
QUORUM = 3


class LocalBlocks:
    """The client's own copy of a checkpoint's blocks (when its files are on this machine), run in float32 on
    the CPU: the recomputation a client trusts most."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self._span = None

    def has(self, start: int, end: int) -> bool:
        from shards import get_family
        prefix = get_family(self.checkpoint.config).layer_prefix
        names = [n for b in range(start, end) for n in self.checkpoint.names_with_prefix(prefix.format(b))]
        return bool(names) and self.checkpoint.files_are_local(names)

    def output(self, start: int, end: int, inputs: torch.Tensor) -> torch.Tensor:
        from shards import BlockSpan
        if self._span is None or (self._span.start, self._span.end) != (start, end):
            self._span = None  # one span at a time in memory
            self._span = BlockSpan.from_pretrained(self.checkpoint, start, end, dtype="float32", device="cpu")
        with torch.inference_mode():
            return self._span(inputs.float())


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
        first = await self._opinion(link, inputs, exclude={self._identity(link.peer_id)})
        if first is None:
            return  # nobody else (reachable) holds these blocks
        self.checked += 1
        limit = tolerance(*self._dtypes([link.peer_id, first[0]], inputs.dtype))
        if _agree(claimed, first[1][:, -new:], limit):
            return
        reference = await self._settle(link, inputs, new, claimed, first, limit)
        if reference is None:
            self.unsettled += 1
            logger.warning(f"{link.peer_id} and a checker disagree on blocks {link.start}:{link.end} and nothing "
                           f"the client trusts settles it: no verdict")
            return
        if not _agree(first[1][:, -new:], reference, limit) and self.local is not None:
            await self._convict_checker(first, link, inputs, reference, limit)
        if _agree(claimed, reference, limit):
            return
        error = relative_error(claimed.numpy(), reference.numpy())
        evidence = self._evidence(session, claimed, reply, error)
        await self._convict(link.peer_id, evidence)
        raise WrongOutputError(f"server {link.peer_id} returned a wrong output for blocks {link.start}:{link.end} "
                               f"(relative error {error:.2e} > {limit:.0e}); banned, unpaid, evidence published")

    # ------------------------------------------------------------------ opinions
    async def _settle(self, link, inputs, new: int, claimed, first, limit) -> torch.Tensor | None:
        """The output the client trusts for the last ``new`` positions, or None when nothing settles it."""
        if self.local is not None and self.local.has(link.start, link.end):
            output = await asyncio.get_running_loop().run_in_executor(
                None, self.local.output, link.start, link.end, inputs)
            return output.to(inputs.dtype).float()[:, -new:]  # as it would have crossed the wire
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

    def _dtypes(self, peers, wire: torch.dtype) -> list[str]:
        servers = self._servers()
        return [*(servers[p].dtype for p in peers if p in servers and servers[p].dtype), dtype_name(wire)]

    # ------------------------------------------------------------------ verdicts
    async def _convict_checker(self, opinion, link, inputs, reference, limit) -> None:
        """A checker that the client's own copy of the blocks proves wrong is convicted too (its forward's
        attestation is the evidence)."""
        peer, output = opinion
        evidence = None
        if self.client.paid_server(peer) is not None:  # re-ask it for its signed claim on exactly this input
            try:
                reply = await self.client.call_span(peer, "forward", SpanRequest(inputs, link.start, link.end,
                                                                                 payment=self.client.payment(peer)))
                claimed = reply.outputs[0].float()[:, -reference.shape[1]:]
                if not _agree(claimed, reference, limit):
                    evidence = Evidence(self.client.model_id, peer, reply.attestation,
                                        [inputs.float().numpy().tobytes()], [tuple(inputs.shape)],
                                        reply.outputs[0].float().numpy().tobytes(),
                                        relative_error(claimed.numpy(), reference.numpy()))
            except Exception as e:
                logger.info(f"could not get the claim of checker {peer} again: {e}")
        await self._convict(peer, evidence)

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
        from swarm.client.evidence import save_evidence
        path = save_evidence(evidence)
        logger.warning(f"evidence against {evidence.peer_id} saved to {path}")
        try:
            await in_dht(self.client.dht.store, evidence_key(self.client.model_id), evidence.to_wire(),
                         get_dht_time() + EVIDENCE_TTL, subkey=evidence.digest.hex())
        except Exception as e:
            logger.warning(f"could not publish evidence against {evidence.peer_id}: {e}")


def _agree(a: torch.Tensor, b: torch.Tensor, limit: float) -> bool:
    return relative_error(a.numpy(), b.numpy()) <= limit
