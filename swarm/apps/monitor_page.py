"""The monitor's page: one HTML document that reads /api/v1/state every 3 s and draws everything itself, its
charts included (inline SVG, no CDN: monitors run on machines without internet)."""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Cocoon swarm</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin-bottom: 4px; } h2 { font-size: 16px; margin: 28px 0 4px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; white-space: nowrap; }
th { font-weight: 600; color: #555; } td.num, th.num { text-align: right; }
td.block { width: 14px; min-width: 14px; height: 16px; padding: 0; border: 1px solid #fff; font-size: 10px;
           text-align: center; color: #fff; }
.online { background: #4caf50; } .joining { background: #ffc107; } .offline { background: #bbb; }
.gap { background: #e53935; } .none { background: #f4f4f4; } .thin { background: #8bc34a; }
.missing { color: #e53935; font-weight: bold; } .muted { color: #888; }
#legend span.swatch { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: -1px; }
.totals span { margin-right: 18px; } .totals b { font-size: 16px; }
.charts { display: flex; gap: 24px; margin: 12px 0; } .chart-box { border: 1px solid #eee; padding: 6px 10px; }
svg.chart polyline { fill: none; stroke: #1976d2; stroke-width: 2; } svg.chart text { font-size: 10px; fill: #888; }
</style></head>
<body><h1>Cocoon swarm</h1><div id="updated" class="muted">loading ...</div>
<div id="legend" class="muted">blocks:<span class="swatch online"></span>held by an online server
<span class="swatch joining"></span>joining<span class="swatch offline"></span>offline
<span class="swatch gap"></span>no online holder<span class="swatch thin"></span>one holder
(numbers: online holders per block) &middot; reachability: direct (its own address), relayed (through a relay of the
swarm), p2p only &middot; units: tok/s of decode through a server's span, cache left in tokens, price in wei per
token &times; block</div>
<div class="charts">
 <div class="chart-box"><div>swarm tokens/s, last hour</div><svg id="chart-tokens" class="chart" width="360" height="90"></svg></div>
 <div class="chart-box"><div>servers online, last hour</div><svg id="chart-servers" class="chart" width="360" height="90"></svg></div>
</div>
<div id="models"></div>
<script>
// every string in the state comes from strangers' DHT records: escaped before it reaches the page
function esc(v) { return String(v).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"})[c]); }
function cell(cls, title, text) { return `<td class="block ${cls}" title="${title}">${text || ""}</td>`; }
function ago(t, now) { const s = Math.max(0, Math.round(now - t)); return s < 120 ? s + " s ago" : Math.round(s / 60) + " min ago"; }
function chart(id, points, key) {
  const svg = document.getElementById(id), w = 360, h = 90, pad = 18;
  if (!points.length) { svg.innerHTML = `<text x="10" y="45">no readings yet</text>`; return; }
  const t0 = points[0].time, t1 = Math.max(points[points.length - 1].time, t0 + 1);
  const top = Math.max(1, ...points.map(p => p[key]));
  const xy = points.map(p => [pad + (w - 2 * pad) * (p.time - t0) / (t1 - t0), h - pad - (h - 2 * pad) * p[key] / top]);
  if (xy.length === 1) xy.push([w - pad, xy[0][1]]);
  svg.innerHTML = `<polyline points="${xy.map(q => q[0].toFixed(1) + "," + q[1].toFixed(1)).join(" ")}"></polyline>` +
    `<text x="2" y="12">${esc(top.toFixed(top < 10 ? 1 : 0))}</text><text x="2" y="${h - 4}">0</text>` +
    `<text x="${w - 60}" y="${h - 4}">now</text><text x="${pad}" y="${h - 4}">${esc(ago(t0, t1))}</text>`;
}
function render(state) {
  const now = state.updated || Date.now() / 1000;
  document.getElementById("updated").textContent = state.updated ?
    "updated " + new Date(state.updated * 1000).toLocaleTimeString() + (state.error ? " (" + state.error + ")" : "") :
    "reading the swarm ...";
  chart("chart-tokens", state.history || [], "tokens_per_s");
  chart("chart-servers", state.history || [], "servers_online");
  let html = "";
  for (const m of state.models) {
    const name = m.name ? `<span class="model-name">${esc(m.name)}</span>` +
      (m.names_disagree ? ` <span class="muted">(the name most of its servers announce)</span>` : ` <span class="muted">(as announced)</span>`) : "";
    html += `<h2 class="model" data-model="${esc(m.model_id)}">${name} <span class="muted model-id">${esc(m.model_id)}</span></h2>`;
    const t = m.totals;
    html += `<div class="totals"><span><b>${t.servers_online}</b> of ${t.servers} servers online</span>` +
            `<span><b>${m.num_blocks}</b> blocks</span><span><b>${t.tokens_per_s.toFixed(1)}</b> tok/s (its slowest block's holders together)</span>` +
            `<span><b>${t.sessions}</b> sessions open</span></div>`;
    html += m.missing_blocks.length ? `<div class="missing">no server holds block(s) ${m.missing_blocks.join(", ")}</div>`
                                    : `<div>every block is served</div>`;
    html += `<table><tr><th>server</th><th>state</th><th>reachability</th><th>blocks</th><th class="num">tok/s</th><th class="num">sessions</th>` +
            `<th class="num">cache left (tokens)</th><th>dtype</th><th>adapters</th><th class="num">price (wei/token&times;block)</th><th>coverage</th></tr>`;
    for (const s of m.servers) {
      let map = "";
      for (let b = 0; b < m.num_blocks; b++) map += cell(s.start <= b && b < s.end ? esc(s.state) : "none", "block " + b);
      html += `<tr class="server" data-peer="${esc(s.peer_id)}"><td title="${esc(s.peer_id)}">${esc(s.public_name || s.peer_id.slice(-10))}</td>` +
              `<td class="state">${esc(s.state)}</td><td class="reachability">${esc(s.reachability)}</td><td class="span">${esc(s.start)}:${esc(s.end)}</td>` +
              `<td class="num">${s.throughput.toFixed(1)}</td><td class="num">${esc(s.sessions)}/${esc(s.max_sessions)}</td><td class="num">${esc(s.cache_tokens_left)}</td>` +
              `<td>${esc(s.dtype)}${s.quant !== "none" ? " " + esc(s.quant) : ""}</td><td>${esc(s.adapters.join(", "))}</td>` +
              `<td class="num">${esc(s.price_per_unit)}</td><td><table><tr>${map}</tr></table></td></tr>`;
    }
    let holders = "";
    for (let b = 0; b < m.num_blocks; b++) {
      const n = m.holders[b];
      holders += cell(n === 0 ? "gap" : n === 1 ? "thin" : "online", `block ${b}: ${n} online holder(s)`, n);
    }
    html += `<tr class="holders"><td colspan="10" class="muted">online holders per block</td><td><table><tr>${holders}</tr></table></td></tr></table>`;
    if (m.departed.length) {
      html += `<div>servers that left:</div><table class="departed"><tr><th>server</th><th>blocks</th><th>last seen</th></tr>`;
      for (const d of m.departed) html += `<tr data-peer="${esc(d.peer_id)}"><td title="${esc(d.peer_id)}">${esc(d.public_name || d.peer_id.slice(-10))}</td>` +
                                          `<td>${esc(d.start)}:${esc(d.end)}</td><td class="last-seen">${esc(ago(d.last_seen, now))}</td></tr>`;
      html += `</table>`;
    }
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
