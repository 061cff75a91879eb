// The clinician's page: an image, a question, a streamed answer, MedSigLIP's findings, similar
// cases and a structured report, all from the runtime on this device (see PROTOCOL.md); with a
// study store, the studies the clinic's modality sent (studies.js), and with a report store,
// sign-off (signoff.js) and the outbox (outbox.js).
//
// The image (image.js) is encoded by MedGemma as soon as it is shown: a question asked before
// the encoding is done waits for it, then hits the cache.

import * as api from "./api.js";
import { dropImage, setImage, setStudyImage, showFrame } from "./image.js";
import { findings } from "./insights.js";
import { initOutbox } from "./outbox.js";
import { $, clearAlert, el, lock, locked, modelText, poll, report, seconds, showAlert, src, state } from "./shared.js";
import { initSignoff, setSubject, showDraft } from "./signoff.js";
import { initStudies } from "./studies.js";

// -- questions and the report -------------------------------------------------------------------

function addAnswer(question) {
  const text = el("div", { class: "answer-text", "aria-live": "polite", "aria-busy": "true" });
  const status = el("p", { class: "answer-status hint" });
  const meta = el("p", { class: "answer-meta hint" });
  const item = el("li", { class: "answer", "data-state": "waiting", "data-tokens": "0" }, el("p", { class: "q" }, el("span", { class: "who", text: "Question: " }), question), text, status, meta);
  $("answers").prepend(item);
  return { item, text, status: (t) => (status.textContent = t), meta };
}

function describeRun(result, done) {
  const parts = [];
  const model = result && result.model;
  if (model) parts.push(modelText(model, "MedGemma") + (model.synthetic ? " · synthetic twin — outputs mean nothing" : ""));
  const t = done.timings || {};
  if (done.usage) parts.push(`${done.usage.completion_tokens} tokens in ${seconds(t.total_s || 0)}`);
  if (t.image_cache_hits) parts.push("image from the cache");
  else if (t.image_cache_misses) parts.push(`image encoded in ${seconds(t.image_encode_s || 0)}`);
  return parts.join(" · ");
}

function setRunning(on) {
  $("ask").disabled = on;
  $("report").disabled = on;
  $("stop").disabled = !on;
}

async function waitFor(promise, signal) {
  return Promise.race([promise, api.sleep(2 ** 31 - 1, signal)]);
}

async function run(kind) {
  if (state.job || locked()) return;
  const question = $("question").value.trim();
  const img = state.image;
  const box = $(kind === "answer" ? "ask-status" : "report-status");
  const say = (t) => (box.textContent = t);
  if (kind === "answer" && !question) {
    say("Type a question first.");
    $("question").focus();
    return;
  }
  if (kind === "report" && !img) return say("Add an image first: the report describes an image.");
  if (img && !img.ready) return say("The image is still being read; try again in a moment.");
  if (!state.config) {
    try {
      state.config = await api.config();
    } catch (err) {
      return report(err, say);
    }
  }
  const job = { kind, ctrl: new AbortController(), call: null };
  state.job = job;
  setRunning(true);
  $("ask-status").textContent = "";
  const entry = kind === "answer" ? addAnswer(question) : null;
  const status = entry ? entry.status : say;
  let tokens = 0;
  try {
    if (img && img.prepared) {
      status("Waiting for the image to finish encoding…");
      await waitFor(img.prepared, job.ctrl.signal);
    }
    const params = kind === "answer"
      ? { prompt: question, images: img ? [src(img)] : [], max_tokens: Number($("length").value) }
      : { prompt: state.config.report.prompt, images: [src(img)], schema: state.config.report.schema, max_tokens: 768 };
    const onEvent = (m) => {
      if (m.event === "token") {
        tokens += 1;
        if (entry) {
          entry.text.append(m.text);
          entry.item.dataset.state = "streaming";
          entry.item.dataset.tokens = String(tokens);
          if (tokens === 1) status("Answering…");
        } else status(`Drafting the report… ${tokens} tokens`);
      } else if (m.event === "queued") {
        // a clinic server (serve --lan) runs one generation at a time: this one waits its turn
        status(`Waiting in line: ${m.position} ahead, about ${Math.max(1, Math.round(m.estimated_wait_s))} s…`);
      } else if (m.event === "progress" && m.stage === "image" && m.done < m.total) status("Encoding the image…");
    };
    status(kind === "answer" ? "Waiting for the first words…" : "Drafting the report…");
    const out = await api.whenLoaded(
      () => {
        job.call = new api.Call("generate", params, { onEvent });
        return job.call.done;
      },
      { signal: job.ctrl.signal, onWait: () => status("MedGemma is still loading; this is sent as soon as it is ready…") },
    );
    const finish = out.done.finish_reason;
    if (entry) {
      entry.item.dataset.finish = finish;
      entry.item.dataset.state = finish === "cancelled" ? "stopped" : "done";
      const longest = $("length").value === $("length").options[$("length").options.length - 1].value;
      const limit = `The answer reached the length limit${longest ? "" : " (choose Long for more)"}.`;
      status(finish === "cancelled" ? "Stopped." : finish === "length" ? limit : "");
      entry.meta.textContent = describeRun(out.result, out.done);
      if (out.result) entry.meta.append(el("span", { class: "answer-disclaimer", text: ` ${out.result.disclaimer}` }));
    } else if (finish === "cancelled") say("Stopped.");
    else showReport(out.result, out.done);
  } catch (err) {
    if (entry) {
      entry.item.dataset.state = err.code === "aborted" ? "stopped" : "error";
      if (err.code === "busy") err.message = "MedGemma is answering another request (another app or tab). Try again when it finishes.";
    }
    report(err, status);
  } finally {
    if (entry) entry.text.setAttribute("aria-busy", "false");
    state.job = null;
    setRunning(false);
  }
}

function stop() {
  const job = state.job;
  if (!job) return;
  $("stop").disabled = true;
  if (job.call) job.call.cancel();
  job.ctrl.abort();
}

function showReport(result, done) {
  const parsed = result.parsed && typeof result.parsed === "object" ? result.parsed : null;
  const notes = [];
  if (!parsed) notes.push(done.finish_reason === "length" ? "The draft was cut off before it was complete; the form starts empty." : "The draft was not valid JSON; the form starts empty.");
  else if (result.schema_errors && result.schema_errors.length) notes.push(`The draft does not fully match the template (${result.schema_errors.join("; ")}); check every field.`);
  notes.push("Check and edit every field before use.");
  if (result.model) notes.push(`Drafted by ${describeRun(result, done)}. ${result.disclaimer || ""}`);
  $("report-status").textContent = notes.join(" ");
  showDraft(parsed);
  const first = $("report-form").querySelector("input, select, textarea");
  if (first) first.focus();
}

async function copyReport() {
  const text = $("report-json").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents($("report-json"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  $("report-status").textContent = "Copied the report as JSON.";
}

// -- wiring ------------------------------------------------------------------------------------

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", () => $("file").files[0] && setImage($("file").files[0]));
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const kind of ["dragleave", "drop"]) drop.addEventListener(kind, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files[0]) setImage(e.dataTransfer.files[0]);
  });
  // a file dropped beside the zone must not make the browser navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  window.addEventListener("paste", (e) => {
    const file = e.clipboardData && e.clipboardData.files[0];
    if (file) setImage(file);
  });
  $("clear-image").addEventListener("click", () => {
    setSubject(null);
    dropImage();
    $("file").value = "";
    $("file").focus();
  });
  $("frame").addEventListener("change", () => showFrame(Number($("frame").value)));
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    run("answer");
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      run("answer");
    }
  });
  $("stop").addEventListener("click", stop);
  $("report").addEventListener("click", () => run("report"));
  $("report-copy").addEventListener("click", copyReport);
  $("alert-close").addEventListener("click", () => clearAlert());
  $("label-set").addEventListener("change", () => state.image && state.image.ready && findings(state.image));
  $("labels-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
    if (!labels.length) $("findings-status").textContent = "Type one or more labels, separated by commas.";
    else if (state.image && state.image.ready) findings(state.image, labels);
    else $("findings-status").textContent = "Add an image first.";
  });
}

async function main() {
  wire();
  initStudies((opened) => setStudyImage(opened));
  initSignoff();
  initOutbox();
  if (!api.takeToken()) {
    showAlert("This page needs its access key. Open the address printed by “medgemma-edge serve” (it ends with #token=…), or start it with --open.");
    lock();
    return;
  }
  try {
    state.config = await api.config();
    if (state.config.disclaimer) $("disclaimer").textContent = state.config.disclaimer.replace(/^Decision support[^;.]*[;.]\s*(not a diagnosis\.\s*)?/i, "");
  } catch (err) {
    report(err);
    if (err.code === "unauthorized") return;
    if (err.code !== "unreachable") showAlert(err.message);
  }
  poll();
}

main();
