"""Stateless forward and backward through the chain, as a torch autograd function."""
from __future__ import annotations

import torch

from routing import ChainLink
from swarm.client import loop
from swarm.client.messages import optional_inputs, read_output, span_request
from swarm.client.swarm_client import SwarmClient


async def _forward_chain(client: SwarmClient, chain: list[ChainLink], hidden: torch.Tensor, extra: dict,
                         exact: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = []
    for link in chain:
        inputs.append(hidden)
        request = span_request({"hidden": hidden, **extra}, {"start": link.start, "end": link.end}, exact=exact)
        hidden, _ = read_output(await client.call(link.peer_id, "forward", request), hidden)
    return hidden, inputs


async def _backward_chain(client: SwarmClient, chain: list[ChainLink], inputs: list[torch.Tensor],
                          grad: torch.Tensor, extra: dict, exact: bool) -> torch.Tensor:
    for link, hidden in reversed(list(zip(chain, inputs))):
        request = span_request({"hidden": hidden, "grad_output": grad.to(hidden.dtype), **extra},
                               {"start": link.start, "end": link.end}, exact=exact)
        grad, _ = read_output(await client.call(link.peer_id, "backward", request), hidden)
    return grad


class RemoteChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, client: SwarmClient, extra: dict, exact: bool) -> torch.Tensor:
        chain = client.make_chain()
        output, inputs = loop.run(_forward_chain(client, chain, hidden.detach(), extra, exact))
        ctx.client, ctx.chain, ctx.inputs, ctx.extra, ctx.exact = client, chain, inputs, extra, exact
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = loop.run(_backward_chain(ctx.client, ctx.chain, ctx.inputs, grad_output.contiguous(), ctx.extra,
                                        ctx.exact))
        return grad, None, None, None


def remote_forward(client: SwarmClient, hidden: torch.Tensor, *, attention_mask=None, position_ids=None,
                   exact: bool = False) -> torch.Tensor:
    """All blocks of the model on ``hidden`` [batch, tokens, hidden_size]; differentiable w.r.t. ``hidden``."""
    extra = optional_inputs(hidden.shape[0], 0, hidden.shape[1], attention_mask, position_ids)
    return RemoteChainFunction.apply(hidden, client, extra, exact)
