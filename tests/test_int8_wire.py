"""8-bit activations on the wire (swarm.wire.int8_rows): a rounded tensor crosses exactly, in about half the bytes,
untrusted encodings are refused, and a client with wire_codec="int8" gets its prompt, its forward and its backward through
a pushed chain of real servers in 8-bit rows, close to the 16-bit wire's results."""
import numpy
import pytest
import torch

from swarm import AutoDistributedModelForCausalLM
from swarm.apps.local_swarm import LocalSwarm
from swarm.client import loop
from swarm.wire import compact, int8_rows
from swarm.wire.codes import WireError
from swarm.wire.requests import Bounds, InferenceStep, PushStep, SpanRequest, piece, piece_bounds
from swarm.wire.limits import Limits

HIDDEN = 64


def activations(rows: int, hidden: int = 256, seed: int = 0) -> torch.Tensor:
    """Like a model's hidden states: mostly small values, a few outlier channels many times larger."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, hidden, generator=generator)
    x[..., 7] *= 80
    x[..., 100 % hidden] *= -30
    return x.bfloat16()


def test_a_rounded_tensor_crosses_exactly_in_about_half_the_bytes():
    x = activations(300)
    x[0, 0] = 0  # an empty row
    x[0, 1, :5], x[0, 1, 5:] = 3.0, 0  # fewer non-zero values than outliers
    x[0, 2] = 1.0  # every value tied
    rounded = int8_rows.round_rows(x)
    assert int8_rows.is_rounded(rounded) and not int8_rows.is_rounded(rounded + 0)  # new tensors are not
    raw = int8_rows.encode(rounded)
    assert len(raw) == 300 * (256 + 36) and len(raw) / (2 * x.numel()) < 0.58
    back = int8_rows.decode(raw, tuple(x.shape), "hidden")
    assert torch.equal(back, rounded) and int8_rows.encode(back) == raw  # forwarded as the same bytes
    error = (rounded.float() - x.float()).norm(dim=-1) / x.float().norm(dim=-1).clamp(min=1e-30)
    assert torch.equal(rounded[0, :3], x[0, :3])
    assert error[0, 3:].mean() < 0.003 and error.max() < 0.01  # outlier channels kept: well under 1% of a row
    assert int8_rows.rounding_bound(rounded) >= float((rounded.float() - x.float()).norm() / x.float().norm())
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):  # every scale bfloat16 has, spikes of 1000x
        scale = 10.0 ** float(torch.randint(-30, 30, (1,), generator=generator))
        y = (torch.randn(2, 16, HIDDEN, generator=generator) * scale)
        y[..., torch.randint(0, HIDDEN, (3,), generator=generator)] *= 1000
        rounded = int8_rows.round_rows(y.bfloat16())
        assert torch.equal(int8_rows.decode(int8_rows.encode(rounded), tuple(y.shape), "h"), rounded)
        assert float((rounded.double() - y.bfloat16().double()).norm() / y.bfloat16().double().norm()) < 0.01


def test_only_long_bfloat16_steps_are_rounded():
    assert int8_rows.applies("int8", activations(16)) and not int8_rows.applies("int8", activations(8))
    assert not int8_rows.applies(None, activations(16)) and not int8_rows.applies("int8", activations(16).float())


def test_untrusted_encodings_are_refused():
    rounded = int8_rows.round_rows(activations(20, HIDDEN))
    raw = bytearray(int8_rows.encode(rounded))
    wrong = {"short": raw[:-1], "index": _with(raw, 4, b"\xff\xff"),  # an outlier index beyond the row
             "repeated index": _with(raw, 4, raw[6:8]),  # two outliers in one place: which would win?
             "negative scale": _with(raw, 0, numpy.array([-1.0], numpy.float32).tobytes()),
             "nan": _with(raw, 4 + 16, numpy.array([0x7FC0], numpy.uint16).tobytes())}  # a NaN outlier
    for name, payload in wrong.items():
        with pytest.raises(WireError):
            int8_rows.decode(bytes(payload), tuple(rounded.shape), name)


def _with(raw: bytearray, offset: int, patch: bytes) -> bytearray:
    changed = bytearray(raw)
    changed[offset:offset + len(patch)] = patch
    return changed


def test_requests_pushes_and_replies_carry_rounded_tensors_in_8_bits_and_digest_their_values():
    bounds = Bounds(Limits(), hidden_size=HIDDEN, start=0, end=4, max_position=4096)
    hidden = int8_rows.round_rows(activations(40, HIDDEN))
    request = SpanRequest(hidden, 0, 4, codec="int8")
    message = request.pack()
    assert len(message.tensors[0].buffer) == 40 * int8_rows.row_bytes(HIDDEN)
    parsed = SpanRequest.parse(message, bounds)
    assert parsed.codec == "int8" and torch.equal(parsed.hidden, hidden) and int8_rows.is_rounded(parsed.hidden)
    push = PushStep(hidden, position=0, route_id="ab" * 16)
    frame = compact.pack_step(push)
    assert len(frame) < 40 * HIDDEN * 2
    received = compact.parse_step(frame, bounds, push=True)
    assert torch.equal(received.hidden, hidden) and received.digest() == push.digest()
    assert received.digest() == InferenceStep(hidden.clone(), position=0).digest()  # the same values, 16-bit
    with pytest.raises(WireError, match="codec"):
        bad = SpanRequest(hidden, 0, 4, codec="int4").pack()
        SpanRequest.parse(bad, bounds)


def test_a_first_step_is_pushed_in_pieces_that_both_ends_hash_alike_and_keep_their_8_bit_rows():
    """A server pushes a session's first step in pieces (each server computes one while the last is on the wire);
    the client checks each answer against its own piece of the step, so both must cut it the same way."""
    bounds = Bounds(Limits(max_tokens_per_request=4096, max_length=4096), hidden_size=HIDDEN, start=0, end=4,
                    max_position=4096)
    tokens = 2500
    assert piece_bounds(tokens, HIDDEN, 0) == [(0, 1024), (1024, 2048), (2048, 2500)]  # 128 KiB of 16 bits each
    assert piece_bounds(tokens, HIDDEN, 7) == [(0, tokens)]  # later steps go whole: the client sends copies
    assert piece_bounds(3000, 4096, 0)[0] == (0, 64)  # at least MIN_PIECE_TOKENS
    output = int8_rows.round_rows(activations(tokens, HIDDEN))
    ids, mask = torch.arange(tokens)[None], torch.ones(1, tokens, dtype=torch.int64)
    step = InferenceStep(activations(tokens, HIDDEN, seed=1), position_ids=ids, attention_mask=mask, position=0)
    pieces = [piece(step, output, a, b, PushStep, route_id="ab" * 16) for a, b in piece_bounds(tokens, HIDDEN, 0)]
    received = [compact.parse_step(compact.pack_step(p) or p.pack(), bounds, push=True) if p.attention_mask is None
                else PushStep.parse(p.pack(), bounds, opening=False) for p in pieces]
    client_side = InferenceStep(output.clone(), position_ids=ids, attention_mask=mask, position=0)  # its own copy
    for (a, b), sent, got in zip(piece_bounds(tokens, HIDDEN, 0), pieces, received):
        assert got.position == a and got.hidden.shape[1] == b - a and got.attention_mask.shape[1] == b
        assert int8_rows.is_rounded(got.hidden) and torch.equal(got.hidden, output[:, a:b])  # 8 bits, same values
        assert got.digest() == sent.digest() == piece(client_side, client_side.hidden, a, b).digest()
    joined = int8_rows.join_tokens([got.hidden for got in received])
    assert torch.equal(joined, output) and int8_rows.encode(joined) == int8_rows.encode(output)


@pytest.mark.slow
def test_a_pushed_chain_takes_prompts_forwards_and_backwards_in_8_bits(checkpoints):
    """Three servers, each pushing to the next; a 1,100-token prompt (with 4 trainable tokens before it: pieces of
    1,024 and 80 tokens at hidden 64), a forward and a backward through the chain. Each server's reply reached
    the client in 8-bit rows, every piece and push was taken and agreed with the client's copy, and the results
    are within the codec's error of the 16-bit wire's."""
    path = checkpoints("llama", num_hidden_layers=6, max_position_embeddings=2048)
    ids = torch.randint(3, 128, (1, 1100), generator=torch.Generator().manual_seed(0))
    results = {}
    with LocalSwarm(path, [(0, 2), (2, 4), (4, 6)]) as swarm:
        for codec in (None, "int8"):
            torch.manual_seed(0)  # the same trainable prompt for both
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                    wire_codec=codec, tuning_mode="ptune",
                                                                    pre_seq_len=4)
            with torch.no_grad(), model.inference_session(max_length=1120) as session:
                model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
                inputs = [s.history[0][0] for s in session._sessions]
                chain = [link.peer_id for link in session.chain]
            assert [int8_rows.is_rounded(h) for h in inputs] == [codec == "int8"] * 3  # each reply came in 8 bits
            counts = [loop.run(model.swarm.info(peer))["pushes"] for peer in chain]
            pieces = 2 * (len(results) + 1)  # 2 a prompt, counted by the servers since the first client's
            assert all(c["taken"] - c["answered"] == pieces and c["differed"] == 0 for c in counts[1:])
            logits = model(ids).logits
            logits[:, -1].logsumexp(-1).sum().backward()
            results[codec] = (logits.detach(), model.prompt_embeddings.weight.grad.clone())
            model.shutdown()
    (logits16, grad16), (logits8, grad8) = results[None], results["int8"]
    assert 0 < float((logits8 - logits16).norm() / logits16.norm()) < 0.05
    assert torch.nn.functional.cosine_similarity(grad8.flatten(), grad16.flatten(), dim=0) > 0.99
