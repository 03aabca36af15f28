"""Bad input on every RPC gets a clear, coded error to that caller; the server keeps serving everyone else,
keeps their sessions, and its memory returns to its level."""
import asyncio
import time

import psutil
import pytest
import torch
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import ExpertRequest

from shards import BlockSpan, Checkpoint
from swarm.client import loop
from swarm.client.swarm_client import SwarmClient
from swarm.apps.local_swarm import LocalSwarm
from swarm.wire.codes import ErrorCode, RemoteError
from swarm.wire.fields import pack_metadata
from swarm.wire.payloads import LoraSpec
from swarm.wire.replies import SpanReply
from swarm.wire.requests import InferenceStep, SpanRequest
from swarm.wire.tensors import pack_tensor
from tests.raw_client import RawStream, info, raw_request

pytestmark = pytest.mark.slow
HIDDEN = 64
OPEN = dict(start=0, end=4)


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


def tensor_proto(buffer: bytes, size, dtype: str):
    return runtime_pb2.Tensor(buffer=buffer, size=size, dtype=dtype)


def test_every_bad_inference_input_gets_an_error_and_the_session_survives(swarm):
    _, client, peer, span = swarm
    x = torch.randn(1, 8, HIDDEN, generator=torch.Generator().manual_seed(0))
    bystander = RawStream(client, peer)
    bystander.step(x[:, :3], **OPEN, max_length=16)

    session = RawStream(client, peer)
    session.step(x[:, :4], **OPEN, max_length=16)
    hidden_meta = {"tensors": ["hidden"], "dtype": "float32"}
    bad = {
        "must have shape": raw_request({"hidden": torch.randn(1, 1, HIDDEN - 1)}, {}),
        "tensor 'hidden' is int64 but the request's dtype is float32": raw_request(
            {"hidden": torch.ones(1, 1, HIDDEN, dtype=torch.int64)}, {}),
        "tensor 'hidden' is bfloat16 but the request's dtype is float32": raw_request(
            {"hidden": torch.ones(1, 1, HIDDEN, dtype=torch.bfloat16)}, {}),
        "NaN or inf": raw_request({"hidden": torch.full((1, 1, HIDDEN), float("nan"))}, {}),
        "inf": raw_request({"hidden": torch.full((1, 1, HIDDEN), float("inf"))}, {}),
        "exceed the session's max_length": raw_request({"hidden": torch.randn(1, 13, HIDDEN)}, {}),
        "batch of 2 in a session opened with 1": raw_request({"hidden": torch.randn(2, 1, HIDDEN)}, {}),
        "not valid msgpack": ExpertRequest(tensors=[pack_tensor(x[:, 4:5])], metadata=b"\xc1\xff garbage"),
        "does not hold float32": ExpertRequest(tensors=[tensor_proto(b"1234", [1, 1, HIDDEN], "float32")],
                                               metadata=pack_metadata(hidden_meta)),
        "dtype 'object'": ExpertRequest(tensors=[tensor_proto(b"", [0], "object")], metadata=pack_metadata(hidden_meta)),
        "metadata 'tensors' must name": ExpertRequest(tensors=[pack_tensor(x[:, 4:5])], metadata=pack_metadata({})),
        "metadata 'dtype' must be one of": raw_request({"hidden": x[:, 4:5]}, {"dtype": "float64"}),
        "may not carry \\['start'\\]": raw_request({"hidden": x[:, 4:5]}, {"start": 0}),
        "position_ids must be int64 of shape": raw_request(
            {"hidden": x[:, 4:5], "position_ids": torch.zeros(1, 3, dtype=torch.long)}, {}),
        "attention_mask values must lie in": raw_request(
            {"hidden": x[:, 4:5], "attention_mask": torch.full((1, 5), 7, dtype=torch.long)}, {}),
        "attention_mask must cover the 4 past and 1 new": raw_request(
            {"hidden": x[:, 4:5], "attention_mask": torch.ones(1, 3, dtype=torch.long)}, {}),
        "reorder must list": raw_request({"hidden": x[:, 4:5]}, {"reorder": [5]}),
        "at most 4 dimensions": ExpertRequest(tensors=[tensor_proto(b"", [1, 1, 1, 1, 1], "float32")],
                                              metadata=pack_metadata(hidden_meta)),
        "elements; the limit": ExpertRequest(tensors=[tensor_proto(b"", [1 << 15, 1 << 15], "float32")],
                                             metadata=pack_metadata(hidden_meta)),
        "shape \\[0, 1048576, 1048576\\]": ExpertRequest(tensors=[tensor_proto(b"", [0, 1 << 20, 1 << 20], "float32")],
                                                       metadata=pack_metadata(hidden_meta)),
    }
    for expected, request in bad.items():
        with pytest.raises(RemoteError, match=expected) as error:
            session.reply(request)
        assert error.value.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE), expected

    # the session kept its cache: the next real token gives the same output as a local recomputation
    reference = span(x[:, :5])[:, 4:5]
    assert torch.allclose(session.step(x[:, 4:5]), reference, atol=1e-5)
    assert torch.allclose(bystander.step(x[:, 3:4]), span(x[:, :4])[:, 3:4], atol=1e-5)
    session.close()
    bystander.close()


def test_compact_frames_are_checked_like_full_ones(swarm):
    """swarm.wire.compact's frames: only in a session opened with ``compact``, each checked; a bad one gets a coded
    error, and the session goes on."""
    from swarm.wire.compact import HEADER, CompactFrame, pack_step, parse_reply
    _, client, peer, span = swarm
    x = torch.randn(1, 8, HIDDEN, generator=torch.Generator().manual_seed(1))
    first = RawStream(client, peer)  # a compact frame cannot open a session
    with pytest.raises(RemoteError, match="opens with a full step") as error:
        SpanReply.parse(first.send_frame(pack_step(InferenceStep(x[:, :1], position=0))), [])
    assert error.value.code == ErrorCode.BAD_REQUEST
    first.close()
    forward = RawStream(client, peer, "forward")
    with pytest.raises(RemoteError, match="forward takes no compact frames"):
        SpanReply.parse(forward.send_frame(pack_step(InferenceStep(x[:, :1], position=0))), [])
    forward.close()

    session = RawStream(client, peer)
    opening = InferenceStep(x[:, :4], **OPEN, max_length=16, compact=True)
    assert SpanReply.parse(session.send(opening.pack()), opening.expected_reply()).compact is True

    def frame(hidden, position=4, kind=0, code=0, size=HIDDEN, cut=0):
        raw = hidden.numpy().tobytes()
        return CompactFrame(HEADER.pack(kind, code, *hidden.shape[:2], size, position, 0, b"") + raw[:len(raw) - cut])

    bad = {"does not hold float32": frame(x[:, 4:5], cut=4),
           "NaN or inf": frame(torch.full((1, 1, HIDDEN), float("nan"))),
           "must have shape": frame(x[:, 4:5], size=HIDDEN + 1),
           "kind 1 where kind 0 belongs": frame(x[:, 4:5], kind=1),
           "dtype code 7": frame(x[:, 4:5], code=7), "a step at position 9": frame(x[:, 4:5], position=9),
           "batch of 32768 is outside": CompactFrame(HEADER.pack(0, 0, 1 << 15, 1, HIDDEN, 4, 0, b"")),
           "tokens in one request exceed": CompactFrame(HEADER.pack(0, 0, 1, 1 << 31, HIDDEN, 4, 0, b"")),
           "shorter than its": CompactFrame(b"\x00" * 7)}
    for expected, message in bad.items():
        with pytest.raises(RemoteError, match=expected) as error:
            SpanReply.parse(session.send_frame(message), [])
        assert error.value.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE), expected
    # the session kept its cache; a good compact step is answered compact, as transformers computes it
    answer = session.send_frame(pack_step(InferenceStep(x[:, 4:5], position=4)))
    assert isinstance(answer, CompactFrame)
    reply = parse_reply(answer, [((1, 1, HIDDEN), torch.float32)], peer)
    assert reply.length == 5 and torch.allclose(reply.outputs[0], span(x[:, :5])[:, 4:5], atol=1e-5)
    session.close()


def test_oversized_and_garbage_frames_are_refused_without_harm(swarm):
    _, client, peer, span = swarm
    process = psutil.Process(int(swarm[0].servers[0].process.pid))
    rss_before = process.memory_info().rss
    bystander = RawStream(client, peer)
    x = torch.randn(1, 2, HIDDEN)
    bystander.step(x[:, :1], **OPEN, max_length=8)
    frames = {(ErrorCode.TOO_LARGE, "exceeds the limit"): b"\x00" + (1 << 40).to_bytes(8, "big"),
              (ErrorCode.BAD_REQUEST, "garbage"): b"\x07" + (16).to_bytes(8, "big") + b"g" * 16,
              (ErrorCode.BAD_REQUEST, "not a valid protobuf"): b"\x00" + (16).to_bytes(8, "big") + b"\xff" * 16}
    for _ in range(20):
        for (code, text), frame in frames.items():
            with pytest.raises(RemoteError, match=text) as error:
                SpanReply.parse(RawStream(client, peer).send_bytes(frame), [])
            assert error.value.code == code
    assert torch.allclose(bystander.step(x[:, 1:2]), span(x)[:, 1:2], atol=1e-5)
    bystander.close()
    assert process.memory_info().rss - rss_before < 64 * 2**20


def test_forward_and_backward_validate_too(swarm):
    _, client, peer, span = swarm
    x = torch.randn(1, 4, HIDDEN)

    def call(handler, tensors, meta):
        return RawStream(client, peer, handler).reply(raw_request(tensors, meta), [((1, 4, HIDDEN), torch.float32)])

    with pytest.raises(RemoteError, match="'start' must be an integer in \\[0, 3\\]"):
        call("forward", {"hidden": x}, {"start": 7, "end": 9})
    with pytest.raises(RemoteError, match="'end' must be"):
        call("forward", {"hidden": x}, {"start": 0, "end": 5})
    with pytest.raises(RemoteError, match="must carry \\['end'\\]"):
        call("forward", {"hidden": x}, {"start": 0})
    with pytest.raises(RemoteError, match="NaN"):
        call("forward", {"hidden": x * float("nan")}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="grad_output shape"):
        call("backward", {"hidden": x, "grad_output": torch.randn(1, 3, HIDDEN)}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="must carry \\['grad_output'\\]"):
        call("backward", {"hidden": x}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="prompts must have shape \\[blocks 4, batch 1, prefix <= 4, 64\\]"):
        call("forward", {"hidden": x, "prompts": torch.randn(3, 1, 2, HIDDEN)}, {"start": 0, "end": 4})
    with pytest.raises(RemoteError, match="prompts must be finite"):
        call("forward", {"hidden": x, "prompts": torch.full((4, 1, 2, HIDDEN), float("nan"))}, {"start": 0, "end": 4})
    opened = RawStream(client, peer)  # prompts come with a session's first step, not later ones
    opened.step(x[:, :2], **OPEN, max_length=8)
    with pytest.raises(RemoteError, match="after the first step may not carry \\['prompts'\\]"):
        opened.reply(raw_request({"hidden": x[:, 2:3], "prompts": torch.randn(4, 1, 1, HIDDEN)}, {}))
    opened.close()
    with pytest.raises(RemoteError, match="does not serve adapter 'someone-elses'; it serves none"):
        call("forward", {"hidden": x}, {"start": 0, "end": 4, "adapter": "someone-elses"})
    lora = {"targets": ["q_proj"], "rank": 2, "alpha": 4.0}
    per_block = 2 * (HIDDEN + HIDDEN)  # q_proj: A [2, 64] and B [64, 2]
    with pytest.raises(RemoteError, match="unknown target modules \\['w_nothing'\\]"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)},
             {"start": 0, "end": 4, "lora_spec": {**lora, "targets": ["w_nothing"]}})
    with pytest.raises(RemoteError, match="'rank' must be an integer in \\[1, 64\\]"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)},
             {"start": 0, "end": 4, "lora_spec": {**lora, "rank": 500}})
    with pytest.raises(RemoteError, match="lora weights must have shape \\[4, 256\\]"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, 7)}, {"start": 0, "end": 4, "lora_spec": lora})
    with pytest.raises(RemoteError, match="LoRA weights need metadata 'lora_spec'"):
        call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)}, {"start": 0, "end": 4})
    zero_lora = call("forward", {"hidden": x, "lora": torch.zeros(4, per_block)},
                     {"start": 0, "end": 4, "lora_spec": lora}).outputs[0]
    assert torch.allclose(zero_lora, span(x), atol=1e-5)  # B = 0: the frozen blocks' output
    output = call("forward", {"hidden": x}, {"start": 1, "end": 3}).outputs[0]
    assert torch.allclose(output, span(x, blocks=(1, 3)), atol=1e-5)


def test_server_full_then_freed_and_idle_sessions_expire(swarm):
    _, client, peer, _ = swarm
    assert info(client, peer)["sessions"] == 0
    x = torch.randn(1, 1, HIDDEN)
    sessions = [RawStream(client, peer) for _ in range(3)]
    for s in sessions[:2]:
        s.step(x, **OPEN, max_length=64)
    with pytest.raises(RemoteError, match="server full: 2 x 100 cache tokens asked, 128 of 256 left") as error:
        sessions[2].step(torch.randn(2, 1, HIDDEN), **OPEN, max_length=100)
    assert error.value.code == ErrorCode.SERVER_FULL
    with pytest.raises(RemoteError, match="'max_length' must be an integer in \\[1, 128\\]") as error:
        RawStream(client, peer).step(x, **OPEN, max_length=129)
    assert error.value.code == ErrorCode.BAD_REQUEST
    sessions[2].step(x, **OPEN, max_length=64)
    with pytest.raises(RemoteError, match="3 sessions open") as error:
        RawStream(client, peer).step(x, **OPEN, max_length=8)
    assert error.value.code == ErrorCode.SERVER_FULL
    sessions[0].close()
    time.sleep(0.5)
    assert info(client, peer)["sessions"] == 2

    time.sleep(4.5)  # --session-timeout 3: idle sessions are freed, and say so when used again
    with pytest.raises(RemoteError, match="expired") as error:
        sessions[1].step(x)
    assert error.value.code == ErrorCode.SESSION_EXPIRED
    status = info(client, peer)
    assert status["sessions"] == 0 and status["cache_tokens_left"] == 256


def test_lora_weights_are_cached_by_hash_within_a_bounded_budget(swarm):
    """Training clients send their LoRA weights once per update; many of them at once cannot make the
    server hold more than --lora-cache-mb (0.05 MB here, room for 12 sets of these weights)."""
    from shards.lora import content_hash
    _, client, peer, span = swarm
    process = psutil.Process(int(swarm[0].servers[0].process.pid))
    x = torch.randn(1, 4, HIDDEN)
    spec = LoraSpec(["q_proj"], 2, 4.0)

    def forward(weights, key=None):
        request = SpanRequest(x, **OPEN, lora=None if key else weights,
                              lora_spec=LoraSpec(spec.targets, spec.rank, spec.alpha, key or content_hash(weights)))
        return loop.run(client.call_span(peer, "forward", request)).outputs[0]

    first = torch.randn(4, 256) * 0.1
    with_weights = forward(first)
    assert not torch.allclose(with_weights, span(x), atol=1e-4)  # the weights matter
    assert torch.equal(forward(first, key=content_hash(first)), with_weights)  # by hash: the same result
    with pytest.raises(RemoteError, match="lora weights not cached: '0+' is not on this server") as error:
        forward(first, key="0" * 32)
    assert error.value.code == ErrorCode.LORA_NOT_CACHED

    async def concurrent_updates(n):  # as from n clients training at once, each with its own weights
        requests = [SpanRequest(x, **OPEN, lora=w, lora_spec=spec) for w in torch.randn(n, 4, 256) * 0.1]
        return await asyncio.gather(*(client.call_span(peer, "forward", r) for r in requests))

    rss_before = process.memory_info().rss
    for _ in range(25):  # 200 updates of 4 KB each, 8 at a time: 800 KB sent, at most 52 KB kept
        replies = loop.run(concurrent_updates(8))
        assert all(r.outputs[0].shape == x.shape for r in replies)
        assert info(client, peer)["lora_cache_bytes"] <= 0.05 * 2**20
    assert 0.04 * 2**20 < info(client, peer)["lora_cache_bytes"] <= 0.05 * 2**20
    with pytest.raises(RemoteError, match="lora weights not cached"):  # the oldest were let go
        forward(first, key=content_hash(first))
    assert torch.equal(forward(first), with_weights)  # and are accepted again when resent
    assert process.memory_info().rss - rss_before < 32 * 2**20
