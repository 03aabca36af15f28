"""Bad input on every RPC gets a clear error to that caller; the server keeps serving everyone else,
keeps their sessions, and its memory returns to its level."""
import asyncio
import time

import psutil
import pytest
import torch
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from shards import BlockSpan, Checkpoint
from swarm.client import loop
from swarm.client.messages import read_output, span_request
from swarm.client.swarm_client import SwarmClient
from swarm.local_swarm import LocalSwarm
from swarm.protocol import RemoteError, ServerFullError, pack_metadata, pack_tensors, unpack_metadata

pytestmark = pytest.mark.slow
HIDDEN = 64


@pytest.fixture(scope="module")
def swarm(checkpoints):
    path = checkpoints("llama")
    with LocalSwarm(path, [(0, 4)], server_args=["--max-sessions", "3", "--cache-tokens", "256",
                                                 "--max-length", "128", "--session-timeout", "3",
                                                 "--lora-cache-mb", "0.05"]) as swarm:
        client = SwarmClient(swarm.initial_peers, Checkpoint(path).model_id, 4)
        (peer,) = client.swarm_state().online()
        yield swarm, client, peer, BlockSpan.from_pretrained(path, 0, 4)
        client.shutdown()


class RawSession:
    """A hand-driven inference stream, to send what a well-behaved client never would."""

    def __init__(self, client, peer):
        self.stream = loop.run(client.open_stream(peer, "inference"))

    def send(self, request: ExpertRequest):
        return loop.run(self.stream.request(request, timeout=30))

    def step(self, hidden, meta=None):
        return read_output(self.send(span_request({"hidden": hidden}, meta or {}, exact=True)), hidden)[0]

    def send_bytes(self, data: bytes):
        async def go():
            self.stream.writer.write(data)
            await self.stream.writer.drain()
            from swarm.protocol import read_frame
            return await asyncio.wait_for(read_frame(self.stream.reader, ExpertResponse, 1 << 20), 30)
        return loop.run(go())

    def close(self):
        loop.background_loop().call_soon_threadsafe(self.stream.close)


def info(client, peer):
    return unpack_metadata(loop.run(client.call(peer, "info", ExpertRequest())).metadata)


def test_every_bad_inference_input_gets_an_error_and_the_session_survives(swarm):
    _, client, peer, span = swarm
    x = torch.randn(1, 8, HIDDEN, generator=torch.Generator().manual_seed(0))
    bystander = RawSession(client, peer)
    bystander.step(x[:, :3], {"start": 0, "end": 4, "max_length": 16})

    session = RawSession(client, peer)
    session.step(x[:, :4], {"start": 0, "end": 4, "max_length": 16})
    bad = {
        "must have shape": span_request({"hidden": torch.randn(1, 1, HIDDEN - 1)}, {}, exact=True),
        "must be floating point": span_request({"hidden": torch.ones(1, 1, HIDDEN, dtype=torch.int64)}, {}, exact=True),
        "NaN or inf": span_request({"hidden": torch.full((1, 1, HIDDEN), float("nan"))}, {}, exact=True),
        "inf": span_request({"hidden": torch.full((1, 1, HIDDEN), float("inf"))}, {}, exact=True),
        "exceed the session's max_length": span_request({"hidden": torch.randn(1, 13, HIDDEN)}, {}, exact=True),
        "batch of 2 in a session opened with 1": span_request({"hidden": torch.randn(2, 1, HIDDEN)}, {}, exact=True),
        "not valid msgpack": ExpertRequest(tensors=pack_tensors([x[:, 4:5]]), metadata=b"\xc1\xff garbage"),
        "does not hold shape": ExpertRequest(tensors=[pack_tensors([x[:, 4:5]])[0].__class__(
            buffer=b"1234", size=[1, 1, HIDDEN], dtype="float32")], metadata=pack_metadata({"tensors": ["hidden"]})),
        "dtype 'object'": ExpertRequest(tensors=[pack_tensors([x[:, 4:5]])[0].__class__(
            buffer=b"", size=[0], dtype="object")], metadata=pack_metadata({"tensors": ["hidden"]})),
        "metadata 'tensors' must be": ExpertRequest(tensors=pack_tensors([x[:, 4:5]]), metadata=pack_metadata({})),
        "position_ids must be int64 of shape": span_request(
            {"hidden": x[:, 4:5], "position_ids": torch.zeros(1, 3, dtype=torch.long)}, {}, exact=True),
        "attention_mask values must lie in": span_request(
            {"hidden": x[:, 4:5], "attention_mask": torch.full((1, 5), 7, dtype=torch.long)}, {}, exact=True),
        "reorder must list": span_request({"hidden": x[:, 4:5]}, {"reorder": [5]}, exact=True),
        "elements; the limit": ExpertRequest(tensors=[pack_tensors([x[:, 4:5]])[0].__class__(
            buffer=b"", size=[1 << 20, 1 << 20], dtype="float32")], metadata=pack_metadata({"tensors": ["hidden"]})),
    }
    for expected, request in bad.items():
        with pytest.raises(RemoteError, match=expected):
            session.send(request)

    # the session kept its cache: the next real token gives the same output as a local recomputation
    reference = span(x[:, :5])[:, 4:5]
    assert torch.allclose(session.step(x[:, 4:5]), reference, atol=1e-5)
    assert torch.allclose(bystander.step(x[:, 3:4]), span(x[:, :4])[:, 3:4], atol=1e-5)
    session.close()
    bystander.close()


def test_oversized_and_garbage_frames_are_refused_without_harm(swarm):
    _, client, peer, span = swarm
    process = psutil.Process(int(swarm[0].servers[0].process.pid))
    rss_before = process.memory_info().rss
    bystander = RawSession(client, peer)
    x = torch.randn(1, 2, HIDDEN)
    bystander.step(x[:, :1], {"start": 0, "end": 4, "max_length": 8})
    for _ in range(20):
        with pytest.raises(RemoteError, match="exceeds this server's limit"):
            RawSession(client, peer).send_bytes(b"\x00" + (1 << 40).to_bytes(8, "big"))
        with pytest.raises(RemoteError, match="garbage"):
            RawSession(client, peer).send_bytes(b"\x07" + (16).to_bytes(8, "big") + b"g" * 16)
        with pytest.raises(RemoteError, match="not a valid protobuf"):
            RawSession(client, peer).send_bytes(b"\x00" + (16).to_bytes(8, "big") + b"\xff" * 16)
    assert torch.allclose(bystander.step(x[:, 1:2]), span(x)[:, 1:2], atol=1e-5)
    bystander.close()
    assert process.memory_info().rss - rss_before < 64 * 2**20


def test_forward_and_backward_validate_too(swarm):
    _, client, peer, span = swarm
    x = torch.randn(1, 4, HIDDEN)

    def call(handler, tensors, meta):
        return loop.run(client.call(peer, handler, span_request(tensors, meta, exact=True)))

    with pytest.raises(RemoteError, match="'start' must be an integer in \\[0, 3\\]"):
        call("forward", {"hidden": x}, {"start": 7, "end": 9})
    with pytest.raises(RemoteError, match="'end' must be"):
        call("forward", {"hidden": x}, {"start": 0, "end": 5})
    with pytest.raises(RemoteError, match="NaN"):
        call("forward", {"hidden": x * float("nan")}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="grad_output shape"):
        call("backward", {"hidden": x, "grad_output": torch.randn(1, 3, HIDDEN)}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="must be \\['hidden', 'grad_output'\\]"):
        call("backward", {"hidden": x}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="prompts must have shape \\[blocks 4, batch 1, prefix <= 4, 64\\]"):
        call("forward", {"hidden": x, "prompts": torch.randn(3, 1, 2, HIDDEN)}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="prompts must be finite"):
        call("forward", {"hidden": x, "prompts": torch.full((4, 1, 2, HIDDEN), float("nan"))}, {"start": 0, "end": 4})
    opened = RawSession(client, peer)  # prompts come with a session's first step, not later ones
    opened.step(x[:, :2], {"start": 0, "end": 4, "max_length": 8})
    with pytest.raises(RemoteError, match="or an inference session's first step"):
        opened.send(span_request({"hidden": x[:, 2:3], "prompts": torch.randn(4, 1, 1, HIDDEN)}, {}, exact=True))
    opened.close()
    with pytest.raises(RemoteError, match="does not serve adapter 'someone-elses'; it serves none"):
        call("forward", {"hidden": x}, {"start": 0, "end": 4, "adapter": "someone-elses"})
    lora = {"targets": ["q_proj"], "rank": 2, "alpha": 4.0}
    per_block = 2 * (HIDDEN + HIDDEN)  # q_proj: A [2, 64] and B [64, 2]
    with pytest.raises(RemoteError, match="unknown target modules \\['w_nothing'\\]"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)},
             {"start": 0, "end": 4, "lora": {**lora, "targets": ["w_nothing"]}})
    with pytest.raises(RemoteError, match="'rank' must be an integer in \\[1, 64\\]"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)}, {"start": 0, "end": 4, "lora": {**lora, "rank": 500}})
    with pytest.raises(RemoteError, match="lora weights must have shape \\[4, 256\\]"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, 7)}, {"start": 0, "end": 4, "lora": lora})
    with pytest.raises(RemoteError, match="metadata 'lora' must be"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)}, {"start": 0, "end": 4})
    zero_lora, _ = read_output(call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)},
                                    {"start": 0, "end": 4, "lora": lora}), x)
    assert torch.allclose(zero_lora, span(x), atol=1e-5)  # B = 0: the frozen blocks' output
    output, _ = read_output(call("forward", {"hidden": x}, {"start": 1, "end": 3}), x)
    assert torch.allclose(output, span(x, blocks=(1, 3)), atol=1e-5)


def test_server_full_then_freed_and_idle_sessions_expire(swarm):
    _, client, peer, _ = swarm
    assert info(client, peer)["sessions"] == 0
    x = torch.randn(1, 1, HIDDEN)
    sessions = [RawSession(client, peer) for _ in range(3)]
    for s in sessions[:2]:
        s.step(x, {"start": 0, "end": 4, "max_length": 64})
    with pytest.raises(ServerFullError, match="server full: 2 x 100 cache tokens asked, 128 of 256 left"):
        sessions[2].step(torch.randn(2, 1, HIDDEN), {"start": 0, "end": 4, "max_length": 100})
    with pytest.raises(RemoteError, match="'max_length' must be an integer in \\[1, 128\\]"):
        RawSession(client, peer).step(x, {"start": 0, "end": 4, "max_length": 129})
    sessions[2].step(x, {"start": 0, "end": 4, "max_length": 64})
    with pytest.raises(ServerFullError, match="3 sessions open"):
        RawSession(client, peer).step(x, {"start": 0, "end": 4, "max_length": 8})
    sessions[0].close()
    time.sleep(0.5)
    assert info(client, peer)["sessions"] == 2

    time.sleep(4.5)  # --session-timeout 3: idle sessions are freed, and say so when used again
    with pytest.raises(RemoteError, match="unknown or expired session"):
        sessions[1].step(x)
    status = info(client, peer)
    assert status["sessions"] == 0 and status["cache_tokens_left"] == 256


def test_lora_weights_are_cached_by_hash_within_a_bounded_budget(swarm):
    """Training clients send their LoRA weights once per update; many of them at once cannot make the
    server hold more than --lora-cache-mb (0.05 MB here, room for 12 sets of these weights)."""
    from shards.lora import content_hash
    _, client, peer, span = swarm
    process = psutil.Process(int(swarm[0].servers[0].process.pid))
    x = torch.randn(1, 4, HIDDEN)
    config = {"targets": ["q_proj"], "rank": 2, "alpha": 4.0}

    def forward(weights, key=None):
        meta = {"start": 0, "end": 4, "lora": {**config, "hash": key or content_hash(weights)}}
        tensors = {"hidden": x, "lora": None if key else weights}
        return read_output(loop.run(client.call(peer, "forward", span_request(tensors, meta, exact=True))), x)[0]

    first = torch.randn(4, 256) * 0.1
    with_weights = forward(first)
    assert not torch.allclose(with_weights, span(x), atol=1e-4)  # the weights matter
    assert torch.equal(forward(first, key=content_hash(first)), with_weights)  # by hash: the same result
    with pytest.raises(RemoteError, match="lora weights not cached: '0+' is not on this server"):
        forward(first, key="0" * 32)

    async def concurrent_updates(n):  # as from n clients training at once, each with its own weights
        requests = [span_request({"hidden": x, "lora": w}, {"start": 0, "end": 4, "lora": config}, exact=True)
                    for w in torch.randn(n, 4, 256) * 0.1]
        return await asyncio.gather(*(client.call(peer, "forward", r) for r in requests))

    rss_before = process.memory_info().rss
    for _ in range(25):  # 200 updates of 4 KB each, 8 at a time: 800 KB sent, at most 52 KB kept
        responses = loop.run(concurrent_updates(8))
        assert all(read_output(r, x)[0].shape == x.shape for r in responses)
        assert info(client, peer)["lora_cache_bytes"] <= 0.05 * 2**20
    assert 0.04 * 2**20 < info(client, peer)["lora_cache_bytes"] <= 0.05 * 2**20
    with pytest.raises(RemoteError, match="lora weights not cached"):  # the oldest were let go
        forward(first, key=content_hash(first))
    assert torch.equal(forward(first), with_weights)  # and are accepted again when resent
    assert process.memory_info().rss - rss_before < 32 * 2**20
