"""Stateless forward and backward through the chain, as a torch autograd function, with failover:
a link whose server fails is replaced by a chain for exactly its blocks, and the call is retried.

Trainable per-block tensors travel with the hidden states, each with the blocks as its first dimension
so that a link takes its slice: deep prompts [blocks, batch, prefix, hidden] and LoRA weights
[blocks, per-block numel] (layout in shards.lora). The servers return their gradients."""
from __future__ import annotations

import torch

from routing import ChainLink
from shards.lora import content_hash
from swarm.client import loop
from swarm.client.messages import block_slice, optional_inputs, read_outputs, span_request
from swarm.client.swarm_client import SwarmClient
from swarm.protocol import LoraNotCachedError

BLOCK_TENSORS = ("prompts", "lora")  # wire order


async def _call_span(client: SwarmClient, link: ChainLink, handler: str, tensors: dict, likes: list,
                     exact: bool, meta: dict) -> list[torch.Tensor]:
    meta = {"start": link.start, "end": link.end, **meta, **client.span_meta(link.peer_id)}
    lora = tensors.get("lora")
    if lora is None:
        return await _request(client, link, handler, tensors, likes, exact, meta)
    # LoRA weights cross the network once per update: afterwards the server knows them by their hash
    key = content_hash(lora)
    meta["lora"] = {**meta["lora"], "hash": key}
    sent = client.lora_sent.setdefault(link.peer_id, [])
    if key in sent:
        try:
            return await _request(client, link, handler, {**tensors, "lora": None}, likes, exact, meta)
        except LoraNotCachedError:
            sent.remove(key)  # the server let them go to make room: send them again
    outputs = await _request(client, link, handler, tensors, likes, exact, meta)
    sent.append(key)
    del sent[:-4]
    return outputs


async def _request(client: SwarmClient, link: ChainLink, handler: str, tensors: dict, likes: list, exact: bool,
                   meta: dict) -> list[torch.Tensor]:
    hidden = tensors["hidden"]
    outputs, response_meta = read_outputs(await client.call(link.peer_id, handler,
                                                            span_request(tensors, meta, exact=exact)), likes)
    client.bans.succeeded(link.peer_id)
    client.record_work(link.peer_id, response_meta, hidden.shape[0] * hidden.shape[1], link.end - link.start,
                       backward=handler == "backward")
    return outputs


async def _forward_chain(client: SwarmClient, start: int, end: int, hidden: torch.Tensor, extra: dict, exact: bool,
                         block_tensors: dict, meta: dict, depth: int = 0):
    """Blocks [start, end) on ``hidden`` (``block_tensors`` covering the same blocks); returns the output
    and (link, input) of every hop taken."""
    hops = []
    for link in await client.chain(start, end):
        own = block_slice(block_tensors, link.start, link.end, start)
        try:
            (output,) = await _call_span(client, link, "forward", {"hidden": hidden, **extra, **own}, [hidden],
                                         exact, meta)
            hops.append((link, hidden))
        except Exception as e:
            if depth >= client.max_retries:
                raise RuntimeError(f"gave up on blocks {link.start}:{link.end} after {depth + 1} failed servers: {e}") from e
            client.report_failure(link.peer_id, e)
            output, sub_hops = await _forward_chain(client, link.start, link.end, hidden, extra, exact, own, meta,
                                                    depth + 1)
            hops.extend(sub_hops)
        hidden = output
    return hidden, hops


async def _backward_hop(client: SwarmClient, link: ChainLink, hidden: torch.Tensor, grad: torch.Tensor, extra: dict,
                        exact: bool, own: dict, meta: dict, depth: int = 0) -> tuple[torch.Tensor, dict]:
    """Gradients w.r.t. this hop's input and its slice of every per-block tensor."""
    present = {name: t for name, t in own.items() if t is not None}
    tensors = {"hidden": hidden, "grad_output": grad.to(hidden.dtype), **extra, **own}
    try:
        grads = await _call_span(client, link, "backward", tensors, [hidden, *present.values()], exact, meta)
        return grads[0], dict(zip(present, grads[1:]))
    except Exception as e:
        if depth >= client.max_retries:
            raise RuntimeError(f"gave up on the backward of blocks {link.start}:{link.end}: {e}") from e
        client.report_failure(link.peer_id, e)
        _, hops = await _forward_chain(client, link.start, link.end, hidden, extra, exact, own, meta, depth + 1)
        block_grads = {name: torch.zeros_like(t) for name, t in present.items()}
        for sub_link, sub_input in reversed(hops):
            sub_own = block_slice(own, sub_link.start, sub_link.end, link.start)
            grad, sub_grads = await _backward_hop(client, sub_link, sub_input, grad, extra, exact, sub_own, meta,
                                                  depth + 1)
            for name, g in sub_grads.items():
                block_grads[name][sub_link.start - link.start:sub_link.end - link.start] = g
        return grad, block_grads


class RemoteChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor | None, lora: torch.Tensor | None,
                client: SwarmClient, extra: dict, exact: bool, meta: dict) -> torch.Tensor:
        given = {"prompts": prompts, "lora": lora}
        block_tensors = {name: None if t is None else t.detach().cpu() for name, t in given.items()}
        output, hops = loop.run(_forward_chain(client, 0, client.num_blocks, hidden.detach().cpu(), extra, exact,
                                               block_tensors, meta))
        ctx.client, ctx.hops, ctx.extra, ctx.exact, ctx.meta = client, hops, extra, exact, meta
        ctx.block_tensors = block_tensors
        ctx.devices = {name: None if t is None else t.device for name, t in given.items()}
        return output.to(hidden.device)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        async def run():
            grad = grad_output.detach().cpu().contiguous()
            block_grads = {n: None if t is None else torch.zeros_like(t) for n, t in ctx.block_tensors.items()}
            for link, hidden in reversed(ctx.hops):
                own = block_slice(ctx.block_tensors, link.start, link.end, 0)
                grad, link_grads = await _backward_hop(ctx.client, link, hidden, grad, ctx.extra, ctx.exact, own,
                                                       ctx.meta)
                for name, g in link_grads.items():
                    block_grads[name][link.start:link.end] = g
            return grad, block_grads
        grad, block_grads = loop.run(run())
        moved = [None if block_grads[n] is None else block_grads[n].to(ctx.devices[n]) for n in BLOCK_TENSORS]
        return grad.to(grad_output.device), *moved, None, None, None, None


def remote_forward(client: SwarmClient, hidden: torch.Tensor, *, attention_mask=None, position_ids=None,
                   exact: bool = False, prompts: torch.Tensor | None = None, lora: torch.Tensor | None = None,
                   lora_config: dict | None = None) -> torch.Tensor:
    """All blocks of the model on ``hidden`` [batch, tokens, hidden_size]; differentiable w.r.t. ``hidden``,
    the deep ``prompts`` [num_blocks, batch, prefix, hidden_size] and the ``lora`` weights
    [num_blocks, per-block numel] (``lora_config`` = {targets, rank, alpha})."""
    extra = optional_inputs(hidden.shape[0], 0, hidden.shape[1], attention_mask, position_ids)
    meta = {"lora": lora_config} if lora is not None else {}
    return RemoteChainFunction.apply(hidden, prompts, lora, client, extra, exact, meta)
