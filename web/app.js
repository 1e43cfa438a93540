// The segtrain dashboard: jobs, one job (live curves from its WatchJob stream), workers and a
// comparison of jobs' curves. Plain DOM and uPlot, no framework; every call goes to the
// coordinator's /api/v1 (coordinator/src/web/api.rs, docs/dashboard.md) with the bearer token
// the user signed in with, kept in sessionStorage (this tab only).
"use strict";

const TOKEN_KEY = "segtrain.token";
const POLL_MS = 2000;
const STATES = ["queued", "scheduled", "running", "restarting", "canceling", "succeeded", "failed", "canceled"];
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELED"]);
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

// ---- small DOM helpers (text only: names and reasons come from users) ------------------------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    // Through the CSSOM: the page's CSP allows no style attributes.
    else if (k === "style") e.style.cssText = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}
const $ = (sel) => document.querySelector(sel);
function table(headers, rows, attrs = {}) {
  return el("table", attrs,
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null, text: h.label ?? h })))),
    el("tbody", {}, rows));
}
function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6)) return v.toExponential(2);
  return v.toFixed(digits).replace(/\.?0+$/, "") || "0";
}
function fmtDuration(s) {
  if (!Number.isFinite(s) || s < 0) return "–";
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}
function fmtBytes(b) {
  if (!b) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const age = (t) => (t ? fmtDuration((Date.now() - Date.parse(t)) / 1000) : "–");
// UUIDv7 ids start with their creation time: jobs created together share the first digits, so
// the short form is the random end.
const shortId = (id) => id.slice(-8);
const stateBadge = (s, id) => el("span", { class: `state ${s}`, id, text: s });

// ---- the API ------------------------------------------------------------------------------
class SignInNeeded extends Error {}

function headers(extra = {}) {
  const h = { ...extra };
  const t = sessionStorage.getItem(TOKEN_KEY);
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

async function api(path, opts = {}) {
  const resp = await fetch(`/api/v1${path}`, { ...opts, headers: headers(opts.headers) });
  const body = await resp.json().catch(() => ({ message: `HTTP ${resp.status}` }));
  if (resp.status === 401 || resp.status === 403) {
    signIn(body.message);
    throw new SignInNeeded(body.message);
  }
  if (!resp.ok) throw new Error(body.message || `HTTP ${resp.status}`);
  return body;
}

// Server-sent events through fetch (EventSource cannot send the Authorization header). Calls
// onEvent(name, data) per event; resolves when the stream ends.
async function stream(path, onEvent, signal) {
  const resp = await fetch(`/api/v1${path}`, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (resp.status === 401 || resp.status === 403) {
    const body = await resp.json().catch(() => ({}));
    signIn(body.message);
    throw new SignInNeeded(body.message);
  }
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    throw new Error(body.message || `HTTP ${resp.status}`);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trimStart();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

// ---- sign-in ----------------------------------------------------------------------------------
function signIn(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopPage();
  $("#view").replaceChildren();
  $("#signin").hidden = false;
  $("#signout").hidden = true;
  $("#signin-error").textContent = message || "";
}

$("#signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
  $("#token").value = "";
  $("#signin").hidden = true;
  route();
});
$("#signout").addEventListener("click", () => signIn(""));

// Every item of a paged list call (workers, attempts, checkpoints), following next_page_token.
async function everyPage(path, key) {
  const items = [];
  let token = "";
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${token ? `${sep}page_token=${encodeURIComponent(token)}` : ""}`);
    items.push(...page[key]);
    token = page.next_page_token || "";
  } while (token);
  return { [key]: items };
}

// Who submitted a job, and its team ("(team)" for a job from before owners were recorded).
function owner(j) {
  return j.submitted_by ? `${j.submitted_by} (${j.team})` : `(${j.team || "default"})`;
}

// ---- page lifecycle: one page at a time, its timers and streams stopped on leaving ---------
let page = { timers: [], abort: new AbortController() };
function stopPage() {
  page.timers.forEach(clearInterval);
  page.abort.abort();
  page = { timers: [], abort: new AbortController() };
  $("#live").classList.remove("on");
}
function every(ms, fn) {
  const run = () => fn().catch(report);
  run();
  page.timers.push(setInterval(run, ms));
}
function report(e) {
  if (e instanceof SignInNeeded || e.name === "AbortError") return;
  const box = $("#page-error");
  if (box) box.textContent = e.message;
}

function route() {
  stopPage();
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === (parts[0] || "jobs")));
  $("#signin").hidden = true;
  $("#signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
  const view = $("#view");
  view.replaceChildren();
  if (parts[0] === "jobs" && parts[1]) jobPage(view, decodeURIComponent(parts[1]));
  else if (parts[0] === "workers") workersPage(view);
  else if (parts[0] === "compare") comparePage(view, (params.get("jobs") || "").split(",").filter(Boolean));
  else jobsPage(view, params.get("state") || "");
}
window.addEventListener("hashchange", route);

// ---- charts ------------------------------------------------------------------------------------
// One uPlot per curve set: x is the iteration; drag to zoom, double-click to reset, the legend
// shows the values under the cursor. `data-points` on the box counts the points drawn.
function chart(box, title, labels, opts = {}) {
  box.append(el("h3", { text: title }));
  const holder = el("div");
  box.append(holder);
  const u = new uPlot({
    width: Math.max(380, box.clientWidth - 16 || 420),
    height: 220,
    scales: { x: { time: false }, y: { distr: opts.log ? 3 : 1 } },
    series: [{ label: "iteration" }, ...labels.map((l, i) => ({
      label: l, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
      value: (_, v) => fmtNum(v),
    }))],
    axes: [{}, { size: 60, values: (_, ticks) => ticks.map((v) => fmtNum(v, 3)) }],
    cursor: { drag: { x: true, y: false } },
  }, [[], ...labels.map(() => [])], holder);
  box.dataset.points = "0";
  return {
    set(data) {
      u.setData(data);
      const n = data.slice(1).reduce((s, ys) => s + ys.filter((v) => v !== null && v !== undefined).length, 0);
      box.dataset.points = String(n);
    },
  };
}

// Points of one curve: the newest attempt's value per iteration, as GetMetrics serves them.
class Series {
  constructor() { this.by = new Map(); }
  put(iteration, value, attempt) {
    const old = this.by.get(iteration);
    if (!old || old.attempt <= attempt) this.by.set(iteration, { value: value ?? NaN, attempt });
  }
  xy() {
    const xs = [...this.by.keys()].sort((a, b) => a - b);
    return [xs, xs.map((x) => { const v = this.by.get(x).value; return Number.isFinite(v) ? v : null; })];
  }
}

// ---- jobs ----------------------------------------------------------------------------------------
function jobsPage(view, state) {
  const filter = el("select", { id: "state-filter", onchange: (e) => { location.hash = e.target.value ? `#/jobs?state=${e.target.value}` : "#/jobs"; } },
    el("option", { value: "", text: "every state" }),
    STATES.map((s) => el("option", { value: s, text: s, selected: s === state })));
  const compare = el("button", { class: "primary", type: "button", id: "compare", onclick: () => {
    const ids = [...document.querySelectorAll("input.pick:checked")].map((c) => c.value);
    if (ids.length >= 2) location.hash = `#/compare?jobs=${ids.join(",")}`;
  } }, "Compare selected");
  const body = el("div", { id: "jobs" });
  view.append(el("h1", { text: "Jobs" }), el("div", { class: "toolbar" }, filter, compare), el("p", { id: "page-error", class: "error" }), body);
  const picked = new Set();
  every(POLL_MS, async () => {
    const q = state ? `?state=${encodeURIComponent(state)}&page_size=200` : "?page_size=200";
    const { jobs } = await api(`/jobs${q}`);
    document.querySelectorAll("input.pick").forEach((c) => (c.checked ? picked.add(c.value) : picked.delete(c.value)));
    if (!jobs.length) { body.replaceChildren(el("p", { class: "muted", text: "No jobs." })); return; }
    const rows = jobs.map((j) => {
      const frac = j.max_iters ? Math.min(1, j.iteration / j.max_iters) : 0;
      const rates = j.rates || {};
      const eta = j.state === "RUNNING" && rates.step_ms ? ((j.max_iters - j.iteration) * rates.step_ms) / 1000 : NaN;
      return el("tr", { "data-job-id": j.id },
        el("td", {}, el("input", { type: "checkbox", class: "pick", value: j.id, checked: picked.has(j.id) })),
        el("td", {}, el("a", { href: `#/jobs/${j.id}`, text: j.name || j.id })),
        el("td", {}, stateBadge(j.state)),
        el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${(frac * 100).toFixed(1)}%` })), `${j.iteration} / ${j.max_iters}`),
        el("td", { class: "num", text: rates.images_per_s ? fmtNum(rates.images_per_s, 1) : "–" }),
        el("td", { class: "num", text: fmtDuration(eta) }),
        el("td", { class: "num", text: `${j.restarts} / ${j.max_restarts}` }),
        el("td", { class: "num", text: age(j.created_at) }),
        el("td", { class: "owner", text: owner(j) }),
        el("td", { class: "muted", text: shortId(j.id) }));
    });
    body.replaceChildren(table(["", "Name", "State", "Progress", { label: "Images/s", num: true }, { label: "ETA", num: true },
      { label: "Restarts", num: true }, { label: "Age", num: true }, "Owner", "Id"], rows, { id: "jobs-table" }));
  });
}

// ---- one job ---------------------------------------------------------------------------------------
function jobPage(view, id) {
  const cancel = el("button", { class: "danger", id: "cancel", type: "button", disabled: true }, "Cancel job");
  const head = el("div", { class: "summary", id: "job-summary" });
  const charts = el("div", { class: "charts" },
    el("div", { class: "chart", id: "chart-loss" }), el("div", { class: "chart", id: "chart-lr" }), el("div", { class: "chart", id: "chart-miou" }));
  const timeline = el("div", { id: "timeline" });
  const attempts = el("div", { id: "attempts" });
  const classes = el("div", { id: "class-iou" });
  const checkpoints = el("div", { id: "checkpoints" });
  const spec = el("pre", { id: "spec" });
  view.append(
    el("div", { class: "toolbar" }, el("h1", { id: "job-name", text: id }), cancel),
    el("p", { id: "page-error", class: "error" }), head, charts,
    el("div", { class: "grid2" },
      el("div", {}, el("h2", { text: "Last evaluation: IoU per class" }), classes),
      el("div", {}, el("h2", { text: "Checkpoints" }), checkpoints)),
    el("div", { class: "grid2" },
      el("div", {}, el("h2", { text: "State timeline" }), timeline),
      el("div", {}, el("h2", { text: "Attempts" }), attempts)),
    el("h2", { text: "Resolved spec" }), spec);

  const loss = new Series(), lr = new Series(), miou = new Series();
  const lossChart = chart($("#chart-loss"), "Training loss", ["loss"]);
  const lrChart = chart($("#chart-lr"), "Learning rate", ["lr"]);
  const miouChart = chart($("#chart-miou"), "Validation mIoU", ["miou"]);
  let job = null, classNames = [], dirty = false;
  const changes = [];

  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${job?.name || id}? Running ranks stop after a checkpoint.`)) return;
    cancel.disabled = true;
    try {
      showJob(await api(`/jobs/${id}/cancel`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reason: "canceled from the dashboard" }) }));
    } catch (e) { report(e); }
  });

  function showJob(j) {
    job = { ...job, ...j };
    $("#job-name").textContent = job.name || id;
    const frac = job.max_iters ? Math.min(1, job.iteration / job.max_iters) : 0;
    head.replaceChildren(
      el("div", {}, el("span", { text: "state" }), stateBadge(job.state, "job-state")),
      el("div", {}, el("span", { text: "progress" }), el("b", { id: "job-progress", text: `${job.iteration} / ${job.max_iters} (${(frac * 100).toFixed(1)}%)` })),
      el("div", {}, el("span", { text: "attempt" }), el("b", { text: job.attempt })),
      el("div", {}, el("span", { text: "restarts" }), el("b", { text: `${job.restarts} / ${job.max_restarts}` })),
      el("div", {}, el("span", { text: "preemptions" }), el("b", { text: job.preemptions })),
      el("div", {}, el("span", { text: "world" }), el("b", { text: job.attempt_world_size || job.world_size })),
      el("div", {}, el("span", { text: "variant" }), el("b", { text: job.variant })),
      el("div", {}, el("span", { text: "age" }), el("b", { text: age(job.created_at) })),
      el("div", {}, el("span", { text: "owner" }), el("b", { id: "job-owner", text: owner(job) })),
      el("div", {}, el("span", { text: "id" }), el("b", { text: job.id })));
    cancel.disabled = TERMINAL.has(job.state) || job.state === "CANCELING";
    if (j.spec) spec.textContent = JSON.stringify(j.spec, null, 2);
  }

  async function refreshTables() {
    const [a, c] = await Promise.all([everyPage(`/jobs/${id}/attempts`, "attempts"), everyPage(`/jobs/${id}/checkpoints`, "checkpoints")]);
    attempts.replaceChildren(table(["#", "State", "World", "Workers", "Reason"], a.attempts.map((x) =>
      el("tr", {}, el("td", { text: x.attempt }), el("td", {}, stateBadge(x.state)), el("td", { text: x.world_size }),
        el("td", { text: (x.workers || []).join(", ") }), el("td", { text: x.reason || "" })))));
    checkpoints.replaceChildren(c.checkpoints.length ? table(["Iteration", "Attempt", { label: "Size", num: true }, "State", { label: "mIoU", num: true }],
      c.checkpoints.map((x) => el("tr", {}, el("td", { text: x.iteration }), el("td", { text: x.attempt }),
        el("td", { class: "num", text: fmtBytes(x.bytes) }), el("td", { text: x.state }),
        el("td", { class: "num", text: x.metrics && x.metrics.miou != null ? `${(x.metrics.miou * 100).toFixed(2)}%` : "–" })))) : el("p", { class: "muted", text: "None yet." }));
  }

  function showTimeline() {
    timeline.replaceChildren(table(["Time", "Attempt", "Change", "Reason"], changes.map((c) =>
      el("tr", {}, el("td", { text: c.time.replace("T", " ").replace("Z", "") }), el("td", { text: c.attempt }),
        el("td", {}, c.from ? `${c.from} → ` : "", stateBadge(c.to)), el("td", { text: c.reason })))));
  }

  function showEval(e) {
    const rows = e.class_iou.map((v, i) => el("tr", {},
      el("td", { text: classNames[i] ?? String(i) }),
      el("td", { class: "num" }, v == null ? "–" : el("span", {}, el("span", { class: "iou", style: `width:${Math.round(v * 100)}px` }), `${(v * 100).toFixed(1)}%`))));
    classes.replaceChildren(el("p", { text: `iteration ${e.iteration}: mIoU ${e.miou == null ? "–" : (e.miou * 100).toFixed(2) + "%"}, pixel accuracy ${e.aacc == null ? "–" : (e.aacc * 100).toFixed(2) + "%"}` }),
      table(["Class", { label: "IoU", num: true }], rows, { id: "class-iou-table" }));
  }

  function draw() {
    if (!dirty) return;
    dirty = false;
    lossChart.set(loss.xy());
    lrChart.set(lr.xy());
    miouChart.set(miou.xy());
  }

  function onEvent(name, ev) {
    if (name === "error") { report(new Error(ev.message)); return; }
    if (name !== "job_event") return;
    // How many events the page has taken in (the browser test checks a resume adds no repeat).
    view.dataset.events = String(Number(view.dataset.events || 0) + 1);
    const d = ev.data;
    if (ev.kind === "metrics") {
      if ("loss" in d.values) loss.put(d.iteration, d.values.loss, ev.attempt);
      if ("lr" in d.values) lr.put(d.iteration, d.values.lr, ev.attempt);
      if (!job || d.iteration > job.iteration) showJob({ iteration: d.iteration });
      dirty = true;
    } else if (ev.kind === "eval") {
      miou.put(d.iteration, d.miou, ev.attempt);
      showEval(d);
      dirty = true;
    } else if (ev.kind === "state_change") {
      changes.push({ time: ev.time, attempt: ev.attempt, from: d.from, to: d.to, reason: d.reason });
      showTimeline();
      showJob({ state: d.to });
      refreshTables().catch(report);
    } else if (ev.kind === "checkpoint") {
      refreshTables().catch(report);
    }
  }

  (async () => {
    const j = await api(`/jobs/${id}`);
    classNames = j.class_names || [];
    showJob(j);
    await refreshTables();
    page.timers.push(setInterval(draw, 300));
    page.timers.push(setInterval(() => api(`/jobs/${id}`).then(showJob).catch(report), 5 * POLL_MS));
    // Follow the event log from the start; after a dropped connection, resume from the last id.
    let after = 0;
    const signal = page.abort.signal;
    while (!signal.aborted) {
      let ended = false;
      $("#live").classList.add("on");
      try {
        await stream(`/jobs/${id}/events?after_event_id=${after}`, (name, ev) => {
          if (name === "end") ended = true;
          if (name === "job_event") after = ev.id;
          onEvent(name, ev);
        }, signal);
      } catch (e) {
        if (e instanceof SignInNeeded || signal.aborted) return;
        report(e);
      }
      $("#live").classList.remove("on");
      if (ended) {
        dirty = true;
        draw();
        showJob(await api(`/jobs/${id}`));
        view.dataset.streamEnded = "1";
        return;
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
  })().catch(report);
}

// ---- workers --------------------------------------------------------------------------------------
function workersPage(view) {
  const body = el("div", { id: "workers", class: "hosts" });
  view.append(el("h1", { text: "Workers" }), el("p", { id: "page-error", class: "error" }), body);
  every(POLL_MS, async () => {
    const { workers } = await everyPage("/workers", "workers");
    if (!workers.length) { body.replaceChildren(el("p", { class: "muted", text: "No worker daemon has registered." })); return; }
    const hosts = new Map();
    for (const w of workers) {
      if (!hosts.has(w.host)) hosts.set(w.host, []);
      hosts.get(w.host).push(w);
    }
    body.replaceChildren(...[...hosts.entries()].sort().map(([host, ws]) => el("div", { class: "host" },
      el("h3", { text: `${host} · ${ws.length} ${ws.every((w) => w.gpu_index < 0) ? "CPU worker" : "GPU"}${ws.length === 1 ? "" : "s"}` }),
      el("div", { class: "gpus" }, ws.sort((a, b) => a.gpu_index - b.gpu_index).map((w) => el("div", { class: "gpu", "data-worker": w.name },
        el("b", { text: w.gpu_index < 0 ? "cpu" : `GPU ${w.gpu_index}` }),
        el("div", { class: "muted", text: w.gpu_index < 0 ? "CPU worker" : `${w.gpu_name} · ${fmtBytes(w.gpu_memory_bytes)}` }),
        el("div", {}, stateBadge(w.state), w.leaving ? " leaving" : ""),
        w.job_id ? el("div", {}, el("a", { href: `#/jobs/${w.job_id}`, text: shortId(w.job_id) }), ` rank ${w.rank}, attempt ${w.attempt}`) : el("div", { class: "muted", text: "no job" }),
        el("div", { class: "muted", text: `heartbeat ${age(w.last_heartbeat)} ago` })))))));
  });
}

// ---- compare ----------------------------------------------------------------------------------------
function comparePage(view, ids) {
  view.append(el("h1", { text: "Compare" }), el("p", { id: "page-error", class: "error" }));
  if (ids.length < 2) {
    view.append(el("p", { class: "muted", text: "Pick two or more jobs on the Jobs page and press “Compare selected”." }));
    return;
  }
  const charts = el("div", { class: "charts" }, el("div", { class: "chart", id: "compare-loss" }), el("div", { class: "chart", id: "compare-miou" }));
  view.append(charts);
  (async () => {
    const jobs = await Promise.all(ids.map((id) => api(`/jobs/${id}`)));
    const labels = jobs.map((j) => `${j.name || shortId(j.id)} (${shortId(j.id)})`);
    const lossChart = chart($("#compare-loss"), "Training loss", labels);
    const miouChart = chart($("#compare-miou"), "Validation mIoU", labels);
    every(5 * POLL_MS, async () => {
      const all = await Promise.all(ids.map((id) => api(`/jobs/${id}/metrics?name=loss&name=miou&limit=100000`)));
      const per = (name) => all.map(({ points }) => {
        const s = new Series();
        for (const p of points) if (p.name === name) s.put(p.iteration, p.value, p.attempt);
        return s.xy();
      });
      lossChart.set(uPlot.join(per("loss")));
      miouChart.set(uPlot.join(per("miou")));
    });
  })().catch(report);
}

route();
