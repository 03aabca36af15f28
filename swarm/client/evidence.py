"""Evidence of wrong work, kept and re-checked: the client that convicts a server saves the evidence (in the
cache directory and in the DHT); anyone with their own copy of the blocks re-checks it with `cocoon verify`.
incentives.verification says what evidence is and checks its signatures; this module runs the blocks."""
from __future__ import annotations

import os
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
    recomputation a checker trusts most, and in a server's dtype, to measure how far honest rounding goes."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        self._blocks: tuple[int, int] | None = None
        self._spans: dict[str, object] = {}

    def has(self, start: int, end: int) -> bool:
        from shards import get_family
        prefix = get_family(self.checkpoint.config).layer_prefix
        names = [n for b in range(start, end) for n in self.checkpoint.names_with_prefix(prefix.format(b))]
        return bool(names) and self.checkpoint.files_are_local(names)

    def output(self, start: int, end: int, inputs: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
        from shards import BlockSpan
        if self._blocks != (start, end):
            self._blocks, self._spans = (start, end), {}  # one span at a time in memory
        if dtype not in self._spans:
            self._spans[dtype] = BlockSpan.from_pretrained(self.checkpoint, start, end, dtype=dtype, device="cpu")
        with torch.inference_mode():
            return self._spans[dtype](inputs.to(getattr(torch, dtype))).float()

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
