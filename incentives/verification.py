"""Spot-checks: what a server attests, how two outputs are compared, and the evidence of a wrong one.

A priced server signs, for every response, the hashes of the span input it received and the output it
returned (``Attestation``). A client re-runs a sampled fraction of steps elsewhere; if the outputs differ
beyond the tolerance of the dtypes involved and a third server sides with the checker, the signed
attestation plus the inputs are ``Evidence`` that anyone holding the same blocks can re-check.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_keys import keys

# Relative error (Frobenius norm) two honest computations of the same span may differ by, by the
# coarsest dtype among the servers' weights and the wire. Measured differences between runs of the same
# weights are ~1e-6 (float32), ~1e-3 (float16), ~1e-2 (bfloat16); the bounds leave headroom so that an
# honest server is never flagged, while a perturbation of 1e-2 of the output's scale (float32) is caught.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 8e-2}


def tolerance(*dtypes: str) -> float:
    return max(TOLERANCE.get(d, TOLERANCE["bfloat16"]) for d in dtypes)


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
class Attestation:
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

    def _message(self):
        return encode_defunct(text=f"cocoon-attestation:{self.server.lower()}:{self.start}:{self.end}:"
                                   f"{self.input_hash.hex()}:{self.output_hash.hex()}:{self.dtype}:{self.wire_dtype}")

    def signed(self, private_key) -> "Attestation":
        # a server signs one of these per response: the parsed key is cached (parsing derives the public key)
        signature = bytes(Account.sign_message(self._message(), _private_key(bytes(private_key))).signature)
        return dataclasses.replace(self, signature=signature)

    @property
    def tolerance(self) -> float:
        return tolerance(self.dtype, self.wire_dtype)

    def valid(self) -> bool:
        try:
            return Account.recover_message(self._message(), signature=self.signature).lower() == self.server.lower()
        except Exception:
            return False

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, record: dict) -> "Attestation":
        try:
            return cls(**record)
        except TypeError as e:
            raise ValueError(f"malformed attestation: {e}") from None


@functools.lru_cache(maxsize=8)
def _private_key(key: bytes) -> keys.PrivateKey:
    return keys.PrivateKey(key)


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

    def recheck(self, honest_output_of_last_step: np.ndarray) -> bool:
        """True when the claim stands proven wrong: consistent, and beyond the tolerance of the dtypes the
        server attested from an honest output of the same blocks (computed in float32)."""
        return (self.consistent() and relative_error(self.claimed_output(), honest_output_of_last_step)
                > self.attestation.tolerance)

    def to_wire(self) -> dict:
        record = asdict(self)
        record["attestation"] = self.attestation.to_wire()
        record["shapes"] = [list(s) for s in self.shapes]
        return record

    @classmethod
    def from_wire(cls, record: dict) -> "Evidence":
        try:
            record = dict(record)
            record["attestation"] = Attestation.from_wire(record["attestation"])
            record["shapes"] = [tuple(s) for s in record["shapes"]]
            return cls(**record)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed evidence: {e}") from None
