"""Stateless forward and backward through the chain, as a torch autograd function, with failover:
a link whose server fails is replaced by a chain for exactly its blocks, and the call is retried.
Deep prompts ([blocks, batch, prefix, hidden], one prefix per block) travel with the hidden states and
get their gradients back from the servers."""
from __future__ import annotations

import torch

from routing import ChainLink
from swarm.client import loop
from swarm.client.messages import optional_inputs, read_outputs, span_request
from swarm.client.swarm_client import SwarmClient


async def _call_span(client: SwarmClient, link: ChainLink, handler: str, tensors: dict, likes: list,
                     exact: bool) -> list[torch.Tensor]:
    meta = {"start": link.start, "end": link.end, **client.payment_meta(link.peer_id)}
    request = span_request(tensors, meta, exact=exact)
    hidden = tensors["hidden"]
    outputs, response_meta = read_outputs(await client.call(link.peer_id, handler, request), likes)
    client.bans.succeeded(link.peer_id)
    client.record_work(link.peer_id, response_meta, hidden.shape[0] * hidden.shape[1], link.end - link.start,
                       backward=handler == "backward")
    return outputs


def _prompts_of(prompts: torch.Tensor | None, link: ChainLink, offset: int) -> torch.Tensor | None:
    return None if prompts is None else prompts[link.start - offset:link.end - offset].contiguous()


async def _forward_chain(client: SwarmClient, start: int, end: int, hidden: torch.Tensor, extra: dict,
                         exact: bool, prompts: torch.Tensor | None = None, depth: int = 0):
    """Blocks [start, end) on ``hidden`` (``prompts`` covering the same blocks); returns the output and
    (link, input) of every hop taken."""
    hops = []
    for link in await client.chain(start, end):
        tensors = {"hidden": hidden, **extra, "prompts": _prompts_of(prompts, link, start)}
        try:
            (output,) = await _call_span(client, link, "forward", tensors, [hidden], exact)
            hops.append((link, hidden))
        except Exception as e:
            if depth >= client.max_retries:
                raise RuntimeError(f"gave up on blocks {link.start}:{link.end} after {depth + 1} failed servers: {e}") from e
            client.report_failure(link.peer_id, e)
            output, sub_hops = await _forward_chain(client, link.start, link.end, hidden, extra, exact,
                                                    _prompts_of(prompts, link, start), depth + 1)
            hops.extend(sub_hops)
        hidden = output
    return hidden, hops


async def _backward_hop(client: SwarmClient, link: ChainLink, hidden: torch.Tensor, grad: torch.Tensor,
                        extra: dict, exact: bool, prompts: torch.Tensor | None, depth: int = 0):
    """Gradients w.r.t. this hop's input and (if any) its blocks' prompts."""
    tensors = {"hidden": hidden, "grad_output": grad.to(hidden.dtype), **extra, "prompts": prompts}
    likes = [hidden] if prompts is None else [hidden, prompts]
    try:
        grads = await _call_span(client, link, "backward", tensors, likes, exact)
        return grads[0], grads[1] if prompts is not None else None
    except Exception as e:
        if depth >= client.max_retries:
            raise RuntimeError(f"gave up on the backward of blocks {link.start}:{link.end}: {e}") from e
        client.report_failure(link.peer_id, e)
        _, hops = await _forward_chain(client, link.start, link.end, hidden, extra, exact, prompts, depth + 1)
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for sub_link, sub_input in reversed(hops):
            sub_prompts = _prompts_of(prompts, sub_link, link.start)
            grad, sub_grad = await _backward_hop(client, sub_link, sub_input, grad, extra, exact, sub_prompts,
                                                 depth + 1)
            if sub_grad is not None:
                grad_prompts[sub_link.start - link.start:sub_link.end - link.start] = sub_grad
        return grad, grad_prompts


class RemoteChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor | None, client: SwarmClient, extra: dict,
                exact: bool) -> torch.Tensor:
        cpu_prompts = None if prompts is None else prompts.detach().cpu()
        output, hops = loop.run(_forward_chain(client, 0, client.num_blocks, hidden.detach().cpu(), extra, exact,
                                               cpu_prompts))
        ctx.client, ctx.hops, ctx.extra, ctx.exact, ctx.prompts = client, hops, extra, exact, cpu_prompts
        ctx.prompts_device = None if prompts is None else prompts.device
        return output.to(hidden.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        async def run():
            grad = grad_output.detach().cpu().contiguous()
            grad_prompts = None if ctx.prompts is None else torch.zeros_like(ctx.prompts)
            for link, hidden in reversed(ctx.hops):
                grad, link_grad = await _backward_hop(ctx.client, link, hidden, grad, ctx.extra, ctx.exact,
                                                      _prompts_of(ctx.prompts, link, 0))
                if link_grad is not None:
                    grad_prompts[link.start:link.end] = link_grad
            return grad, grad_prompts
        grad, grad_prompts = loop.run(run())
        grad_prompts = None if grad_prompts is None else grad_prompts.to(ctx.prompts_device)
        return grad.to(grad_output.device), grad_prompts, None, None, None


def remote_forward(client: SwarmClient, hidden: torch.Tensor, *, attention_mask=None, position_ids=None,
                   exact: bool = False, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """All blocks of the model on ``hidden`` [batch, tokens, hidden_size]; differentiable w.r.t. ``hidden``
    and the deep ``prompts`` [num_blocks, batch, prefix, hidden_size]."""
    extra = optional_inputs(hidden.shape[0], 0, hidden.shape[1], attention_mask, position_ids)
    return RemoteChainFunction.apply(hidden, prompts, client, extra, exact)
