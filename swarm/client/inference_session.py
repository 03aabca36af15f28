"""InferenceSession: one open stream per server of a chain, each holding a KV cache for this client."""
from __future__ import annotations

import logging

import torch

from routing import ChainLink
from swarm.client import loop
from swarm.client.messages import optional_inputs, read_output, span_request
from swarm.client.swarm_client import ServerStream, SwarmClient
from swarm.protocol import ServerFullError

logger = logging.getLogger(__name__)


class _ServerSession:
    def __init__(self, link: ChainLink, stream: ServerStream, max_length: int):
        self.link, self.stream, self.max_length = link, stream, max_length
        self.opened = False

    async def step(self, hidden: torch.Tensor, extra: dict, *, exact: bool, timeout: float) -> torch.Tensor:
        meta = {} if self.opened else {"start": self.link.start, "end": self.link.end, "max_length": self.max_length}
        response = await self.stream.request(span_request({"hidden": hidden, **extra}, meta, exact=exact), timeout)
        self.opened = True
        output, _ = read_output(response, hidden)
        return output


class InferenceSession:
    """Generation state across the swarm. Use as a context manager; ``step`` sends new tokens' hidden states."""

    def __init__(self, client: SwarmClient, *, max_length: int, exact: bool = False):
        self.client, self.max_length, self.exact = client, max_length, exact
        self.position = 0
        self._sessions: list[_ServerSession] = []
        self.closed = False

    @property
    def chain(self) -> list[ChainLink]:
        return [s.link for s in self._sessions]

    def step(self, hidden: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [batch, new_tokens, hidden_size] of the new tokens -> the last block's output for them."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, length = hidden.shape[:2]
        if self.position + length > self.max_length:
            raise ValueError(f"{self.position} + {length} tokens exceed the session's max_length {self.max_length}; "
                             f"open the session with a larger max_length")
        extra = optional_inputs(batch, self.position, length, attention_mask, position_ids)
        output = loop.run(self._step(hidden.detach(), extra))
        self.position += length
        return output

    async def _step(self, hidden: torch.Tensor, extra: dict) -> torch.Tensor:
        if not self._sessions:
            return await self._open(hidden, extra)
        for session in self._sessions:
            hidden = await session.step(hidden, extra, exact=self.exact, timeout=self.client.request_timeout)
        return hidden

    async def _open(self, hidden: torch.Tensor, extra: dict) -> torch.Tensor:
        """First step: open a session on each server of a chain; a full server is skipped for another."""
        full: set[str] = set()
        block = 0
        while block < self.client.num_blocks:
            link = self.client.make_chain(block, banned=full)[0]
            session = _ServerSession(link, await self.client.open_stream(link.peer_id, "inference"), self.max_length)
            try:
                output = await session.step(hidden, extra, exact=self.exact, timeout=self.client.request_timeout)
            except ServerFullError as e:
                logger.info(f"{link.peer_id} is full ({e}); trying another server for blocks {link.start}:{link.end}")
                session.stream.close()
                full.add(link.peer_id)
                continue
            self._sessions.append(session)
            hidden, block = output, link.end
        return hidden

    def close(self) -> None:
        if not self.closed:
            for session in self._sessions:
                loop.background_loop().call_soon_threadsafe(session.stream.close)
            self.closed = True

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
