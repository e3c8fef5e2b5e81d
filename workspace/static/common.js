"use strict";
// Shared by the workspace pages. Every server value is put into the page with textContent
// (never as markup), so hostile DICOM tag values render as text.
// The flags, their labels and their order come from the server (/api/priorities), never
// re-spelt here: PRIORITY maps a value to {label, icon}, ORDER lists the flags by rank.
let PRIORITY = {};
let ORDER = [];
async function loadPriorities() {
  const list = await api("/api/priorities");
  PRIORITY = Object.fromEntries(list.map(p => [p.value, p]));
  ORDER = list.filter(p => p.rank != null).map(p => p.value);
}
function priorityOptions(select, values, withAll) {
  // fills a <select> with the served flags (textContent: never markup)
  const options = values.map(v => el("option", {value: v, textContent: (PRIORITY[v] || {label: v}).label.toLowerCase()}));
  select.replaceChildren(...(withAll ? [el("option", {value: "", textContent: "all"})] : []), ...options);
}
let SESSION = null;

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) if (child != null) node.append(child);
  return node;
}
function badge(priority) {
  const p = PRIORITY[priority] || {label: String(priority), icon: ""};
  return el("span", {className: `badge ${priority}`}, el("span", {ariaHidden: "true", textContent: p.icon}), p.label);
}
function personName(pn) {
  // DICOM PN: component groups (alphabetic=ideographic=phonetic), each family^given^middle^prefix^suffix
  if (!pn) return "";
  return String(pn).split("=").map(group => {
    const [family, given, middle, prefix, suffix] = group.split("^");
    const rest = [prefix, given, middle, suffix].filter(Boolean).join(" ");
    return family && rest ? `${family}, ${rest}` : (family || rest || "");
  }).filter(Boolean).join(" / ");
}
function dicomDate(da) {
  return da && /^\d{8}$/.test(da) ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : (da || "");
}
async function api(path, options = {}) {
  const headers = Object.assign({"Content-Type": "application/json"}, options.headers || {});
  if (options.method && options.method !== "GET" && SESSION) headers["X-CSRF-Token"] = SESSION.csrf_token;
  const r = await fetch(path, Object.assign({cache: "no-store", credentials: "same-origin"}, options, {headers}));
  if (r.status === 401) { location.assign("/login"); throw new Error("signed out"); }
  if (!r.ok) {
    let detail = `${r.status}`;
    try { const body = await r.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return r.json();
}
function post(path, body) { return api(path, {method: "POST", body: JSON.stringify(body || {})}); }
async function startSession() {
  SESSION = await api("/api/session");
  await loadPriorities();
  const who = document.getElementById("who");
  if (who) who.textContent = `Signed in as ${SESSION.name} (${SESSION.role.replace("_", " ")})`;
  const out = document.getElementById("logout");
  if (out) out.onclick = async () => {
    // after single sign-on the provider's session ends too (its end_session_endpoint)
    let next = "/login";
    try { const r = await post("/api/logout"); if (r.end_session_url && /^https?:\/\//.test(r.end_session_url)) next = r.end_session_url; }
    finally { location.assign(next); }
  };
  return SESSION;
}
