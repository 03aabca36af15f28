"""Pure decisions over a swarm snapshot: no torch, no network."""
from routing.chain import ChainLink, NoChainError, make_chain
from routing.state import ServerInfo, ServerState, SwarmState

__all__ = ["ChainLink", "NoChainError", "make_chain", "ServerInfo", "ServerState", "SwarmState"]
