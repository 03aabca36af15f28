"""The wire contract without a network: records round-trip through pack and parse; anything else gets a
coded error, never an unhandled exception; the failover policy follows the codes; bans stay bounded."""
import asyncio

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse

from incentives.metering import Receipt
from incentives.verification import Attestation
from routing import BanList
from swarm.client.failover import ServerFailure, Verdict, judge
from swarm.wire.fields import unpack_metadata
from swarm.wire.framing import read_frame
from swarm.wire.codes import ErrorCode, InvalidReply, RemoteError, WireError
from swarm.wire.limits import Limits
from swarm.wire.payloads import Accept, LoraSpec, PayerSignature, Payment, Route, SignedReservation, SignedVoucher
from swarm.wire.replies import ErrorReply, SpanReply
from swarm.wire.requests import BackwardRequest, Bounds, InferenceStep, PayRequest, SpanRequest
from swarm.wire.tensors import wire_dtype

HIDDEN = 16
BOUNDS = Bounds(Limits(max_batch=4, max_tokens_per_request=64, max_length=32), HIDDEN, 2, 6, 64)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ADDRESS = st.from_regex(r"0x[0-9a-f]{40}", fullmatch=True)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tensors_equal(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@st.composite
def span_requests(draw, cls=SpanRequest, opening=True):
    dtype = draw(st.sampled_from(DTYPES))
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(batch, length, HIDDEN, generator=g) * 1e3).to(dtype)
    fields = {}
    start = draw(st.integers(2, 5))
    end = draw(st.integers(start + 1, 6))
    if cls is not InferenceStep or opening:
        fields.update(start=start, end=end)
    if cls is InferenceStep and opening:
        fields["max_length"] = draw(st.integers(length, 32))
    if cls is BackwardRequest:
        fields["grad_output"] = torch.randn(batch, length, HIDDEN, generator=g).to(dtype)
    if draw(st.booleans()):
        fields["position_ids"] = torch.randint(0, 64, (batch, length), generator=g)
    if draw(st.booleans()):
        past = 0 if cls is not InferenceStep else draw(st.integers(0, 4))
        fields["attention_mask"] = torch.randint(0, 2, (batch, past + length), generator=g)
    if cls is not InferenceStep or opening:
        if draw(st.booleans()):
            fields["prompts"] = torch.randn(end - start, batch, draw(st.integers(1, length)), HIDDEN,
                                            generator=g).to(dtype)
        choice = draw(st.sampled_from(["none", "lora", "hash", "adapter"]))
        spec = LoraSpec(draw(st.lists(st.sampled_from(["q_proj", "v_proj"]), min_size=1, max_size=2, unique=True)),
                        draw(st.integers(1, 8)), draw(st.floats(0.5, 64)))
        if choice == "lora":
            fields.update(lora=torch.randn(end - start, 10, generator=g), lora_spec=spec)
        elif choice == "hash":
            spec.hash = draw(st.from_regex(r"[0-9a-f]{32}", fullmatch=True))
            fields["lora_spec"] = spec
        elif choice == "adapter":
            fields["adapter"] = draw(st.text(min_size=1, max_size=20))
    if cls is InferenceStep and not opening and draw(st.booleans()):
        fields["reorder"] = draw(st.lists(st.integers(0, batch - 1), min_size=batch, max_size=batch))
    if (cls is not InferenceStep or opening) and draw(st.booleans()):
        fields["codec"] = "int8"
    if draw(st.booleans()):
        voucher = None
        if draw(st.booleans()):
            voucher = SignedVoucher(draw(ADDRESS), draw(ADDRESS), draw(st.integers(0, 2**256 - 1)),
                                    draw(st.integers(0, 2**70)), draw(st.integers(0, 2**255)),
                                    draw(st.binary(min_size=65, max_size=65)))
        proof = PayerSignature(draw(st.integers(0, 2**40)), draw(st.binary(min_size=65, max_size=65))) \
            if draw(st.booleans()) else None
        reservation = SignedReservation(draw(st.integers(0, 2**256 - 1)), draw(st.binary(min_size=65, max_size=65))) \
            if draw(st.booleans()) else None
        fields["payment"] = Payment(draw(ADDRESS), draw(st.integers(0, 2**64 - 1)), voucher, proof, reservation)
    return cls(hidden, **fields)


def same_request(a: SpanRequest, b: SpanRequest) -> bool:
    for name in ("hidden", "grad_output", "position_ids", "attention_mask", "prompts", "lora"):
        if not tensors_equal(getattr(a, name), getattr(b, name)):
            return False
    scalars = ("start", "end", "lora_spec", "adapter", "payment", "max_length", "reorder", "codec", "by_push")
    return all(getattr(a, n, None) == getattr(b, n, None) for n in scalars) and type(a) is type(b)


@SETTINGS
@given(st.data())
def test_requests_round_trip(data):
    cls, opening = data.draw(st.sampled_from([(SpanRequest, True), (BackwardRequest, True), (InferenceStep, True),
                                              (InferenceStep, False)]))
    request = data.draw(span_requests(cls, opening))
    parsed = cls.parse(ExpertRequest.FromString(request.pack().SerializeToString()), BOUNDS, opening=opening)
    assert same_request(request, parsed)


@SETTINGS
@given(st.data())
def test_replies_round_trip(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    shapes = data.draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 8)), min_size=1,
                                max_size=3))
    outputs = [torch.randn(*shape).to(dtype) for shape in shapes]
    attestation = st.builds(Attestation, ADDRESS, st.integers(0, 100), st.integers(1, 100), st.binary(min_size=32,
                            max_size=32), st.binary(min_size=32, max_size=32), st.sampled_from(["float32", "bfloat16"]),
                            st.sampled_from(["float32", "bfloat16"]), st.just(b"") | st.binary(min_size=65, max_size=65))
    receipt = st.builds(Receipt, ADDRESS, ADDRESS, st.integers(0, 2**64 - 1), st.integers(0, 2**40),
                        st.integers(0, 2**40), st.just(b"") | st.binary(min_size=65, max_size=65))
    reply = SpanReply(outputs, data.draw(st.none() | st.integers(1, 1000)), data.draw(st.none() | attestation),
                      data.draw(st.none() | receipt))
    message = ExpertResponse.FromString(reply.pack().SerializeToString())
    parsed = SpanReply.parse(message, [(tuple(s), dtype) for s in shapes])
    assert all(tensors_equal(a, b) for a, b in zip(outputs, parsed.outputs))
    assert (parsed.length, parsed.attestation, parsed.receipt) == (reply.length, reply.attestation, reply.receipt)
    with pytest.raises(InvalidReply):  # any other shape or dtype than expected is the server's failure
        SpanReply.parse(message, [(tuple(s), torch.float64 if i == 0 else dtype) for i, s in enumerate(shapes)])

    code = data.draw(st.sampled_from(list(ErrorCode)))
    text = data.draw(st.text(max_size=50))
    with pytest.raises(RemoteError) as error:
        SpanReply.parse(ErrorReply(code, text).pack(), [])
    assert (error.value.code, error.value.message) == (code, text)

    payment = Payment(data.draw(ADDRESS), data.draw(st.integers(0, 2**64 - 1)))
    assert PayRequest.parse(PayRequest(payment).pack()) == PayRequest(payment)


proto_tensors = st.builds(runtime_pb2.Tensor, buffer=st.binary(max_size=256),
                          size=st.lists(st.integers(0, 2**32 - 1), max_size=6),
                          dtype=st.sampled_from(["float32", "bfloat16", "float16", "int64", "object", "", "float64"]),
                          compression=st.sampled_from([0, 1, 2]))
msgpack_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=10)
                              | st.binary(max_size=10), lambda children: st.lists(children, max_size=4)
                              | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)
metadata = st.one_of(st.binary(max_size=200), st.dictionaries(
    st.sampled_from(["tensors", "dtype", "start", "end", "max_length", "reorder", "payment", "lora_spec", "adapter",
                     "compression", "push", "accept", "route_id", "position", "compact", "other"]), msgpack_values,
    max_size=8).map(
    lambda d: __import__("msgpack").packb(d, use_bin_type=True)))


@SETTINGS
@given(st.lists(proto_tensors, max_size=4), metadata, st.sampled_from([SpanRequest, BackwardRequest, InferenceStep]),
       st.booleans())
def test_garbage_requests_get_a_coded_error(tensors, meta, cls, opening):
    try:
        cls.parse(ExpertRequest(tensors=tensors, metadata=meta), BOUNDS, opening=opening)
    except WireError as e:
        assert isinstance(e.code, ErrorCode) and e.message


@SETTINGS
@given(st.binary(max_size=300))
def test_garbage_bytes_get_a_coded_error(data):
    for message_type in (ExpertRequest, ExpertResponse):
        try:
            message = message_type.FromString(data)
        except Exception:
            message = None  # not even a protobuf: the framing layer answers that (below)
        if message is not None and message_type is ExpertRequest:
            try:
                SpanRequest.parse(message, BOUNDS)
            except WireError:
                pass
        elif message is not None:
            try:
                SpanReply.parse(message, [((1, 1, HIDDEN), torch.float32)])
            except (InvalidReply, RemoteError):
                pass

    async def read():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        try:
            return await read_frame(reader, ExpertRequest, 1 << 16, deadline=1.0)
        except WireError as e:
            return e.code
        except asyncio.IncompleteReadError:
            return "truncated"
    asyncio.run(read())


def test_wire_dtypes_never_squeeze_through_float16():
    assert wire_dtype(torch.float32) == torch.bfloat16
    assert wire_dtype(torch.float32, exact=True) == torch.float32
    assert wire_dtype(torch.bfloat16) == torch.bfloat16 and wire_dtype(torch.float16) == torch.float16
    big = torch.full((1, 1, HIDDEN), 1e6, dtype=torch.bfloat16)
    parsed = SpanRequest.parse(SpanRequest(big, 2, 3).pack(), BOUNDS)
    assert torch.equal(parsed.hidden, big) and parsed.hidden.dtype == torch.bfloat16


def test_failover_follows_the_error_codes():
    for code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.PAYMENT_REQUIRED):
        assert judge(RemoteError(code, "")) is Verdict.RAISE
    for code in (ErrorCode.SERVER_FULL, ErrorCode.QUOTA_EXCEEDED, ErrorCode.SHUTTING_DOWN):
        assert judge(RemoteError(code, "")) is Verdict.SKIP
    for code in (ErrorCode.SESSION_EXPIRED, ErrorCode.LORA_NOT_CACHED):
        assert judge(RemoteError(code, "")) is Verdict.RETRY
    for error in (RemoteError(ErrorCode.INTERNAL, ""), RemoteError(ErrorCode.DEADLINE, ""), InvalidReply("NaN"),
                  ServerFailure("closed"), TimeoutError(), ConnectionRefusedError()):
        assert judge(error) is Verdict.BAN
    assert judge(TypeError("a bug here")) is Verdict.RAISE  # never blamed on a server


def test_bans_stay_bounded_after_any_number_of_failures():
    clock = [0.0]
    bans = BanList(base_seconds=5, max_seconds=600, clock=lambda: clock[0])
    seconds = [bans.ban("peer") for _ in range(5000)]  # 2 ** 5000 would overflow a float
    assert seconds[:3] == [5, 10, 20] and max(seconds) == 600
    clock[0] = 601
    assert not bans.is_banned("peer")


# ------------------------------------------------------------------ compact frames (swarm.wire.compact)
@SETTINGS
@given(st.data())
def test_compact_steps_pushes_and_replies_round_trip(data):
    from swarm.wire.compact import pack_reply, pack_step, parse_reply, parse_step, reply_from_push
    from swarm.wire.requests import PushStep
    dtype = data.draw(st.sampled_from(DTYPES))
    batch, length = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 8))
    hidden = (torch.randn(batch, length, HIDDEN) * 1e3).to(dtype)
    position = data.draw(st.integers(0, 32))
    push = data.draw(st.booleans())
    route = data.draw(st.from_regex(r"[0-9a-f]{32}", fullmatch=True))
    proof = data.draw(st.none() | st.binary(min_size=48, max_size=48)) if push else None
    step = PushStep(hidden, position=position, route_id=route, push_proof=proof) if push else \
        InferenceStep(hidden, position=position)
    parsed = parse_step(pack_step(step), BOUNDS, push=push)
    assert type(parsed) is type(step) and tensors_equal(parsed.hidden, hidden) and parsed.position == position
    assert parsed.route_id == (route if push else None) and parsed.push_proof == proof
    full = type(step).parse(ExpertRequest.FromString(step.pack().SerializeToString()), BOUNDS, opening=False)
    # a push answered from either format matches the client's copy
    assert parsed.digest() == full.digest() == step.digest() and full.push_proof == proof
    with pytest.raises(WireError):  # a step where a push belongs, and the other way round
        parse_step(pack_step(step), BOUNDS, push=not push)

    digest = data.draw(st.none() | st.from_regex(r"[0-9a-f]{64}", fullmatch=True))
    reply = SpanReply([hidden], position + length, digest=digest, push_proof=proof)
    parsed = parse_reply(pack_reply(reply), [(tuple(hidden.shape), dtype)], "peer")
    assert tensors_equal(parsed.outputs[0], hidden) and (parsed.length, parsed.digest) == (reply.length, digest)
    assert parsed.push_proof == proof and reply_from_push(pack_reply(reply)) == (digest, proof)
    full = SpanReply.parse(ExpertResponse.FromString(reply.pack().SerializeToString()), [(tuple(hidden.shape), dtype)])
    assert (full.digest, full.push_proof) == (digest, proof)
    with pytest.raises(InvalidReply):  # any other shape or dtype than expected is the server's failure
        parse_reply(pack_reply(reply), [((batch, length + 1, HIDDEN), dtype)], "peer")
    with pytest.raises(InvalidReply):
        parse_reply(pack_reply(reply), [(tuple(hidden.shape), torch.float64)], "peer")


PEER = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@SETTINGS
@given(st.data())
def test_push_routes_round_trip_and_garbage_in_them_gets_a_coded_error(data):
    """The typed records nested in a step (Route, Accept) cross as they were built; any other value in their
    fields is refused with a code."""
    route = data.draw(st.sampled_from([Route.STOP, Route(PEER, "a" * 32), Route(PEER, "b" * 32, ("10.0.0.1:5",)),
                                       Route(PEER, "c" * 32, (), "[::1]:443"), Route(PEER, "e" * 32, key=b"k" * 16)]))
    accept = data.draw(st.sampled_from([Accept.STOP, Accept(PEER, "d" * 32)]))
    step = InferenceStep(torch.randn(1, 2, HIDDEN), 2, 4, max_length=8, position=0, push=route, accept=accept)
    parsed = InferenceStep.parse(step.pack(), BOUNDS)
    assert (parsed.push, parsed.accept) == (route, accept) and bool(parsed.push) == bool(route)

    field = data.draw(st.sampled_from(["to", "id", "direct", "relay", "key", "other"]))
    garbage = data.draw(msgpack_values)
    record = {**Route(PEER, "a" * 32).to_wire(), field: garbage}
    try:
        parsed = Route.from_wire(record)
    except WireError as e:
        assert e.code == ErrorCode.BAD_REQUEST and e.message
    else:  # only a value that is itself valid gets through
        value = parsed.to_wire()[field]
        assert field != "other"
        assert value == garbage or (field == "direct" and value == list(garbage)) or \
            (field == "relay" and garbage in (None, "") and value == "")


@SETTINGS
@given(st.sampled_from(["payment", "payment.voucher", "payment.proof", "payment.reservation", "lora_spec"]),
       st.data())
def test_garbage_in_a_nested_record_of_a_request_gets_a_coded_error(where, data):
    """Payment, its voucher and proof, and the LoRA layout are typed records: any value in any of their fields
    that is not what the field holds is refused with a code, never a crash, never let through changed."""
    voucher = SignedVoucher("0x" + "1" * 40, "0x" + "2" * 40, 3, 4, 5, b"s" * 65)
    payment = Payment("0x" + "3" * 40, 7, voucher, PayerSignature(1_900_000_000, b"p" * 65),
                      SignedReservation(10**18, b"r" * 65))
    step = InferenceStep(torch.randn(1, 2, HIDDEN), 2, 4, max_length=8, payment=payment,
                         lora_spec=LoraSpec(["q_proj"], 2, 4.0, "ab" * 16))
    message = step.pack()
    meta = unpack_metadata(message.metadata)
    record = meta
    for key in where.split("."):
        record = record[key]
    field = data.draw(st.sampled_from(sorted(record) + ["other"]))
    record[field] = data.draw(msgpack_values)
    message.metadata = __import__("msgpack").packb(meta, use_bin_type=True)
    try:
        parsed = InferenceStep.parse(message, BOUNDS)
    except WireError as e:
        assert e.code == ErrorCode.BAD_REQUEST and e.message
    else:  # only a value the field holds got through (None: the field is absent), and it crosses unchanged
        assert field != "other"
        present = lambda d: {k: present(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}
        top = where.split(".")[0]
        assert present(unpack_metadata(parsed.pack().metadata)[top]) == present(meta[top])


@SETTINGS
@given(st.sampled_from(["attestation", "receipt"]), st.data())
def test_garbage_in_a_replys_signed_records_is_the_servers_failure(where, data):
    """A reply's attestation and receipt are read with bounds: garbage in any of their fields is an InvalidReply
    (a BadAttestation for the attestation: the client bans a priced server for good), never let through."""
    from swarm.wire.codes import BadAttestation
    attestation = Attestation("0x" + "1" * 40, 0, 4, b"i" * 32, b"o" * 32, signature=b"s" * 65)
    reply = SpanReply([torch.ones(1, 1, HIDDEN)], 3, attestation, Receipt("0x" + "2" * 40, "0x" + "1" * 40, 5, 4, 0))
    message = reply.pack()
    meta = unpack_metadata(message.metadata)
    field = data.draw(st.sampled_from(sorted(meta[where]) + ["other"]))
    meta[where][field] = data.draw(msgpack_values)
    message.metadata = __import__("msgpack").packb(meta, use_bin_type=True)
    try:
        parsed = SpanReply.parse(message, [((1, 1, HIDDEN), torch.float32)], "peer")
    except InvalidReply as e:
        assert isinstance(e, BadAttestation) == (where == "attestation")
    else:
        assert field != "other" and getattr(parsed, where).to_wire() == meta[where]


def test_a_field_added_to_a_step_goes_in_full_frames_never_dropped():
    """A newcomer adds a field to InferenceStep and forgets compact.py: the step goes as a full frame whenever the
    field is set (its value crosses), compact when it is not. Marking the field compact without teaching the layout
    to write it is refused outright."""
    import dataclasses
    from swarm.wire import compact
    from swarm.wire.fields import unpack_metadata
    from swarm.wire.requests import COMPACT

    @dataclasses.dataclass
    class WithHint(InferenceStep):
        temperature_hint: float | None = None

    hidden = torch.randn(1, 1, HIDDEN)
    assert compact.pack_step(WithHint(hidden, position=3)) is not None
    step = WithHint(hidden, position=3, temperature_hint=0.5)
    assert compact.pack_step(step) is None
    assert unpack_metadata(step.pack().metadata)["temperature_hint"] == 0.5
    with pytest.raises(WireError, match="temperature_hint"):  # a server that does not know it says so
        InferenceStep.parse(step.pack(), BOUNDS, opening=False)

    @dataclasses.dataclass
    class MarkedCompact(InferenceStep):
        temperature_hint: float | None = dataclasses.field(default=None, metadata={COMPACT: ("inference",)})

    with pytest.raises(RuntimeError, match="compact"):
        compact.check_layout(MarkedCompact)


def test_what_a_compact_frame_cannot_carry_goes_in_full():
    from swarm.wire.compact import pack_reply, pack_step
    from swarm.wire.requests import PushStep
    hidden = torch.randn(1, 1, HIDDEN)
    assert pack_step(InferenceStep(hidden, position=3)) is not None
    assert pack_step(PushStep(hidden, position=3, route_id="a" * 32)) is not None
    for fields in ({"start": 2, "end": 4, "max_length": 8}, {"position": None}, {"reorder": [0]}, {"push": Route.STOP},
                   {"accept": Accept.STOP}, {"compact": True}, {"max_length": 8}, {"end": 4},
                   {"position_ids": torch.zeros(1, 1, dtype=torch.long)}, {"attention_mask": torch.ones(1, 4)},
                   {"payment": Payment("0x" + "1" * 40, 1)}):
        assert pack_step(InferenceStep(hidden, **{"position": 3, **fields})) is None, fields
    assert pack_step(SpanRequest(hidden)) is None
    assert pack_reply(SpanReply([hidden], 4, attestation=Attestation("0x" + "1" * 40, 0, 4, b"i" * 32, b"o" * 32))) \
        is None
    assert pack_reply(SpanReply([hidden], 4, receipt=Receipt("0x" + "1" * 40, "0x" + "2" * 40, 1, 2, 0))) is None
    assert pack_reply(SpanReply([hidden, hidden], 4)) is None
    assert pack_reply(SpanReply([hidden], 4, compact=True)) is None  # the first step's reply says so in full


@SETTINGS
@given(st.binary(max_size=200), st.integers(0, 2), st.integers(0, 4), st.integers(0, 5), st.integers(0, 9),
       st.sampled_from([HIDDEN, HIDDEN - 1, 1 << 31]), st.integers(0, 2**64 - 1), st.sampled_from(["", "nan", "inf"]))
def test_garbage_compact_frames_get_a_coded_error(data, kind, code, batch, tokens, hidden, position, poison):
    from swarm.wire.compact import HEADER, parse_reply, parse_step
    frames = [data]
    body = torch.randn(batch, tokens, min(hidden, HIDDEN))
    poison = poison if body.numel() else ""
    if poison:
        body.view(-1)[0] = float(poison)
    if code < 3:
        body = body.to([torch.float32, torch.bfloat16, torch.float16][code])
    raw = (body.view(torch.int16) if body.dtype == torch.bfloat16 else body).numpy().tobytes()
    header = HEADER.pack(kind, code, batch, tokens, hidden, position, 0, b"")
    frames += [header + raw, header + raw[:-1], header[:-1]]
    for frame in frames:
        for push in (False, True):
            try:
                step = parse_step(frame, BOUNDS, push=push)
            except WireError as e:
                assert isinstance(e.code, ErrorCode) and e.message
            else:  # only a well-formed step of finite values gets through
                assert not poison and step.hidden.shape == (batch, tokens, HIDDEN)
                assert bool(step.hidden.isfinite().all())
        try:
            reply = parse_reply(frame, [((batch, tokens, HIDDEN), torch.float32)], "peer")
        except InvalidReply as e:
            assert str(e)
        else:
            assert not poison and reply.outputs[0].shape == (batch, tokens, HIDDEN)


def test_a_push_proof_blames_only_whom_it_proves_wrong():
    """swarm.wire.push_proof: the pusher by its own proof for the client's input; the receiver when the proof is
    not the pusher's for this step (forged, altered, or of another position); nobody for another input."""
    from swarm.wire.push_proof import Blame, judge, make, new_key
    key, route = new_key(), "ab" * 16
    ours, theirs, pushed, other = ("1" * 64), ("2" * 64), ("3" * 64), ("4" * 64)
    proof = make(key, route, 5, ours, pushed)
    assert judge(proof, key, route, 5, pushed, ours) is Blame.PUSHER  # it pushed that for what we sent it
    assert judge(proof, key, route, 5, other, ours) is Blame.RECEIVER  # a digest the pusher never proved
    assert judge(proof, key, route, 6, pushed, ours) is Blame.RECEIVER  # a proof of another position
    assert judge(proof, new_key(), route, 5, pushed, ours) is Blame.RECEIVER  # made without the pusher's key
    assert judge(None, key, route, 5, pushed, ours) is Blame.RECEIVER
    assert judge(proof[:-1] + bytes([proof[-1] ^ 1]), key, route, 5, pushed, ours) is Blame.RECEIVER
    assert judge(make(key, route, 5, theirs, pushed), key, route, 5, pushed, ours) is Blame.NOBODY  # stale input


def test_a_first_step_taken_by_push_carries_no_tokens_and_names_its_pusher():
    """A long prompt goes along a chain by push: each later server is opened with an empty step that says so."""
    accept = Accept("QmXRGLJvAmkoTffLkJZdQeH2fWk4pN1y5cYwQ8UNPVCLsb", "ab" * 16)
    empty = torch.empty(2, 0, HIDDEN, dtype=torch.bfloat16)
    opening = dict(start=2, end=4, max_length=16)
    step = InferenceStep.parse(InferenceStep(empty, **opening, by_push=12, accept=accept).pack(), BOUNDS)
    assert step.by_push == 12 and step.hidden.shape == (2, 0, HIDDEN) and step.accept == accept
    wrong = [InferenceStep(empty, **opening, by_push=12),  # from whom?
             InferenceStep(empty, **opening, accept=accept),  # no tokens, not by push
             InferenceStep(empty, **opening, by_push=17, accept=accept),  # more than max_length
             InferenceStep(empty, **opening, by_push=True, accept=accept),  # how many?
             InferenceStep(torch.ones(2, 3, HIDDEN, dtype=torch.bfloat16), **opening, by_push=12, accept=accept)]
    for request in wrong:
        with pytest.raises(WireError):
            InferenceStep.parse(request.pack(), BOUNDS)
    with pytest.raises(WireError):  # only a first step may
        InferenceStep.parse(InferenceStep(empty, by_push=12, accept=accept).pack(), BOUNDS, opening=False)
