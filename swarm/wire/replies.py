"""Replies, as a server builds them and as a client checks them: ``SpanReply`` (forward, backward, inference),
``InfoReply``, ``PayReply``, and ``ErrorReply`` for any RPC. A client raises ``RemoteError`` for an error reply
and ``InvalidReply`` for a reply that breaks the contract (wrong shape, dtype, size, NaN): the latter is the
server's fault."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from hivemind.proto.runtime_pb2 import ExpertResponse

from routing.addresses import ROUTE_ID
from incentives.metering import Receipt
from incentives.verification import Attestation
from swarm.wire import push_proof
from swarm.wire.codes import BadAttestation, ErrorCode, InvalidReply, RemoteError, WireError
from swarm.wire.fields import MAX_METADATA_BYTES, MAX_STR_LEN, pack_metadata, read_int, read_map, read_str, short, \
    unpack_metadata
from swarm.wire.payloads import HASH
from swarm.wire.requests import COMPACT
from swarm.wire.tensors import all_finite, dtype_name, pack_tensor, unpack_tensor


def reply_metadata(message: ExpertResponse, peer_id: str | None) -> dict:
    """A reply's metadata, bounded; RemoteError when it is an error reply, InvalidReply when it is garbage."""
    try:
        meta = unpack_metadata(message.metadata)
    except WireError as e:
        raise InvalidReply(f"server {peer_id}: {e.message}") from None
    if "error" in meta:
        code, text = meta.get("error"), meta.get("message")
        try:
            code = ErrorCode(code)
        except ValueError:
            raise InvalidReply(f"server {peer_id} answered an error with unknown code {short(code)}") from None
        raise RemoteError(code, text if isinstance(text, str) else "", peer_id)
    return meta


@dataclass
class ErrorReply:
    code: ErrorCode
    message: str

    def pack(self) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata({"error": self.code.value, "message": self.message[:MAX_STR_LEN]}))


@dataclass
class SpanReply:
    """The span's output (forward, inference) or the gradients (backward), with the server's accounting."""
    outputs: list[torch.Tensor] = field(metadata={COMPACT: ("reply",)})
    length: int | None = field(default=None, metadata={COMPACT: ("reply",)})  # inference: the session's length now
    attestation: Attestation | None = None  # what a priced server signs of its input and output
    receipt: Receipt | None = None          # what a priced server counts of its work for this client
    # inference: set when computed from a pushed step (InferenceStep.digest)
    digest: str | None = field(default=None, metadata={COMPACT: ("reply",)})
    compact: bool | None = None       # inference, first step: the server takes steps in swarm.wire.compact's layout
    # inference, computed from a pushed step: the pusher's proof that came with it (swarm.wire.push_proof)
    push_proof: bytes | None = field(default=None, metadata={COMPACT: ("reply",)})

    def pack(self) -> ExpertResponse:
        meta = {k: v for k, v in (("length", self.length), ("digest", self.digest), ("compact", self.compact),
                                  ("push_proof", self.push_proof),
                                  ("attestation", self.attestation and self.attestation.to_wire()),
                                  ("receipt", self.receipt and self.receipt.to_wire())) if v is not None}
        return ExpertResponse(tensors=[pack_tensor(t) for t in self.outputs], metadata=pack_metadata(meta))

    @classmethod
    def parse(cls, message: ExpertResponse, expected: Sequence[tuple[tuple[int, ...], torch.dtype]],
              peer_id: str | None = None) -> "SpanReply":
        """Check a server's reply against the shapes and dtypes it must have; raises InvalidReply (or
        RemoteError for an error reply)."""
        meta = reply_metadata(message, peer_id)
        if len(message.tensors) != len(expected):
            raise InvalidReply(f"server {peer_id} returned {len(message.tensors)} tensors, expected {len(expected)}")
        outputs = []
        for i, (proto, (shape, dtype)) in enumerate(zip(message.tensors, expected)):
            try:
                tensor = unpack_tensor(proto, f"output {i}", math.prod(shape))
            except WireError as e:
                raise InvalidReply(f"server {peer_id}: {e.message}") from None
            if tuple(tensor.shape) != tuple(shape):
                raise InvalidReply(f"server {peer_id} returned shape {list(tensor.shape)}, expected {list(shape)}")
            if tensor.dtype != dtype:
                raise InvalidReply(f"server {peer_id} returned {dtype_name(tensor.dtype)}, expected {dtype_name(dtype)}")
            if not all_finite(tensor):
                raise InvalidReply(f"server {peer_id} returned NaN or inf")
            outputs.append(tensor)
        try:
            length = read_int(meta, "length", 1, 1 << 40, required=False)
            attestation, receipt = read_map(meta, "attestation"), read_map(meta, "receipt")
            return cls(outputs, length, _signed(Attestation, attestation, peer_id), _signed(Receipt, receipt, peer_id),
                       read_str(meta, "digest", HASH, required=False), meta.get("compact") is True,
                       push_proof.read(meta))
        except WireError as e:
            raise InvalidReply(f"server {peer_id}: {e.message}") from None

    @staticmethod
    def max_bytes(expected: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> int:
        """The largest frame a reply of these tensors can take (so a client buffers no more than that)."""
        return MAX_METADATA_BYTES + 1024 + sum(math.prod(shape) * dtype.itemsize + 64 for shape, dtype in expected)


def _signed(record_type, record: dict | None, peer_id: str | None):
    """A signed record of a reply, read with bounds; a garbage attestation is a BadAttestation."""
    if record is None:
        return None
    try:
        return record_type.from_wire(record)
    except ValueError as e:
        error = BadAttestation if record_type is Attestation else InvalidReply
        raise error(f"server {peer_id}: {e}") from None


@dataclass
class InfoReply:
    """What a server says about itself (its ServerInfo fields and a few more)."""
    info: dict

    def pack(self) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata(self.info))

    @classmethod
    def parse(cls, message: ExpertResponse, peer_id: str | None = None) -> "InfoReply":
        return cls(reply_metadata(message, peer_id))


@dataclass
class PayReply:
    accepted: bool = True

    def pack(self) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata({"accepted": self.accepted}))

    @classmethod
    def parse(cls, message: ExpertResponse, peer_id: str | None = None) -> "PayReply":
        meta = InfoReply.parse(message, peer_id).info
        return cls(meta.get("accepted") is True)


@dataclass
class PushRefusal:
    """A server's answer to a pushed step it will not take (a pushed step that is taken is answered to the client,
    never to the pusher): the route it came under, and why. The pusher stops pushing on that route."""
    route: str
    reason: str

    def pack(self) -> ExpertResponse:
        return ExpertResponse(metadata=pack_metadata({"route": self.route, "accepted": False,
                                                      "reason": self.reason[:MAX_STR_LEN]}))

    @classmethod
    def parse(cls, message: ExpertResponse, peer_id: str | None = None) -> "PushRefusal":
        meta = reply_metadata(message, peer_id)
        try:
            if meta.get("accepted") is not False:
                raise WireError(ErrorCode.BAD_REQUEST, "a push is answered only to refuse it ('accepted': false)")
            return cls(read_str(meta, "route", ROUTE_ID), read_str(meta, "reason"))
        except WireError as e:
            raise InvalidReply(f"server {peer_id}: {e.message}") from None
