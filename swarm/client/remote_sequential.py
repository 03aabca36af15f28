"""Stateless forward and backward through the chain, as a torch autograd function, with failover:
a link whose server fails is replaced by a chain for exactly its blocks, and the call is retried."""
from __future__ import annotations

import torch

from routing import ChainLink
from swarm.client import loop
from swarm.client.messages import optional_inputs, read_output, span_request
from swarm.client.swarm_client import SwarmClient


async def _call_span(client: SwarmClient, link: ChainLink, handler: str, tensors: dict, exact: bool) -> torch.Tensor:
    meta = {"start": link.start, "end": link.end, **client.payment_meta(link.peer_id)}
    request = span_request(tensors, meta, exact=exact)
    hidden = tensors["hidden"]
    output, response_meta = read_output(await client.call(link.peer_id, handler, request), hidden)
    client.bans.succeeded(link.peer_id)
    client.record_work(link.peer_id, response_meta, hidden.shape[0] * hidden.shape[1], link.end - link.start,
                       backward=handler == "backward")
    return output


async def _forward_chain(client: SwarmClient, start: int, end: int, hidden: torch.Tensor, extra: dict,
                         exact: bool, depth: int = 0) -> tuple[torch.Tensor, list[tuple[ChainLink, torch.Tensor]]]:
    """Blocks [start, end) on ``hidden``; returns the output and (link, input) of every hop taken."""
    hops = []
    for link in await client.chain(start, end):
        try:
            output = await _call_span(client, link, "forward", {"hidden": hidden, **extra}, exact)
            hops.append((link, hidden))
        except Exception as e:
            if depth >= client.max_retries:
                raise RuntimeError(f"gave up on blocks {link.start}:{link.end} after {depth + 1} failed servers: {e}") from e
            client.report_failure(link.peer_id, e)
            output, sub_hops = await _forward_chain(client, link.start, link.end, hidden, extra, exact, depth + 1)
            hops.extend(sub_hops)
        hidden = output
    return hidden, hops


async def _backward_hop(client: SwarmClient, link: ChainLink, hidden: torch.Tensor, grad: torch.Tensor,
                        extra: dict, exact: bool, depth: int = 0) -> torch.Tensor:
    try:
        return await _call_span(client, link, "backward", {"hidden": hidden, "grad_output": grad.to(hidden.dtype),
                                                          **extra}, exact)
    except Exception as e:
        if depth >= client.max_retries:
            raise RuntimeError(f"gave up on the backward of blocks {link.start}:{link.end}: {e}") from e
        client.report_failure(link.peer_id, e)
        _, hops = await _forward_chain(client, link.start, link.end, hidden, extra, exact, depth + 1)
        for sub_link, sub_input in reversed(hops):
            grad = await _backward_hop(client, sub_link, sub_input, grad, extra, exact, depth + 1)
        return grad


class RemoteChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, client: SwarmClient, extra: dict, exact: bool) -> torch.Tensor:
        output, hops = loop.run(_forward_chain(client, 0, client.num_blocks, hidden.detach().cpu(), extra, exact))
        ctx.client, ctx.hops, ctx.extra, ctx.exact = client, hops, extra, exact
        return output.to(hidden.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        async def run():
            grad = grad_output.detach().cpu().contiguous()
            for link, hidden in reversed(ctx.hops):
                grad = await _backward_hop(ctx.client, link, hidden, grad, ctx.extra, ctx.exact)
            return grad
        return loop.run(run()).to(grad_output.device), None, None, None


def remote_forward(client: SwarmClient, hidden: torch.Tensor, *, attention_mask=None, position_ids=None,
                   exact: bool = False) -> torch.Tensor:
    """All blocks of the model on ``hidden`` [batch, tokens, hidden_size]; differentiable w.r.t. ``hidden``."""
    extra = optional_inputs(hidden.shape[0], 0, hidden.shape[1], attention_mask, position_ids)
    return RemoteChainFunction.apply(hidden, client, extra, exact)
