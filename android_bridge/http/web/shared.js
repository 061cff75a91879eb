// What the page's parts share: its state, small DOM helpers, messages, the runtime's status.

import * as api from "./api.js";

export const $ = (id) => document.getElementById(id);
const POLL_MS = 5000;
export const state = { config: null, health: null, image: null, job: null, reachable: true, labelSets: null };
const healthListeners = [];

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

export const basename = (p) => String(p || "").split(/[\\/]/).filter(Boolean).pop() || "";
export const seconds = (s) => (s < 10 ? `${s.toFixed(1)} s` : `${Math.round(s)} s`);

// -- messages -------------------------------------------------------------------------------

export function showAlert(text) {
  $("alert-text").textContent = text;
  $("alert").hidden = false;
}

export function clearAlert(onlyIf = null) {
  if (onlyIf === null || $("alert-text").textContent === onlyIf) $("alert").hidden = true;
}

export function report(err, where) {
  if (err.code === "unreachable") unreachable();
  else if (err.code === "unauthorized") {
    showAlert(err.message);
    lock();
  }
  if (where) where(err.code === "aborted" ? "Stopped." : err.message);
}

export function unreachable() {
  state.reachable = false;
  $("runtime").textContent = "Runtime not reachable";
  $("runtime").dataset.state = "down";
  showAlert(api.UNREACHABLE);
  api.abortAll(new api.ApiError("unreachable", api.UNREACHABLE));
}

export function lock() {
  document.body.classList.add("locked");
  for (const b of document.querySelectorAll("button, input, select, textarea")) {
    if (b.id !== "alert-close") b.disabled = true;
  }
}

// -- the runtime's state ----------------------------------------------------------------------

export function modelText(info, name) {
  if (!info) return `${name}: not loaded`;
  const parts = [name];
  if (info.text) parts.push(`${basename(info.text)}${info.quant ? ` (${info.quant})` : ""}`);
  if (info.precision) parts.push(info.precision);
  if (info.bundle) parts.push(`bundle “${basename(info.bundle)}”`);
  return parts.join(" · ");
}

function modelLine(container, info, name) {
  container.append(el("span", { text: modelText(info, name) }));
  if (info && info.synthetic) {
    container.append(" ", el("strong", { class: "badge", text: "synthetic twin — outputs mean nothing" }));
  }
}

export function renderHealth(h) {
  const mg = h.models.medgemma;
  const ms = h.models.medsiglip;
  renderLan(h);
  const chip = $("runtime");
  const states = { ready: "ready", generating: "answering", loading: "loading…", uninitialized: "not loaded", error: "failed to load" };
  const text = `Runtime: MedGemma ${states[mg.state] || mg.state}, MedSigLIP ${states[ms.state] || ms.state}`;
  if (chip.textContent !== text) chip.textContent = text; // a live region: announce changes only
  chip.dataset.state = mg.state === "error" || ms.state === "error" ? "error" : mg.state === "loading" || ms.state === "loading" ? "loading" : "ok";
  const line = $("model-line");
  const key = JSON.stringify([mg.info, ms.info, mg.error]);
  if (line.dataset.key === key) return renderCapabilities(h, ms);
  line.dataset.key = key;
  line.replaceChildren();
  line.append("Answers by ");
  modelLine(line, mg.info, "MedGemma");
  line.append(". Findings by ");
  modelLine(line, ms.info, "MedSigLIP");
  line.append(".");
  if (mg.error) line.append(" ", el("span", { class: "error-text", text: `MedGemma: ${mg.error}` }));
  renderCapabilities(h, ms);
}

// Clinic-server mode (serve --lan): the certificate fingerprint tablets pin, read off this screen.
function renderLan(h) {
  const p = $("lan");
  if (!h.lan) return void (p.hidden = true);
  const pairs = h.lan.fingerprint.toUpperCase().match(/../g).join(":");
  const q = h.lan.queue;
  const text = `Clinic server: ${h.lan.devices} paired device(s); ${q.running + q.waiting} generation(s) running or waiting. `
    + `Certificate fingerprint (SHA-256) for pairing: ${pairs}`;
  if (p.textContent !== text) p.textContent = text;
  p.hidden = false;
}

function renderCapabilities(h, ms) {
  const sets = ms.info && ms.info.label_sets;
  if (sets && sets.length && state.labelSets === null) {
    state.labelSets = sets;
    $("label-set").replaceChildren(...sets.map((s) => el("option", { value: s, text: s === "cxr" ? "Chest X-ray (cxr)" : s === "derm" ? "Dermatology (derm)" : s })));
  }
  if (!h.capabilities.index) $("cases-status").textContent = "No case index: start the runtime with “--index DIR” to see similar prior cases.";
}

export async function poll() {
  try {
    const h = await api.health();
    state.health = h;
    if (!state.reachable) {
      state.reachable = true;
      clearAlert(api.UNREACHABLE);
    }
    renderHealth(h);
    for (const fn of healthListeners) fn(h);
  } catch (err) {
    // refused: gone. Slow: twice in a row, so a busy device's late answer isn't taken for death.
    state.misses = err.code === "timeout" ? (state.misses || 0) + 1 : 0;
    if (err.code === "unreachable" || state.misses >= 2) unreachable();
    else if (err.code !== "timeout") report(err);
    if (err.code === "unauthorized") return;
    setTimeout(poll, POLL_MS);
    return;
  }
  state.misses = 0;
  setTimeout(poll, POLL_MS);
}

// The image as the ops take it: a received instance by its UIDs, or an uploaded file's bytes.
export function src(img) {
  if (img.source) return img.source;
  return img.frame === null ? { base64: img.b64 } : { base64: img.b64, frame: img.frame };
}

// `fn(health)` after every health answer (the parts that appear with a capability).
export function onHealth(fn) {
  healthListeners.push(fn);
}

export const locked = () => document.body.classList.contains("locked");

// Run `fn` (async) now and every `ms` while the tab is visible: a hidden tab asks nothing, and
// a tab shown again refreshes at once. `wanted()` says whether the part is still on screen.
export function visiblePoll(fn, ms, wanted = () => true) {
  let timer = null;
  let running = false;
  let again = false;
  const tick = async () => {
    clearTimeout(timer);
    timer = null;
    if (running) {
      again = true; // asked while a refresh runs: refresh once more right after it
      return;
    }
    if (document.hidden || locked() || !wanted()) return;
    running = true;
    try {
      await fn();
    } catch (_) {
      /* fn reports its own errors */
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      tick();
    } else if (!document.hidden && wanted()) timer = setTimeout(tick, ms);
  };
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(timer);
      timer = null;
    } else if (timer === null) tick();
  });
  return { now: tick, start: () => timer === null && !running && tick() };
}

// "Doe^Jane^M" (a DICOM person name) as people write it: "Doe, Jane M".
export function personName(pn) {
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = String(pn || "").split("=")[0].split("^");
  const first = [prefix, given, middle].filter(Boolean).join(" ");
  const name = [family, first].filter(Boolean).join(", ");
  return [name, suffix].filter(Boolean).join(" ").trim();
}

// An ISO time as a short local date and time ("today 14:03" for today).
export function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const today = new Date().toDateString() === d.toDateString();
  return today ? `today ${time}` : `${d.toLocaleDateString()} ${time}`;
}
