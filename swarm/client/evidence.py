"""Evidence of wrong work, kept and re-checked: the client that convicts a server saves the evidence (in the
cache directory and in the DHT); anyone with their own copy of the blocks re-checks it with `cocoon verify`.
incentives.verification says what evidence is and checks its signatures; this module runs the blocks."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
import torch

from incentives.verification import Evidence, relative_error


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


@dataclass
class Recheck:
    consistent: bool      # the attestation is the server's and names exactly these inputs and this output
    error: float          # relative error of the claimed output against ours
    tolerance: float      # what the dtypes the server attested allow
    proven_wrong: bool


def recheck(evidence: Evidence, checkpoint) -> Recheck:
    """Run the blocks of the evidence on its inputs with our own copy of them (float32, CPU)."""
    from shards import BlockSpan
    attestation = evidence.attestation
    if not evidence.consistent():
        return Recheck(False, float("nan"), attestation.tolerance, False)
    span = BlockSpan.from_pretrained(checkpoint, attestation.start, attestation.end, dtype="float32", device="cpu")
    with torch.inference_mode():
        output = span(torch.from_numpy(evidence.inputs().copy()))
    last = evidence.shapes[-1][1]
    honest = output[:, -last:].to(getattr(torch, attestation.wire_dtype)).float().numpy()
    error = relative_error(evidence.claimed_output(), honest)
    return Recheck(True, error, attestation.tolerance, evidence.recheck(honest))
