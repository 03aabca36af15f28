"""How peers reach each other beyond hivemind's p2p daemon: direct TLS connections (direct), relays for servers
behind NAT (relay), the event loop every process runs (event_loop), and network namespaces for tests and
benchmarks (netns, testbed, nfqueue)."""
