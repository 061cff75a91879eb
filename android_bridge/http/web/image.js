// The image the page works on: a file the user gives (checked here for type, bytes and pixels,
// then uploaded) or an instance the clinic's modality sent to this device (studies.js: the
// image source {"study", "instance", "frame"?}, nothing uploaded). The runtime previews it (the
// picture the models see, with its DICOM window); then MedGemma encodes it (prepare_image, with
// progress), MedSigLIP scores it, the case index is searched and its saved reports are listed.

import * as api from "./api.js";
import { base64Of, refusal, sniff } from "./files.js";
import { findings, similar } from "./insights.js";
import { $, clearAlert, report, seconds, showAlert, src, state } from "./shared.js";
import { setSubject } from "./signoff.js";

export function dropImage() {
  const img = state.image;
  if (img) {
    img.ctrl.abort();
    if (img.prepareCall) img.prepareCall.cancel();
  }
  state.image = null;
  $("preview").hidden = true;
  $("preview-img").removeAttribute("src");
  $("clear-image").hidden = true;
  $("frame-row").hidden = true;
  $("encode").hidden = true;
  $("drop").classList.remove("has-image");
  $("findings").replaceChildren();
  $("cases").replaceChildren();
  $("findings-status").textContent = "Add an image to see findings.";
  if (!state.health || state.health.capabilities.index) $("cases-status").textContent = "Add an image to see similar cases.";
}

// A new image object; `key` says what it shows (a frame change keeps the report of the image).
function newImage(fields) {
  const img = { file: null, source: null, link: null, sha256: null, frame: null, ctrl: new AbortController(), b64: null, ready: false, prepared: null, prepareCall: null, ...fields };
  const same = state.image && state.image.key === img.key; // another frame of the same image
  img.fresh = !(same && state.image.ready);
  if (same) img.sha256 = state.image.sha256;
  else setSubject(null); // any report shown described another image
  dropImage();
  clearAlert();
  state.image = img;
  $("findings-status").textContent = "Reading the image…";
  return img;
}

export async function setImage(file, frame = null) {
  const info = await sniff(file);
  const why = refusal(file, info, state.config && state.config.limits);
  if (why) {
    setSubject(null);
    dropImage();
    clearAlert();
    showAlert(why);
    $("file").value = "";
    return;
  }
  const img = newImage({ key: file, file, frame, label: file.name });
  let pv;
  try {
    pv = await api.preview(file, { frame, signal: img.ctrl.signal });
  } catch (err) {
    return previewFailed(img, err, `“${file.name}”`);
  }
  if (state.image !== img) return;
  showPreview(img.label, pv);
  img.b64 = await base64Of(file);
  if (state.image !== img) return;
  if (!img.sha256) img.sha256 = await sha256Of(file); // what its reports are saved against
  if (state.image !== img) return;
  start(img);
}

// A received instance (from the study list): nothing is uploaded, the ops read it on the device.
export async function setStudyImage({ source, link, label }, frame = null) {
  const image = frame === null ? { ...source } : { ...source, frame };
  const img = newImage({ key: `${source.study}/${source.instance}`, source: image, link, frame, label });
  let pv;
  try {
    ({ result: pv } = await api.rpc("preview_image", { image }, { ms: 120000, signal: img.ctrl.signal }));
  } catch (err) {
    return previewFailed(img, err, "this image");
  }
  if (state.image !== img) return;
  showPreview(label, pv);
  start(img);
}

function previewFailed(img, err, what) {
  if (state.image !== img) return;
  dropImage();
  if (err.code === "aborted") return;
  report(err);
  if (err.code !== "unreachable" && err.code !== "unauthorized") showAlert(`Couldn't use ${what}: ${err.message}`);
}

// The image is shown: encode it for MedGemma, score it, search the index, list its reports.
function start(img) {
  img.ready = true;
  img.prepared = prepare(img);
  findings(img);
  similar(img);
  if (img.fresh) setSubject(img);
}

// The file's SHA-256 (hex): its reports are saved against it. null where the browser has no
// WebCrypto (a page not on 127.0.0.1 or https): then reports can't be saved for uploads.
async function sha256Of(file) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function showPreview(name, pv) {
  const facts = [pv.format.toUpperCase()];
  const i = pv.info || {};
  if (i.modality) facts.push(i.modality);
  facts.push(`${pv.size[0]} × ${pv.size[1]} px`);
  if (i.window && i.window.width !== undefined) {
    facts.push(`window C ${Math.round(i.window.center)} / W ${Math.round(i.window.width)} (${i.window.from})`);
  } else if (i.window) facts.push(`window: ${i.window.from}`);
  if (i.frames > 1) facts.push(`frame ${i.frame + 1} of ${i.frames}`);
  $("preview-img").src = pv.image;
  $("preview-img").alt = `The image as the models see it: ${facts.join(", ")}`;
  $("preview-facts").textContent = `${name} — ${facts.join(" · ")}`;
  $("preview").hidden = false;
  $("drop").classList.add("has-image");
  $("clear-image").hidden = false;
  $("frame-row").hidden = !(i.frames > 1);
  if (i.frames > 1) {
    $("frame").max = String(i.frames - 1);
    $("frame").value = String(i.frame);
    $("frame-of").textContent = `of 0–${i.frames - 1}`;
  }
}

// MedGemma encodes the image while the user types. Never rejects: a failure here only means
// the image is encoded when the question is asked.
async function prepare(img) {
  const box = $("encode");
  const label = $("encode-label");
  const bar = $("encode-bar");
  if (state.health && !state.health.capabilities.images && state.health.models.medgemma.state === "ready") {
    box.hidden = false;
    bar.value = 0;
    label.textContent = "This runtime's MedGemma has no image encoder: it can't answer questions about images.";
    return false;
  }
  if (!state.health) return false;
  const t0 = performance.now();
  let text = "Preparing the image for MedGemma…";
  const tick = () => (label.textContent = `${text} ${Math.round((performance.now() - t0) / 1000)} s`);
  box.hidden = false;
  bar.removeAttribute("value");
  tick();
  const timer = setInterval(tick, 1000);
  const onEvent = (m) => {
    if (m.event !== "progress") return;
    if (m.done >= m.total) bar.value = 1;
    else bar.removeAttribute("value");
  };
  try {
    const out = await api.whenLoaded(
      () => {
        img.prepareCall = new api.Call("prepare_image", { images: [src(img)] }, { onEvent, signal: img.ctrl.signal });
        return img.prepareCall.done;
      },
      { signal: img.ctrl.signal, onWait: () => (text = "Waiting for MedGemma to load…") },
    );
    clearInterval(timer);
    if (out.done.finish_reason === "cancelled") {
      label.textContent = "Image encoding stopped; it will be encoded when you ask.";
      return false;
    }
    const first = out.result.images[0];
    bar.value = 1;
    label.textContent = first.cached ? "Image ready for questions (already encoded)." : `Image ready for questions (encoded in ${seconds(first.encode_s)}).`;
    return true;
  } catch (err) {
    clearInterval(timer);
    if (state.image !== img) return false;
    bar.value = 0;
    if (err.code === "busy") label.textContent = "MedGemma is busy; the image will be encoded when you ask.";
    else report(err, (t) => (label.textContent = `Image not prepared: ${t}`));
    return false;
  }
}

// Show frame `n` of the current (multi-frame) image: the same image, so its report stays.
export function showFrame(n) {
  const img = state.image;
  if (!img || !Number.isInteger(n) || n < 0) return;
  if (img.file) setImage(img.file, n);
  else setStudyImage({ source: { study: img.source.study, instance: img.source.instance }, link: img.link, label: img.label }, n);
}
