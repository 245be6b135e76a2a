// sidecar dashboard: one SSE stream of shared snapshots, admin API calls for
// tables and forms. Every user-supplied string goes through textContent.
"use strict";

const TOKEN_KEY = "sidecar.adminToken";
const STALE_MS = 5000;
const HISTORY = 120;

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  source: null,
  lastData: 0,
  snapshot: null,
  snapshotAt: 0,
  settings: new Map(), // id -> backend settings from the admin API
  history: [],
  prevCounters: null,
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
}

// ---- snapshot rendering ----------------------------------------------------

function onSnapshot(snap) {
  setConn(true);
  $("#overlay").hidden = true;
  state.snapshot = snap;
  state.snapshotAt = Date.now();
  const c = snap.counters;
  if (state.prevCounters) {
    const dt = Math.max(0.2, (snap.ts - state.prevCounters.ts) / 1000);
    const d = (k) => Math.max(0, c[k] - state.prevCounters[k]) / dt;
    state.history.push({ ts: snap.ts, ok: d("requests_2xx"), e5: d("requests_5xx"), u429: d("upstream_429"), tok: d("tokens"), cost: c.cost_usd });
    if (state.history.length > HISTORY) state.history.shift();
  }
  state.prevCounters = { ...c, ts: snap.ts };
  renderHeader(snap);
  renderCards(snap);
  renderCharts();
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
  $("#cost-total").textContent = fmt.usd(snap.counters.cost_usd);
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
      el("span", { class: "name", "data-field": "name" }, b.name),
      el("span", {}, el("span", { class: "badge" }, b.pool), el("span", { class: `badge ${b.state}`, "data-field": "state" }, b.state),
        managed ? el("span", { class: "badge", title: "declared in the config file" }, "config") : null)),
    bar(pct, `${b.requests_left} of ${b.effective_rpm} requests left in this window`),
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

/** The tokens-left bar; width set through CSSOM, which the CSP allows. */
function bar(pct, title) {
  const fill = el("div", {});
  fill.style.width = `${pct.toFixed(1)}%`;
  return el("div", { class: "bar", title }, fill);
}

function renderCountdowns() {
  const elapsed = (Date.now() - state.snapshotAt) / 1000;
  for (const b of state.snapshot.backends) {
    if (!b.cooldown_remaining_s) continue;
    const node = document.querySelector(`[data-testid=backend-card][data-id="${b.id}"] [data-field=cooldown]`);
    if (node) node.textContent = fmt.secs(b.cooldown_remaining_s - elapsed);
  }
}

// ---- charts (inline SVG) ---------------------------------------------------

function line(svg, points, max, color) {
  if (points.length < 2) return;
  const w = 600, h = 130, step = w / (HISTORY - 1), x0 = w - step * (points.length - 1);
  const d = points.map((v, i) => `${i ? "L" : "M"}${(x0 + i * step).toFixed(1)},${(h - (v / max) * (h - 10)).toFixed(1)}`).join(" ");
  const p = document.createElementNS("http://www.w3.org/2000/svg", "path");
  p.setAttribute("d", d); p.setAttribute("fill", "none"); p.setAttribute("stroke", color); p.setAttribute("stroke-width", "2");
  svg.append(p);
}

function axis(svg, max, unit) {
  const ns = "http://www.w3.org/2000/svg";
  const base = document.createElementNS(ns, "line");
  base.setAttribute("x1", "0"); base.setAttribute("x2", "600"); base.setAttribute("y1", "130"); base.setAttribute("y2", "130");
  base.setAttribute("class", "axis");
  const t = document.createElementNS(ns, "text");
  t.setAttribute("x", "4"); t.setAttribute("y", "12"); t.setAttribute("class", "lbl");
  t.textContent = `${fmt.n(max, 2)} ${unit}`;
  svg.append(base, t);
}

function renderCharts() {
  const h = state.history;
  const rate = $("#chart-rate"), tok = $("#chart-tokens");
  rate.replaceChildren(); tok.replaceChildren();
  const css = getComputedStyle(document.documentElement);
  const maxRate = Math.max(1, ...h.map((p) => Math.max(p.ok, p.e5, p.u429)));
  axis(rate, maxRate, "req/s");
  line(rate, h.map((p) => p.ok), maxRate, css.getPropertyValue("--ok"));
  line(rate, h.map((p) => p.e5), maxRate, css.getPropertyValue("--down"));
  line(rate, h.map((p) => p.u429), maxRate, css.getPropertyValue("--cool"));
  const maxTok = Math.max(1, ...h.map((p) => p.tok));
  axis(tok, maxTok, "tokens/s");
  line(tok, h.map((p) => p.tok), maxTok, css.getPropertyValue("--accent"));
  const maxCost = Math.max(1e-9, ...h.map((p) => p.cost));
  line(tok, h.map((p) => p.cost), maxCost, css.getPropertyValue("--ok"));
}

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
$("#logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
// On loopback with no admin token configured the API needs none: open live
// at once, and show the token form only when the gateway asks for one.
if (state.token !== null) login(state.token);
else login("", true);
