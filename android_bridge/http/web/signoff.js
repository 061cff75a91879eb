// Sign-off: the structured report form saved as a draft (the AI draft exactly as generated
// beside the clinician's final text), signed by a named person in a role after they have seen
// what they changed, then read-only; amended as a new version; exported (DICOM SR, FHIR, PDF)
// and sent to the clinic's PACS or record system through the outbox. Reports are saved against
// the image they describe: a received instance's UIDs, or an uploaded file's SHA-256.
//
// Without a report store in the runtime (health: reports false) only the form is shown, as
// before: edit, then copy the JSON.

import * as api from "./api.js";
import { reportDiff, renderDiff } from "./diff.js";
import { destinationText, refreshOutbox } from "./outbox.js";
import { buildReportForm } from "./report.js";
import { $, basename, el, onHealth, report, state, when } from "./shared.js";

const rep = { on: false, subject: null, report: null, draft: null, value: null, savedKey: null, mode: "none", reviewed: null };
const CONFLICT = "The report changed elsewhere (another tab, app or the command line)"; // + the runtime's why

const say = (t) => ($("signoff-status").textContent = t);
const savedSay = (t) => ($("saved-status").textContent = t);
const dirty = () => JSON.stringify(rep.value) !== rep.savedKey;
const copy = (v) => JSON.parse(JSON.stringify(v ?? {}));

function failed(err, what) {
  if (err.code === "conflict") {
    say(`${what}. ${CONFLICT}: ${err.message.replace(/\.$/, "")}. The saved reports below show each one's latest version.`);
    refreshSaved();
  } else report(err, (t) => say(`${what}: ${t}`));
}

// -- the form -------------------------------------------------------------------------------

function renderForm(value, readOnly) {
  const form = $("report-form");
  rep.value = buildReportForm(form, state.config.report.schema, value, (v) => {
    $("report-json").textContent = JSON.stringify(v, null, 2);
    if (rep.mode === "draft" && rep.reviewed !== null && JSON.stringify(v) !== rep.reviewed) hideReview();
    if (rep.mode === "draft") stateLine();
  }, { readOnly });
  form.setAttribute("aria-label", readOnly ? "Structured report (signed, read-only)" : "Structured report (editable draft)");
  form.hidden = false;
  $("report-json-box").hidden = false;
  $("report-copy").hidden = false;
}

function provenanceText(p) {
  if (!p) return "";
  const parts = [p.model, p.bundle && `bundle “${basename(p.bundle)}”`, p.quantization, p.runtime_version && `runtime ${p.runtime_version}`].filter(Boolean);
  return `${parts.join(" · ")}${p.synthetic ? " · synthetic twin — outputs mean nothing" : ""}`;
}

function stateLine() {
  const line = $("report-state");
  const r = rep.report;
  line.replaceChildren();
  line.hidden = !rep.on || rep.mode === "none";
  if (line.hidden) return;
  if (!r) line.append(el("strong", { text: "Not saved yet." }), " Save it as a draft, or sign it.");
  else if (r.status === "signed") {
    line.append(el("strong", { class: "signed-mark", text: `Signed — version ${r.version}` }), ` by ${r.signer ? `${r.signer.name} (${r.signer.role})` : "?"}, ${when(r.signed_at)}. Read-only: amend it to change anything.`);
  } else {
    const amends = r.replaces ? `, amending version ${r.replaces}` : "";
    line.append(el("strong", { text: `Draft — version ${r.version}${amends}` }), `, saved ${when(r.updated || r.created)}.`);
    if (dirty()) line.append(" ", el("span", { class: "unsaved", text: "Unsaved changes." }));
  }
  if (r && r.provenance) line.append(el("span", { class: "hint provenance", text: ` Drafted by ${provenanceText(r.provenance)}. ${(state.config && state.config.disclaimer) || ""}` }));
}

function setMode(mode) {
  rep.mode = mode;
  const on = rep.on && mode !== "none";
  $("signoff").hidden = !on;
  $("draft-actions").hidden = mode !== "draft";
  $("signed-actions").hidden = mode !== "signed";
  $("amend-box").hidden = mode !== "amend";
  if (mode !== "draft") hideReview();
  stateLine();
}

function hideReview() {
  $("sign-review").hidden = true;
  rep.reviewed = null;
}

// A new draft from the model: `draft` is its parsed JSON (null when it was cut off or invalid).
export function showDraft(draft) {
  rep.report = null;
  rep.draft = draft && typeof draft === "object" ? copy(draft) : null;
  renderForm(copy(rep.draft || { needs_review: true }), false);
  rep.savedKey = null;
  say("");
  setMode("draft");
}

// Show a saved report: read-only when signed, else its draft to edit.
function load(r) {
  rep.report = r;
  rep.draft = r.draft ? copy(r.draft) : null;
  renderForm(copy(r.final), r.status === "signed");
  rep.savedKey = JSON.stringify(rep.value);
  setMode(r.status === "signed" ? "signed" : "draft");
  $("report-status").textContent = "";
}

// -- save, sign, amend ----------------------------------------------------------------------

function source() {
  const s = rep.subject;
  return s.link ? { ...s.link } : { image_sha256: s.sha256 };
}

async function save() {
  if (!rep.subject) return say("The report's image is still being read; try again in a moment.");
  const params = { final: rep.value, source: source() };
  if (rep.report) params.report_id = rep.report.report_id;
  if (rep.draft) params.draft = rep.draft;
  const sent = JSON.stringify(rep.value);
  const { result } = await api.rpc("save_report", params);
  rep.report = result;
  rep.savedKey = sent;
  stateLine();
  refreshSaved();
  return result;
}

async function saveDraft() {
  try {
    const r = await save();
    if (r) say(`Saved as a draft (version ${r.version}).`);
  } catch (err) {
    failed(err, "Not saved");
  }
}

function signer() {
  const name = $("signer-name").value.trim();
  const role = $("signer-role").value.trim();
  if (!name || !role) {
    say("Type your name and your role to sign: the signature records who checked the report.");
    $(name ? "signer-role" : "signer-name").focus();
    return null;
  }
  return { name, role };
}

async function review() {
  const who = signer();
  if (!who) return;
  try {
    if (!rep.report || dirty()) await save();
  } catch (err) {
    return failed(err, "Not saved, so not signed");
  }
  if (!rep.report) return; // not saved (save said why)
  rep.reviewed = JSON.stringify(rep.value);
  renderDiff($("report-diff"), reportDiff(rep.draft, rep.value, state.config.report.schema), { hadDraft: rep.draft !== null });
  $("sign-confirm-text").textContent = `Sign version ${rep.report.version} as ${who.name} (${who.role})? A signed report can't be changed afterwards, only amended.`;
  $("sign-confirm").textContent = `Sign as ${who.name}`;
  $("sign-review").hidden = false;
  say("");
  $("sign-review-h").focus();
}

async function sign() {
  const who = signer();
  if (!who || rep.reviewed === null) return;
  if (JSON.stringify(rep.value) !== rep.reviewed) return review(); // edited since: show the diff again
  try {
    const { result } = await api.rpc("sign_report", { report_id: rep.report.report_id, version: rep.report.version, signer: who.name, role: who.role });
    load(result);
    say(`Signed version ${result.version}. It can now be exported or sent.`);
    refreshSaved();
    $("signed-actions").querySelector("button:not(:disabled)").focus();
  } catch (err) {
    failed(err, "Not signed");
  }
}

function startAmend() {
  renderForm(copy(rep.report.final), false);
  $("amend-reason").value = "";
  setMode("amend");
  say(`Amending version ${rep.report.version}: edit the report, give the reason, save. Version ${rep.report.version} stays as signed.`);
  $("amend-reason").focus();
}

async function saveAmend() {
  const reason = $("amend-reason").value.trim();
  if (!reason) {
    say("Give the reason for the amendment: it is kept with the report's history.");
    return $("amend-reason").focus();
  }
  try {
    const { result } = await api.rpc("amend_report", { report_id: rep.report.report_id, final: rep.value, reason });
    load(result);
    say(`Saved version ${result.version} as a draft, amending version ${result.replaces}. Sign it to complete the amendment.`);
    refreshSaved();
  } catch (err) {
    failed(err, "Amendment not saved");
  }
}

// -- export and send ------------------------------------------------------------------------

function download(out) {
  const raw = atob(out.base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  const url = URL.createObjectURL(new Blob([bytes], { type: out.mime || "application/octet-stream" }));
  const a = el("a", { href: url, download: out.filename || `report.${out.format}` });
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 30000);
}

async function exportAs(format) {
  const names = { sr: "DICOM SR", fhir: "FHIR JSON", pdf: "PDF" };
  say(`Exporting as ${names[format]}…`);
  try {
    const { result } = await api.rpc("export_report", { report_id: rep.report.report_id, version: rep.report.version, format }, { ms: 60000 });
    download(result);
    say(`Exported version ${rep.report.version} as ${names[format]}: ${result.filename}.`);
  } catch (err) {
    failed(err, "Not exported");
  }
}

async function send() {
  try {
    const { result } = await api.rpc("send_report", { report_id: rep.report.report_id, version: rep.report.version });
    const where = destinationText(result.destination);
    say(result.state === "delivered" ? `Version ${result.version} delivered to ${where}.` : `Version ${result.version} is in the outbox for ${where} (${result.state}); it is retried until delivered.`);
    refreshOutbox();
    refreshSaved();
  } catch (err) {
    failed(err, "Not sent");
  }
}

// -- saved reports of the current image -----------------------------------------------------

async function refreshSaved() {
  const s = rep.subject;
  if (!rep.on || !s) return;
  const params = s.link ? { study: s.link.study_uid } : { image_sha256: s.sha256 };
  try {
    const { result } = await api.rpc("list_reports", params);
    if (rep.subject !== s) return;
    const list = $("saved-reports");
    list.replaceChildren(...result.reports.map(savedItem));
    const n = result.total ?? result.reports.length;
    savedSay(n ? `${n} saved ${n === 1 ? "report" : "reports"}.` : `No saved reports for this ${s.link ? "study" : "image"} yet.`);
  } catch (err) {
    report(err, (t) => savedSay(`Couldn't list the saved reports: ${t}`));
  }
}

function savedItem(r) {
  const who = r.signer ? ` · signed by ${r.signer.name} (${r.signer.role}), ${when(r.signed_at)}` : ` · saved ${when(r.updated || r.created)}`;
  const delivery = (r.delivery || []).map((d) => d.state).filter(Boolean);
  const opens = el("span", { class: "saved-open" });
  for (let v = r.version; v >= 1; v--) { // the latest first; earlier versions stay readable
    const b = el("button", { type: "button", class: "secondary small", text: v === r.version ? `Open version ${v}` : `Version ${v}` });
    b.addEventListener("click", () => openSaved(r.report_id, v));
    opens.append(b);
  }
  const current = rep.report && rep.report.report_id === r.report_id && rep.report.version === r.version;
  return el(
    "li",
    { class: `saved-item${current ? " current" : ""}`, "data-status": r.status, "data-version": String(r.version) },
    el("strong", { class: `status status-${r.status}`, text: r.status }),
    ` version ${r.version}${r.replaces ? ` (amends ${r.replaces})` : ""}${who}`,
    delivery.length ? el("span", { class: "hint", text: ` · sent: ${delivery.join(", ")}` }) : null,
    r.final && r.final.impression ? el("span", { class: "saved-impression", text: r.final.impression }) : null,
    opens,
  );
}

async function openSaved(id, version) {
  try {
    const { result } = await api.rpc("get_report", { report_id: id, version });
    load(result);
    say(`Opened version ${result.version} (${result.status}).`);
    $("report-form").querySelector("input, select, textarea")?.focus();
    refreshSaved();
  } catch (err) {
    failed(err, "Couldn't open the report");
  }
}

// -- what the report is about ---------------------------------------------------------------

// A new image is shown: any report of the previous one is closed, and this one's saved
// reports are listed once it is known (`img.link` for a received instance, `img.sha256`).
export function setSubject(img) {
  rep.subject = img && (img.link || img.sha256) ? { link: img.link || null, sha256: img.sha256 || null } : null;
  rep.report = null;
  rep.draft = null;
  rep.value = null;
  $("report-form").hidden = true;
  $("report-form").replaceChildren();
  $("report-json-box").hidden = true;
  $("report-copy").hidden = true;
  $("saved-reports").replaceChildren();
  savedSay("");
  say("");
  setMode("none");
  $("saved").hidden = !rep.on || !rep.subject;
  $("saved-h").textContent = rep.subject && rep.subject.link ? "Saved reports for this study" : "Saved reports for this image";
  refreshSaved();
}

// Where Send delivers (health: capabilities.delivery), or why it can't.
function destinations(h) {
  const list = (h.capabilities && h.capabilities.delivery) || [];
  const key = JSON.stringify(list);
  if ($("send-hint").dataset.key === key) return;
  $("send-hint").dataset.key = key;
  $("report-send").disabled = !list.length;
  $("report-send").textContent = list.length ? `Send to ${destinationText(list[0])}` : "Send";
  $("send-hint").textContent = list.length
    ? "The signed report goes to the outbox and is delivered when the destination answers."
    : "No destination is configured: start “medgemma-edge serve” with --pacs HOST:PORT/AE or --fhir-url URL to send reports.";
}

function setOn(on) {
  if (rep.on === on) return;
  rep.on = on;
  $("report-hint").textContent = on
    ? "A draft in the report template, for you to check, edit, sign and export."
    : "A draft in the report template, for you to check, edit and copy.";
  $("saved").hidden = !on || !rep.subject;
  setMode(rep.mode);
  refreshSaved();
}

export function initSignoff() {
  $("report-save").addEventListener("click", saveDraft);
  $("report-sign").addEventListener("click", review);
  $("sign-confirm").addEventListener("click", sign);
  $("sign-cancel").addEventListener("click", () => {
    hideReview();
    $("report-form").querySelector("input, select, textarea")?.focus();
  });
  $("report-amend").addEventListener("click", startAmend);
  $("amend-save").addEventListener("click", saveAmend);
  $("amend-cancel").addEventListener("click", () => {
    load(rep.report);
    say("Amendment cancelled.");
  });
  $("report-send").addEventListener("click", send);
  for (const b of document.querySelectorAll("[data-export]")) b.addEventListener("click", () => exportAs(b.dataset.export));
  onHealth((h) => {
    setOn(Boolean(h.capabilities && h.capabilities.reports));
    destinations(h);
  });
}
