// Received studies: what the clinic's modality (or a folder import) sent to this device's DICOM
// node, newest first, refreshed every few seconds while the tab is visible. Opening a study
// lists its series and images; choosing an image shows it (with its DICOM window) and starts
// the page's flow with the image source {"study": UID, "instance": UID}.
//
// Patient names and IDs come from DICOM files: they are only ever set as textContent.

import * as api from "./api.js";
import { $, el, onHealth, personName, report, state, visiblePoll, when } from "./shared.js";

const PAGE = 20; // studies per page ("More" adds the next)
const MAX_LIMIT = 200; // the op's limit
const POLL_MS = 5000;
const MAX_SHOWN_INSTANCES = 60; // per series before "Show all"
const MODALITIES = [
  ["CR", "CR (computed radiography)"],
  ["DX", "DX (digital X-ray)"],
  ["CT", "CT"],
  ["MR", "MR"],
  ["US", "US (ultrasound)"],
  ["XC", "XC (photograph)"],
  ["OT", "OT (other, secondary capture)"],
];

const view = { on: false, shown: 0, total: 0, rows: new Map(), reasons: new Map(), seen: null, open: null, current: null, onOpen: null };
let queue = Promise.resolve();
let poller = null;

// Run list changes one at a time: a poll and "More" must not interleave.
const serial = (fn) => (queue = queue.then(fn, fn));

function say(text) {
  const status = $("studies-status");
  if (status.textContent !== text) status.textContent = text; // a live region: announce changes only
}

function emptyText() {
  const dicom = state.health && state.health.capabilities.dicom;
  const modality = $("study-modality").value;
  if (modality) return `No ${modality} studies received. Choose “All modalities” to see the others.`;
  const importing = "A folder (e.g. from a CR reader's USB stick) can be added with “medgemma-edge dicom import DIR”.";
  if (dicom && dicom.port) {
    const local = !dicom.host || dicom.host === "127.0.0.1" || dicom.host === "localhost" || dicom.host === "::1";
    const where = local ? `port ${dicom.port} of this device (listening on this device only: start serve with --dicom-host ADDRESS to receive from the clinic network)` : `${dicom.host} port ${dicom.port}`;
    return `No studies yet. Send images from the modality or PACS (DICOM C-STORE) to AE title “${dicom.ae_title}” at ${where}; they appear here. ${importing}`;
  }
  return `No studies yet, and this runtime is not receiving DICOM: start “medgemma-edge serve” with --dicom-port N (and --ae-title) to receive from the modality. ${importing}`;
}

function params(offset, limit) {
  const p = { offset, limit };
  if ($("study-modality").value) p.modality = $("study-modality").value;
  return p;
}

async function refresh() {
  if (!view.on) return;
  const limit = Math.min(MAX_LIMIT, Math.max(PAGE, view.shown));
  let result;
  try {
    ({ result } = await api.rpc("list_studies", params(0, limit)));
  } catch (err) {
    report(err, (t) => say(`Couldn't list the received studies: ${t}`));
    return;
  }
  show(result.studies, result.total);
}

async function more() {
  try {
    const { result } = await api.rpc("list_studies", params(view.shown, PAGE));
    const have = [...view.rows.values()].map((r) => r.study);
    const known = new Set(have.map((s) => s.study_uid));
    show([...have, ...result.studies.filter((s) => !known.has(s.study_uid))], result.total);
  } catch (err) {
    report(err, (t) => say(`Couldn't list more studies: ${t}`));
  }
}

// Make the list show `studies` in order, reusing rows (and their focused buttons) that exist.
function show(studies, total) {
  const list = $("studies");
  const wanted = new Set(studies.map((s) => s.study_uid));
  for (const [uid, row] of view.rows) {
    if (!wanted.has(uid)) {
      row.li.remove();
      view.rows.delete(uid);
    }
  }
  const fresh = view.seen ? studies.filter((s) => !view.seen.has(s.study_uid)) : [];
  studies.forEach((s, i) => {
    let row = view.rows.get(s.study_uid);
    const key = JSON.stringify(s);
    if (!row) {
      row = newRow(s);
      view.rows.set(s.study_uid, row);
    } else if (row.key !== key) {
      fillRow(row, s);
      if (s.study_uid === view.current) reloadStudy(s.study_uid); // more images arrived
    }
    row.key = key;
    row.study = s;
    if (list.children[i] !== row.li) list.insertBefore(row.li, list.children[i] || null);
    addModality(s.modalities || []);
  });
  view.seen = new Set([...(view.seen || []), ...wanted]);
  view.shown = studies.length;
  view.total = total;
  $("studies-more").hidden = studies.length >= total;
  if (!total) say(emptyText());
  else if (fresh.length) say(`New: ${fresh.map(summary).join("; ")}. ${countText()}`);
  else say(countText());
}

const countText = () => `${view.total} ${view.total === 1 ? "study" : "studies"} received, newest first${view.shown < view.total ? ` (showing ${view.shown})` : ""}.`;

function summary(s) {
  const what = [(s.modalities || []).join("/"), (s.body_parts || []).join(", ")].filter(Boolean).join(" ");
  return `${what || "study"} received ${when(s.received)}`;
}

function addModality(mods) {
  const select = $("study-modality");
  for (const m of mods) {
    if (m && ![...select.options].some((o) => o.value === m)) select.append(el("option", { value: m, text: m }));
  }
}

function newRow(s) {
  const button = el("button", { type: "button", class: "study-open" });
  const badge = el("p", { class: "study-badge" });
  const li = el("li", { class: "study-item" }, button, badge);
  const row = { li, button, badge, key: "", study: s };
  button.addEventListener("click", () => openStudy(row.study.study_uid));
  fillRow(row, s);
  return row;
}

function fillRow(row, s) {
  const name = personName(s.patient_name) || "Name not recorded";
  const id = s.patient_id ? `ID ${s.patient_id}` : "no patient ID";
  const what = [(s.modalities || []).join("/") || "modality not recorded", (s.body_parts || []).join(", "), s.description].filter(Boolean).join(" · ");
  const dated = s.study_date ? `study of ${s.study_date}` : "study date not recorded";
  const count = `${s.instance_count} ${s.instance_count === 1 ? "image" : "images"}`;
  row.button.replaceChildren(
    el("span", { class: "study-who" }, el("strong", { text: name }), ` · ${id}`),
    el("span", { class: "study-what", text: `${what} · ${dated}` }),
    el("span", { class: "study-when", text: `received ${when(s.received)} · ${count}` }),
  );
  row.li.classList.toggle("current", view.current === s.study_uid);
  if (view.current === s.study_uid) row.button.setAttribute("aria-current", "true");
  badge(row, s);
}

function badge(row, s) {
  const none = s.displayable_count === 0;
  const some = !none && s.displayable_count < s.instance_count;
  row.badge.hidden = !none && !some;
  row.badge.replaceChildren();
  if (some) row.badge.append(el("span", { class: "hint", text: `${s.instance_count - s.displayable_count} of ${s.instance_count} images can't be displayed here.` }));
  if (!none) return;
  row.badge.append(el("strong", { class: "cant", text: "can't display" }));
  if (s.why_not) {
    row.badge.append(" ", s.why_not); // the list names the reason itself
    return;
  }
  const cacheKey = `${s.study_uid}/${s.instance_count}`;
  const reason = view.reasons.get(cacheKey);
  if (reason) row.badge.append(" ", reason);
  else if (reason === undefined) {
    view.reasons.set(cacheKey, null); // asked once
    api.rpc("get_study", { study: s.study_uid }).then(
      ({ result }) => {
        view.reasons.set(cacheKey, whyNot(result));
        if (view.rows.get(s.study_uid) === row) badge(row, row.study);
      },
      () => {},
    );
  }
}

// Why a study's instances can't be displayed: their transfer syntaxes, named.
function whyNot(study) {
  const why = new Set();
  for (const series of study.series || []) {
    for (const i of series.instances || []) if (!i.displayable) why.add(instanceWhyNot(i));
  }
  return [...why].join("; ");
}

function instanceWhyNot(i) {
  if (i.why_not) return i.why_not;
  return `${i.transfer_syntax_name || "transfer syntax"} (${i.transfer_syntax}): no decoder on this device`;
}

// -- one study ------------------------------------------------------------------------------

async function openStudy(uid) {
  let study;
  try {
    ({ result: study } = await api.rpc("get_study", { study: uid }));
  } catch (err) {
    report(err, (t) => say(err.code === "not_found" ? "That study is no longer on this device." : `Couldn't open the study: ${t}`));
    if (err.code === "not_found") refresh();
    return;
  }
  view.current = uid;
  for (const [u, row] of view.rows) {
    row.li.classList.toggle("current", u === uid);
    if (u === uid) row.button.setAttribute("aria-current", "true");
    else row.button.removeAttribute("aria-current");
  }
  renderStudy(study);
  const first = firstDisplayable(study);
  if (first) openInstance(study, first.series, first.instance);
  else $("study-h").focus();
}

// The open study again (its list row changed): the same series list, nothing else reopened.
async function reloadStudy(uid) {
  try {
    const { result } = await api.rpc("get_study", { study: uid });
    if (view.current !== uid) return;
    const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.instance : null;
    renderStudy(result);
    markInstance(state.image && state.image.link ? state.image.link.instance_uid : null);
    const again = focused && [...document.querySelectorAll("#series .instance-open")].find((b) => b.dataset.instance === focused);
    if (again) again.focus();
  } catch (_) {
    /* the next poll tries again */
  }
}

function markInstance(uid) {
  for (const b of document.querySelectorAll("#series .instance-open")) {
    if (b.dataset.instance === uid) b.setAttribute("aria-current", "true");
    else b.removeAttribute("aria-current");
  }
}

function firstDisplayable(study) {
  for (const series of study.series || []) {
    for (const instance of series.instances || []) if (instance.displayable) return { series, instance };
  }
  return null;
}

function renderStudy(study) {
  const box = $("study");
  const name = personName(study.patient_name) || "Name not recorded";
  $("study-h").textContent = `${name} — ${(study.modalities || []).join("/") || "study"}${study.study_date ? `, ${study.study_date}` : ""}`;
  const facts = [
    study.patient_id ? `Patient ID ${study.patient_id}` : null,
    study.patient_birth_date ? `born ${study.patient_birth_date}` : null,
    study.patient_sex ? `sex ${study.patient_sex}` : null,
    study.accession ? `accession ${study.accession}` : null,
    study.description || null,
    `${study.series_count} series, ${study.instance_count} ${study.instance_count === 1 ? "image" : "images"}`,
    `received ${when(study.received)}${study.calling_ae ? ` from ${study.calling_ae}` : ""}`,
  ];
  $("study-facts").textContent = facts.filter(Boolean).join(" · ");
  const list = $("series");
  list.replaceChildren(...(study.series || []).map((series) => seriesItem(study, series)));
  box.hidden = false;
}

function seriesItem(study, series) {
  const title = [`Series ${series.number ?? "—"}`, series.modality, series.body_part, series.description].filter(Boolean).join(" · ");
  const instances = el("ol", { class: "instances" });
  const li = el("li", { class: "series-item" }, el("p", { class: "series-title", text: `${title} (${series.instances.length} ${series.instances.length === 1 ? "image" : "images"})` }), instances);
  const render = (all) => {
    const shown = all ? series.instances : series.instances.slice(0, MAX_SHOWN_INSTANCES);
    instances.replaceChildren(...shown.map((i) => instanceItem(study, series, i)));
    if (shown.length < series.instances.length) {
      const rest = el("button", { type: "button", class: "secondary small", text: `Show all ${series.instances.length} images` });
      rest.addEventListener("click", () => {
        render(true);
        const next = instances.children[shown.length] && instances.children[shown.length].querySelector("button");
        if (next) next.focus();
      });
      instances.append(el("li", {}, rest));
    }
  };
  render(false);
  return li;
}

function instanceItem(study, series, i) {
  const frames = i.frames > 1 ? `, ${i.frames} frames` : "";
  const what = `Image ${i.number ?? "—"}${frames}${i.rows && i.columns ? ` · ${i.columns} × ${i.rows}` : ""}${i.sop_class ? ` · ${i.sop_class}` : ""}`;
  if (!i.displayable) {
    return el("li", { class: "instance cant-open" }, el("span", { text: what }), " ", el("strong", { class: "cant", text: "can't display" }), el("span", { class: "hint", text: ` ${instanceWhyNot(i)}` }));
  }
  const button = el("button", { type: "button", class: "secondary small instance-open", "data-instance": i.sop_instance_uid, text: `Show ${what}` });
  button.addEventListener("click", () => openInstance(study, series, i));
  return el("li", { class: "instance" }, button);
}

function openInstance(study, series, instance) {
  markInstance(instance.sop_instance_uid);
  const name = personName(study.patient_name) || "Name not recorded";
  view.onOpen({
    source: { study: study.study_uid, instance: instance.sop_instance_uid },
    link: { study_uid: study.study_uid, series_uid: series.series_uid, instance_uid: instance.sop_instance_uid },
    label: `${name} — series ${series.number ?? "—"}, image ${instance.number ?? "—"}`,
  });
}

// -- wiring ---------------------------------------------------------------------------------

function setOn(on) {
  if (view.on === on) return;
  view.on = on;
  $("studies-panel").hidden = !on;
  if (on) poller.start();
}

// Start the panel; `onOpen({source, link, label})` shows a received instance in the page.
export function initStudies(onOpen) {
  view.onOpen = onOpen;
  const select = $("study-modality");
  for (const [value, text] of MODALITIES) select.append(el("option", { value, text }));
  poller = visiblePoll(() => serial(refresh), POLL_MS, () => view.on);
  $("studies-refresh").addEventListener("click", () => poller.now());
  $("studies-more").addEventListener("click", () => serial(more));
  select.addEventListener("change", () => {
    view.shown = 0;
    view.seen = null; // what a filter shows again is not news
    poller.now();
  });
  onHealth((h) => setOn(Boolean(h.capabilities && h.capabilities.studies)));
}
