"use strict";
const REFRESH_MS = 15000;
const STATUS = {
  received: "receiving", complete: "queued", analysing: "analysing", reported: "reported",
  sent: "SR in PACS", failed: "FAILED", not_applicable: "not applicable",
};
const PENDING_STATUS = {
  received: "Receiving images", complete: "Queued for AI", analysing: "AI analysing", failed: "AI failed",
};
const state = {sort: "priority", order: "asc", offset: 0, limit: 50, total: 0, fds: 28};

function toDA(value) { return value ? value.replaceAll("-", "") : ""; }
function query() {
  const p = new URLSearchParams({sort: state.sort, order: state.order, offset: state.offset, limit: state.limit});
  const text = document.getElementById("f-text").value.trim();
  if (text) p.set("q", text);
  const pr = document.getElementById("f-priority").value; if (pr) p.append("priority", pr);
  const st = document.getElementById("f-status").value; if (st) p.append("status", st);
  const from = toDA(document.getElementById("f-from").value); if (from) p.set("date_from", from);
  const to = toDA(document.getElementById("f-to").value); if (to) p.set("date_to", to);
  return p.toString();
}
function num(value, digits, unit) {
  return value == null ? "\u2014" : `${Number(value).toFixed(digits)}${unit}`;
}
function priorityCell(row) {
  const td = el("td", {className: "priority", title: (row.priority_reasons || []).join("\n")}, badge(row.priority));
  // the statement every output carries: the flag naming what set it
  if (row.priority_headline)
    td.append(el("span", {className: "sub driver-note", textContent: row.priority_headline}));
  if (row.ai_priority && row.ai_priority !== row.priority)
    td.append(el("span", {className: "sub ai-note", textContent: `AI alone: ${(PRIORITY[row.ai_priority] || {label: row.ai_priority}).label.toLowerCase()}`}));
  if (row.overridden_by && row.override_reason)
    td.append(el("span", {className: "sub override-comment", textContent: `\u201C${row.override_reason}\u201D (${row.overridden_by})`}));
  if (row.priority === "not_analysed" && row.reason)
    td.append(el("span", {className: "sub reason", textContent: row.reason}));
  return td;
}
function patientCell(row) {
  const facts = [row.patient_id ? `ID ${row.patient_id}` : null,
    [row.patient_age, row.patient_sex].filter(Boolean).join(" ") || null].filter(Boolean).join(" \u00B7 ");
  return el("td", {className: "patient"},
    el("span", {className: "name", textContent: personName(row.patient_name) || "(no name)"}),
    el("span", {className: "sub", textContent: facts}));
}
function studyCell(row) {
  return el("td", {className: "study"},
    el("span", {textContent: dicomDate(row.study_date) || "\u2014"}),
    el("span", {className: "sub", textContent: row.accession_number ? `Acc ${row.accession_number}` : ""}),
    el("span", {className: "uid", textContent: row.study_instance_uid, title: `StudyInstanceUID ${row.study_instance_uid}`}));
}
function waitedCell(row) {
  const td = el("td", {className: "waited"});
  if (row.days_waited == null) { td.textContent = "\u2014"; return td; }
  td.append(el("span", {className: row.days_waited >= state.fds ? "breach" : "num",
    textContent: `${row.days_waited} / ${state.fds} d`}));
  td.append(el("span", {className: "sub", textContent: `request ${dicomDate(row.request_date)}`}));
  return td;
}
function likelihoodCell(row) {
  if (row.case_likelihood == null) return el("td", {className: "likelihood", textContent: "\u2014"});
  const pct = Math.round(row.case_likelihood * 100);
  const bar = el("div", {className: "bar"}, el("span"));
  bar.firstChild.style.width = `${pct}%`;
  return el("td", {className: "likelihood"}, el("span", {className: "num", textContent: `${pct}%`}), bar);
}
function render(page) {
  state.total = page.total; state.fds = page.fds_days;
  const rows = page.rows;
  const disclaimers = [...new Set(rows.map(r => r.disclaimer).filter(Boolean))];
  document.getElementById("disclaimer").hidden = disclaimers.length === 0;
  document.getElementById("disclaimer-text").textContent =
    disclaimers.map(d => d.replace(/^NOT FOR CLINICAL USE:?\s*/i, "")).join(" ");
  const counts = page.counts || {};
  document.getElementById("summary").replaceChildren(
    ...[...ORDER, ...(counts.pending ? ["pending"] : [])].map(p =>
      el("div", {className: `count ${p}`}, el("b", {textContent: counts[p] || 0}), badge(p))),
    el("span", {className: "hint", textContent: `${page.total} studies. Ordered by priority, then longest waiting first. Refreshes every 15 s.`}));
  const first = page.total ? page.offset + 1 : 0;
  document.getElementById("page-info").textContent = `${first}\u2013${page.offset + rows.length} of ${page.total}`;
  document.getElementById("prev").disabled = page.offset === 0;
  document.getElementById("next").disabled = page.offset + rows.length >= page.total;
  for (const th of document.querySelectorAll("th.sortable"))
    th.setAttribute("aria-sort", th.dataset.sort === state.sort ? (state.order === "asc" ? "ascending" : "descending") : "none");
  const tbody = document.getElementById("rows");
  if (rows.length === 0) {
    tbody.replaceChildren(el("tr", {}, el("td", {className: "empty", colSpan: 10, textContent: "No studies match."})));
    return;
  }
  tbody.replaceChildren(...rows.map(row => {
    const tr = el("tr", {className: `row ${row.priority}${row.acknowledged_by ? " acknowledged" : ""}`});
    tr.dataset.uid = row.study_instance_uid;
    tr.dataset.priority = row.priority;
    const open = el("a", {className: "open", textContent: "Open", href: `/studies/${encodeURIComponent(row.study_instance_uid)}`});
    const actions = el("td", {className: "actions"}, open);
    // the server builds and encodes the viewer URL (workspace/viewer.py); http(s) only
    if (row.viewer_url && /^https?:\/\//.test(row.viewer_url))
      actions.append(" ", el("a", {className: "viewer", textContent: "Viewer", href: row.viewer_url, target: "_blank", rel: "noopener noreferrer"}));
    if (row.acknowledged_by) {
      actions.append(" ", el("span", {className: "acknowledged-by", textContent: `\u2713 ${row.acknowledged_by}`}));
    } else if (SESSION && SESSION.role === "radiologist") {
      const ack = el("button", {className: "ack", type: "button", textContent: "Acknowledge", title: "Mark as seen (audited)"});
      ack.onclick = async () => {
        try { await post(`/api/studies/${encodeURIComponent(row.study_instance_uid)}/acknowledge`); } catch (e) { alert(e.message); }
        load();
      };
      actions.append(" ", ack);
    }
    if (row.pirads_overall) actions.append(el("span", {className: "sub", textContent: `PI-RADS ${row.pirads_overall}`}));
    const largest = el("td", {className: "num", textContent: num(row.largest_lesion_ml, 2, " ml")});
    if (row.lesion_count) largest.append(el("span", {className: "sub", textContent: row.lesion_count === 1 ? "1 lesion" : `${row.lesion_count} lesions`}));
    tr.append(
      priorityCell(row), patientCell(row), studyCell(row), waitedCell(row), likelihoodCell(row), largest,
      el("td", {className: "num", textContent: num(row.gland_volume_ml, 0, " ml")}),
      el("td", {className: "num", textContent: num(row.psa_density, 2, "")}),
      el("td", {className: `status ${row.status}`, textContent: STATUS[row.status] || row.status}),
      actions,
    );
    return tr;
  }));
}
function waited(iso) {
  if (!iso) return "";
  const minutes = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 60000));
  if (minutes < 60) return `${minutes} min`;
  if (minutes < 48 * 60) return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  return `${Math.floor(minutes / 1440)} d`;
}
function renderPending(rows) {
  document.getElementById("pending-section").hidden = rows.length === 0;
  document.getElementById("pending-count").textContent = `(${rows.length})`;
  document.getElementById("pending-rows").replaceChildren(...rows.map(row => {
    const tr = el("tr", {className: `pending ${row.status}`});
    tr.dataset.uid = row.study_instance_uid;
    let note = "";
    if (row.status === "failed") note = `${row.error || "analysis failed"}${row.retry_at ? "; retrying" : ""}`;
    else if (row.attempts > 0) note = `attempt ${row.attempts + 1}`;
    tr.append(
      el("td", {className: "referral"}, badge(row.referral_urgency)),
      el("td", {className: "status", textContent: PENDING_STATUS[row.status] || row.status}),
      el("td", {className: "images", textContent: row.instances ?? ""}),
      el("td", {className: "waited", textContent: waited(row.received_at), title: row.received_at || ""}),
      el("td", {className: "study"}, el("span", {className: "uid", textContent: row.study_instance_uid})),
      el("td", {className: "note", textContent: note}),
    );
    return tr;
  }));
}
async function load() {
  try {
    const [page, pending] = await Promise.all([api(`/api/worklist?${query()}`), api("/api/worklist/pending")]);
    render(page);
    renderPending(pending);
    document.getElementById("offline").hidden = true;
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById("offline").hidden = false;
  }
}
document.getElementById("filters").onsubmit = (event) => {
  event.preventDefault();
  state.offset = 0;
  state.limit = Number(document.getElementById("f-limit").value);
  load();
};
for (const th of document.querySelectorAll("th.sortable")) {
  th.onclick = () => {
    if (state.sort === th.dataset.sort) state.order = state.order === "asc" ? "desc" : "asc";
    else { state.sort = th.dataset.sort; state.order = "asc"; }
    state.offset = 0;
    load();
  };
}
document.getElementById("prev").onclick = () => { state.offset = Math.max(0, state.offset - state.limit); load(); };
document.getElementById("next").onclick = () => { state.offset += state.limit; load(); };
startSession().then(() => {
  const select = document.getElementById("f-priority");
  priorityOptions(select, [...ORDER, "pending"], true);
  load();
});
setInterval(load, REFRESH_MS);
