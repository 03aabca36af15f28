"""`cocoon monitor`: a page of the swarm for the people who run it (FastAPI + uvicorn).

    GET /               the page (swarm.apps.monitor_page): per model, its name as servers announce it, totals, which
                        servers hold which blocks (state, reachability, throughput, sessions, KV cache left,
                        adapters, price), holders per block, gaps marked, servers that left with when they were last
                        seen, recent spot-check evidence, and charts of the last hour; it refreshes itself
    GET /api/v1/state   the same as JSON
    GET /metrics        the same as Prometheus text
    GET /health         200 while the swarm was read recently, 503 otherwise

Models are found in the DHT's model index (every server announces its model there, signed like its block
records); the monitor reads the swarm every few seconds in a thread of its own and keeps an hour of history.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Sequence

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from swarm.dht.records import fetch_evidence, fetch_models, fetch_swarm_state
from swarm.apps.monitor_page import PAGE

HISTORY_SECONDS = 3600
DEPARTED_SECONDS = 3600  # how long a server that left stays listed
HISTORY_POINTS = 360  # at most one point every 10 s over the hour
# the model index is anyone's to write: a reader caps what it reads there, and trusts the servers' block records
MAX_MODELS = 32
MAX_BLOCKS = 1024
READ_SECONDS = 10.0  # one model's read, at most: a slow read keeps the last state and says so


class SwarmWatch:
    """The latest state of every model in the swarm, read in the background, with an hour of history."""

    def __init__(self, dht, period: float = 3.0, models: Sequence[tuple[str, int]] = ()):
        self.dht, self.period, self.extra_models = dht, period, list(models)
        self.state: dict = {"models": [], "updated": None, "history": []}
        self.history: deque = deque()
        self.seen: dict[tuple[str, str], dict] = {}  # (model id, peer id) -> its latest record, with "last_seen"
        self.known_blocks: dict[str, int] = {}  # model id -> its block count, as its servers' records say
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarm-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.state = self.read()
            except Exception as e:  # a DHT hiccup: keep the last state, say so
                self.state = {**self.state, "error": f"{type(e).__name__}: {e}"}
            self._stop.wait(self.period)

    def read(self) -> dict:
        models = dict(self.extra_models)
        models.update(fetch_models(self.dht))
        now = time.time()
        read = [self._model(model_id, min(blocks, MAX_BLOCKS), now)
                for model_id, blocks in sorted(models.items())[:MAX_MODELS]]
        # a model in the index that no signed server record backs is shown only while servers it had are remembered
        read = [model for model in read if model["servers"] or model["departed"] or
                model["model_id"] in dict(self.extra_models)]
        self._remember(now, read)
        return {"updated": now, "models": read, "history": list(self.history),
                "totals": {"servers_online": sum(m["totals"]["servers_online"] for m in read),
                           "tokens_per_s": sum(m["totals"]["tokens_per_s"] for m in read)}}

    def _model(self, model_id: str, num_blocks: int, now: float) -> dict:
        # the servers' own signed records say how many blocks the model has (the index is only a first guess)
        num_blocks = self.known_blocks.get(model_id, num_blocks)
        state = fetch_swarm_state(self.dht, model_id, num_blocks, READ_SECONDS)
        if state.servers:
            self.known_blocks[model_id] = min(max(info.end for info in state.servers.values()), MAX_BLOCKS)
            if self.known_blocks[model_id] != num_blocks:
                num_blocks = self.known_blocks[model_id]
                state = fetch_swarm_state(self.dht, model_id, num_blocks, READ_SECONDS)
        servers = [{"peer_id": peer, **info.to_wire(), "reachability": _reachability(info)} for peer, info in
                   sorted(state.servers.items(), key=lambda item: (item[1].start, item[1].public_name, item[0]))]
        online = [s for s in servers if s["state"] == "online"]
        holders = [sum(s["start"] <= b < s["end"] for s in online) for b in range(num_blocks)]
        per_block = [sum(s["throughput"] for s in online if s["start"] <= b < s["end"]) for b in range(num_blocks)]
        for server in servers:
            self.seen[(model_id, server["peer_id"])] = {**server, "last_seen": now}
        current = {s["peer_id"] for s in servers}
        departed = sorted((record for (mid, peer), record in self.seen.items() if mid == model_id and
                           peer not in current and now - record["last_seen"] < DEPARTED_SECONDS),
                          key=lambda record: -record["last_seen"])
        names = state.model_names()
        return {"model_id": model_id, "name": names[0] if names else "",
                "names_disagree": len(names) > 1, "num_blocks": num_blocks, "servers": servers,
                "departed": departed, "holders": holders, "missing_blocks": state.missing_blocks(),
                "evidence": self._evidence(model_id),
                # a chain through the swarm runs at most as fast as its slowest block's servers together
                "totals": {"servers_online": len(online), "servers": len(servers),
                           "sessions": sum(s["sessions"] for s in online),
                           "tokens_per_s": min(per_block) if per_block else 0.0}}

    def _remember(self, now: float, models: list[dict]) -> None:
        if self.history and now - self.history[-1]["time"] < HISTORY_SECONDS / HISTORY_POINTS:
            self.history.pop()  # one point per interval: the latest reading stands for it
        self.history.append({"time": now, "servers_online": sum(m["totals"]["servers_online"] for m in models),
                             "tokens_per_s": round(sum(m["totals"]["tokens_per_s"] for m in models), 2)})
        while self.history and now - self.history[0]["time"] > HISTORY_SECONDS:
            self.history.popleft()
        for key in [k for k, record in self.seen.items() if now - record["last_seen"] > DEPARTED_SECONDS]:
            del self.seen[key]

    def _evidence(self, model_id: str) -> list[dict]:
        """Only evidence that its server's own signature makes evidence (anyone may write these records), with
        every field checked: one bad record must not break the page or the JSON."""
        records = []
        for digest, evidence, expires in fetch_evidence(self.dht, model_id):
            record = _shown_evidence(digest, evidence, expires)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda r: -r["expires"])[:20]

    def healthy(self) -> bool:
        updated = self.state.get("updated")
        return updated is not None and time.time() - updated < max(5 * self.period, 30.0)

    def close(self) -> None:
        self._stop.set()


def _shown_evidence(digest: str, evidence, expires) -> dict | None:
    if isinstance(evidence, str):
        return None
    attestation, error = evidence.attestation, evidence.reference_error
    try:
        signed = evidence.consistent()  # the attestation verifies against the payout key it names
    except Exception:  # shapes that do not fit the bytes, and the like
        return None
    fields_ok = (isinstance(evidence.peer_id, str) and len(evidence.peer_id) <= 64 and
                 type(error) in (int, float) and math.isfinite(error) and type(expires) in (int, float) and
                 math.isfinite(expires) and type(attestation.start) is int and type(attestation.end) is int)
    if not (signed and fields_ok):
        return None
    return {"digest": str(digest)[:80], "peer_id": evidence.peer_id, "payout": str(attestation.server)[:42],
            "blocks": [attestation.start, attestation.end], "relative_error": float(error), "expires": float(expires)}


def _reachability(info) -> str:
    """How clients reach a server: its own direct address, a relay of the swarm, or only hivemind's p2p daemons."""
    return "direct" if info.direct else "relayed" if info.relay else "p2p only"


def prometheus_text(state: dict) -> str:
    """The state as Prometheus text exposition (prometheus_client escapes the labels: names come from strangers)."""
    servers = GaugeMetricFamily("cocoon_servers", "Servers of a model by state.", labels=["model", "state"])
    missing = GaugeMetricFamily("cocoon_missing_blocks", "Blocks of a model that no online server holds.",
                                labels=["model"])
    evidence = GaugeMetricFamily("cocoon_evidence", "Published evidence of wrong work.", labels=["model"])
    labels = ["model", "peer", "name"]
    throughput = GaugeMetricFamily("cocoon_server_throughput", "Tokens per second a server announces for its span.",
                                   labels=labels)
    sessions = GaugeMetricFamily("cocoon_server_sessions", "Inference sessions open on a server.", labels=labels)
    for model in state.get("models", []):
        mid = model["model_id"]
        for status in ("online", "joining", "offline"):
            servers.add_metric([mid, status], sum(s["state"] == status for s in model["servers"]))
        missing.add_metric([mid], len(model["missing_blocks"]))
        evidence.add_metric([mid], len(model["evidence"]))
        for server in model["servers"]:
            names = [mid, server["peer_id"], server["public_name"]]
            throughput.add_metric(names, server["throughput"])
            sessions.add_metric(names, server["sessions"])

    class Snapshot:
        def collect(self):
            return [servers, missing, evidence, throughput, sessions]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry).decode()


def create_app(watch: SwarmWatch) -> FastAPI:
    app = FastAPI(title="cocoon monitor")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.get("/api/v1/state")
    async def state():
        return watch.state

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return prometheus_text(watch.state)

    @app.get("/health")
    async def health():
        updated = watch.state.get("updated")
        body = {"status": "ok" if watch.healthy() else "stale", "updated": updated,
                "models": len(watch.state.get("models", [])), "error": watch.state.get("error")}
        return JSONResponse(body, status_code=200 if watch.healthy() else 503)

    return app

