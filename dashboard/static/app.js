// The dashboard page: one EventSource for live snapshots, plain DOM rendering (text only,
// never HTML from data), POSTs carrying the session's CSRF token. No libraries.
"use strict";

const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
let last = null;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c instanceof Node ? c : String(c ?? ""));
  return el;
}

function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 90 ? `${Math.round(s)} s ago` : `${Math.round(s / 60)} min ago`;
}

function toast(text, bad) {
  const t = $("toast");
  t.textContent = text;
  t.className = bad ? "toast bad" : "toast";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

async function post(url, body) {
  const r = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: JSON.stringify(body || {}),
  });
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) location.assign("/login");
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

// --- approvals: cards keyed by id, so a reason being typed survives updates -------------
function approvalCard(a) {
  const e = a.explanation;
  const reason = h("input", { placeholder: "reason (stored and audited)", maxlength: "500",
    "data-role": "reason" });
  const decide = (verdict) => async (ev) => {
    ev.target.disabled = true;
    try {
      const r = await post(`/api/approvals/${encodeURIComponent(a.id)}/${verdict}`,
        { reason: reason.value });
      toast(`${a.agent}.${a.action}: ${r.status}`);
    } catch (err) { toast(err.message, true); ev.target.disabled = false; }
  };
  return h("article", { class: "approval", "data-id": a.id },
    h("h3", {}, `${a.agent}.${a.action}`, " ", h("span", { class: "muted" }, a.id)),
    h("p", { class: "summary" }, e.summary),
    h("p", {}, h("b", {}, "Why: "), e.reason || "(no reason given)"),
    h("p", {}, h("b", {}, "Confidence: "), `${Math.round(e.confidence * 100)} %`,
      "  ", h("b", {}, "Requested by: "), a.requested_by,
      "  ", h("b", {}, "Expires: "), h("span", { "data-role": "expires" }, "")),
    h("details", {}, h("summary", {}, "data it used"),
      h("pre", {}, JSON.stringify(e.data, null, 2))),
    h("p", {}, h("b", {}, "Exact arguments"), h("span", { class: "muted" },
      ` sha256 ${a.args_sha256.slice(0, 16)}…`)),
    h("pre", { class: "args" }, JSON.stringify(a.args, null, 2)),
    h("div", { class: "inline" }, reason,
      h("button", { class: "approve", type: "button", onclick: decide("approve") }, "Approve"),
      h("button", { class: "deny", type: "button", onclick: decide("deny") }, "Deny")));
}

function renderApprovals(list) {
  const box = $("approvals");
  const ids = new Set(list.map((a) => a.id));
  for (const card of [...box.children]) if (!ids.has(card.dataset.id)) card.remove();
  for (const a of list) {
    let card = box.querySelector(`[data-id="${CSS.escape(a.id)}"]`);
    if (!card) { card = approvalCard(a); box.append(card); }
    const left = Math.max(0, a.expires_at - Date.now() / 1000);
    card.querySelector('[data-role="expires"]').textContent = `in ${Math.round(left / 60)} min`;
  }
  $("approvals-count").textContent = list.length;
  $("no-approvals").hidden = list.length > 0;
}

// --- agents -------------------------------------------------------------------------
function agentControls(name, control) {
  const act = (what) => async () => {
    try { const r = await post(`/api/agents/${name}/${what}`); toast(`${name}: ${r.state}`); }
    catch (err) { toast(err.message, true); }
  };
  const kill = async () => {
    if (!confirm(`Revoke every token of ${name}? Its next command is refused.`)) return;
    try { toast((await post("/api/revoke", { kind: "agent", target: name,
      reason: "kill switch from the dashboard" })).detail); }
    catch (err) { toast(err.message, true); }
  };
  const cell = h("td", { class: "controls" });
  if (control) for (const what of ["start", "stop", "restart"])
    cell.append(h("button", { type: "button", onclick: act(what) }, what));
  if (control) cell.append(h("button", { type: "button", onclick: () => showLogs(name) }, "logs"));
  cell.append(h("button", { type: "button", class: "deny", onclick: kill }, "kill switch"));
  return cell;
}

function renderAgents(snap) {
  const body = $("agents").tBodies[0];
  body.replaceChildren(...snap.agents.map((a) => h("tr", { "data-agent": a.name },
    h("td", { title: a.description }, a.name),
    h("td", {}, h("span", { class: `state ${a.state}` }, a.state),
      a.health ? ` (${a.health})` : ""),
    h("td", {}, a.kind), h("td", {}, a.tier), h("td", {}, a.version || "–"),
    h("td", {}, ago(a.last_heartbeat)),
    h("td", {}, `${a.handled} / ${a.refused} / ${a.failed}`),
    agentControls(a.name, snap.control))));
  $("control-note").textContent = snap.control ? "" :
    "Start/stop/restart and logs need the control service; states come from heartbeats.";
}

let logsTimer = null;
async function showLogs(name) {
  $("logs-panel").hidden = false;
  $("logs-agent").textContent = name;
  $("logs").textContent = "";
  clearInterval(logsTimer);
  let cursor = "";
  const pull = async () => {
    const r = await fetch(`/api/agents/${name}/logs?cursor=${encodeURIComponent(cursor)}`,
      { credentials: "same-origin" });
    const data = await r.json();
    if (!r.ok) { $("logs").textContent = data.error; clearInterval(logsTimer); return; }
    $("logs").textContent += data.lines.map((l) => l + "\n").join("");
    cursor = data.cursor || cursor;
  };
  await pull();
  logsTimer = setInterval(pull, 2000);
}

// --- throughput chart: two lines on a canvas --------------------------------------------
function drawChart(rates) {
  const c = $("chart"), g = c.getContext("2d");
  const W = c.width, H = c.height, pad = 28;
  g.clearRect(0, 0, W, H);
  g.strokeStyle = "#ccd"; g.lineWidth = 1;
  g.strokeRect(pad, 4, W - pad - 4, H - pad);
  const max = Math.max(1, ...rates.map((r) => Math.max(r.in_msgs, r.out_msgs)));
  g.fillStyle = "#556"; g.font = "11px system-ui, sans-serif";
  g.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 14);
  g.fillText("0", 2, H - pad);
  g.fillText(`msgs/s, last ${rates.length} s`, pad + 4, H - 8);
  const x = (i) => pad + (i / Math.max(1, rates.length - 1)) * (W - pad - 4);
  const y = (v) => 4 + (1 - v / max) * (H - pad - 4);
  for (const [key, color] of [["in_msgs", "#2a6fdb"], ["out_msgs", "#d9822b"]]) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    rates.forEach((r, i) => (i ? g.lineTo(x(i), y(r[key])) : g.moveTo(x(i), y(r[key]))));
    g.stroke();
  }
  g.fillStyle = "#2a6fdb"; g.fillText("— in", W - 90, H - 8);
  g.fillStyle = "#d9822b"; g.fillText("— out", W - 50, H - 8);
  const now = rates[rates.length - 1];
  $("rates").textContent = now ? `in ${now.in_msgs.toFixed(1)} msgs/s ` +
    `(${(now.in_bytes / 1024).toFixed(1)} KiB/s) · out ${now.out_msgs.toFixed(1)} msgs/s ` +
    `(${(now.out_bytes / 1024).toFixed(1)} KiB/s) · ${now.connections} connections` : "no data yet";
}

// --- alerts, workflows, audit ---------------------------------------------------------
function renderAlerts(alerts) {
  $("alerts").replaceChildren(...alerts.map((a) => h("li", { class: `alert ${a.severity}` },
    h("b", {}, `${a.severity} · ${a.kind}`), ` ${a.identity} · ${ago(a.ts)}`,
    h("p", {}, a.summary), a.reason ? h("p", { class: "muted" }, a.reason) : "")));
  $("no-alerts").hidden = alerts.length > 0;
}

function renderWorkflows(list) {
  $("workflows").tBodies[0].replaceChildren(...list.map((w) => h("tr", { "data-id": w.id },
    h("td", {}, follow(w.id)), h("td", {}, h("span", { class: `state ${w.status}` }, w.status)),
    h("td", {}, w.request),
    h("td", {}, Object.entries(w.steps).map(([id, s]) => `${id}: ${s.status}`).join(", ")),
    h("td", {}, w.reason))));
}

function syncOptions(select, values) {
  const have = new Set([...select.options].map((o) => o.value));
  for (const v of [...values].sort()) if (!have.has(v)) select.append(h("option", { value: v }, v));
}

function follow(id) {
  return h("a", { href: "#audit-section", class: "mono", title: "show its audit records",
    onclick: () => { $("audit-find").value = id; if (last) renderAudit(last.audit); } }, id);
}

function renderAudit(records) {
  const agent = $("audit-agent").value, outcome = $("audit-outcome").value;
  const find = $("audit-find").value.trim();
  syncOptions($("audit-agent"), new Set(records.map((r) => r.identity)));
  syncOptions($("audit-outcome"), new Set(records.map((r) => r.outcome)));
  const shown = records.filter((r) => (!agent || r.identity === agent ||
    r.detail?.agent === agent) && (!outcome || r.outcome === outcome) &&
    (!find || r.workflow_id === find || r.trace_id === find)).slice(0, 100);
  $("audit").tBodies[0].replaceChildren(...shown.map((r) => h("tr", {},
    h("td", {}, r.seq), h("td", {}, new Date(r.ts * 1000).toLocaleTimeString()),
    h("td", {}, r.kind), h("td", {}, r.identity), h("td", {}, r.action),
    h("td", {}, h("span", { class: `state ${r.outcome}` }, r.outcome), r.code ? ` ${r.code}` : ""),
    h("td", {}, r.workflow_id ? follow(r.workflow_id) : ""),
    h("td", {}, r.trace_id ? follow(r.trace_id) : ""))));
}

function render(snap) {
  last = snap;
  renderApprovals(snap.approvals);
  renderAgents(snap);
  drawChart(snap.rates);
  renderAlerts(snap.alerts);
  renderWorkflows(snap.workflows);
  renderAudit(snap.audit);
  $("problems").hidden = snap.problems.length === 0;
  $("problems").textContent = snap.problems.join(" · ");
  $("updated").textContent = `updated ${new Date(snap.generated_at * 1000).toLocaleTimeString()}`;
}

function connect() {
  const es = new EventSource("/api/events");
  es.addEventListener("snapshot", (ev) => {
    $("live").textContent = "live"; $("live").className = "pill on";
    render(JSON.parse(ev.data));
  });
  es.onerror = async () => {
    $("live").textContent = "reconnecting…"; $("live").className = "pill off";
    const r = await fetch("/api/snapshot", { credentials: "same-origin" }).catch(() => null);
    if (r && r.status === 401) { es.close(); location.assign("/login"); }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("audit-agent").addEventListener("change", () => last && renderAudit(last.audit));
  $("audit-outcome").addEventListener("change", () => last && renderAudit(last.audit));
  $("audit-find").addEventListener("input", () => last && renderAudit(last.audit));
  $("logs-close").addEventListener("click", () => {
    clearInterval(logsTimer); $("logs-panel").hidden = true;
  });
  $("run-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const wf = await post("/api/workflows/run", { request: $("run-request").value });
      toast(`workflow ${wf.id}: ${wf.status}${wf.reason ? " – " + wf.reason : ""}`,
        wf.status === "rejected");
    } catch (err) { toast(err.message, true); }
  });
  $("revoke-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    try {
      toast((await post("/api/revoke", { kind: f.get("kind"), target: f.get("target"),
        reason: f.get("reason") || "", lift: f.get("lift") === "on" })).detail);
    } catch (err) { toast(err.message, true); }
  });
  connect();
});
