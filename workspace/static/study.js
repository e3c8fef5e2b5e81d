"use strict";
const UID = decodeURIComponent(location.pathname.split("/").pop());
const BASE = `/api/studies/${encodeURIComponent(UID)}`;
let selected = null;
let study = null;
// result.domain_gate: what the model's out-of-distribution gate said (information, not a flag)
const DOMAIN_GATE_WORDS = {
  in_domain: "within the model's validated domain",
  low_confidence: "near the edge of the model's validated domain (low confidence)",
  not_fitted: "not checked: this model has no fitted domain gate",
};

function fact(list, name, value) {
  list.append(el("dt", {textContent: name}), el("dd", {textContent: value == null || value === "" ? "\u2014" : String(value)}));
}
function showImages(z) {
  document.getElementById("slice").value = z;
  document.getElementById("slice-label").textContent = `${z + 1} / ${Number(document.getElementById("slice").max) + 1}`;
  const q = selected == null ? "" : `?lesion=${selected}`;
  for (const role of ["t2w", "adc", "hbv"]) document.getElementById(`img-${role}`).src = `${BASE}/images/${role}/${z}.png${q}`;
}
async function loadImages() {
  try {
    const info = await api(`${BASE}/images`);
    const slider = document.getElementById("slice");
    slider.max = info.slices - 1;
    slider.oninput = () => showImages(Number(slider.value));
    const keys = document.getElementById("keys");
    keys.replaceChildren(...info.key_slices.map((z, i) => {
      const b = el("button", {type: "button", className: "key", textContent: `Lesion ${i + 1} (slice ${z + 1})`});
      b.onclick = () => { selected = i; showImages(z); };
      return b;
    }));
    if (info.key_slices.length) selected = 0;
    document.getElementById("images-hint").textContent = info.key_slices.length ? "at lesion 1" : "";
    showImages(info.default_slice);
  } catch (e) {
    document.getElementById("images-hint").textContent = e.message;
  }
}
function renderAssessment(a) {
  const list = document.getElementById("assessment");
  list.replaceChildren();
  fact(list, "Acknowledged", a.acknowledged_by);
  fact(list, "Reported", a.reported_by);
  fact(list, "Override", a.override ? `${a.override.priority} by ${a.override.by}: \u201C${a.override.reason}\u201D` : null);
  fact(list, "PI-RADS", a.pirads_overall);
  fact(list, "Biopsy", a.isup_grade_group == null ? null : `ISUP ${a.isup_grade_group} on ${dicomDate(a.biopsy_date)}`);
  if (a.pirads_overall) document.getElementById("pirads").value = String(a.pirads_overall);

  const byIndex = Object.fromEntries(a.findings.map(f => [f.finding_index, f]));
  for (const tr of document.querySelectorAll("#lesions tr")) {
    const f = byIndex[tr.dataset.index];
    const out = tr.querySelector(".decision");
    out.className = `decision ${f ? f.decision : ""}`;
    out.textContent = f ? `${f.decision}${f.pirads ? `, PI-RADS ${f.pirads}` : ""} (${f.by})` : "";
  }
}
function lesionRow(lesion, i) {
  const tr = el("tr", {className: "lesion"});
  tr.dataset.index = i;
  const decision = el("select", {className: "finding-decision", ariaLabel: `Decision on lesion ${i + 1}`},
    el("option", {value: "accept", textContent: "accept"}), el("option", {value: "reject", textContent: "reject"}),
    el("option", {value: "edit", textContent: "edit"}));
  const pirads = el("select", {className: "finding-pirads", ariaLabel: `PI-RADS of lesion ${i + 1}`},
    el("option", {value: "", textContent: "PI-RADS"}), ...[1, 2, 3, 4, 5].map(n => el("option", {value: n, textContent: n})));
  const sector = el("input", {className: "finding-sector", placeholder: "sector (edit)", size: 8, maxLength: 32});
  const save = el("button", {type: "button", className: "finding-save", textContent: "Save"});
  save.onclick = () => act(`findings/${i}`, {
    decision: decision.value, pirads: pirads.value ? Number(pirads.value) : null,
    sector: decision.value === "edit" && sector.value ? sector.value : null});
  const go = el("button", {type: "button", className: "show", textContent: "Show"});
  go.onclick = () => { const b = document.querySelectorAll("#keys button")[i]; if (b) b.click(); };
  tr.append(
    el("td", {textContent: i + 1}),
    el("td", {className: "num", textContent: `${Math.round(lesion.likelihood * 100)}%`}),
    el("td", {className: "num", textContent: `${lesion.volume_ml.toFixed(2)} ml`}),
    el("td", {textContent: lesion.sector || "\u2014"}),
    el("td", {}, el("div", {className: "form-row"}, decision, pirads, sector, save, go), el("span", {className: "decision"})),
  );
  return tr;
}
async function act(path, body) {
  const error = document.getElementById("read-error");
  error.textContent = "";
  try {
    const out = await post(`${BASE}/${path}`, body);
    renderAssessment(out.assessment);
  } catch (e) { error.textContent = e.message; }
}
async function load() {
  await startSession();
  priorityOptions(document.getElementById("override-priority"), ORDER.filter(v => v !== "not_analysed"), false);
  try { study = await api(BASE); } catch (e) { document.getElementById("page-error").textContent = e.message; return; }
  const result = study.result || {};
  document.title = `${personName(study.patient_name) || "Study"} · radtriage`;
  document.getElementById("patient-name").textContent = personName(study.patient_name) || "(no name)";
  // the flag of the current decision (study.priority), the statement naming its driver, and
  // the AI's own opinion apart from it
  const flag = study.priority || result.priority || "pending";
  const head = [badge(flag)];
  if (result.priority_headline) head.push(el("span", {className: "sub driver-note", textContent: result.priority_headline}));
  if (result.ai_priority && result.ai_priority !== flag)
    head.push(el("span", {className: "sub ai-note", textContent: `AI alone: ${(PRIORITY[result.ai_priority] || {label: result.ai_priority}).label.toLowerCase()}`}));
  document.getElementById("priority").replaceChildren(...head);
  if (result.disclaimer) {
    document.getElementById("disclaimer").hidden = false;
    document.getElementById("disclaimer-text").textContent = result.disclaimer.replace(/^NOT FOR CLINICAL USE:?\s*/i, "");
  }
  const facts = document.getElementById("facts");
  fact(facts, "Patient ID", study.patient_id);
  fact(facts, "Accession", study.accession_number);
  fact(facts, "Study date", dicomDate(study.study_date));
  fact(facts, "Description", study.study_description);
  fact(facts, "Referral", result.referral_urgency ? `${result.referral_urgency}${result.referral_source && result.referral_source !== "none" ? ` (${result.referral_source.replace("_", " ")})` : ""}` : study.referral_urgency);
  fact(facts, "Days waited", result.days_waited);
  fact(facts, "AI likelihood", result.case_likelihood == null ? null : `${Math.round(result.case_likelihood * 100)}%`);
  fact(facts, "Domain check", Object.hasOwn(DOMAIN_GATE_WORDS, result.domain_gate || "") ? DOMAIN_GATE_WORDS[result.domain_gate] : null);
  fact(facts, "Gland volume", result.gland_volume_ml == null ? null : `${result.gland_volume_ml.toFixed(0)} ml`);
  fact(facts, "PSA density", result.psa_density);
  fact(facts, "Status", study.status);
  if (result.reason) fact(facts, "Not analysed because", `${result.reason.message} (${result.reason.code})`);
  fact(facts, "Why this priority", (result.priority_reasons || []).join("; "));
  if (result.request_date_source) fact(facts, "Clock started", `${dicomDate(result.request_date)} (${result.request_date_source.replace("_", " ")})${result.request_date_note ? `: ${result.request_date_note}` : ""}`);
  fact(facts, "Study UID", study.study_instance_uid);
  document.getElementById("lesions").replaceChildren(...(result.lesions || []).map(lesionRow));
  const model = document.getElementById("model");
  if (result.model) {
    fact(model, "Name", result.model.name);
    fact(model, "Version", result.model.version);
    fact(model, "sha256", result.model.sha256.slice(0, 16));
    try {
      const models = await api("/api/models");
      const card = (models.available || []).find(m => m.name === result.model.name && m.version === result.model.version);
      if (card) { fact(model, "Task", card.task); fact(model, "Clinical use", card.clinical_use ? "yes" : "NO (demonstration)"); }
    } catch (e) { /* the card is optional */ }
  } else fact(model, "Model", null);
  document.getElementById("documents").replaceChildren(...study.documents.map(d =>
    el("li", {}, el("a", {href: d.url, textContent: d.kind === "sr" ? "Structured Report (SR)" : "Segmentation (SEG)"}))));
  // the server builds and encodes the viewer URL (workspace/viewer.py); http(s) only
  if (study.viewer_url && /^https?:\/\//.test(study.viewer_url))
    document.getElementById("documents").append(el("li", {}, el("a", {id: "open-viewer", href: study.viewer_url,
      target: "_blank", rel: "noopener noreferrer", textContent: "Open in viewer"})));
  const readOnly = SESSION.role !== "radiologist";
  for (const b of document.querySelectorAll("button, select, textarea, input")) {
    if (readOnly && !["logout", "slice"].includes(b.id) && !b.classList.contains("key") && !b.classList.contains("show")) b.disabled = true;
  }
  document.getElementById("ack").onclick = () => act("acknowledge");
  document.getElementById("reported").onclick = () => act("reported");
  document.getElementById("pirads-save").onclick = () => {
    const v = document.getElementById("pirads").value;
    if (v) act("pirads", {pirads: Number(v)});
  };
  document.getElementById("override-save").onclick = () => {
    const reason = document.getElementById("override-reason").value.trim();
    if (!reason) { document.getElementById("read-error").textContent = "Give a reason for the override."; return; }
    act("override", {priority: document.getElementById("override-priority").value, reason});
  };
  document.getElementById("biopsy-save").onclick = () => {
    const isup = document.getElementById("isup").value, date = document.getElementById("biopsy-date").value;
    if (isup === "" || !date) { document.getElementById("read-error").textContent = "Give the ISUP grade group and the biopsy date."; return; }
    act("biopsy", {isup_grade_group: Number(isup), biopsy_date: date.replaceAll("-", "")});
  };
  renderAssessment(await api(`${BASE}/assessment`));
  loadImages();
}
load();
