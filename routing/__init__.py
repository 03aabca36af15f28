"""Pure decisions over a swarm snapshot: no torch, no network."""
from routing.bans import BanList
from routing.chain import ChainLink, NoChainError, chain_seconds, make_chain
from routing.placement import choose_span, should_move, swarm_throughput
from routing.state import ServerInfo, ServerState, SwarmState

__all__ = ["BanList", "ChainLink", "NoChainError", "chain_seconds", "make_chain", "choose_span", "should_move",
           "swarm_throughput", "ServerInfo", "ServerState", "SwarmState"]
