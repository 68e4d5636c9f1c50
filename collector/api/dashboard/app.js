// modtrack dashboard: plain DOM + SVG, no library, no network beyond the collector's API.
// Polls the API every 2 s; per-step module figures are cached (a merged step never changes),
// so each poll fetches only the steps that are new.
"use strict";

const POLL_MS = 2000;
const TRACE_MAX_STEPS = 200; // the trace API's step range per request (collector/api/trace_export.py MAX_STEPS)
const WINDOW_STEPS = 10;   // heatmap: mean over the last N steps
const CHART_STEPS = 120;   // step-time chart
const RESOLVED_SHOWN = 6;  // straggler list: every active episode, then the latest resolved ones
const API = "api/v1";
const PERFETTO = "https://ui.perfetto.dev";

const state = {
  token: null,
  job: null,
  jobs: [],
  heat: null,             // heatData() of the window
  window: [],             // the window's step numbers
  phase: null,            // null: follow the active straggler's phase
  stepMetric: "compute",  // step chart: "compute" (wall minus sync wait) or "wall"
  module: null,           // module shown as bars: the verdict's, until the user picks one
  modulePicked: false,
  steps: [],              // /steps answer for the selected job
  stragglers: [],
  moduleCache: new Map(), // "job|step" -> modules answer
  capture: null,          // {job, from, to, wanted, trace}
  busy: false,
};

// ---- small helpers -------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function median(values) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return NaN;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

const fmtMs = (ms) => (!Number.isFinite(ms) ? "–" : ms >= 100 ? ms.toFixed(0) + " ms" : ms >= 10 ? ms.toFixed(1) + " ms" : ms.toFixed(2) + " ms");
const fmtX = (x) => (Number.isFinite(x) ? x.toFixed(2) + "×" : "–");

// ---- the API ---------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function readToken() {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    localStorage.setItem("modtrack.token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // keep it out of the address bar
  }
  state.token = localStorage.getItem("modtrack.token");
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const resp = await fetch(`${API}/${path}`, { ...options, headers });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new HttpError(resp.status, (body && body.error) || resp.statusText);
  return body;
}

// ---- polling ---------------------------------------------------------------------------

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  try {
    state.jobs = (await api("jobs")).jobs || [];
    if (!state.job || !state.jobs.some((j) => j.job === state.job)) {
      state.job = state.jobs.length ? state.jobs[0].job : null;
    }
    renderJobs();
    if (state.job) await refreshJob(state.job);
    else renderEmpty();
    setLive(`live · updated ${new Date().toLocaleTimeString()}`, false);
    $("token-form").hidden = true;
  } catch (err) {
    if (err.status === 401) {
      $("token-form").hidden = false;
      setLive("the API wants a token", true);
    } else {
      setLive(`cannot reach the collector: ${err.message}`, true);
    }
  } finally {
    state.busy = false;
  }
}

async function refreshJob(job) {
  const q = encodeURIComponent(job);
  const [steps, stragglers] = await Promise.all([
    api(`jobs/${q}/steps?last=${CHART_STEPS}`),
    api(`jobs/${q}/stragglers`),
  ]);
  if (job !== state.job) return;  // the user switched job meanwhile
  state.steps = steps.steps || [];
  state.stragglers = stragglers.stragglers || [];
  const window = state.steps.slice(-WINDOW_STEPS).map((s) => s.step);
  const missing = window.filter((s) => !state.moduleCache.has(`${job}|${s}`));
  const answers = await Promise.all(missing.map((s) => api(`jobs/${q}/modules?step=${s}`)));
  missing.forEach((s, i) => state.moduleCache.set(`${job}|${s}`, answers[i]));
  for (const key of state.moduleCache.keys()) {  // keep the cache to the window
    const [j, s] = [key.slice(0, key.lastIndexOf("|")), Number(key.slice(key.lastIndexOf("|") + 1))];
    if (j !== job || !window.includes(s)) state.moduleCache.delete(key);
  }
  state.heat = heatData(window.map((s) => state.moduleCache.get(`${job}|${s}`)).filter(Boolean));
  state.window = window;
  render();
}

function setLive(text, error) {
  const live = $("live");
  live.textContent = text;
  live.dataset.error = error ? "true" : "false";
}

// ---- data shaping ----------------------------------------------------------------------

// Active episodes, the costliest first: the verdict names the one that costs the job most.
function activeCulprits() {
  return state.stragglers.filter((s) => s.state === "active")
    .sort((a, b) => (b.cost_ms_per_step || 0) - (a.cost_ms_per_step || 0));
}

function hostOfRank() {
  const hosts = new Map();
  for (const step of state.steps) for (const r of step.ranks) hosts.set(r.rank, r.host);
  return hosts;
}

// The ranks an episode blames: its rank, or for a host-level episode (rank -1) the ranks it
// lists (every rank of the host when it lists none).
function episodeHas(s, rank, hosts) {
  if (s.rank >= 0) return s.rank === rank;
  return s.ranks && s.ranks.length ? s.ranks.includes(rank) : hosts.get(rank) === s.host;
}

// The module x phase entries an episode lists (every place its rank is slow); older answers: its one module.
function listed(s) {
  return s.modules && s.modules.length ? s.modules : [{ module: s.module, phase: s.phase, excess_ms: s.excess_ms, slowdown: s.slowdown }];
}

// Is (rank, module, phase) a straggler's cell?
function isCulprit(rank, module, phase, hosts) {
  return activeCulprits().some((s) => episodeHas(s, rank, hosts)
    && listed(s).some((e) => e.module === module && e.phase === phase));
}

function isCulpritRank(rank, hosts) {
  return activeCulprits().some((s) => episodeHas(s, rank, hosts));
}

// The episode's slowdown, or where its peers spend nothing in its cause (garbage collection: no ratio) its excess.
function slowdownText(s) {
  const top = (s.modules || []).find((e) => e.module === s.module && e.phase === s.phase);
  return top && top.slowdown == null ? `+${fmtMs(top.excess_ms || 0)}` : fmtX(s.slowdown);
}

function blamed(s) {
  if (s.rank >= 0) return String(s.rank);
  return s.ranks && s.ranks.length ? `host: ${s.ranks.join(", ")}` : "host: all";
}

// Per (phase, module, rank): the median ms over the window's steps (one noisy step does not
// paint a cell), and its ratio to the median of the ranks that ran the module.
function heatData(answers) {
  const series = new Map();  // "phase\tmodule" -> {module, phase, order, ranks: Map(rank -> [ms...])}
  let order = 0;
  for (const answer of answers) {
    for (const m of answer.modules || []) {
      const key = `${m.phase}\t${m.module}`;
      if (!series.has(key)) series.set(key, { module: m.module, phase: m.phase, order: order++, ranks: new Map() });
      const entry = series.get(key);
      for (const [rank, ms] of Object.entries(m.ms_by_rank || {})) {
        if (ms === null || !Number.isFinite(ms)) continue;
        if (!entry.ranks.has(Number(rank))) entry.ranks.set(Number(rank), []);
        entry.ranks.get(Number(rank)).push(ms);
      }
    }
  }
  const rows = [];
  const ranks = new Set();
  for (const entry of series.values()) {
    const ms = new Map([...entry.ranks].map(([r, values]) => [r, median(values)]));
    const med = median([...ms.values()]);
    const ratio = new Map([...ms].map(([r, v]) => [r, med > 0 ? v / med : (v > 0 ? Infinity : 1)]));
    ms.forEach((_, r) => ranks.add(r));
    rows.push({ module: entry.module, phase: entry.phase, order: entry.order, ms, median: med, ratio });
  }
  rows.sort((a, b) => a.order - b.order);
  return { rows, ranks: [...ranks].sort((a, b) => a - b) };
}

// ---- rendering -------------------------------------------------------------------------

function renderJobs() {
  const nav = $("jobs");
  nav.replaceChildren(...state.jobs.map((j) => el("button", {
    "data-job": j.job, "aria-current": j.job === state.job ? "true" : "false",
    onclick: () => {
      state.job = j.job; state.module = null; state.modulePicked = false; state.phase = null;
      state.heat = null; state.steps = []; refresh();
    },
  }, el("span", { class: "dot", "data-bad": j.state && j.state !== "running" && j.state !== "live" ? "true" : "false" }),
  j.job, el("span", { class: "meta", text: `${j.ranks_reporting ?? "?"}/${j.world_size ?? "?"} ranks · step ${j.last_step ?? "–"}${
    j.sample_every > 1 ? ` · module detail every ${j.sample_every} steps` : ""}` }))));
}

function renderEmpty() {
  $("verdict").dataset.state = "loading";
  $("verdict-title").textContent = "No job has reported yet.";
  $("verdict-detail").textContent = "Start training with the agent: torchrun … -m modtrack.agent --collector HOST:PORT train.py";
}

function render() {
  const { heat, window } = state;
  if (!heat) return;
  const hosts = hostOfRank();
  const culprits = activeCulprits();
  const phase = state.phase || (culprits[0] && culprits[0].phase) || "forward";
  renderVerdict(culprits);
  renderPhaseSwitch(phase);
  renderHeatmap(heat, phase, hosts, window);
  if (!state.modulePicked && culprits[0]) state.module = culprits[0].module;
  renderBars(heat, phase, hosts);
  renderStepChart(hosts);
  renderStragglers();
  renderCapture();
}

function renderVerdict(culprits) {
  const v = $("verdict");
  if (!culprits.length) {
    v.dataset.state = "clear";
    $("verdict-title").textContent = "No straggler: every rank runs at its peers' pace.";
    const last = state.steps.length ? state.steps[state.steps.length - 1].step : null;
    $("verdict-detail").textContent = last === null ? "" : `Watching ${state.job}, last step ${last}.`;
    return;
  }
  const s = culprits[0];
  v.dataset.state = "straggler";
  const who = s.rank >= 0 ? `rank ${s.rank} @ ${s.host}`
    : `host ${s.host} (ranks ${s.ranks && s.ranks.length ? s.ranks.join(", ") : "all"})`;
  const title = $("verdict-title");
  const cause = s.cause ? `${s.cause}: ` : "";
  const entries = listed(s);
  const where = entries.slice(0, 4).map((e) => `${e.module} (${e.phase}) +${fmtMs(e.excess_ms || 0)}`).join(", ")
    + (entries.length > 4 ? `, and ${entries.length - 4} more` : "");
  title.replaceChildren(el("b", { text: who }), ` is slow — ${cause}${where}`);
  const pct = Number.isFinite(s.cost_pct) ? ` (${s.cost_pct.toFixed(1)}% of the step)` : "";
  const more = culprits.length > 1 ? ` · ${culprits.length - 1} more below` : "";
  const gpu = s.explanation ? ` · GPU: ${s.explanation}` : "";  // GPU health: what the culprit's GPU says
  $("verdict-detail").textContent = `since step ${s.first_step} · costs the job ${fmtMs(s.cost_ms_per_step)} per step${pct}${gpu}${more}`;
}

function renderPhaseSwitch(phase) {
  for (const b of document.querySelectorAll("#phase-switch button")) {
    b.setAttribute("aria-pressed", b.dataset.phase === phase ? "true" : "false");
  }
}

function heatColor(ratio) {
  if (!Number.isFinite(ratio)) return ratio > 0 ? "#e0362c" : "#222b35";
  if (ratio < 1) {  // faster than the median: blue, faint
    const t = Math.min(1, (1 - ratio) / 0.5);
    return mix([34, 43, 53], [47, 95, 138], t);
  }
  const t = Math.min(1, (ratio - 1) / 1.0);  // 1× .. 2× and above
  if (t < 0.5) return mix([34, 43, 53], [168, 69, 44], t / 0.5 * 0.9);
  return mix([168, 69, 44], [224, 54, 44], (t - 0.5) / 0.5);
}

function mix(a, b, t) {
  const c = a.map((x, i) => Math.round(x + (b[i] - x) * t));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

function shortName(module, root) {
  return root && module.startsWith(root + ".") ? module.slice(root.length + 1) : module;
}

function renderHeatmap(heat, phase, hosts, window) {
  const box = $("heatmap");
  const rows = heat.rows.filter((r) => r.phase === phase);
  $("heat-window").textContent = window.length ? `steps ${window[0]}–${window[window.length - 1]}` : "";
  if (!rows.length) {
    box.replaceChildren(el("p", { class: "empty", text: `No ${phase} figures in the recent steps.` }));
    return;
  }
  const root = rows[0].module.split(".")[0];
  const head = el("tr", {}, el("th", { class: "module", text: "module" }),
    ...heat.ranks.map((r) => el("th", { class: "rank", "data-rank": r, "data-culprit-rank": isCulpritRank(r, hosts) ? "true" : null, text: `r${r}` })));
  const body = rows.map((row) => {
    const name = shortName(row.module, root);
    const depth = row.module === root ? 0 : name.split(".").length;
    const label = el("th", { class: "module", title: row.module, "data-module": row.module,
      onclick: () => pickModule(row.module) },
    el("span", { class: "tree", text: "· ".repeat(Math.max(0, depth - 1)) }), name);
    const cells = heat.ranks.map((rank) => {
      const ratio = row.ratio.get(rank);
      if (ratio === undefined) return el("td", { "data-rank": rank, "data-module": row.module, "data-empty": "true", text: "·" });
      const culprit = isCulprit(rank, row.module, phase, hosts);
      return el("td", {
        "data-rank": rank, "data-module": row.module, "data-phase": phase, "data-slowdown": ratio.toFixed(3),
        "data-culprit": culprit ? "true" : "false",
        style: `background:${heatColor(ratio)}`,
        title: `rank ${rank} · ${row.module} · ${phase}\n${fmtMs(row.ms.get(rank))} (median ${fmtMs(row.median)}) = ${fmtX(ratio)}`,
        onclick: () => pickModule(row.module),
        text: ratio >= 1.5 || culprit ? fmtX(ratio) : "",
      });
    });
    return el("tr", { "data-module": row.module }, label, ...cells);
  });
  box.replaceChildren(el("table", { id: "heat-table" }, el("thead", {}, head), el("tbody", {}, ...body)));
  markSelected();
}

function pickModule(module) {
  state.module = module;
  state.modulePicked = true;
  render();
}

function markSelected() {
  for (const tr of document.querySelectorAll("#heat-table tbody tr")) {
    tr.dataset.selected = tr.dataset.module === state.module ? "true" : "false";
  }
}

function renderBars(heat, phase, hosts) {
  const box = $("module-bars");
  const row = heat.rows.find((r) => r.module === state.module && r.phase === phase);
  if (!row) {
    $("bars-title").textContent = "Module time per rank";
    box.replaceChildren(el("p", { class: "empty", text: "Click a module in the heatmap." }));
    return;
  }
  $("bars-title").textContent = "Module time per rank";
  const max = Math.max(...row.ms.values(), row.median) || 1;
  const bars = [...row.ms].sort((a, b) => a[0] - b[0]).map(([rank, ms]) => {
    const culprit = isCulprit(rank, row.module, phase, hosts);
    return el("div", { class: "bar-row", "data-rank": rank, "data-culprit": culprit ? "true" : "false" },
      el("span", { text: `rank ${rank}` }),
      el("div", { class: "track" },
        el("div", { class: "fill", style: `width:${(100 * ms / max).toFixed(1)}%` }),
        el("div", { class: "median", style: `left:${(100 * row.median / max).toFixed(1)}%`, title: "median" })),
      el("span", { class: "num", text: fmtMs(ms) }));
  });
  box.replaceChildren(el("div", { class: "sub", "data-module": row.module, text: `${row.module} · ${phase} · self time, median of the window; dashed: median of the ranks` }), ...bars);
}

function renderStepChart(hosts) {
  const box = $("step-chart");
  const steps = state.steps;
  if (steps.length < 2) {
    box.replaceChildren(el("p", { class: "empty", text: "Waiting for steps…" }));
    return;
  }
  const W = Math.max(600, box.clientWidth || 900), H = 240, L = 56, R = 70, T = 10, B = 26;
  const series = new Map();  // rank -> [[step, wall_ms]]
  // Under synchronous training every rank's wall time is the slowest's (the others wait in the
  // gradient all-reduce); wall minus that wait is what tells the culprit apart.
  const value = state.stepMetric === "wall" ? (r) => r.wall_ms : (r) => r.wall_ms - (r.sync_wait_ms || 0);
  for (const s of steps) for (const r of s.ranks) {
    const v = value(r);
    if (!Number.isFinite(v)) continue;
    if (!series.has(r.rank)) series.set(r.rank, []);
    series.get(r.rank).push([s.step, v]);
  }
  const x0 = steps[0].step, x1 = steps[steps.length - 1].step;
  // Scale to the bulk of the points, not to one warm-up step: what lies above is drawn at the top.
  const all = [...series.values()].flat().map((p) => p[1]).sort((a, b) => a - b);
  const yMax = niceCeil(Math.max(Math.min(all[all.length - 1] * 1.05, all[Math.floor(0.9 * (all.length - 1))] * 1.6), 1e-3));
  const X = (s) => L + (W - L - R) * (x1 > x0 ? (s - x0) / (x1 - x0) : 0);
  const Y = (ms) => T + (H - T - B) * (1 - Math.min(Math.max(ms, 0), yMax) / yMax);
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": "step time per rank" });
  const axis = el("svg:g", { class: "axis" });
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    axis.append(el("svg:line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: "grid-line" }),
      el("svg:text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end", text: fmtMs(v) }));
  }
  for (const s of [x0, Math.round((x0 + x1) / 2), x1]) {
    axis.append(el("svg:text", { x: X(s), y: H - 8, "text-anchor": "middle", text: `step ${s}` }));
  }
  svg.append(axis);
  const ranks = [...series.keys()].sort((a, b) => a - b);
  const ordered = ranks.filter((r) => !isCulpritRank(r, hosts)).concat(ranks.filter((r) => isCulpritRank(r, hosts)));
  for (const rank of ordered) {  // the culprit drawn last, on top
    const pts = series.get(rank);
    const culprit = isCulpritRank(rank, hosts);
    svg.append(el("svg:polyline", { class: "rank-line", "data-rank": rank, "data-culprit": culprit ? "true" : "false",
      points: pts.map(([s, ms]) => `${X(s).toFixed(1)},${Y(ms).toFixed(1)}`).join(" ") }));
  }
  let lastY = -Infinity;  // culprits' labels at their lines' ends, kept from overlapping
  const labels = ordered.filter((r) => isCulpritRank(r, hosts)).map((r) => {
    const pts = series.get(r);
    const [s, ms] = pts[pts.length - 1];
    return { rank: r, x: X(s) + 6, y: Y(ms) + 4 };
  }).sort((a, b) => a.y - b.y);
  for (const l of labels) {
    l.y = Math.max(l.y, lastY + 13);
    lastY = l.y;
    svg.append(el("svg:text", { class: "label", "data-culprit": "true", x: l.x, y: l.y, text: `rank ${l.rank}` }));
  }
  box.replaceChildren(svg);
  const culpritRanks = ranks.filter((r) => isCulpritRank(r, hosts));
  for (const b of document.querySelectorAll("#metric-switch button")) {
    b.setAttribute("aria-pressed", b.dataset.metric === state.stepMetric ? "true" : "false");
  }
  const what = state.stepMetric === "wall" ? "wall time per step" : "wall time minus sync wait, per step";
  $("steps-legend").textContent = `${ranks.length} ranks, ${what}` +
    (culpritRanks.length ? ` · red: rank ${culpritRanks.join(", ")}` : "");
}

function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function renderStragglers() {
  const body = $("straggler-rows");
  if (!state.stragglers.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "empty", text: "None so far." })));
    return;
  }
  const active = state.stragglers.filter((s) => s.state === "active");
  const resolved = state.stragglers.filter((s) => s.state !== "active");
  const shown = active.concat(resolved.slice(0, RESOLVED_SHOWN));
  const older = resolved.length - Math.min(resolved.length, RESOLVED_SHOWN);
  const rows = shown.map((s) => el("tr", {
    "data-rank": s.rank, "data-ranks": s.rank >= 0 ? String(s.rank) : (s.ranks || []).join(","),
    "data-module": s.module, "data-phase": s.phase, "data-state": s.state,
    onclick: () => { state.phase = s.phase; pickModule(s.module); },
  },
  el("td", { text: s.state }), el("td", { text: blamed(s) }), el("td", { text: s.host }),
  el("td", { text: s.cause ? `${s.module} · ${s.cause}` : s.module, title: listed(s).map((e) => `${e.module} (${e.phase}) +${fmtMs(e.excess_ms || 0)}`).join("\n") }),
  el("td", { text: s.phase }), el("td", { class: "num", text: slowdownText(s) }),
  el("td", { class: "num", text: s.first_step }), el("td", { class: "num", text: s.last_step }),
  el("td", { class: "num", text: fmtMs(s.cost_ms_per_step) })));
  if (older > 0) rows.push(el("tr", { class: "older" }, el("td", { colspan: 9, class: "hint", text: `and ${older} older resolved episode(s)` })));
  body.replaceChildren(...rows);
}

// ---- capture ---------------------------------------------------------------------------

async function startCapture() {
  if (!state.job) return;
  const job = state.job;
  const n = Math.max(1, Math.min(50, Number($("capture-steps").value) || 3));
  const last = state.steps.length ? state.steps[state.steps.length - 1].step : 0;
  $("capture-btn").disabled = true;
  try {
    const answer = await api(`jobs/${encodeURIComponent(job)}/capture?steps=${n}`, { method: "POST" });
    state.capture = { job, wanted: n, from: last + 1, to: last + n + 20, captureId: answer && answer.capture_id, trace: null, polls: 0 };
    renderCapture();
    pollCapture();
  } catch (err) {
    $("capture-status").textContent = `capture refused: ${err.message}`;
    $("capture-btn").disabled = false;
  }
}

async function pollCapture() {
  const c = state.capture;
  if (!c || c.trace) return;
  c.polls += 1;
  // The captured steps are the ranks' next ones after the request reached them, which can be well past the last
  // step this page had seen (a job of 50 ms steps runs 40 steps between two of its refreshes): the window follows
  // the job, up to the trace API's 200 steps.
  const latest = state.steps.length ? state.steps[state.steps.length - 1].step : c.to;
  c.to = Math.min(c.from + TRACE_MAX_STEPS - 1, Math.max(c.to, latest + c.wanted + 20));
  try {
    const trace = await api(`jobs/${encodeURIComponent(c.job)}/trace?from_step=${c.from}&to_step=${c.to}`);
    const info = trace.otherData || {};
    const got = info.captured_steps || [];
    if (info.source === "capture" && (got.length >= c.wanted || c.polls > 30)) {
      c.trace = trace;
      c.steps = got;
    }
  } catch (err) {
    $("capture-status").textContent = `waiting for the trace: ${err.message}`;
  }
  renderCapture();
  if (!c.trace && c.polls <= 60 && state.capture === c) setTimeout(pollCapture, POLL_MS);
  else if (!c.trace) { $("capture-status").textContent = "no trace came back (are the agents connected?)"; $("capture-btn").disabled = false; }
}

function renderCapture() {
  const c = state.capture;
  const ready = !!(c && c.trace && c.job === state.job);
  $("trace-download").disabled = !ready;
  $("trace-perfetto").disabled = !ready;
  if (!c) return;
  if (ready) {
    const s = c.steps;
    $("capture-status").textContent = `trace of steps ${s[0]}–${s[s.length - 1]} is in`;
    $("capture-btn").disabled = false;
  } else if (c.job === state.job) {
    $("capture-status").textContent = `capturing ${c.wanted} step(s)…`;
  }
}

function traceBytes() {
  const c = state.capture;
  return new TextEncoder().encode(JSON.stringify(c.trace));
}

function traceFileName() {
  const c = state.capture;
  return `modtrack-${c.job}-steps-${c.steps[0]}-${c.steps[c.steps.length - 1]}.json`;
}

function downloadTrace() {
  const url = URL.createObjectURL(new Blob([traceBytes()], { type: "application/json" }));
  const a = el("a", { href: url, download: traceFileName() });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// Perfetto's documented handshake: open the UI, PING until it answers PONG, then post the buffer.
function openInPerfetto() {
  const win = window.open(PERFETTO + "/#!/viewer");
  if (!win) { $("capture-status").textContent = "the browser blocked the Perfetto window; use Download"; return; }
  const buffer = traceBytes().buffer;
  const title = traceFileName();
  const timer = setInterval(() => win.postMessage("PING", PERFETTO), 50);
  const stop = setTimeout(() => { clearInterval(timer); window.removeEventListener("message", onMessage); }, 30000);
  function onMessage(evt) {
    if (evt.source !== win || evt.data !== "PONG") return;
    clearInterval(timer);
    clearTimeout(stop);
    window.removeEventListener("message", onMessage);
    win.postMessage({ perfetto: { buffer, title, fileName: title } }, PERFETTO);
  }
  window.addEventListener("message", onMessage);
}

// ---- start -----------------------------------------------------------------------------

function start() {
  readToken();
  for (const b of document.querySelectorAll("#phase-switch button")) {
    b.addEventListener("click", () => { state.phase = b.dataset.phase; render(); });
  }
  for (const b of document.querySelectorAll("#metric-switch button")) {
    b.addEventListener("click", () => { state.stepMetric = b.dataset.metric; render(); });
  }
  $("capture-btn").addEventListener("click", startCapture);
  $("trace-download").addEventListener("click", downloadTrace);
  $("trace-perfetto").addEventListener("click", openInPerfetto);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token-input").value.trim() || null;
    if (state.token) localStorage.setItem("modtrack.token", state.token);
    refresh();
  });
  refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
}

start();
