"""Stateless forward and backward through the chain, as a torch autograd function, with failover:
a link whose server fails is replaced by a chain for exactly its blocks, and the call is retried.

Trainable per-block tensors travel with the hidden states, each with the blocks as its first dimension
so that a link takes its slice: deep prompts [blocks, batch, prefix, hidden] and LoRA weights
[blocks, per-block numel] (layout in shards.lora). The servers return their gradients."""
from __future__ import annotations

import dataclasses

import torch

from routing import ChainLink
from shards.lora import content_hash
from swarm.client import loop
from swarm.client.failover import Failover, Verdict
from swarm.client.inputs import block_slice, optional_inputs
from swarm.client.swarm_client import SwarmClient
from swarm.wire import int8_rows
from swarm.wire.codes import ErrorCode, RemoteError
from swarm.wire.payloads import LoraSpec
from swarm.wire.requests import BackwardRequest, SpanRequest
from swarm.wire.tensors import wire_dtype

BLOCK_TENSORS = ("prompts", "lora")  # wire order


async def _call_span(client: SwarmClient, link: ChainLink, request: SpanRequest) -> list[torch.Tensor]:
    """One request to one server; LoRA weights cross the network once per update (afterwards the server
    knows them by their hash)."""
    request.start, request.end = link.start, link.end
    request.adapter, request.payment = client.adapter, client.payment(link.peer_id)
    handler = "backward" if request.grad_output is not None else "forward"
    if request.lora is None:
        return await _request(client, link, handler, request)
    key = content_hash(request.lora)
    request.lora_spec = dataclasses.replace(request.lora_spec, hash=key)
    sent = client.lora_sent.setdefault(link.peer_id, [])
    if key in sent:
        try:
            by_hash = dataclasses.replace(request, lora=None)
            return await _request(client, link, handler, by_hash, lora_shape=tuple(request.lora.shape))
        except RemoteError as e:
            if e.code != ErrorCode.LORA_NOT_CACHED:
                raise
            sent.remove(key)  # the server let them go to make room: send them again
    outputs = await _request(client, link, handler, request)
    sent.append(key)
    del sent[:-4]
    return outputs


async def _request(client: SwarmClient, link: ChainLink, handler: str, request: SpanRequest,
                   lora_shape: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    reply = await client.call_span(link.peer_id, handler, request, lora_shape)
    client.bans.succeeded(link.peer_id)
    hidden = request.hidden
    client.record_work(link.peer_id, reply, hidden.shape[0] * hidden.shape[1], link.end - link.start,
                       backward=handler == "backward")
    return reply.outputs


async def _forward_chain(client: SwarmClient, start: int, end: int, hidden: torch.Tensor, extra: dict,
                         block_tensors: dict, lora_spec: LoraSpec | None, failover: Failover):
    """Blocks [start, end) on ``hidden`` (``block_tensors`` covering the same blocks); returns the output
    and (link, input) of every hop taken."""
    hops = []
    tokens = hidden.shape[0] * hidden.shape[1]
    for link in await failover.chain(start, end, training=True, batch_tokens=tokens):
        own = block_slice(block_tensors, link.start, link.end, start)
        try:
            request = SpanRequest(hidden, **extra, **own, lora_spec=lora_spec, codec=client.codec)
            (output,) = await _call_span(client, link, request)
            hops.append((link, hidden))
        except Exception as e:
            failover.failed(link.peer_id, e)
            output, sub_hops = await _forward_chain(client, link.start, link.end, hidden, extra, own, lora_spec,
                                                    failover)
            hops.extend(sub_hops)
        hidden = output
    return hidden, hops


async def _backward_hop(client: SwarmClient, link: ChainLink, hidden: torch.Tensor, grad: torch.Tensor, extra: dict,
                        own: dict, lora_spec: LoraSpec | None, failover: Failover) -> tuple[torch.Tensor, dict]:
    """Gradients w.r.t. this hop's input and its slice of every per-block tensor."""
    present = [name for name in BLOCK_TENSORS if own.get(name) is not None]
    grad = int8_rows.maybe_round(client.codec, grad.to(hidden.dtype))
    request = BackwardRequest(hidden, grad_output=grad, **extra, **own, lora_spec=lora_spec, codec=client.codec)
    try:
        grads = await _call_span(client, link, request)
        return grads[0], dict(zip(present, grads[1:]))
    except Exception as e:
        if failover.failed(link.peer_id, e) is Verdict.RETRY:
            return await _backward_hop(client, link, hidden, grad, extra, own, lora_spec, failover)
        _, hops = await _forward_chain(client, link.start, link.end, hidden, extra, own, lora_spec, failover)
        block_grads = {name: torch.zeros_like(own[name], dtype=torch.float32 if name == "lora" else hidden.dtype)
                       for name in present}
        for sub_link, sub_input in reversed(hops):
            sub_own = block_slice(own, sub_link.start, sub_link.end, link.start)
            grad, sub_grads = await _backward_hop(client, sub_link, sub_input, grad, extra, sub_own, lora_spec,
                                                  failover)
            for name, g in sub_grads.items():
                block_grads[name][sub_link.start - link.start:sub_link.end - link.start] = g
        return grad, block_grads


class RemoteChainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor | None, lora: torch.Tensor | None,
                client: SwarmClient, extra: dict, exact: bool, lora_spec: LoraSpec | None) -> torch.Tensor:
        dtype = wire_dtype(hidden.dtype, exact)
        given = {"prompts": prompts, "lora": lora}
        block_tensors = {name: None if t is None else t.detach().cpu().to(dtype if name == "prompts" else t.dtype)
                         for name, t in given.items()}
        failover = Failover(client, f"a forward of blocks 0:{client.num_blocks}")
        wire = int8_rows.maybe_round(client.codec, hidden.detach().cpu().to(dtype))
        output, hops = loop.run(_forward_chain(client, 0, client.num_blocks, wire, extra,
                                               block_tensors, lora_spec, failover))
        ctx.client, ctx.hops, ctx.extra, ctx.lora_spec = client, hops, extra, lora_spec
        ctx.block_tensors = block_tensors
        ctx.like = {name: t for name, t in given.items() if t is not None}
        ctx.like_hidden = hidden
        return output.to(device=hidden.device, dtype=hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        async def run():
            grad = grad_output.detach().cpu().to(ctx.hops[0][1].dtype).contiguous()
            block_grads = {n: None if t is None else torch.zeros(t.shape) for n, t in ctx.block_tensors.items()}
            failover = Failover(ctx.client, f"a backward of blocks 0:{ctx.client.num_blocks}")
            for link, hidden in reversed(ctx.hops):
                own = block_slice(ctx.block_tensors, link.start, link.end, 0)
                grad, link_grads = await _backward_hop(ctx.client, link, hidden, grad, ctx.extra, own, ctx.lora_spec,
                                                       failover)
                for name, g in link_grads.items():
                    block_grads[name][link.start:link.end] = g
            return grad, block_grads
        grad, block_grads = loop.run(run())
        moved = [None if n not in ctx.like else block_grads[n].to(device=ctx.like[n].device, dtype=ctx.like[n].dtype)
                 for n in BLOCK_TENSORS]
        return grad.to(device=grad_output.device, dtype=ctx.like_hidden.dtype), *moved, None, None, None, None


def remote_forward(client: SwarmClient, hidden: torch.Tensor, *, attention_mask=None, position_ids=None,
                   exact: bool = False, prompts: torch.Tensor | None = None, lora: torch.Tensor | None = None,
                   lora_spec: LoraSpec | None = None) -> torch.Tensor:
    """All blocks of the model on ``hidden`` [batch, tokens, hidden_size]; differentiable w.r.t. ``hidden``,
    the deep ``prompts`` [num_blocks, batch, prefix, hidden_size] and the ``lora`` weights
    [num_blocks, per-block numel] (read by ``lora_spec``)."""
    extra = optional_inputs(hidden.shape[0], 0, hidden.shape[1], attention_mask, position_ids)
    return RemoteChainFunction.apply(hidden, prompts, lora, client, extra, exact, lora_spec if lora is not None else None)
