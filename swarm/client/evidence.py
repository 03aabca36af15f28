"""Evidence of wrong work, kept and re-checked: the client that convicts a server saves the evidence (in the
cache directory and in the DHT); anyone with their own copy of the blocks re-checks it with `cocoon verify`.
incentives.verification says what evidence is and checks its signatures; this module runs the blocks."""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch

from incentives.verification import MEASURABLE, Evidence, relative_error


def evidence_dir() -> Path:
    return Path(os.environ.get("COCOON_CACHE_DIR", Path.home() / ".cache" / "cocoon")) / "evidence"


def save_evidence(evidence: Evidence) -> Path:
    path = evidence_dir() / f"{evidence.digest.hex()}.msgpack"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgpack.packb(evidence.to_wire(), use_bin_type=True))
    return path


def load_evidence(path: str | os.PathLike) -> Evidence:
    try:
        return Evidence.from_wire(msgpack.unpackb(Path(path).read_bytes(), raw=False))
    except (OSError, ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"{path} is not a cocoon evidence file: {e}") from None


class LocalBlocks:
    """Our own copy of a checkpoint's blocks (when its files are on this machine), run on the CPU: in float32, the
    recomputation a checker trusts most, and in a server's dtype, to measure how far honest rounding goes.

    Spans stay loaded, the least recently used let go beyond ``max_bytes``: a client spot-checks the same few
    spans of its chain at every checked step, and loading a span's weights costs far more than running it."""

    MAX_BYTES = 2 * 2**30

    def __init__(self, checkpoint, max_bytes: int = MAX_BYTES):
        self.checkpoint, self.max_bytes = checkpoint, max_bytes
        self._spans: OrderedDict[tuple[int, int, str], torch.nn.Module] = OrderedDict()

    def has(self, start: int, end: int) -> bool:
        from shards import get_family
        prefix = get_family(self.checkpoint.config).layer_prefix
        names = [n for b in range(start, end) for n in self.checkpoint.names_with_prefix(prefix.format(b))]
        return bool(names) and self.checkpoint.files_are_local(names)

    def output(self, start: int, end: int, inputs: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
        with torch.inference_mode():
            return self._span(start, end, dtype)(inputs.to(getattr(torch, dtype))).float()

    def _span(self, start: int, end: int, dtype: str) -> torch.nn.Module:
        from shards import BlockSpan
        key = (start, end, dtype)
        if key in self._spans:
            self._spans.move_to_end(key)
            return self._spans[key]
        span = self._spans[key] = BlockSpan.from_pretrained(self.checkpoint, start, end, dtype=dtype, device="cpu")
        while len(self._spans) > 1 and sum(s.parameters_bytes() for s in self._spans.values()) > self.max_bytes:
            self._spans.popitem(last=False)
        return span

    def honest(self, start: int, end: int, inputs: torch.Tensor, dtype: str, wire: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the span in float32, the span in ``dtype``, or None where that dtype cannot run here), every
        position of ``inputs``, rounded to the wire dtype."""
        reference = self.output(start, end, inputs).to(wire).float()
        if dtype == "float32":
            return reference, reference
        if dtype not in MEASURABLE:
            return reference, None
        return reference, self.output(start, end, inputs, dtype).to(wire).float()


@dataclass
class Recheck:
    consistent: bool      # the attestation is the server's and names exactly these inputs and this output
    error: float          # relative error of the claimed output against ours
    tolerance: float      # what honest rounding in the attested dtypes allows, measured here on these inputs
    proven_wrong: bool


def recheck(evidence: Evidence, checkpoint) -> Recheck:
    """Run the blocks of the evidence on its inputs with our own copy of them, in float32 and in the attested
    dtype (CPU)."""
    attestation = evidence.attestation
    if not evidence.consistent():
        return Recheck(False, float("nan"), attestation.tolerance, False)
    inputs = torch.from_numpy(evidence.inputs().copy())
    reference, same_dtype = LocalBlocks(checkpoint).honest(attestation.start, attestation.end, inputs,
                                                           attestation.dtype, getattr(torch, attestation.wire_dtype))
    reference = reference.numpy()
    tolerance = evidence.tolerance(reference, None if same_dtype is None else same_dtype.numpy())
    claimed = evidence.claimed_output()
    error = relative_error(claimed, reference[:, -claimed.shape[1]:])
    return Recheck(True, error, tolerance, error > tolerance)
