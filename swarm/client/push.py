"""Server-to-server push, the client's side (the servers' side: swarm.server.push). The client tells each server of
its chain, on its own authenticated stream, whose pushes to take (``Accept``: the previous server, under a route
id the client picked for this session) and where to push its outputs (``Route``: the next server, once that one
has taken the route, and only if it reads compact frames, the layout pushes travel in). It still sends every
server its own copy of each step and checks every reply."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from routing import ChainLink
from swarm.wire import push_proof
from swarm.wire.payloads import Accept, Route
from swarm.wire.requests import InferenceStep


def new_route_id() -> str:
    return os.urandom(16).hex()


class PushingSession(Protocol):
    """What the client knows of its session on one server of the chain."""
    link: ChainLink
    route_id: str      # under which this session takes pushes
    route_key: bytes   # what its pusher proves its pushes with (swarm.wire.push_proof)
    pushing: Route     # what its server was last told: where to push
    accepting: Accept  # and whose pushes to take
    stream: object     # its ServerStream (``.compact``: the server reads compact frames)


@dataclass(frozen=True)
class PushOrigin:
    """What the client knows of the push a server may answer a step from: the session's route and its key, and
    the client's own step to the pusher at the same position."""
    route_id: str
    key: bytes
    pusher_step: InferenceStep

    def judge(self, position: int, pushed_digest: str, proof: bytes | None) -> push_proof.Blame:
        return push_proof.judge(proof, self.key, self.route_id, position, pushed_digest, self.pusher_step.digest())


def route_changes(session: PushingSession, previous: PushingSession | None, following: PushingSession | None,
                  next_addresses: dict) -> tuple[Route | None, Accept | None]:
    """What the server of ``session`` must be told about pushes, each None when nothing changed: take the previous
    server's pushes, and push to the following one once that one takes them (``next_addresses``: the keywords of
    a Route that say where the following server takes direct or relayed connections)."""
    accept = Accept(previous.link.peer_id, session.route_id) if previous is not None else Accept.STOP
    push = Route.STOP
    if following is not None and following.stream.compact and \
            following.accepting == Accept(session.link.peer_id, following.route_id):
        push = Route(following.link.peer_id, following.route_id, key=following.route_key, **next_addresses)
    return push if push != session.pushing else None, accept if accept != session.accepting else None
