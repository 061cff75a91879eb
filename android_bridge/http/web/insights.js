// MedSigLIP beside the answer: zero-shot findings as a ranked bar chart, and the most similar
// cases of the index as thumbnails with their scores and metadata.

import * as api from "./api.js";
import { $, el, report, src, state } from "./shared.js";

export async function findings(img, labels = null) {
  const status = $("findings-status");
  const list = $("findings");
  if (!state.health || !state.health.capabilities.medsiglip) {
    status.textContent = "MedSigLIP is not in this runtime's bundle.";
    return;
  }
  const params = { image: src(img) };
  if (labels) params.labels = labels;
  else if ($("label-set").value) params.label_set = $("label-set").value;
  status.textContent = "Scoring the image…";
  list.replaceChildren();
  try {
    const { result } = await api.whenLoaded(() => new api.Call("classify", params, { signal: img.ctrl.signal }).done, {
      signal: img.ctrl.signal,
      onWait: () => (status.textContent = "Waiting for MedSigLIP to load…"),
    });
    if (state.image !== img) return;
    list.replaceChildren(
      ...result.labels.map((label, i) => {
        const score = result.scores[i];
        const fill = el("span", { class: "fill" });
        fill.style.width = `${Math.max(0.5, Math.min(100, score * 100))}%`;
        return el(
          "li",
          {},
          el("span", { class: "bar-label", text: label }),
          el("span", { class: "bar", "aria-hidden": "true" }, fill),
          el("span", { class: "bar-value", text: score.toFixed(3) }),
        );
      }),
    );
    const what = result.label_set ? `label set “${result.label_set}”` : "your labels";
    status.textContent = `Scores against ${what}, highest first. ${result.note || ""}`;
  } catch (err) {
    if (state.image === img) report(err, (t) => (status.textContent = `No findings: ${t}`));
  }
}

export async function similar(img) {
  const status = $("cases-status");
  const list = $("cases");
  if (!state.health || !state.health.capabilities.index) return;
  status.textContent = "Searching the case index…";
  try {
    const params = { image: src(img), k: 6, thumbnails: 96 };
    const { result } = await api.whenLoaded(() => new api.Call("search_similar", params, { signal: img.ctrl.signal }).done, {
      signal: img.ctrl.signal,
      onWait: () => (status.textContent = "Waiting for MedSigLIP to load…"),
    });
    if (state.image !== img) return;
    list.replaceChildren(...result.matches.map(caseCard));
    status.textContent = result.matches.length ? `${result.matches.length} most similar cases (cosine similarity of MedSigLIP embeddings).` : "The index has no cases.";
  } catch (err) {
    if (state.image === img) report(err, (t) => (status.textContent = `No similar cases: ${t}`));
  }
}

function caseCard(m) {
  const picture = m.thumbnail
    ? el("img", { src: m.thumbnail, alt: `Case ${m.id}`, width: "96", height: "96" })
    : el("span", { class: "no-thumb", text: "no picture" });
  const meta = el("dl", { class: "meta" });
  for (const [k, v] of Object.entries(m.metadata || {})) meta.append(el("dt", { text: k }), el("dd", { text: String(v) }));
  return el("li", { class: "case" }, picture, el("p", { class: "case-title", text: `Case ${m.id} · similarity ${m.score.toFixed(3)}` }), meta);
}
