"""A test double: `cocoon serve` that misbehaves as $COCOON_MISCHIEF says. Run as
`python -m tests.malicious_server serve ...`.

  perturb (default)  outputs off by 1e-2 relative, as a server that skimps on work would
  scale              outputs times 1.05: colluders running this return the same wrong output
  noise              outputs plus Gaussian noise of 6% of each output row's norm
  perturb_verify     perturbs only verify steps (2 to 8 new tokens onto a session: speculative decoding) once a
                     session holds over 20 tokens (after it rolled back some)
  nan                outputs full of NaN
  huge               answers every request with a frame that claims 512 MiB
  no_attestation     a priced server that signs nothing
  bad_attestation    a priced server whose attestations name another output
  push_wrong         answers the client honestly, pushes a perturbed output to the next server
  push_elsewhere     pushes its outputs to the server $COCOON_PUSH_TO instead of the one the client named
  push_tokens        answers the client honestly, pushes each output twice over (2 tokens for 1) to the next server
  frame_pusher       answers every step it took from a push with a digest that contradicts the pusher's
  tarpit             announces its blocks and answers pings, but never answers a step

$COCOON_ADVERTISE_THROUGHPUT makes it announce that many tokens/s, so that clients pick it first.
$COCOON_DIRECT_ADDRESS makes it announce that "ip:port" as its direct address (another server's, say).
"""
import dataclasses
import os

import torch

from swarm.server import billing, engine, push, server, session_steps, streams

MISCHIEF = os.environ.get("COCOON_MISCHIEF", "perturb")
_honest_execute = engine.Engine._execute


def _execute(self, task):
    output = _honest_execute(self, task)
    if MISCHIEF == "nan":
        return torch.full_like(output, float("nan"))
    if MISCHIEF == "perturb":
        return output + 1e-2 * output.float().std().to(output.dtype) * torch.randn_like(output)
    if MISCHIEF == "perturb_verify" and task.decode and task.request.hidden.shape[1] > 1 and \
            task.cache.get_seq_length() > 20:
        return output + 1e-2 * output.float().std().to(output.dtype) * torch.randn_like(output)
    if MISCHIEF == "scale":
        return output * 1.05
    if MISCHIEF == "noise":
        noise = torch.randn(output.shape)
        rows = output.float().norm(dim=-1, keepdim=True)
        return (output.float() + 0.06 * rows * noise / noise.norm(dim=-1, keepdim=True)).to(output.dtype)
    return output


_honest_write = streams.write_frame


async def _huge_frame(writer, message):
    if not message.tensors:  # info and errors as usual: clients must pick this server for work
        return await _honest_write(writer, message)
    writer.write(b"\x00" + (512 << 20).to_bytes(8, "big") + b"\x00" * 1024)
    await writer.drain()


_honest_attest = billing.Billing.attest


def _attest(self, chain, wire_input, wire_output, start, end):
    if MISCHIEF == "no_attestation":
        return chain, None
    if MISCHIEF == "bad_attestation":
        return _honest_attest(self, chain, wire_input, wire_output + 1, start, end)
    return _honest_attest(self, chain, wire_input, wire_output, start, end)


_honest_push = push.PushSender.send


async def _push(self, route, step, output, position, next_block):
    if MISCHIEF == "push_wrong":
        output = output + 1e-2 * output.float().std().to(output.dtype) * torch.randn_like(output)
    if MISCHIEF == "push_elsewhere":
        route = dataclasses.replace(route, to=os.environ["COCOON_PUSH_TO"], direct=())
    if MISCHIEF == "push_tokens":
        output = torch.cat([output, output], dim=1)
    return await _honest_push(self, route, step, output, position, next_block)


_honest_step = session_steps.SessionSteps.step


async def _step(self, session, step, peer, payer, digest=None):
    reply = await _honest_step(self, session, step, peer, payer, digest=digest)
    if MISCHIEF == "frame_pusher" and reply.digest is not None:
        reply.digest = "0" * 32 + reply.digest[32:]  # "the previous server pushed me something else"
    return reply


push.PushSender.send = _push
session_steps.SessionSteps.step = _step
engine.Engine._execute = _execute
billing.Billing.attest = _attest
if MISCHIEF == "huge":
    streams.write_frame = _huge_frame
if MISCHIEF == "tarpit":
    async def _never(self, message, stream):
        import asyncio
        await asyncio.sleep(3600)

    session_steps.SessionSteps.inference = _never
if "COCOON_ADVERTISE_THROUGHPUT" in os.environ:
    _honest_set_throughput = server.Server._set_throughput

    def _set_throughput(self):
        _honest_set_throughput(self)
        self.info.throughput = float(os.environ["COCOON_ADVERTISE_THROUGHPUT"])

    server.Server._set_throughput = _set_throughput

if "COCOON_DIRECT_ADDRESS" in os.environ:
    _honest_check_reachability = server.Server._check_reachability

    async def _check_reachability(self):  # what it announces after its own check found it reachable
        relaying = await _honest_check_reachability(self)
        self.info.direct, self.info.relay = (os.environ["COCOON_DIRECT_ADDRESS"],), ""
        return relaying

    server.Server._check_reachability = _check_reachability

if __name__ == "__main__":
    from swarm.apps.cli import run
    run()
