// What the clinician changed in the AI draft, field by field, word by word: shown before
// signing, so the signer sees exactly what they are putting their name to.
//
// A report (the schema's shape) is flattened into labelled fields ("Findings 2 · location"),
// each field's draft and final text compared as words (a longest common subsequence; the
// fields are short). The result is rendered with <del>/<ins> and textContent only.

import { el } from "./shared.js";

const MAX_TOKENS = 1500; // a field longer than this (in words) is shown as replaced, not diffed

function label(key) {
  const words = String(key).replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function text(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "boolean") return v ? "yes" : "no";
  return String(v);
}

// {path label: text} for every scalar of a report, in the schema's order where known.
export function flatten(value, schema = null) {
  const out = new Map();
  const walk = (v, name, sch) => {
    if (Array.isArray(v)) {
      v.forEach((item, i) => walk(item, `${name} ${i + 1}`, sch && sch.items));
      return;
    }
    if (v && typeof v === "object") {
      const keys = [...Object.keys((sch && sch.properties) || {}), ...Object.keys(v)];
      for (const k of new Set(keys)) if (k in v) walk(v[k], name ? `${name} · ${k.replace(/_/g, " ")}` : label(k), sch && sch.properties && sch.properties[k]);
      return;
    }
    out.set(name, text(v));
  };
  walk(value || {}, "", schema);
  return out;
}

const tokens = (s) => s.split(/(\s+)/).filter((t) => t !== "");

// [{op: "same"|"del"|"ins", text}] turning `a` into `b`, adjacent runs merged.
export function wordDiff(a, b) {
  const x = tokens(a);
  const y = tokens(b);
  const ops = [];
  const push = (op, t) => {
    const last = ops[ops.length - 1];
    if (last && last.op === op) last.text += t;
    else ops.push({ op, text: t });
  };
  if (x.length > MAX_TOKENS || y.length > MAX_TOKENS) {
    if (a) push("del", a);
    if (b) push("ins", b);
    return ops;
  }
  // lcs[i][j]: the longest common subsequence of x[i:] and y[j:]
  const lcs = Array.from({ length: x.length + 1 }, () => new Uint16Array(y.length + 1));
  for (let i = x.length - 1; i >= 0; i--) {
    for (let j = y.length - 1; j >= 0; j--) {
      lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  let i = 0;
  let j = 0;
  while (i < x.length && j < y.length) {
    if (x[i] === y[j]) {
      push("same", x[i]);
      i += 1;
      j += 1;
    } else if (lcs[i + 1][j] >= lcs[i][j + 1]) push("del", x[i++]);
    else push("ins", y[j++]);
  }
  while (i < x.length) push("del", x[i++]);
  while (j < y.length) push("ins", y[j++]);
  return ops;
}

// [{field, draft, final, ops}] for every field whose text differs.
export function reportDiff(draft, final, schema = null) {
  const a = flatten(draft, schema);
  const b = flatten(final, schema);
  const fields = [...new Set([...b.keys(), ...a.keys()])];
  const changed = [];
  for (const f of fields) {
    const da = a.get(f) ?? "";
    const fb = b.get(f) ?? "";
    if (da !== fb) changed.push({ field: f, draft: da, final: fb, ops: wordDiff(da, fb) });
  }
  return { changed, unchanged: fields.length - changed.length };
}

// The diff as a definition list: each changed field, removed text struck, added underlined.
export function renderDiff(container, diff, { hadDraft = true } = {}) {
  container.replaceChildren();
  if (!hadDraft) {
    container.append(el("p", { class: "hint", text: "There was no usable AI draft (it was cut off or not valid JSON): all the text below is yours." }));
  }
  if (!diff.changed.length) {
    container.append(el("p", { class: "diff-none", text: "No changes: the final text is the AI draft exactly as generated." }));
    return;
  }
  const list = el("dl", { class: "diff" });
  for (const c of diff.changed) {
    const dd = el("dd", {});
    for (const op of c.ops) {
      if (op.op === "same") dd.append(op.text);
      else if (op.op === "del") dd.append(el("del", {}, el("span", { class: "visually-hidden", text: "[removed: " }), op.text, el("span", { class: "visually-hidden", text: "]" })));
      else dd.append(el("ins", {}, el("span", { class: "visually-hidden", text: "[added: " }), op.text, el("span", { class: "visually-hidden", text: "]" })));
    }
    if (!c.final) dd.append(el("span", { class: "hint", text: " (now empty)" }));
    list.append(el("dt", { text: c.field }), dd);
  }
  container.append(list);
  if (diff.unchanged) container.append(el("p", { class: "hint", text: `${diff.unchanged} other field${diff.unchanged === 1 ? "" : "s"} as the AI drafted.` }));
}
