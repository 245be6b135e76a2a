// sidecar dashboard: one SSE stream of shared snapshots, admin API calls for
// tables and forms. Every user-supplied string goes through textContent.
"use strict";

const TOKEN_KEY = "sidecar.adminToken";
const STALE_MS = 5000;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  source: null,
  lastData: 0,
  snapshot: null,
  snapshotAt: 0,
  settings: new Map(), // id -> backend settings from the admin API
  serverHistory: [],
};

const $ = (sel) => document.querySelector(sel);

/** Builds an element; children are nodes or text (never parsed as HTML). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(method, path, body) {
  const opts = { method, headers: { ...authHeaders() } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(`/api/admin${path}`, opts);
  let data = null;
  try { data = await res.json(); } catch (_) { /* empty body */ }
  if (!res.ok) {
    const msg = (data && data.error && data.error.message) || `${res.status} ${res.statusText}`;
    const err = new Error(msg);
    err.status = res.status;
    throw err;
  }
  return data;
}

const fmt = {
  n: (v, d = 0) => (v === null || v === undefined ? "–" : Number(v).toLocaleString(undefined, { maximumFractionDigits: d })),
  ms: (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`),
  usd: (v) => `$${Number(v || 0).toFixed(v >= 1 ? 2 : 6)}`,
  secs: (s) => {
    if (s === null || s === undefined || s <= 0) return "–";
    s = Math.ceil(s);
    return s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
  },
  time: (ms) => new Date(ms).toLocaleTimeString(),
  hour: (unix) => new Date(unix * 1000).toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" }),
};

// ---- connection ------------------------------------------------------------

function connect() {
  if (state.source) state.source.close();
  const q = state.token ? `?token=${encodeURIComponent(state.token)}` : "";
  const es = new EventSource(`/api/admin/events${q}`);
  state.source = es;
  es.onmessage = (ev) => {
    let snap;
    try { snap = JSON.parse(ev.data); } catch (_) { return; }
    state.lastData = Date.now();
    onSnapshot(snap);
  };
  es.onerror = () => setConn(false);
}

function setConn(on) {
  const c = $("#conn");
  c.textContent = on ? "live" : "disconnected";
  c.className = `pill ${on ? "on" : "off"}`;
}

setInterval(() => {
  if (!state.lastData && !state.source) return;
  const age = Date.now() - state.lastData;
  const stale = age > STALE_MS;
  $("#overlay").hidden = !stale;
  if (stale) {
    $("#overlay-text").textContent = state.lastData
      ? `No data for ${Math.round(age / 1000)} s. Reconnecting…`
      : "Waiting for the first snapshot…";
    setConn(false);
  }
  if (state.snapshot) renderCountdowns();
}, 500);

async function login(token, quiet = false) {
  state.token = token;
  try {
    await api("GET", "/backends");
  } catch (e) {
    if (quiet) {
      // A token is needed after all: ask for it, without blaming anyone.
      state.token = null;
      $("#login").hidden = false;
      return;
    }
    $("#login-error").textContent = e.status === 401 || e.status === 403 ? `Refused: ${e.message}` : e.message;
    return;
  }
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("#logout").hidden = !token;
  $("#login").hidden = true;
  $("#app").hidden = false;
  state.lastData = Date.now();
  connect();
  refreshSettings();
  refreshTables();
  refreshHistory();
  refreshRecent();
  refreshWindows();
}

// ---- snapshot rendering ----------------------------------------------------

function onSnapshot(snap) {
  setConn(true);
  $("#overlay").hidden = true;
  state.snapshot = snap;
  state.snapshotAt = Date.now();
  renderHeader(snap);
  renderCards(snap);
  const sel = $("#recent-backend");
  const names = snap.backends.map((b) => b.name);
  if ([...sel.options].slice(1).map((o) => o.value).join() !== names.join()) {
    const keep = sel.value;
    sel.replaceChildren(el("option", { value: "" }, "all"), ...names.map((n) => el("option", { value: n }, n)));
    sel.value = names.includes(keep) ? keep : "";
  }
  if (snap.backends.some((b) => !state.settings.has(b.id))) refreshSettings();
}

function renderHeader(snap) {
  const shared = snap.state && snap.state.backend === "redis"
    ? el("span", { "data-testid": "shared-state", class: snap.state.degraded ? "pill off" : "pill on" },
      snap.state.degraded
        ? `Redis unreachable: each replica serves 1/${snap.state.replicas_alive} of each limit`
        : `shared state: Redis · ${snap.state.replicas_alive} replica(s)`)
    : null;
  $("#pools").replaceChildren(...[shared].filter(Boolean), ...snap.pools.filter((p) => p.backends > 0).map((p) =>
    el("span", { "data-testid": "pool" }, `${p.pool}: ${p.healthy}/${p.backends} healthy · ${p.cooling} cooling · ${fmt.n(p.requests_left)} left · ${fmt.n(p.effective_rpm)} rpm · ${p.in_flight} in flight`)));
  const q = snap.queue;
  $("#queue").replaceChildren(el("span", { "data-testid": "queue" },
    `queue urgent ${q.urgent} · high ${q.high} · normal ${q.normal} · low ${q.low} · emergency ${snap.emergency_grants}`));
  $("#backend-count").textContent = `${snap.backends.length}`;
}

function stat(label, value, field) {
  return [el("span", {}, label), el("b", { "data-field": field }, value)];
}

function renderCards(snap) {
  const cards = $("#cards");
  const existing = new Map([...cards.children].map((c) => [Number(c.dataset.id), c]));
  const seen = new Set();
  for (const b of snap.backends) {
    seen.add(b.id);
    const card = buildCard(b, state.settings.get(b.id));
    const old = existing.get(b.id);
    if (old) old.replaceWith(card); else cards.append(card);
  }
  for (const [id, node] of existing) if (!seen.has(id)) node.remove();
}

function buildCard(b, s) {
  const limit = Math.max(1, b.effective_rpm);
  // A key that cannot serve shows no capacity, whatever its window holds.
  const serving = b.state === "healthy" || b.state === "cooling";
  const pct = serving ? Math.max(0, Math.min(100, (b.requests_left / limit) * 100)) : 0;
  const managed = s && s.source === "config";
  const actions = el("div", { class: "actions" },
    el("button", { class: "ghost", type: "button", disabled: managed, title: managed ? "managed by the config file" : null,
      onclick: () => act(b, b.state === "disabled" ? "enable" : "disable") }, b.state === "disabled" ? "Enable" : "Disable"),
    el("button", { class: "ghost", type: "button", onclick: () => act(b, "reset-cooldown") }, "Reset cooldown"),
    el("button", { class: "ghost", type: "button", onclick: () => act(b, "test") }, "Test"),
    el("button", { class: "ghost", type: "button", disabled: managed || !s, onclick: () => openEdit(b, s) }, "Edit"),
    el("button", { class: "danger", type: "button", disabled: managed, onclick: () => remove(b) }, "Delete"));
  return el("article", { class: `card ${b.state}`, "data-testid": "backend-card", dataset: { id: b.id, name: b.name } },
    el("div", { class: "top" },
      el("span", { class: "name", "data-field": "name", title: b.name }, b.name),
      el("span", {}, el("span", { class: "badge" }, b.pool), el("span", { class: `badge ${b.state}`, "data-field": "state" }, b.state),
        managed ? el("span", { class: "badge", title: "declared in the config file" }, "config") : null)),
    bar(pct, `${b.requests_left} of ${b.effective_rpm} requests left in this window`, serving),
    strip(b),
    el("div", { class: "stats" },
      stat("left in window", `${fmt.n(b.requests_left)} / ${fmt.n(b.effective_rpm)}`, "left"),
      stat("rpm eff / conf", `${fmt.n(b.effective_rpm)} / ${fmt.n(b.configured_rpm)}`, "rpm"),
      stat("in flight", b.max_concurrency ? `${b.in_flight} / ${b.max_concurrency}` : `${b.in_flight}`, "in_flight"),
      b.shared_window_used != null ? stat("all replicas", `${fmt.n(b.shared_window_used)} / ${fmt.n(b.effective_rpm)} in window`, "shared") : null,
      stat("burst / next slot", `${fmt.n(b.burst_left)} / ${b.next_free_in_s == null ? "now" : fmt.secs(b.next_free_in_s)}`, "burst"),
      stat("cooldown", fmt.secs(b.cooldown_remaining_s), "cooldown"),
      b.next_check_in_s != null ? stat(b.state === "error" ? "next key test" : "next probe", fmt.secs(b.next_check_in_s), "next_check") : null,
      stat("429s in a row", fmt.n(b.consecutive_429), "c429"),
      stat("latency / ttft", `${fmt.ms(b.latency_ms)} / ${fmt.ms(b.ttft_ms)}`, "latency"),
      stat("requests", fmt.n(b.requests), "requests"),
      stat("tokens", fmt.n(b.prompt_tokens + b.completion_tokens), "tokens")),
    b.last_error && b.state !== "healthy" ? el("div", { class: "lasterr", "data-field": "last_error" }, b.last_error) : null,
    actions);
}

/** The requests-left bar; width set through CSSOM, which the CSP allows.
 *  A key that cannot serve gets an empty, red-edged bar, never a full one. */
function bar(pct, title, serving) {
  const fill = el("div", {});
  fill.style.width = `${pct.toFixed(1)}%`;
  return el("div", { class: serving ? "bar" : "bar dead", title }, fill);
}

/** The last rolling window as a timeline: a tick per grant, 429s (cooldown
 *  starts) in red, cooldown spans in amber, the limit, and when the next
 *  slot opens (the oldest grant leaving the window) dashed. */
function strip(b) {
  const w = state.windows;
  const svg = svgEl("svg", { class: "strip", viewBox: "0 0 300 34", preserveAspectRatio: "none", "data-testid": "window-strip" });
  if (!w) return svg;
  const span = w.window_ms, t0 = w.now_ms - span;
  const x = (ms) => Math.max(0, Math.min(300, ((ms - t0) / span) * 300));
  svg.append(svgEl("line", { x1: 0, x2: 300, y1: 30, y2: 30, class: "base" }));
  for (const c of state.cooldownRows || []) {
    if (c.backend !== b.name || c.until < t0) continue;
    svg.append(svgEl("rect", { x: x(c.started_at), y: 4, width: Math.max(1, x(Math.min(c.until, w.now_ms)) - x(c.started_at)), height: 26, class: "cool" }));
    if (c.started_at >= t0) svg.append(svgEl("line", { x1: x(c.started_at), x2: x(c.started_at), y1: 2, y2: 30, class: "r429" }));
  }
  const grants = (w.byId.get(b.id) || []).filter((g) => g >= t0).sort((a, c) => a - c);
  for (const g of grants) svg.append(svgEl("line", { x1: x(g), x2: x(g), y1: 16, y2: 30, class: "tick" }));
  if (grants.length >= b.effective_rpm && grants.length) {
    const g = grants[0];
    svg.append(svgEl("line", { x1: x(g), x2: x(g), y1: 4, y2: 30, class: "next" }));
  }
  const label = svgEl("text", { x: 298, y: 11, "text-anchor": "end", class: "limit" });
  const next = b.next_free_in_s == null ? "slot free now" : `next slot in ${fmt.secs(b.next_free_in_s)}`;
  label.textContent = `${grants.length} / ${b.effective_rpm} in ${Math.round(span / 1000)} s · ${next}`;
  svg.append(label);
  svg.append(svgEl("title", {}));
  svg.lastChild.textContent = "the last rolling window: a tick per request sent, red = 429, amber = cooling";
  return svg;
}

async function refreshWindows() {
  try {
    const [w, cool] = await Promise.all([api("GET", "/windows"), api("GET", "/stats/cooldowns?limit=50")]);
    state.cooldownRows = cool.rows;
    w.byId = new Map(w.backends.map((b) => [b.id, b.grants_ms]));
    state.windows = w;
    if (state.snapshot) renderCards(state.snapshot);
  } catch (_) { /* next refresh retries */ }
}
setInterval(() => { if (state.token !== null && !$("#app").hidden) refreshWindows(); }, 2000);

function renderCountdowns() {
  const elapsed = (Date.now() - state.snapshotAt) / 1000;
  for (const b of state.snapshot.backends) {
    if (!b.cooldown_remaining_s) continue;
    const node = document.querySelector(`[data-testid=backend-card][data-id="${b.id}"] [data-field=cooldown]`);
    if (node) node.textContent = fmt.secs(b.cooldown_remaining_s - elapsed);
  }
}

// ---- charts (inline SVG) ---------------------------------------------------

const NS = "http://www.w3.org/2000/svg";
const HOUR_MS = 3600 * 1000;
function svgEl(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

/** A series over the last hour, placed by each point's own time. */
function line(svg, points, value, max, color, now) {
  const w = 600, h = 120;
  const xy = points.filter((p) => value(p) != null)
    .map((p) => [((p.at_ms - (now - HOUR_MS)) / HOUR_MS) * w, h - (value(p) / max) * (h - 12)]);
  if (xy.length < 2) return;
  const d = xy.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
  svg.append(svgEl("path", { d, fill: "none", stroke: color, "stroke-width": 2 }));
}

/** Baseline, the top value, and a time axis: 15-minute ticks up to now. */
function axis(svg, max, unit, now) {
  svg.append(svgEl("line", { x1: 0, x2: 600, y1: 120, y2: 120, class: "axis" }));
  const top = svgEl("text", { x: 4, y: 12, class: "lbl" });
  top.textContent = `${fmt.n(max, 2)} ${unit}`;
  svg.append(top);
  for (let m = 60; m >= 0; m -= 15) {
    const x = ((HOUR_MS - m * 60000) / HOUR_MS) * 600;
    svg.append(svgEl("line", { x1: x, x2: x, y1: 120, y2: 124, class: "axis" }));
    const t = svgEl("text", { x: Math.min(Math.max(x, 14), 586), y: 136, class: "lbl", "text-anchor": "middle" });
    t.textContent = m === 0 ? "now" : new Date(now - m * 60000).toTimeString().slice(0, 5);
    svg.append(t);
  }
}

/** The last hour, kept by the gateway (not just what this tab saw). */
async function refreshHistory() {
  try {
    const h = await api("GET", "/history");
    state.serverHistory = h.points;
    renderCharts();
  } catch (_) { /* next refresh retries */ }
}

function renderCharts() {
  const h = state.serverHistory || [];
  const now = Date.now();
  const rate = $("#chart-rate"), lat = $("#chart-latency");
  rate.replaceChildren(); lat.replaceChildren();
  const css = getComputedStyle(document.documentElement);
  const maxRate = Math.max(1, ...h.map((p) => Math.max(p.ok, p.client_errors, p.server_errors)));
  axis(rate, maxRate, "req / 10 s", now);
  line(rate, h, (p) => p.ok, maxRate, css.getPropertyValue("--ok"), now);
  line(rate, h, (p) => p.client_errors, maxRate, css.getPropertyValue("--cool"), now);
  line(rate, h, (p) => p.server_errors, maxRate, css.getPropertyValue("--down"), now);
  const maxLat = Math.max(1, ...h.map((p) => Math.max(p.latency_p95_ms || 0, p.ttft_p95_ms || 0)));
  axis(lat, maxLat, "ms", now);
  line(lat, h, (p) => p.latency_p50_ms, maxLat, css.getPropertyValue("--ok"), now);
  line(lat, h, (p) => p.latency_p95_ms, maxLat, css.getPropertyValue("--down"), now);
  line(lat, h, (p) => p.ttft_p50_ms, maxLat, css.getPropertyValue("--accent"), now);
  const tokens = h.reduce((s, p) => s + p.tokens, 0), cost = h.reduce((s, p) => s + p.cost_usd, 0);
  $("#hour-totals").textContent = `last hour: ${fmt.n(h.reduce((s, p) => s + p.ok, 0))} ok · ${fmt.n(tokens)} tokens · ${fmt.usd(cost)}`;
}
setInterval(() => { if (state.token !== null && !$("#app").hidden) refreshHistory(); }, 10000);

// ---- settings, tables and actions -----------------------------------------

async function refreshSettings() {
  try {
    const data = await api("GET", "/backends");
    state.settings = new Map(data.backends.map((b) => [b.id, b]));
    if (state.snapshot) renderCards(state.snapshot);
  } catch (_) { /* next snapshot retries */ }
  refreshConfig();
}

/** Where each runtime value comes from; an override can be cleared here. */
async function refreshConfig() {
  try {
    const c = await api("GET", "/config");
    const keys = Object.keys(c.sources);
    $("#config tbody").replaceChildren(...keys.map((k) => {
      const from = c.sources[k];
      const clear = el("button", { class: "ghost", type: "button", "data-clear": k }, "clear");
      clear.hidden = from !== "override";
      clear.addEventListener("click", async () => {
        try {
          await api("PATCH", "/config", { [k]: null });
          refreshConfig();
        } catch (e) { $("[data-role=config-error]").textContent = e.message; }
      });
      return el("tr", { "data-config": k }, el("td", {}, k), el("td", { class: "num" }, String(c[k])),
        el("td", {}, el("span", { class: `badge src-${from}` }, from)),
        el("td", { class: "num" }, from === "override" ? String(c.configured[k]) : ""), el("td", {}, clear));
    }));
  } catch (_) { /* next refresh retries */ }
}

/** The last requests, filtered by status class and backend. */
async function refreshRecent() {
  const status = $("#recent-status").value, backend = $("#recent-backend").value;
  try {
    const q = new URLSearchParams({ status, limit: "20" });
    if (backend) q.set("backend", backend);
    const data = await api("GET", `/requests?${q}`);
    rows($("#recent tbody"), data.requests, (r) => [[fmt.time(r.at_ms)], [r.client || "–"], [r.model || "–"], [r.backend || "–"],
      [r.error ? `${r.status} ${r.error}` : String(r.status)], [r.attempts, 1], [fmt.ms(r.queued_ms), 1], [fmt.ms(r.latency_ms), 1],
      [fmt.ms(r.ttft_ms), 1], [`${fmt.n(r.prompt_tokens)} / ${fmt.n(r.completion_tokens)}`, 1]]);
    [...$("#recent tbody").children].forEach((tr, i) => { if (data.requests[i].status >= 400) tr.classList.add("bad"); });
  } catch (_) { /* next refresh retries */ }
}
setInterval(() => { if (state.token !== null && !$("#app").hidden) refreshRecent(); }, 3000);

function rows(tbody, items, cells) {
  tbody.replaceChildren(...items.map((it) => el("tr", {}, ...cells(it).map(([v, num]) => el("td", { class: num ? "num" : null }, v)))));
}

async function refreshTables() {
  try {
    const [hourly, daily, cool] = await Promise.all([
      api("GET", "/stats/hourly?hours=24"), api("GET", "/stats/daily?days=30"), api("GET", "/stats/cooldowns?limit=25")]);
    rows($("#hourly tbody"), hourly.rows, (r) => [[fmt.hour(r.hour)], [r.backend], [r.model], [fmt.n(r.requests), 1], [fmt.n(r.errors), 1],
      [`${fmt.n(r.prompt_tokens)} / ${fmt.n(r.completion_tokens)}`, 1], [fmt.usd(r.cost), 1], [fmt.ms(r.avg_latency_ms), 1]]);
    rows($("#daily tbody"), daily.rows, (r) => [[r.day], [fmt.n(r.requests), 1], [fmt.n(r.errors), 1],
      [`${fmt.n(r.prompt_tokens)} / ${fmt.n(r.completion_tokens)}`, 1], [fmt.usd(r.cost), 1], [fmt.ms(r.avg_latency_ms), 1]]);
    state.cooldownRows = cool.rows;
    rows($("#cooldowns tbody"), cool.rows, (r) => [[r.backend], [fmt.time(r.started_at)], [fmt.secs((r.until - r.started_at) / 1000)],
      [r.consecutive_429, 1], [r.ended_at ? fmt.time(r.ended_at) : "–"], [r.reason]]);
  } catch (_) { /* shown stale until the next refresh */ }
}
setInterval(() => { if (state.token !== null && !$("#app").hidden) refreshTables(); }, 30000);
setInterval(() => { if (state.token !== null && !$("#app").hidden) refreshSettings(); }, 10000);

async function act(b, action) {
  try {
    const res = await api("POST", `/backends/${b.id}/${action}`);
    if (action === "test") alertText(b.name, res.test.ok ? `OK (${res.test.status}, ${Math.round(res.test.latency_ms)} ms)` : `failed: ${res.test.error || res.test.status}`);
    refreshSettings();
  } catch (e) { alertText(b.name, e.message); }
}

async function remove(b) {
  if (!confirm(`Delete backend ${b.name}? In-flight requests finish first.`)) return;
  try { await api("DELETE", `/backends/${b.id}`); refreshSettings(); } catch (e) { alertText(b.name, e.message); }
}

function alertText(name, msg) { window.alert(`${name}: ${msg}`); }

function parseModels(text) {
  const models = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line) continue;
    const i = line.indexOf("=");
    if (i < 1) throw new Error(`model line "${line}" must be "canonical = native id"`);
    const canonical = line.slice(0, i).trim(), native = line.slice(i + 1).trim();
    if (!canonical || !native) throw new Error(`model line "${line}" must be "canonical = native id"`);
    models[canonical] = native;
  }
  return models;
}

function modelsText(models) {
  return Object.entries(models || {}).map(([k, v]) => `${k} = ${v.native}`).join("\n");
}

function validUrl(u) {
  try { const x = new URL(u); return x.protocol === "http:" || x.protocol === "https:"; } catch (_) { return false; }
}

$("#add-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target, err = f.querySelector("[data-role=form-error]");
  err.textContent = "";
  const name = f.name.value.trim(), base = f.base_url.value.trim(), key = f.api_key.value.trim();
  const rpm = Number(f.rpm_limit.value), weight = Number(f.weight.value || 1);
  let models;
  try { models = parseModels(f.models.value); } catch (e) { err.textContent = e.message; return; }
  if (!name) { err.textContent = "name is required"; return; }
  if (!validUrl(base)) { err.textContent = "base URL must be an http(s) URL"; return; }
  if (!key) { err.textContent = "API key is required"; return; }
  if (!Number.isInteger(rpm) || rpm < 1) { err.textContent = "RPM limit must be a whole number ≥ 1"; return; }
  if (!(weight > 0)) { err.textContent = "weight must be positive"; return; }
  if (!Object.keys(models).length) { err.textContent = "at least one model is required"; return; }
  const body = { name, base_url: base, api_key: key, pool: f.pool.value, rpm_limit: rpm, weight, models };
  try {
    await api("POST", `/backends${f.skip_test.checked ? "?skip_test=true" : ""}`, body);
    f.reset();
    refreshSettings();
  } catch (e) { err.textContent = e.message; }
});

let editing = null;
function openEdit(b, s) {
  editing = b;
  const f = $("#edit-form");
  f.querySelector("[data-role=edit-name]").textContent = b.name;
  f.querySelector("[data-role=form-error]").textContent = "";
  f.base_url.value = s.base_url; f.api_key.value = ""; f.pool.value = s.pool;
  f.rpm_limit.value = s.rpm_limit; f.weight.value = s.weight; f.max_concurrency.value = s.max_concurrency || "";
  f.models.value = modelsText(s.models);
  $("#edit-dialog").showModal();
}
$("#edit-form [data-role=cancel]").addEventListener("click", () => $("#edit-dialog").close());
$("#edit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target, err = f.querySelector("[data-role=form-error]");
  const patch = { base_url: f.base_url.value.trim(), pool: f.pool.value, rpm_limit: Number(f.rpm_limit.value), weight: Number(f.weight.value) };
  if (!validUrl(patch.base_url)) { err.textContent = "base URL must be an http(s) URL"; return; }
  if (!Number.isInteger(patch.rpm_limit) || patch.rpm_limit < 1) { err.textContent = "RPM limit must be a whole number ≥ 1"; return; }
  if (f.api_key.value.trim()) patch.api_key = f.api_key.value.trim();
  if (f.max_concurrency.value) patch.max_concurrency = Number(f.max_concurrency.value);
  try { patch.models = parseModels(f.models.value); } catch (e) { err.textContent = e.message; return; }
  try {
    await api("PATCH", `/backends/${editing.id}`, patch);
    $("#edit-dialog").close();
    refreshSettings();
  } catch (e) { err.textContent = e.message; }
});

// ---- start -----------------------------------------------------------------

$("#login-form").addEventListener("submit", (ev) => { ev.preventDefault(); $("#login-error").textContent = ""; login($("#token").value); });
$("#recent-status").addEventListener("change", refreshRecent);
$("#recent-backend").addEventListener("change", refreshRecent);
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
// On loopback with no admin token configured the API needs none: open live
// at once, and show the token form only when the gateway asks for one.
if (state.token !== null) login(state.token);
else login("", true);
