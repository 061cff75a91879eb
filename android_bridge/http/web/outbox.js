// The outbox: signed reports queued for the clinic's PACS or record system, and whether each
// reached it (queued / delivered / failed, attempts, the last error). Refreshed every few
// seconds while the tab is visible; a destination that is down is retried by the runtime.

import * as api from "./api.js";
import { $, el, onHealth, report, visiblePoll, when } from "./shared.js";

const POLL_MS = 5000;
const view = { on: false, rows: new Map() };
let poller = null;

function say(text) {
  const status = $("outbox-status");
  if (status.textContent !== text) status.textContent = text;
}

// Where an outbox item goes, in words.
export function destinationText(d) {
  if (!d) return "the configured destination";
  if (d.kind === "dicom") return `PACS ${d.ae_title ? `“${d.ae_title}” ` : ""}at ${d.host}:${d.port}`;
  if (d.kind === "fhir") return `FHIR endpoint ${d.url}`;
  return d.kind || "destination";
}

function fill(li, it) {
  const state = el("strong", { class: `delivery delivery-${it.state}`, text: it.state });
  const facts = [];
  if (it.state === "delivered") facts.push(`delivered ${when(it.delivered_at)}`);
  facts.push(`${it.attempts} ${it.attempts === 1 ? "attempt" : "attempts"}`);
  if (it.state !== "delivered" && it.next_attempt) facts.push(`next try ${when(it.next_attempt)}`);
  li.replaceChildren(
    el("span", { class: "outbox-what", text: `Report ${it.report_id}, version ${it.version} → ${destinationText(it.destination)}` }),
    " ",
    state,
    el("span", { class: "hint", text: ` · ${facts.join(" · ")}` }),
  );
  if (it.last_error && it.state !== "delivered") li.append(el("span", { class: "outbox-error", text: `Last error: ${it.last_error}` }));
  li.dataset.state = it.state;
  li.dataset.report = it.report_id;
  li.dataset.version = String(it.version);
}

async function refresh() {
  if (!view.on) return;
  let items;
  try {
    ({ result: { items } } = await api.rpc("outbox", {}));
  } catch (err) {
    report(err, (t) => say(`Couldn't read the outbox: ${t}`));
    return;
  }
  const list = $("outbox");
  const wanted = new Set(items.map((it) => it.item_id));
  for (const [id, row] of view.rows) {
    if (!wanted.has(id)) {
      row.li.remove();
      view.rows.delete(id);
    }
  }
  items.forEach((it, i) => {
    let row = view.rows.get(it.item_id);
    const key = JSON.stringify(it);
    if (!row) {
      row = { li: el("li", { class: "outbox-item" }), key: "" };
      view.rows.set(it.item_id, row);
    }
    if (row.key !== key) fill(row.li, it);
    row.key = key;
    if (list.children[i] !== row.li) list.insertBefore(row.li, list.children[i] || null);
  });
  const waiting = items.filter((it) => it.state !== "delivered").length;
  if (!items.length) say("Nothing sent yet. Sign a report, then Send it.");
  else say(`${items.length} sent ${items.length === 1 ? "report" : "reports"}; ${waiting ? `${waiting} not delivered yet` : "all delivered"}.`);
}

// Refresh now (after a Send).
export function refreshOutbox() {
  if (poller) poller.now();
}

export function initOutbox() {
  poller = visiblePoll(refresh, POLL_MS, () => view.on);
  onHealth((h) => {
    const on = Boolean(h.capabilities && h.capabilities.reports);
    if (on === view.on) return;
    view.on = on;
    $("outbox-panel").hidden = !on;
    if (on) poller.start();
  });
}
