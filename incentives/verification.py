"""Spot-checks: what a server attests, how two outputs are compared, and the evidence of a wrong one.

A priced server signs, for every response, the hashes of the span input it received and the output it
returned (``Attestation``). A client re-runs a sampled fraction of steps elsewhere; if the outputs differ
beyond the tolerance of the dtypes involved and a third server sides with the checker, the signed
attestation plus the inputs are ``Evidence`` that anyone holding the same blocks can re-check.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from incentives import fields
from incentives.eip712 import Typed, sign, signer_of

# Relative error (Frobenius norm) two honest computations of the same span may differ by when nobody measured
# it: the bound between two servers, by the coarsest dtype among their weights and the wire. 8-bit and 4-bit
# weights (bitsandbytes, CUDA only) cannot be recomputed on a CPU, so their bounds are never measured.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2, "int8": 1e-1, "nf4": 2e-1}
# What a checker that holds the blocks allows instead: HEADROOM times the largest relative error of any position
# when it runs the span in the server's dtype itself, against float32 (both rounded to the wire dtype), plus one
# rounding to the wire dtype and a float32 floor. On real weights (bench/verification_deltas.py) honest bfloat16
# differs from float32 by 0.5e-2 to 7e-2 with the span, while scaling by 1.05 differs by 5e-2 on any span: no one
# bound serves every span, a measured one does. HEADROOM covers another device's rounding of the same dtype.
HEADROOM = 2.5
WIRE_ROUNDING = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}  # unit roundoff
FLOAT32_FLOOR = 1e-4
MEASURABLE = ("float32", "float16", "bfloat16")
MAX_BLOCKS = 2**16
MAX_EVIDENCE_STEPS = 4096
MAX_EVIDENCE_BYTES = 64 << 20  # a session's inputs, float32: what a re-check runs, and what the DHT will carry


def tolerance(*dtypes: str) -> float:
    return max(TOLERANCE.get(d, TOLERANCE["bfloat16"]) for d in dtypes)


def measured_tolerance(reference: np.ndarray, same_dtype: np.ndarray, wire: str) -> float:
    """The tolerance for a span's output computed in another dtype, from ``reference`` (the span in float32) and
    ``same_dtype`` (the span in that dtype), both [..., hidden] over every position and as the wire carried them."""
    reference = np.asarray(reference, np.float64).reshape(-1, np.shape(reference)[-1])
    same_dtype = np.asarray(same_dtype, np.float64).reshape(reference.shape)
    rows = np.linalg.norm(same_dtype - reference, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-30)
    honest = float(rows.max()) if rows.size else 0.0
    if not math.isfinite(honest):
        return TOLERANCE["bfloat16"]
    return HEADROOM * honest + WIRE_ROUNDING.get(wire, WIRE_ROUNDING["bfloat16"]) + FLOAT32_FLOOR


def relative_error(output: np.ndarray, reference: np.ndarray) -> float:
    output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
    if output.shape != reference.shape or not np.isfinite(output).all():
        return math.inf
    return float(np.linalg.norm(output - reference) / max(np.linalg.norm(reference), 1e-30))


def array_hash(array: np.ndarray) -> bytes:
    """SHA-256 of a tensor's float32 bytes and shape: what attestations and evidence name."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).digest()


def chain_hash(previous: bytes, array: np.ndarray) -> bytes:
    """Hash of a session's inputs so far: each step's input hash chained onto the previous value, so one
    attestation of an inference step names the whole history its output depends on."""
    return hashlib.sha256(previous + array_hash(array)).digest()


@dataclass(frozen=True)
class Attestation(Typed):
    """``server`` says: for blocks [start, end), computing in ``dtype``, input ``input_hash`` gave output
    ``output_hash``, sent in ``wire_dtype`` (the dtypes set the tolerance anyone re-checking it applies)."""
    server: str
    start: int
    end: int
    input_hash: bytes
    output_hash: bytes
    dtype: str = "float32"
    wire_dtype: str = "float32"
    signature: bytes = b""

    EIP712_NAME = "Attestation"
    EIP712_FIELDS = (("server", "address"), ("start", "uint256"), ("end", "uint256"), ("inputHash", "bytes32"),
                     ("outputHash", "bytes32"), ("dtype", "string"), ("wireDtype", "string"))

    def signed(self, private_key) -> "Attestation":
        return dataclasses.replace(self, signature=sign(self, private_key))

    @property
    def tolerance(self) -> float:
        return tolerance(self.dtype, self.wire_dtype)

    def valid(self) -> bool:
        try:
            return signer_of(self, self.signature).lower() == self.server.lower()
        except Exception:
            return False

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, record: Any) -> "Attestation":
        try:
            record = fields.fields_of(record, "attestation", {f.name for f in dataclasses.fields(cls)})
            return cls(fields.address(record, "server"), fields.uint(record, "start", MAX_BLOCKS),
                       fields.uint(record, "end", MAX_BLOCKS), fields.raw(record, "input_hash", 32),
                       fields.raw(record, "output_hash", 32), _dtype(record, "dtype", TOLERANCE),
                       _dtype(record, "wire_dtype", MEASURABLE),
                       fields.signature(record))
        except ValueError as e:
            raise ValueError(f"malformed attestation: {e}") from None


def _dtype(record: dict, key: str, allowed) -> str:
    value = fields.text(record, key, 16, default="float32")
    if value not in allowed:
        raise ValueError(f"{key} must be one of {sorted(allowed)}")
    return value


@dataclass(frozen=True)
class Evidence:
    """A server's signed claim, the inputs it was given, and what honest servers computed instead."""
    model_id: str
    peer_id: str
    attestation: Attestation
    steps: list[bytes]      # float32 bytes of each step's span input, in order (one step for a forward)
    shapes: list[tuple[int, ...]]
    claimed: bytes          # float32 bytes of the output the server returned for the last step
    reference_error: float  # relative error of the claimed output against the checkers' output

    @property
    def digest(self) -> bytes:
        """The evidence id that verdicts sign and the contract records (so it is used once)."""
        return hashlib.sha256(self.attestation.signature + self.attestation.input_hash +
                              self.attestation.output_hash + self.peer_id.encode()).digest()  # 32 bytes

    def inputs(self) -> np.ndarray:
        """All steps' inputs as one sequence [batch, tokens, hidden]: what a re-check runs as one forward."""
        arrays = [np.frombuffer(b, dtype=np.float32).reshape(s) for b, s in zip(self.steps, self.shapes)]
        return np.concatenate(arrays, axis=1)

    def claimed_output(self) -> np.ndarray:
        last = self.shapes[-1]
        return np.frombuffer(self.claimed, dtype=np.float32).reshape(last)

    def consistent(self) -> bool:
        """The attestation is the server's, and names exactly these inputs and this output."""
        digest = b""
        for b, s in zip(self.steps, self.shapes):
            digest = chain_hash(digest, np.frombuffer(b, dtype=np.float32).reshape(s))
        return (self.attestation.valid() and digest == self.attestation.input_hash
                and array_hash(self.claimed_output()) == self.attestation.output_hash)

    def tolerance(self, reference: np.ndarray, same_dtype: np.ndarray | None) -> float:
        """What an honest server may differ by on these inputs: measured from an honest recomputation of every
        position in float32 (``reference``) and in the attested dtype (``same_dtype``; the reference itself for
        float32), both as the attested wire dtype carries them; the attested dtypes' bound when not measured."""
        if same_dtype is None or self.attestation.dtype not in MEASURABLE:
            return self.attestation.tolerance
        return measured_tolerance(reference, same_dtype, self.attestation.wire_dtype)

    def recheck(self, reference: np.ndarray, same_dtype: np.ndarray | None = None) -> bool:
        """True when the claim stands proven wrong: consistent, and further from ``reference`` (an honest float32
        output of every position of ``inputs()``, as the wire carries it) than ``tolerance`` allows."""
        claimed = self.claimed_output()
        return (self.consistent() and relative_error(claimed, np.asarray(reference)[:, -claimed.shape[1]:])
                > self.tolerance(reference, same_dtype))

    def to_wire(self) -> dict:
        record = asdict(self)
        record["attestation"] = self.attestation.to_wire()
        record["shapes"] = [list(s) for s in self.shapes]
        return record

    @classmethod
    def from_wire(cls, record: Any) -> "Evidence":
        """Evidence from the DHT, which anyone may write: every field bounded, the steps' bytes matching their
        shapes, at most MAX_EVIDENCE_BYTES of inputs in all."""
        try:
            record = fields.fields_of(record, "evidence", {f.name for f in dataclasses.fields(cls)})
            steps, shapes = record.get("steps"), record.get("shapes")
            if not isinstance(steps, list) or not isinstance(shapes, list) or not 1 <= len(steps) == len(shapes) \
                    <= MAX_EVIDENCE_STEPS:
                raise ValueError(f"steps and shapes must be lists of 1 to {MAX_EVIDENCE_STEPS} entries, as many each")
            if not all(isinstance(b, bytes) for b in steps) or sum(map(len, steps)) > MAX_EVIDENCE_BYTES:
                raise ValueError(f"steps must be bytes, at most {MAX_EVIDENCE_BYTES} in all")
            shapes = [_shape(s) for s in shapes]
            if any(len(b) != 4 * math.prod(s) for b, s in zip(steps, shapes)):
                raise ValueError("a step's bytes do not hold float32 of its shape")
            claimed = fields.raw(record, "claimed", 4 * math.prod(shapes[-1]), max_length=MAX_EVIDENCE_BYTES)
            error = record.get("reference_error")
            if type(error) not in (int, float) or not error >= 0:
                raise ValueError("reference_error must be a number >= 0")
            return cls(fields.text(record, "model_id", 256), fields.text(record, "peer_id", 64),
                       Attestation.from_wire(record.get("attestation")), steps, shapes, claimed, float(error))
        except ValueError as e:
            raise ValueError(f"malformed evidence: {e}") from None


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != 3 or \
            not all(type(d) is int and 0 < d <= MAX_EVIDENCE_BYTES for d in value):
        raise ValueError("a shape must be [batch, tokens, hidden] of positive integers")
    return tuple(value)
