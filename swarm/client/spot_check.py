"""Spot-checks of inference steps: re-run a sampled fraction of steps on other servers holding the same
blocks, and convict a server whose output is wrong beyond the tolerance of the dtypes involved."""
from __future__ import annotations

import logging
import random

import torch
from hivemind.utils import get_dht_time

from incentives.verification import Attestation, Evidence, relative_error, tolerance
from swarm.client.failover import Failover
from swarm.wire import SpanReply, SpanRequest, dtype_name

logger = logging.getLogger(__name__)
EVIDENCE_TTL = 7 * 24 * 3600


class WrongOutputError(RuntimeError):
    """A server's output disagreed with two other servers: it was convicted and replaced."""


class SpotChecker:
    def __init__(self, client, rate: float, seed: int | None = None):
        self.client, self.rate = client, rate
        self.rng = random.Random(seed)
        self.checked = 0
        self.steps: dict[str, int] = {}            # steps answered, per server
        self.convicted_after: dict[str, int] = {}  # steps a server had answered when it was convicted
        self.convicted: dict[str, Evidence | None] = {}

    async def maybe_check(self, session, output: torch.Tensor, reply: SpanReply) -> None:
        """Called after ``session`` answered a step with ``output`` (in the wire dtype, as are the session's
        inputs); raises WrongOutputError on a conviction."""
        self.steps[session.link.peer_id] = self.steps.get(session.link.peer_id, 0) + 1
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return
        if any(t is not None for t in session.block_inputs.values()):
            return  # the client's own prompts or LoRA weights: re-checking would need them too (not yet)
        hidden_steps = [h for h, _ in session.history]
        if any(extra.get("position_ids") is not None or extra.get("attention_mask") is not None
               for _, extra in session.history):
            return  # padded batches are not re-checked (the evidence format covers plain sequences)
        link = session.link
        inputs = torch.cat(hidden_steps, dim=1)
        claimed = output.float()  # the wire's values, as the server attested them
        new = output.shape[1]
        checkers = await self._checkers(link, exclude={link.peer_id})
        if not checkers:
            return  # nobody else holds these blocks: nothing to compare with
        first = await self._recompute(checkers[0], inputs)
        if first is None:
            return
        self.checked += 1
        limit = tolerance(*self._dtypes(link.peer_id, checkers[0], inputs.dtype))
        if relative_error(claimed[:, -new:].numpy(), first[:, -new:].numpy()) <= limit:
            return
        # disagreement: a third opinion decides who is wrong
        thirds = await self._checkers(link, exclude={link.peer_id, *(p for p, _, _ in checkers[0])})
        if not thirds:
            logger.warning(f"{link.peer_id} and a checker disagree on blocks {link.start}:{link.end}, no third server")
            return
        second = await self._recompute(thirds[0], inputs)
        if second is None:
            return
        if relative_error(first[:, -new:].numpy(), second[:, -new:].numpy()) > limit:
            logger.warning(f"checkers disagree with each other on blocks {link.start}:{link.end}; no verdict")
            return
        error = relative_error(claimed[:, -new:].numpy(), second[:, -new:].numpy())
        evidence = self._evidence(session, claimed[:, -new:], reply, error)
        self.convicted[link.peer_id] = evidence
        self.convicted_after[link.peer_id] = self.steps[link.peer_id]
        self.client.bans.ban_forever(link.peer_id)
        if self.client.payments is not None:
            self.client.payments.stop(link.peer_id)
        if evidence is not None:
            await self._publish(evidence)
        raise WrongOutputError(f"server {link.peer_id} returned a wrong output for blocks {link.start}:{link.end} "
                               f"(relative error {error:.2e} > {limit:.0e}); banned, unpaid, evidence published")

    async def _checkers(self, link, exclude: set[str]):
        """Chains (list of hops) over exactly [start, end) avoiding ``exclude``: the first is used."""
        try:
            chain = await self.client.chain(link.start, link.end, avoid=tuple(exclude))
        except LookupError:
            return []
        hops = [(l.peer_id, l.start, l.end) for l in chain]
        return [hops] if not exclude & {p for p, _, _ in hops} else []

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

    def _dtypes(self, peer_id: str, hops, wire: torch.dtype) -> list[str]:
        servers = self.client._state.servers if self.client._state else {}
        dtypes = [servers[p].dtype for p in [peer_id, *(h[0] for h in hops)] if p in servers and servers[p].dtype]
        return [*dtypes, dtype_name(wire)]

    def _evidence(self, session, claimed: torch.Tensor, reply: SpanReply, error: float):
        if reply.attestation is None or session.reordered:
            # a free server signs nothing; after a beam reorder the server's signed input chain names rows in
            # the order it received them, not the reordered history: banned by this client, no public evidence
            return None
        steps = [h.float().numpy() for h, _ in session.history]
        return Evidence(self.client.model_id, session.link.peer_id, Attestation.from_wire(reply.attestation),
                        [s.tobytes() for s in steps], [tuple(s.shape) for s in steps],
                        claimed.float().numpy().tobytes(), error)

    async def _publish(self, evidence: Evidence) -> None:
        key = f"{self.client.model_id}.evidence"
        try:
            await self.client.dht.store(key, evidence.to_wire(), get_dht_time() + EVIDENCE_TTL,
                                        subkey=evidence.digest.hex(), return_future=True)
        except Exception as e:
            logger.warning(f"could not publish evidence against {evidence.peer_id}: {e}")
