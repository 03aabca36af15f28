"""A server's Prometheus metrics (`cocoon serve --metrics-port PORT`): tokens and block-tokens served,
requests by RPC and outcome code, step latency, open sessions, KV tokens reserved, vouchers accepted, wei
earned, evidence of wrong work published against this server, how its decode steps run, and the drafted
tokens of clients' verify steps (speculative decoding): proposed, and accepted (not rolled back)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens = Counter("cocoon_tokens", "Tokens processed (batch x tokens of each request)", ["rpc"], registry=r)
        self.block_tokens = Counter("cocoon_block_tokens", "Tokens x blocks processed: the unit of pay", ["rpc"],
                                    registry=r)
        self.requests = Counter("cocoon_requests", "Requests answered, by RPC and outcome (ok or an error code)",
                                ["rpc", "code"], registry=r)
        self.latency = Histogram("cocoon_request_seconds", "Seconds from a request's arrival to its answer", ["rpc"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=r)
        self.sessions = Gauge("cocoon_open_sessions", "Inference sessions open", registry=r)
        self.kv_tokens = Gauge("cocoon_kv_tokens_reserved", "KV cache tokens reserved by open sessions", registry=r)
        self.vouchers = Counter("cocoon_vouchers_accepted", "Vouchers accepted from clients", registry=r)
        self.earned = Counter("cocoon_wei_earned", "Wei redeemed on chain", registry=r)
        self.evidence = Gauge("cocoon_evidence_against_server", "Published evidence of wrong work naming this server",
                              registry=r)
        self.decode_plan = Info("cocoon_decode_plan", "How decode steps run here, as measured at start-up "
                                "(shards.decode_paths): path, threads, wait policy, step_ms", registry=r)

        self.drafts = Gauge("cocoon_draft_tokens", "Drafted tokens in clients' verify steps (speculative decoding): "
                            "proposed, and accepted (those the client did not roll back)", ["outcome"], registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP in a thread; returns the port (0 takes a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port

    def track_sessions(self, sessions) -> None:
        """Read the session table whenever metrics are scraped."""
        self.sessions.set_function(lambda: len(sessions.sessions))
        self.kv_tokens.set_function(lambda: sessions.cache_tokens - sessions.tokens_left)

    def track_drafts(self, drafts: dict[str, int]) -> None:
        """Read the counts of swarm.server.session_steps whenever metrics are scraped."""
        self.drafts.labels("proposed").set_function(lambda: drafts["proposed"])
        self.drafts.labels("accepted").set_function(lambda: drafts["accepted"])
