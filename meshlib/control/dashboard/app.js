// meshlib dashboard: polls /dashboard/state with the view token and renders it. No framework, no build step.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "meshlib-view-token";
let viewToken = null;
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fill(id, rows, columns, empty) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren();
  if (!rows.length) {
    body.append(el("tr", {}, el("td", { class: "empty", colspan: String(columns) }, empty)));
  }
  for (const row of rows) body.append(row);
}

const fmt = {
  rate: (v) => (v === null || v === undefined ? "–" : v.toFixed(v < 10 ? 2 : 1)),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(v === 1 ? 0 : 1) + "%"),
  ms: (v) => (v === null || v === undefined ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " ms"),
  count: (v) => Math.round(v).toLocaleString("en"),
  when: (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z") : "–"),
  ago: (seconds) => (seconds === null || seconds === undefined ? "none yet" : `${seconds.toFixed(0)} s ago`),
  left: (seconds) => {
    if (seconds < 0) return "expired";
    const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60);
    return h >= 48 ? `${Math.floor(h / 24)} d` : h ? `${h} h ${m} min` : `${m} min`;
  },
};

function renderGraph(state) {
  const graph = document.getElementById("graph");
  const width = graph.clientWidth || 800, height = graph.clientHeight || 300;
  const names = state.services;
  const pos = {};
  const rx = Math.max(80, width / 2 - 110), ry = Math.max(60, height / 2 - 45);
  names.forEach((name, i) => {
    const angle = (2 * Math.PI * i) / Math.max(1, names.length) - Math.PI / 2;
    pos[name] = [width / 2 + rx * Math.cos(angle), height / 2 + ry * Math.sin(angle)];
  });
  graph.replaceChildren();
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#8c959f" }));
  defs.append(marker);
  graph.append(defs);
  const R = 30;
  for (const e of state.edges) {
    const a = pos[e.source], b = pos[e.service];
    if (!a || !b || a === b) continue;
    const dx = b[0] - a[0], dy = b[1] - a[1], len = Math.hypot(dx, dy) || 1;
    const g = svg("g", { class: "edge" + (e.success_rate !== null && e.success_rate < 0.99 ? " failing" : "") });
    g.append(svg("line", { x1: a[0] + (dx * R) / len, y1: a[1] + (dy * R) / len, x2: b[0] - (dx * R) / len, y2: b[1] - (dy * R) / len }));
    g.append(svg("text", { x: (a[0] + b[0]) / 2, y: (a[1] + b[1]) / 2 - 4 }, `${fmt.rate(e.rps)} rps · ${fmt.pct(e.success_rate)} · p99 ${fmt.ms(e.p99_ms)}`));
    graph.append(g);
  }
  for (const name of names) {
    const [x, y] = pos[name];
    const g = svg("g", { class: "node", "data-service": name });
    g.append(svg("circle", { cx: x, cy: y, r: R }));
    g.append(svg("text", { x: x, y: y + 4 }, name.length > 14 ? name.slice(0, 13) + "…" : name));
    graph.append(g);
  }
}

function render(state) {
  const connected = state.dataplanes.filter((d) => d.connected).length;
  const nacked = state.dataplanes.filter((d) => d.state === "NACKED").length;
  document.getElementById("summary").textContent =
    `version ${state.version} · replica ${state.replica} · ${state.services.length} services · ${connected} data planes` +
    (nacked ? ` · ${nacked} NACKED` : "") + ` · updated ${new Date(state.now * 1000).toLocaleTimeString()}`;
  renderGraph(state);

  fill("edges", state.edges.map((e) => el("tr", { "data-source": e.source, "data-service": e.service, "data-destination": e.destination, "data-rps": e.rps === null ? "" : String(e.rps) },
    el("td", {}, e.source === "unknown" ? "(outside the mesh)" : e.source),
    el("td", {}, e.destination),
    el("td", { class: "num rps" }, fmt.rate(e.rps)),
    el("td", { class: "num" + (e.success_rate !== null && e.success_rate < 0.99 ? " error" : "") }, fmt.pct(e.success_rate)),
    el("td", { class: "num" }, fmt.ms(e.p50_ms)),
    el("td", { class: "num" }, fmt.ms(e.p99_ms)),
    el("td", { class: "num" }, fmt.count(e.requests)),
    el("td", {}, e.reporter))), 8, "no traffic reported yet (data planes report every few seconds)");

  fill("dataplanes", state.dataplanes.map((d) => {
    const cert = d.certificate;
    const left = cert ? cert.not_after - state.now : null;
    return el("tr", { "data-node": d.node, "data-state": d.connected ? d.state : "DISCONNECTED" },
      el("td", {}, d.node),
      el("td", {}, `${d.workload}.${d.namespace}`),
      el("td", {}, el("span", { class: "badge " + d.state }, d.state)),
      el("td", { class: "num" }, d.sent_version ?? "–"),
      el("td", { class: "num" }, d.acked_version ?? "–"),
      el("td", { class: "error last-error" }, d.last_nack ? `version ${d.last_nack.version}: ${d.last_nack.error}` : ""),
      el("td", {}, cert ? cert.identity : "–"),
      el("td", { class: left !== null && left < 3600 ? "warn" : "", title: cert ? fmt.when(cert.not_after) : "" }, cert ? fmt.left(left) : "–"),
      el("td", {}, fmt.ago(d.report_age)));
  }), 9, "no data plane has connected");

  fill("breakers", state.breakers.map((b) => el("tr", {},
    el("td", {}, b.workload), el("td", {}, b.destination), el("td", {}, b.subset), el("td", { class: "error" }, b.state))), 4, "none");
  fill("ejected", state.ejected.map((b) => el("tr", {},
    el("td", {}, b.workload), el("td", {}, b.destination), el("td", {}, b.subset), el("td", { class: "num error" }, b.ejected))), 4, "none");

  document.getElementById("policy-version").textContent = `version ${state.version}`;
  fill("resources", state.resources.map((r) => el("tr", {},
    el("td", {}, r.kind), el("td", {}, r.namespace ?? ""), el("td", {}, r.name),
    el("td", {}, el("details", {}, el("summary", {}, "spec"), el("pre", {}, JSON.stringify(r.document.spec ?? r.document, null, 2)))))), 4, "no resources");

  fill("history", state.history.map((h) => {
    const button = el("button", { type: "button", "data-version": String(h.version) }, "roll back here");
    button.addEventListener("click", () => { document.getElementById("rollback-version").value = h.version; document.getElementById("admin-token").focus(); });
    return el("tr", {},
      el("td", { class: "num" }, h.version), el("td", {}, fmt.when(h.at)), el("td", {}, h.who), el("td", {}, h.action),
      el("td", {}, (h.changes || []).map((c) => `${c.op} ${c.ref}`).join(", ")),
      el("td", {}, h.version === state.version ? "in force" : button));
  }), 6, "no changes yet");
}

async function poll() {
  clearTimeout(timer);
  const status = document.getElementById("status");
  try {
    const response = await fetch("/dashboard/state", { headers: { authorization: `Bearer ${viewToken}` }, cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("the control plane refused this token");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    status.textContent = "live";
    status.className = "status live";
  } catch (err) {
    status.textContent = `control plane unreachable (${err.message}); retrying`;
    status.className = "status down";
  }
  timer = setTimeout(poll, POLL_MS);
}

function showLogin(message) {
  document.getElementById("main").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

function start(token) {
  viewToken = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("login").hidden = true;
  document.getElementById("main").hidden = false;
  poll();
}

async function admin(method, path, body, contentType) {
  const token = document.getElementById("admin-token").value.trim();
  const result = document.getElementById("admin-result");
  if (!token) { result.textContent = "paste an admin token first"; result.className = "error"; return; }
  try {
    const response = await fetch(path, { method, body, headers: { authorization: `Bearer ${token}`, "content-type": contentType } });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
    result.textContent = `done: version ${data.version}`;
    result.className = "";
    poll();
  } catch (err) {
    result.textContent = `refused: ${err.message}`;
    result.className = "error";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = document.getElementById("view-token").value.trim();
    if (token) start(token);
  });
  document.getElementById("apply").addEventListener("click", () =>
    admin("POST", "/v1/resources", document.getElementById("apply-body").value, "application/yaml"));
  document.getElementById("rollback").addEventListener("click", () =>
    admin("POST", "/v1/rollback", JSON.stringify({ version: Number(document.getElementById("rollback-version").value) }), "application/json"));
  // A token in the fragment (#token=...) is never sent to the server; it is moved to this tab's storage.
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) history.replaceState(null, "", location.pathname + location.search);
  const token = fromHash || sessionStorage.getItem(TOKEN_KEY);
  if (token) start(token); else showLogin("");
});
