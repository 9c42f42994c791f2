// vramctl's status page: follows GET /events and acts through the API's own
// routes (POST /switch, DELETE /holds/{id}). No framework, no build step.
// Everything shown is set as text (never parsed as HTML). The API token, when
// the server asks for one, is kept in sessionStorage (this tab only) and sent
// as an Authorization header: never in a URL.

const TOKEN_KEY = "vramctl.token";
const LOG_KEPT = 200;
// As the journal keeps them (status/events.py): a failure stays the reason until the model is healthy again.
const FAILURE_STEPS = new Set(["failed", "rejected", "SleepFallback", "removed-outside"]);
const RECOVERED_STEPS = new Set(["healthy", "awake"]);

const state = {
  gpus: {}, // gpu -> {status, switches, queue, notes, memory}
  specs: {}, // gpu -> {deployment, models}
  readOnly: null,
  notes: [],
  busy: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function clock(t) {
  if (typeof t !== "number") return "";
  const d = new Date(t * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function ago(since) {
  const s = Math.max(0, Date.now() / 1000 - since);
  if (s < 90) return `${s.toFixed(0)} s`;
  if (s < 5400) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function gpuOf(g) {
  const key = String(g);
  if (!state.gpus[key]) state.gpus[key] = { status: null, switches: [], queue: {}, notes: {}, failures: {}, memory: null };
  return state.gpus[key];
}

// ------------------------------------------------------------------ words

const STATE_WORDS = {
  running: "awake",
  starting: "starting",
  stopping: "stopping",
  sleeping: "going to sleep",
  waking: "waking",
  asleep: "asleep",
  paused: "paused",
  failed: "failed",
  exited: "stopped",
};

function stateText(model, st, spec) {
  if (!st) return "stopped";
  if (st === "asleep") {
    const how = spec && spec.switchStrategy === "checkpoint" ? "checkpointed to host memory" : "its sleep API";
    return `asleep (${how})`;
  }
  return STATE_WORDS[st] || st;
}

function stateMark(st) {
  // A symbol beside the words: the state never depends on colour alone.
  return { running: "●", asleep: "◐", starting: "◔", waking: "◔", stopping: "◌", sleeping: "◌", failed: "✖" }[st] || "○";
}

// ------------------------------------------------------------------ actions

function token() {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function showDone(text) {
  const box = $("done");
  box.textContent = text;
  box.hidden = !text;
}

async function act(method, path, body, what) {
  showError("");
  showDone("");
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const t = token();
  if (t) headers["Authorization"] = `Bearer ${t}`;
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
      redirect: "error",
    });
  } catch (err) {
    showError(`${what}: the server did not answer (${err.message}).`);
    return false;
  }
  if (resp.ok) {
    showDone(`${what}: accepted (${resp.status}).`);
    return true;
  }
  let reason = resp.statusText;
  try {
    const doc = await resp.json();
    if (doc && doc.error) reason = doc.error;
  } catch {
    // not JSON: keep the status text
  }
  if (resp.status === 401) {
    showError(`${what} was refused (401): ${reason}. Enter the API token below.`);
    const form = $("token-form");
    form.hidden = false;
    $("token-why").textContent = t
      ? "The server refused the token this tab holds: enter the right one."
      : "This server asks for its API token before it acts (it listens off loopback, or a token is set).";
    $("token").focus();
  } else {
    showError(`${what} was refused (${resp.status}): ${reason}`);
  }
  return false;
}

function switchTo(gpu, model) {
  const body = { model, gpu: Number(gpu) };
  return act("POST", "/switch", body, model ? `Switch to ${model}` : "Free the GPU");
}

function sleepActive(gpu, model) {
  return act("POST", "/switch", { model: null, gpu: Number(gpu), sleep: true }, `Put ${model} to sleep`);
}

function cancelHold(id, model) {
  return act("DELETE", `/holds/${encodeURIComponent(id)}`, undefined, `Cancel the hold on ${model}`);
}

// ------------------------------------------------------------------ rendering

function memoryBar(gpu, spec, mem, status) {
  const wrap = el("div", { class: "memory" });
  if (!mem) {
    wrap.append(el("p", { class: "muted", text: "Memory: waiting for the first sample…" }));
    return wrap;
  }
  const total = Math.max(1, mem.totalMiB);
  const asleep = new Set(mem.asleep || []);
  const parts = [];
  if (mem.baselineMiB) parts.push({ key: "baseline", label: "driver and context", mib: mem.baselineMiB, cls: "seg-base" });
  for (const [m, mib] of Object.entries(mem.models || {})) {
    if (!mib) continue;
    const sleeping = asleep.has(m);
    parts.push({ key: m, model: m, label: sleeping ? `${m} (asleep residue)` : m, mib, cls: sleeping ? "seg-residue" : "seg-model" });
  }
  if (mem.foreignMiB) parts.push({ key: "foreign", label: "not vramctl's processes", mib: mem.foreignMiB, cls: "seg-foreign" });
  if (mem.otherMiB) parts.push({ key: "other", label: "unattributed", mib: mem.otherMiB, cls: "seg-other" });
  const free = Math.max(0, mem.totalMiB - mem.usedMiB);
  const summary = parts.map((p) => `${p.label} ${p.mib} MiB`).join(", ");
  const bar = el("div", {
    class: "bar",
    role: "img",
    "aria-label": `GPU ${gpu} memory: ${mem.usedMiB} of ${mem.totalMiB} MiB used${summary ? ": " + summary : ""}; ${free} MiB free`,
    "data-used": mem.usedMiB,
  });
  for (const p of parts) {
    const seg = el("span", {
      class: `seg ${p.cls}`,
      style: null,
      title: `${p.label}: ${p.mib} MiB`,
      "data-model": p.model || null,
      "data-part": p.key,
    });
    seg.style.width = `${(100 * p.mib) / total}%`;
    seg.textContent = p.mib / total > 0.12 ? p.label : "";
    bar.append(seg);
  }
  const legend = el("ul", { class: "legend" });
  for (const p of parts) legend.append(el("li", {}, el("span", { class: `key ${p.cls}`, "aria-hidden": "true" }), `${p.label}: ${p.mib} MiB`));
  legend.append(el("li", {}, el("span", { class: "key seg-free", "aria-hidden": "true" }), `free: ${free} MiB`));
  wrap.append(
    el("p", { class: "mem-title" }, `Memory: ${mem.usedMiB} / ${mem.totalMiB} MiB used`, status && status.gpuProbe === "simulated" ? " (simulated GPU)" : ""),
    bar,
    legend,
  );
  return wrap;
}

function modelsTable(gpu, spec, view) {
  const st = view.status || {};
  const states = st.modelStates || {};
  const active = st.activeModel;
  const companions = new Set(st.companions || []);
  const table = el("table", { class: "models" });
  table.append(el("caption", { text: `Models of GPU ${gpu}` }));
  table.append(el("thead", {}, el("tr", {}, ...["Model", "Class", "State", "Reason", "Action"].map((h) => el("th", { scope: "col", text: h })))));
  const body = el("tbody");
  const names = new Set([...Object.keys((spec && spec.models) || {}), ...Object.keys(states)]);
  for (const m of [...names].sort()) {
    const ms = (spec && spec.models && spec.models[m]) || {};
    const s = states[m];
    // Why it is not what was asked (kept until it is healthy again), else its last step.
    const note = (view.failures && view.failures[m]) || (view.notes && view.notes[m]);
    const isActive = m === active;
    const role = isActive ? " (active)" : companions.has(m) ? " (companion)" : "";
    const reason = note ? `${note.step}: ${note.message}` : "";
    const row = el("tr", { "data-model": m, "data-state": s || "stopped", "data-active": isActive ? "true" : "false" });
    row.append(
      el("th", { scope: "row" }, m, role ? el("span", { class: "badge", text: role }) : null),
      el("td", { "data-label": "Class", text: ms.class || "" }),
      el(
        "td",
        { class: `state state-${s || "stopped"}`, "data-label": "State" },
        el("span", { "aria-hidden": "true", text: stateMark(s) + " " }),
        stateText(m, s, ms),
      ),
      el("td", { class: "reason", "data-label": "Reason", text: reason }),
    );
    const acts = el("td", { class: "acts", "data-label": "Action" });
    if (ms.class === "heavy" && !isActive) {
      acts.append(
        el("button", {
          type: "button",
          "data-action": "switch",
          "data-model": m,
          "data-focus": `switch-${gpu}-${m}`,
          disabled: state.readOnly !== null,
          "aria-label": `Switch GPU ${gpu} to ${m}`,
          onclick: () => switchTo(gpu, m),
          text: `Switch to ${m}`,
        }),
      );
    }
    if (isActive && ms.canSleep && s === "running") {
      acts.append(
        el("button", {
          type: "button",
          "data-action": "sleep",
          "data-focus": `sleep-${gpu}-${m}`,
          disabled: state.readOnly !== null,
          onclick: () => sleepActive(gpu, m),
          text: `Put ${m} to sleep`,
        }),
      );
    }
    row.append(acts);
    body.append(row);
  }
  table.append(body);
  return table;
}

function queueList(gpu, view) {
  const q = view.queue || {};
  const box = el("div", { class: "queue" });
  box.append(el("h3", { text: "Holds and queue" }));
  const list = el("ul");
  for (const [m, h] of Object.entries(q.holds || {})) {
    const li = el("li", { "data-hold-model": m }, `${m}: ${h.count} hold${h.count === 1 ? "" : "s"}, held for ${ago(h.since)}`);
    for (const id of h.ids || []) {
      li.append(
        " ",
        el("button", {
          type: "button",
          "data-action": "cancel-hold",
          "data-focus": `hold-${id}`,
          disabled: state.readOnly !== null,
          "aria-label": `Cancel hold ${id.slice(0, 8)} on ${m}`,
          onclick: () => cancelHold(id, m),
          text: `Cancel hold ${id.slice(0, 8)}`,
        }),
      );
    }
    list.append(li);
  }
  for (const [m, w] of Object.entries(q.waiting || {})) {
    list.append(el("li", { "data-waiting-model": m }, `${m}: ${w.count} waiting, for ${ago(w.since)}`));
  }
  if (q.draining) list.append(el("li", { text: `draining the holds for a switch${q.switchingTo ? " to " + q.switchingTo : ""}` }));
  if (!list.children.length) list.append(el("li", { class: "muted", text: "no holds, nobody waiting" }));
  box.append(list);
  return box;
}

function switchesTable(gpu, view) {
  const table = el("table", { class: "switches" });
  table.append(el("caption", { text: `Last switches of GPU ${gpu} (newest first)` }));
  table.append(el("thead", {}, el("tr", {}, ...["Finished", "From", "To", "Strategy", "Duration", "Outcome"].map((h) => el("th", { scope: "col", text: h })))));
  const body = el("tbody");
  const rows = [...(view.switches || [])].reverse();
  for (const s of rows) {
    body.append(
      el(
        "tr",
        { "data-outcome": s.outcome },
        el("td", { "data-label": "Finished", text: s.finishedAt ? new Date(s.finishedAt).toLocaleTimeString() : "" }),
        el("td", { "data-label": "From", text: s.from || "(none)" }),
        el("td", { "data-label": "To", text: s.to || "(none)" }),
        el("td", { "data-label": "Strategy", text: s.strategy || "" }),
        el("td", { "data-label": "Duration", text: typeof s.durationSeconds === "number" ? `${s.durationSeconds.toFixed(2)} s` : "" }),
        el("td", {
          class: `outcome outcome-${s.outcome}`,
          "data-label": "Outcome",
          text: s.outcome === "success" ? "✔ success" : `✖ ${s.outcome}`,
        }),
      ),
    );
  }
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted", text: "no switch since vramctl started" })));
  table.append(body);
  return table;
}

function gpuSection(gpu) {
  const view = gpuOf(gpu);
  const spec = state.specs[gpu] || { models: {} };
  const st = view.status || {};
  const sec = el("section", { class: "gpu", "data-gpu": gpu, "aria-labelledby": `gpu-${gpu}-title` });
  const phase = st.phase || "unknown";
  sec.append(
    el(
      "h2",
      { id: `gpu-${gpu}-title` },
      `GPU ${gpu}`,
      spec.deployment ? ` · ${spec.deployment}` : "",
      " · ",
      el("span", { class: `phase phase-${phase}`, "data-phase": phase, text: phase }),
    ),
  );
  sec.append(
    el("p", { class: "active" }, "Holds the GPU: ", el("strong", { "data-active-model": st.activeModel || "", text: st.activeModel || "nothing (free)" })),
  );
  if (st.message) sec.append(el("p", { class: "message", text: st.message }));
  sec.append(memoryBar(gpu, spec, view.memory, st));
  const bar = el("div", { class: "gpu-actions" });
  bar.append(
    el("button", {
      type: "button",
      "data-action": "free",
      "data-focus": `free-${gpu}`,
      disabled: state.readOnly !== null || (!st.activeModel && !(st.runningModels || []).length && !(st.asleepModels || []).length),
      onclick: () => switchTo(gpu, null),
      text: "Free the GPU",
    }),
  );
  sec.append(bar);
  sec.append(modelsTable(gpu, spec, view));
  sec.append(queueList(gpu, view));
  sec.append(switchesTable(gpu, view));
  return sec;
}

function render() {
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.focus : null;
  const ro = $("readonly");
  ro.hidden = state.readOnly === null;
  ro.textContent = state.readOnly === null ? "" : `Read-only: ${state.readOnly}`;
  const gpus = Object.keys({ ...state.specs, ...state.gpus }).sort((a, b) => Number(a) - Number(b));
  $("gpus").replaceChildren(...gpus.map(gpuSection));
  $("notes").replaceChildren(...state.notes.map((n) => el("li", { text: n })));
  if (focused) {
    const again = document.querySelector(`[data-focus="${CSS.escape(focused)}"]`);
    if (again && !again.disabled) again.focus();
  }
}

// One render per burst of events of a task; a microtask, since timers and
// animation frames are throttled in a tab that is not in front.
let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  queueMicrotask(() => {
    renderPending = false;
    render();
  });
}

function logLine(ev) {
  const d = ev.data || {};
  let what = "";
  let step = ev.kind;
  switch (ev.kind) {
    case "progress":
      step = d.step;
      what = d.message;
      break;
    case "model":
      what = `${d.model}: ${d.from || "stopped"} → ${d.to || "stopped"}`;
      break;
    case "switch":
      what = `switch ${d.from || "(none)"} → ${d.to || "(none)"}: ${d.outcome} in ${d.durationSeconds} s (${d.strategy})`;
      break;
    default:
      return;
  }
  const li = el(
    "li",
    { "data-kind": ev.kind, "data-step": step, "data-id": ev.id, "data-seq": ev.kind === "progress" ? d.seq : null },
    el("time", { text: clock(ev.kind === "progress" ? d.time : ev.time) }),
    ` gpu${ev.gpu} `,
    el("span", { class: "step", text: step }),
    ` ${what}`,
  );
  const log = $("log");
  log.prepend(li);
  while (log.children.length > LOG_KEPT) log.lastElementChild.remove();
}

function onEvent(ev) {
  const v = gpuOf(ev.gpu);
  switch (ev.kind) {
    case "status":
      v.status = ev.data;
      break;
    case "progress":
      if (ev.data.model) {
        v.notes[ev.data.model] = ev.data;
        if (FAILURE_STEPS.has(ev.data.step)) v.failures[ev.data.model] = ev.data;
        else if (RECOVERED_STEPS.has(ev.data.step)) delete v.failures[ev.data.model];
      }
      break;
    case "queue":
      v.queue = ev.data;
      break;
    case "switch":
      v.switches.push(ev.data);
      while (v.switches.length > 20) v.switches.shift();
      break;
    case "memory":
      v.memory = ev.data;
      break;
    default:
      break;
  }
  logLine(ev);
  scheduleRender();
}

function onHello(doc) {
  state.gpus = {};
  for (const [g, v] of Object.entries(doc.gpus || {})) {
    state.gpus[g] = {
      status: v.status,
      switches: v.switches || [],
      queue: v.queue || {},
      notes: v.notes || {},
      failures: v.failures || {},
      memory: v.memory,
    };
  }
  state.specs = doc.specs || {};
  state.readOnly = doc.readOnly ?? null;
  state.notes = doc.notes || [];
  $("log").replaceChildren();
  for (const ev of doc.recent || []) logLine(ev);
  render();
}

function connect() {
  const conn = $("connection");
  const source = new EventSource("/events");
  source.addEventListener("open", () => {
    conn.textContent = "Live: following the event stream.";
    conn.dataset.live = "true";
  });
  source.addEventListener("error", () => {
    conn.textContent = "The event stream was interrupted: reconnecting…";
    conn.dataset.live = "false";
  });
  source.addEventListener("hello", (e) => onHello(JSON.parse(e.data)));
  for (const kind of ["progress", "status", "model", "queue", "switch", "memory"]) {
    source.addEventListener(kind, (e) => onEvent(JSON.parse(e.data)));
  }
}

function setupToken() {
  const form = $("token-form");
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token").value.trim();
    if (!value) return;
    try {
      sessionStorage.setItem(TOKEN_KEY, value);
    } catch {
      showError("This browser keeps no session storage: the token cannot be kept.");
      return;
    }
    $("token").value = "";
    form.hidden = true;
    showError("");
    showDone("Token kept for this tab. Try the action again.");
  });
  $("token-forget").addEventListener("click", () => {
    try {
      sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // nothing kept
    }
    showDone("Token forgotten.");
  });
}

setupToken();
connect();
setInterval(scheduleRender, 5000); // waiting times move on
