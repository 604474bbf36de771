"use strict";
// The dashboard's script. It reads three endpoints of the node that served it, every
// REFRESH_MS: /cluster/status (the ring), /admin/dashboard.json (hints, repair runs, debt,
// breaker, rate) and /metrics (Prometheus text, parsed here). Charts come from the page's own
// history of /metrics samples: the node keeps none, so they start when the page is opened
// (the history survives reloads of this tab through sessionStorage).

const REFRESH_MS = 3000;
const HISTORY_MS = 10 * 60 * 1000;
const HISTORY_KEY = "mendkv-dashboard-history";
const SVG_NS = "http://www.w3.org/2000/svg";
const COLOURS = ["#2f6fde", "#d9480f", "#1a7f37", "#7048e8", "#c2255c", "#0b7285", "#5c940d"];

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function pill(text) {
  return el("span", { class: "pill " + text }, text);
}

function num(n) {
  return Number(n).toLocaleString("en-US");
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? Math.round(n) : n.toFixed(1)) + " " + units[i];
}

function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return Math.round(ms) + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function replaceRows(tbody, rows, emptyText, columns) {
  tbody.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText))]));
}

// ---- Prometheus text ----

// Parses the text exposition into [{name, labels, value}].
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, "$1");
    }
    samples.push({ name: m[1], labels, value: parseFloat(m[4]) });
  }
  return samples;
}

function sum(samples, name, match) {
  let total = 0;
  for (const s of samples) {
    if (s.name !== name) continue;
    if (match && !Object.entries(match).every(([k, v]) => s.labels[k] === v)) continue;
    total += s.value;
  }
  return total;
}

// Totals per value of one label: {op: total}.
function byLabel(samples, name, label) {
  const out = {};
  for (const s of samples) {
    if (s.name === name && s.labels[label] !== undefined) {
      out[s.labels[label]] = (out[s.labels[label]] || 0) + s.value;
    }
  }
  return out;
}

// Cumulative histogram buckets per value of `label`: {op: [[le, count], ...]}.
function histograms(samples, name, label) {
  const out = {};
  for (const s of samples) {
    if (s.name !== name + "_bucket") continue;
    const key = label ? s.labels[label] : "";
    const le = s.labels.le === "+Inf" ? Infinity : parseFloat(s.labels.le);
    (out[key] = out[key] || []).push([le, s.value]);
  }
  for (const key of Object.keys(out)) out[key].sort((a, b) => a[0] - b[0]);
  return out;
}

// What one sample of /metrics keeps for the charts: counters and histogram buckets only.
function compact(samples, t) {
  return {
    t,
    requests: byLabel(samples, "mendkv_requests_total", "op"),
    latency: histograms(samples, "mendkv_request_duration_seconds", "op"),
    readRepair: byLabel(samples, "mendkv_read_repair_total", "outcome"),
    aeSum: sum(samples, "mendkv_anti_entropy_cycle_duration_seconds_sum"),
    aeCount: sum(samples, "mendkv_anti_entropy_cycle_duration_seconds_count"),
    hintsDelivered: sum(samples, "mendkv_hints_delivered_total"),
    repairsOk: byLabel(samples.filter((s) => s.labels.outcome === "ok"),
      "mendkv_repairs_total", "mechanism"),
    repairsAll: byLabel(samples, "mendkv_repairs_total", "mechanism"),
    network: byLabel(samples, "mendkv_network_bytes_total", "class"),
  };
}

// The q-quantile of the observations between two cumulative bucket lists, interpolated
// within the bucket as Prometheus's histogram_quantile does; null without observations.
function quantile(q, before, after) {
  const prev = new Map((before || []).map(([le, c]) => [le, c]));
  const deltas = after.map(([le, c]) => [le, c - (prev.get(le) || 0)]);
  const total = deltas.length ? deltas[deltas.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0, below = 0;
  for (const [le, count] of deltas) {
    if (count >= rank) {
      if (le === Infinity) return lower;
      return lower + (le - lower) * ((rank - below) / Math.max(count - below, 1e-9));
    }
    lower = le;
    below = count;
  }
  return lower;
}

// ---- history ----

let history = [];
try {
  history = JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "[]");
} catch (e) {
  history = [];
}

function remember(sample) {
  history.push(sample);
  history = history.filter((s) => s.t >= sample.t - HISTORY_MS);
  try {
    sessionStorage.setItem(HISTORY_KEY, JSON.stringify(history));
  } catch (e) {
    // A full or disabled sessionStorage only costs the history across reloads.
  }
}

// Puts the node's kept samples before the page's own (the node's cover the time before the
// page opened).
async function loadNodeHistory() {
  const { samples } = await fetchOk("/admin/dashboard/history");
  const firstOwn = history.length ? history[0].t : Infinity;
  const older = samples.filter((s) => s.t_ms < firstOwn)
    .map((s) => compact(parseMetrics(s.text), s.t_ms));
  history = older.concat(history);
}

// One series per key: the rate (per second) of each counter between consecutive samples.
function rateSeries(pick, keys) {
  const out = {};
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    const dt = (b.t - a.t) / 1000;
    if (dt <= 0) continue;
    const va = pick(a), vb = pick(b);
    for (const key of keys || Object.keys(vb)) {
      const d = (vb[key] || 0) - (va[key] || 0);
      // A counter that went down means the node restarted: no rate for that interval.
      if (d >= 0) (out[key] = out[key] || []).push([b.t, d / dt]);
    }
  }
  return out;
}

// ---- charts (inline SVG) ----

function chart(title, unit, series, format) {
  const box = el("div", { class: "chart" }, el("div", { class: "title" }, title));
  const names = Object.keys(series).filter((k) => series[k].length);
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 400 110");
  svg.setAttribute("preserveAspectRatio", "none");
  const now = history.length ? history[history.length - 1].t : Date.now();
  const t0 = now - HISTORY_MS;
  let max = 0;
  for (const n of names) for (const [, v] of series[n]) if (v !== null) max = Math.max(max, v);
  const top = max > 0 ? max * 1.15 : 1;
  for (const y of [0, 55, 100]) {
    const line = document.createElementNS(SVG_NS, "line");
    Object.entries({ x1: 0, x2: 400, y1: y + 5, y2: y + 5, stroke: "#e7eaf0" })
      .forEach(([k, v]) => line.setAttribute(k, v));
    svg.append(line);
  }
  names.forEach((n, i) => {
    const points = series[n].filter(([, v]) => v !== null)
      .map(([t, v]) => `${((t - t0) / HISTORY_MS * 400).toFixed(1)},${(105 - v / top * 100).toFixed(1)}`);
    const line = document.createElementNS(SVG_NS, "polyline");
    line.setAttribute("points", points.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLOURS[i % COLOURS.length]);
    line.setAttribute("stroke-width", "1.8");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  });
  const fmt = format || ((v) => v.toFixed(v < 10 ? 2 : 0));
  const legend = el("div", { class: "legend" }, `max ${fmt(max)} ${unit}`);
  names.forEach((n, i) => {
    const known = series[n].filter(([, v]) => v !== null);
    const last = known.length ? known[known.length - 1][1] : null;
    legend.append(el("i", { style: `background:${COLOURS[i % COLOURS.length]}` }),
      `${n} ${last === null ? "–" : fmt(last)}`);
  });
  if (!names.length) legend.append(el("span", { class: "empty" }, " · no data yet"));
  box.append(svg, legend);
  return box;
}

function renderCharts() {
  const charts = [];
  charts.push(chart("Requests per second, by operation", "req/s",
    rateSeries((s) => s.requests)));
  const latency = {};
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    for (const op of Object.keys(b.latency)) {
      for (const q of [0.5, 0.99]) {
        const key = `${op} p${q * 100}`;
        const v = quantile(q, a.latency[op], b.latency[op]);
        (latency[key] = latency[key] || []).push([b.t, v === null ? null : v * 1000]);
      }
    }
  }
  charts.push(chart("Request latency p50 / p99, by operation", "ms", latency));
  charts.push(chart("Read-repair frequency (inconsistent reads found)", "/s",
    rateSeries((s) => s.readRepair)));
  const cycle = { "mean exchange": [] };
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    const n = b.aeCount - a.aeCount;
    cycle["mean exchange"].push([b.t, n > 0 ? (b.aeSum - a.aeSum) / n * 1000 : null]);
  }
  charts.push(chart("Anti-entropy cycle time (one range with one peer)", "ms", cycle));
  charts.push(chart("Hint delivery rate", "hints/s",
    rateSeries((s) => ({ delivered: s.hintsDelivered }))));
  const success = {};
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1], b = history[i];
    for (const m of Object.keys(b.repairsAll)) {
      const all = b.repairsAll[m] - (a.repairsAll[m] || 0);
      const ok = (b.repairsOk[m] || 0) - (a.repairsOk[m] || 0);
      (success[m] = success[m] || []).push([b.t, all > 0 ? 100 * ok / all : null]);
    }
  }
  charts.push(chart("Repair success rate, by mechanism", "%", success, (v) => v.toFixed(0)));
  charts.push(chart("Network overhead per mechanism", "/s",
    rateSeries((s) => s.network), (v) => bytes(v)));
  $("charts").replaceChildren(...charts);
  const span = history.length > 1 ? duration(history[history.length - 1].t - history[0].t) : "0 s";
  $("trend-note").textContent = `(this node; ${span} of the last ${HISTORY_MS / 60000} min, ` +
    "from the node's samples and this page's)";
}

// ---- sections ----

function renderRing(status, metrics) {
  $("node-id").textContent = status.node_id;
  $("cluster").textContent = status.cluster;
  document.title = `mendkv · ${status.node_id}`;
  const rows = status.nodes.map((n) => {
    const share = (n.ownership * 100).toFixed(1);
    // Nodes join and leave only once membership changes exist; until then every node that
    // is a member is "normal" and /cluster/status has no state field.
    const state = n.state || "normal";
    return el("tr", { "data-node-id": n.id },
      el("td", {}, el("b", {}, n.id), n.id === status.node_id ? " (this node)" : ""),
      el("td", {}, pill(n.status)),
      el("td", {}, pill(state)),
      el("td", { class: "num" }, n.id === status.node_id ? "–" : Number(n.phi).toFixed(2)),
      el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${share}%` })), ` ${share}%`),
      el("td", { class: "num", id: `ring-hints-${n.id}` }, num(n.hints_pending)));
  });
  replaceRows($("ring-rows"), rows, "no members known", 6);
  const stated = status.nodes.some((n) => n.state);
  $("ring-note").textContent = "Liveness and phi as this node's failure detector sees them " +
    `(${sum(metrics, "mendkv_peers", { status: "up" })} up). ` +
    (stated ? "" : "State: this version has no joins or leaves yet, so every member is normal.");
}

function renderHints(dash, metrics) {
  const hints = dash.hints;
  const rows = hints.targets.map((t) => el("tr", { "data-hint-target": t.target },
    el("td", {}, t.target),
    el("td", { class: "num", id: `hints-pending-${t.target}` }, num(t.pending)),
    el("td", { class: "num" }, duration(t.oldest_age_ms)),
    el("td", { class: "num" },
      t.oldest_age_ms === null ? "–" : duration(Math.max(hints.ttl_ms - t.oldest_age_ms, 0)))));
  replaceRows($("hint-rows"), rows, "no hints pending", 4);
  const dropped = byLabel(metrics, "mendkv_hints_dropped_total", "reason");
  const droppedText = Object.entries(dropped).filter(([, v]) => v > 0)
    .map(([k, v]) => `${k} ${num(v)}`).join(", ");
  const totals = [
    ["pending", `${num(hints.pending_total)} (${bytes(hints.bytes)} of ${bytes(hints.max_bytes_total)})`],
    ["stored", num(sum(metrics, "mendkv_hints_stored_total"))],
    ["delivered", num(sum(metrics, "mendkv_hints_delivered_total"))],
    ["expired", num(sum(metrics, "mendkv_hints_expired_total"))],
    ["dropped", `${num(sum(metrics, "mendkv_hints_dropped_total"))}${droppedText ? " (" + droppedText + ")" : ""}`],
    ["TTL", duration(hints.ttl_ms)],
    ["limits", `${num(hints.max_hints_per_node)} keys per target, delivery ` +
      (hints.delivery_rate_per_s ? `${num(hints.delivery_rate_per_s)} hints/s` : "unlimited")],
  ];
  $("hint-totals").replaceChildren(...totals.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function renderRepair(dash) {
  const repair = dash.repair;
  const rows = repair.runs.map((r) => {
    const share = r.ranges_total ? (100 * r.ranges_done / r.ranges_total).toFixed(0) : 100;
    return el("tr", { "data-run-id": r.id, "data-run-state": r.state },
      el("td", {}, `#${r.id}`),
      el("td", {}, pill(r.state)),
      el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${share}%` })), ` ${share}%`),
      el("td", { class: "num" }, `${num(r.ranges_done)} / ${num(r.ranges_total)}`),
      el("td", { class: "num" }, num(r.keys_compared)),
      el("td", { class: "num" }, num(r.keys_different)),
      el("td", { class: "num" }, num(r.keys_repaired)),
      el("td", { class: "num" }, `${bytes(r.bytes_sent)} / ${bytes(r.bytes_received)}`),
      el("td", { class: "num" }, duration(r.elapsed_ms)),
      el("td", { class: "num" }, r.state === "running" ? duration(r.eta_ms) : "–"));
  });
  replaceRows($("run-rows"), rows, "no repair run since this node started (POST /admin/repair, mendkv repair)", 10);
  const debt = repair.debt.map((d) => el("tr", {},
    el("td", {}, `${d.node} ↔ ${d.peer}`),
    el("td", { class: "num" }, num(d.mismatched_leaves)),
    el("td", { class: "num" }, d.estimated_bytes == null ? "–" : bytes(d.estimated_bytes)),
    el("td", { class: "num" }, d.eta_ms == null ? "–" : duration(d.eta_ms))));
  replaceRows($("debt-rows"), debt, "no known debt: every compared range converged", 4);
  const b = repair.breaker;
  let why = "no stress signal over its threshold";
  if (b.state !== "closed") why = b.stress_now || b.last_trip || "a probe exchange failed";
  const items = [
    ["breaker", pill(b.state)],
    ["why", b.state === "closed" ? why : `${why}${b.reopens_in_ms !== null ? `; probe in ${duration(b.reopens_in_ms)}` : ""}`],
    ["trips since start", num(b.trips) + (b.last_trip ? ` (last: ${b.last_trip})` : "")],
    ["repair rate in force", repair.rate.bytes_per_s ? `${bytes(repair.rate.bytes_per_s)}/s` : "unlimited"],
    ["rate source", repair.rate.source],
    ["anti-entropy", repair.anti_entropy_enabled
      ? `every ${duration(repair.anti_entropy_interval_ms)} per range and peer, ${repair.anti_entropy_concurrency} at once`
      : "scheduled runs disabled (operator runs still work)"],
  ];
  $("breaker").replaceChildren(...items.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

// ---- refresh loop ----

async function fetchOk(path, as) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return as === "text" ? response.text() : response.json();
}

async function refresh() {
  const problems = [];
  const [status, dash, text] = await Promise.all([
    fetchOk("/cluster/status").catch((e) => { problems.push(e.message); return null; }),
    fetchOk("/admin/dashboard.json").catch((e) => { problems.push(e.message); return null; }),
    fetchOk("/metrics", "text").catch((e) => { problems.push(e.message); return null; }),
  ]);
  const metrics = text === null ? [] : parseMetrics(text);
  if (text !== null) remember(compact(metrics, Date.now()));
  if (status) renderRing(status, metrics);
  if (dash) { renderHints(dash, metrics); renderRepair(dash); }
  renderCharts();
  $("error").style.display = problems.length ? "block" : "none";
  $("error").textContent = problems.length ? "Could not read: " + problems.join("; ") : "";
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`;
}

// One refresh at a time: the next is scheduled when the last has finished.
async function loop() {
  try {
    await refresh();
  } catch (e) {
    $("error").style.display = "block";
    $("error").textContent = "Dashboard error: " + e.message;
  }
  setTimeout(loop, REFRESH_MS);
}

loadNodeHistory()
  .catch((e) => { $("error").style.display = "block"; $("error").textContent = "History: " + e.message; })
  .finally(loop);
