"""What a server allows: ``Limits`` on one request, ``Quotas`` on one peer. One peer exhausts its own share,
not the server. (Peer ids cost nothing to make: quotas stop one greedy or broken client, not a crowd of
identities; a priced server also charges for every unit of work.) Plain numbers: no torch here."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a server."""
    max_batch: int = field(default=32, metadata={"help": "sequences in one request"})
    max_tokens_per_request: int = field(default=8192, metadata={"help": "batch x new tokens in one request"})
    max_length: int = field(default=4096, metadata={"help": "longest session this server accepts, in tokens"})
    max_lora_rank: int = field(default=64, metadata={"help": "largest LoRA rank a client may send"})

    def max_numel(self, hidden_size: int) -> int:
        return max(self.max_tokens_per_request * hidden_size, self.max_batch * self.max_length)

    def max_message_bytes(self, hidden_size: int) -> int:
        return 2 * 4 * self.max_numel(hidden_size) + (1 << 20)  # backward carries two float32 tensors


@dataclass(frozen=True)
class Quotas:
    max_streams_per_peer: int = field(default=128, metadata={"help": "open streams of one peer, all RPCs"})
    max_inflight_mb_per_peer: float = field(default=0.0, metadata={
        "help": "MiB of one peer's frames being received or served (0: twice the largest message)"})
    max_sessions_per_peer: int = field(default=32, metadata={
        "help": "inference sessions of one peer (an HTTP front serving 16 streams needs 16)"})
    max_queued_per_peer: int = field(default=32, metadata={"help": "requests of one peer waiting for compute"})
    frame_deadline: float = field(default=30.0, metadata={
        "help": "seconds a frame may take to arrive once its first byte has"})
    rollback_factor: float = field(default=8.0, metadata={
        "help": "positions a session may roll back (speculative decoding recomputes them), as a multiple of its "
                "max_length: a client that rolls back without end is refused"})
    prefill_chunk_ms: float = field(default=25.0, metadata={
        "help": "a long prefill or forward runs in chunks of about this much compute, so that other peers' "
                "decode steps go between them (they wait for at most one chunk)"})
