"""`cocoon monitor`: a page of the swarm for the people who run it (FastAPI + uvicorn).

    GET /               the page: per model, which servers hold which blocks (state, throughput, sessions, KV
                        cache left, adapters, price, reachability), gaps in coverage marked, recent spot-check
                        evidence; it refreshes itself
    GET /api/v1/state   the same as JSON
    GET /metrics        the same as Prometheus text

Models are found in the DHT's model index (every server announces its model there, signed like its block
records); the monitor reads the swarm every few seconds in a thread of its own.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from swarm.dht_records import fetch_evidence, fetch_models, fetch_swarm_state


class SwarmWatch:
    """The latest state of every model in the swarm, read in the background."""

    def __init__(self, dht, period: float = 3.0, models: Sequence[tuple[str, int]] = ()):
        self.dht, self.period, self.extra_models = dht, period, list(models)
        self.state: dict = {"models": [], "updated": None}
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
        return {"updated": time.time(), "models": [self._model(model_id, blocks) for model_id, blocks in
                                                   sorted(models.items())]}

    def _model(self, model_id: str, num_blocks: int) -> dict:
        state = fetch_swarm_state(self.dht, model_id, num_blocks)
        servers = [{"peer_id": peer, **info.to_wire()} for peer, info in
                   sorted(state.servers.items(), key=lambda item: (item[1].start, item[1].public_name, item[0]))]
        return {"model_id": model_id, "num_blocks": num_blocks, "servers": servers,
                "missing_blocks": state.missing_blocks(), "evidence": self._evidence(model_id)}

    def _evidence(self, model_id: str) -> list[dict]:
        records = [{"digest": digest, "peer_id": evidence.peer_id, "payout": evidence.attestation.server,
                    "blocks": [evidence.attestation.start, evidence.attestation.end],
                    "relative_error": evidence.reference_error, "expires": expires}
                   for digest, evidence, expires in fetch_evidence(self.dht, model_id) if not isinstance(evidence, str)]
        return sorted(records, key=lambda r: -r["expires"])[:20]

    def close(self) -> None:
        self._stop.set()


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

    return app


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Cocoon swarm</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; white-space: nowrap; }
td.block { width: 8px; min-width: 8px; height: 14px; padding: 0; border: 1px solid #fff; }
.online { background: #4caf50; } .joining { background: #ffc107; } .offline { background: #bbb; }
.gap { background: #e53935; } .none { background: #f4f4f4; }
.missing { color: #e53935; font-weight: bold; } .muted { color: #888; }
</style></head>
<body><h1>Cocoon swarm</h1><div id="updated" class="muted">loading ...</div><div id="models"></div>
<script>
// every string in the state comes from strangers' DHT records: escaped before it reaches the page
function esc(v) { return String(v).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]); }
function cell(cls, title) { return `<td class="block ${cls}" title="${title}"></td>`; }
function render(state) {
  document.getElementById("updated").textContent = state.updated ?
    "updated " + new Date(state.updated * 1000).toLocaleTimeString() + (state.error ? " (" + state.error + ")" : "") :
    "reading the swarm ...";
  let html = "";
  for (const m of state.models) {
    html += `<h2>${esc(m.model_id)} <span class="muted">${m.num_blocks} blocks</span></h2>`;
    html += m.missing_blocks.length ? `<div class="missing">no server holds block(s) ${m.missing_blocks.join(", ")}</div>`
                                    : `<div>every block is served</div>`;
    html += `<table><tr><th>server</th><th>state</th><th>blocks</th><th>tok/s</th><th>sessions</th>` +
            `<th>cache left</th><th>dtype</th><th>adapters</th><th>price (wei/unit)</th><th>coverage</th></tr>`;
    for (const s of m.servers) {
      let map = "";
      for (let b = 0; b < m.num_blocks; b++) map += cell(s.start <= b && b < s.end ? esc(s.state) : "none", "block " + b);
      html += `<tr class="server" data-peer="${esc(s.peer_id)}"><td title="${esc(s.peer_id)}">${esc(s.public_name || s.peer_id.slice(-10))}</td>` +
              `<td class="state">${esc(s.state)}</td><td class="span">${esc(s.start)}:${esc(s.end)}</td>` +
              `<td>${s.throughput.toFixed(1)}</td><td>${esc(s.sessions)}/${esc(s.max_sessions)}</td><td>${esc(s.cache_tokens_left)}</td>` +
              `<td>${esc(s.dtype)}${s.quant !== "none" ? " " + esc(s.quant) : ""}</td><td>${esc(s.adapters.join(", "))}</td>` +
              `<td>${esc(s.price_per_unit)}</td><td><table><tr>${map}</tr></table></td></tr>`;
    }
    let gaps = "";
    for (let b = 0; b < m.num_blocks; b++) gaps += cell(m.missing_blocks.includes(b) ? "gap" : "online", "block " + b);
    html += `<tr><td colspan="9" class="muted">holders per block</td><td><table><tr>${gaps}</tr></table></td></tr></table>`;
    if (m.evidence.length) {
      html += `<div>recent evidence of wrong work:</div><table><tr><th>server</th><th>payout</th><th>blocks</th><th>error</th></tr>`;
      for (const e of m.evidence) html += `<tr><td>${esc(e.peer_id)}</td><td>${esc(e.payout)}</td><td>${esc(e.blocks[0])}:${esc(e.blocks[1])}</td>` +
                                          `<td>${e.relative_error.toExponential(2)}</td></tr>`;
      html += `</table>`;
    }
  }
  document.getElementById("models").innerHTML = html || "<p>no model is served yet</p>";
}
async function refresh() {
  try { render(await (await fetch("api/v1/state")).json()); } catch (e) { document.getElementById("updated").textContent = e; }
}
refresh(); setInterval(refresh, 3000);
</script></body></html>
"""
