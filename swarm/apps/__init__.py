"""What people run: the `cocoon` command and its subcommands, the HTTP API, the monitor, the demo, and the
local swarm of real processes that the demo, the tests and the benches start."""
