// The structured report as a form: built from the report's JSON schema (so the template can
// change without touching the page), filled with the model's draft, edited by the clinician,
// saved, signed (signoff.js) or copied out as JSON; a signed report is shown read-only. Supported schema parts: object properties of type string (enum → a
// choice), boolean, number/integer, and arrays of such objects or of strings.

let uid = 0;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

function title(key, prop) {
  const words = (prop.title || key).replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function emptyOf(prop) {
  if (prop.type === "boolean") return prop.default ?? false;
  if (prop.type === "array") return [];
  if (prop.type === "object") return fill(prop, {});
  if (prop.type === "number" || prop.type === "integer") return null;
  return "";
}

// The draft's values, typed as the schema says; anything missing starts empty.
function fill(schema, value) {
  const out = {};
  const v = value && typeof value === "object" ? value : {};
  for (const [key, prop] of Object.entries(schema.properties || {})) {
    if (prop.type === "array") {
      const items = Array.isArray(v[key]) ? v[key] : [];
      out[key] = items.map((it) => (prop.items && prop.items.type === "object" ? fill(prop.items, it) : String(it ?? "")));
    } else if (prop.type === "object") {
      out[key] = fill(prop, v[key]);
    } else if (prop.type === "boolean") {
      out[key] = typeof v[key] === "boolean" ? v[key] : emptyOf(prop);
    } else if (prop.type === "number" || prop.type === "integer") {
      out[key] = typeof v[key] === "number" ? v[key] : null;
    } else {
      out[key] = v[key] === undefined || v[key] === null ? "" : String(v[key]);
    }
  }
  return out;
}

function scalarField(key, prop, obj, required, onChange, readOnly = false) {
  uid += 1;
  const id = `report-${key}-${uid}`;
  const hintId = prop.description ? `${id}-hint` : null;
  const label = el("label", { for: id }, title(key, prop), required ? el("span", { class: "req", text: " (required)" }) : null);
  const hint = hintId ? el("span", { class: "hint", id: hintId, text: prop.description }) : null;
  let input;
  if (prop.type === "boolean") {
    input = el("input", { type: "checkbox", id, "aria-describedby": hintId });
    input.checked = Boolean(obj[key]);
    input.disabled = readOnly;
    input.addEventListener("change", () => {
      obj[key] = input.checked;
      onChange();
    });
    return el("div", { class: "field check" }, input, label, hint);
  }
  if (Array.isArray(prop.enum)) {
    input = el("select", { id, "aria-describedby": hintId }, el("option", { value: "", text: "—" }));
    for (const option of prop.enum) input.append(el("option", { value: option, text: option }));
    input.value = prop.enum.includes(obj[key]) ? obj[key] : "";
    input.disabled = readOnly;
  } else if (prop.type === "number" || prop.type === "integer") {
    input = el("input", { type: "number", id, step: prop.type === "integer" ? "1" : "any", "aria-describedby": hintId });
    input.value = obj[key] === null ? "" : String(obj[key]);
  } else if (/impression|recommendation|comment|summary/.test(key)) {
    input = el("textarea", { id, rows: "3", "aria-describedby": hintId });
    input.value = obj[key];
  } else {
    input = el("input", { type: "text", id, "aria-describedby": hintId });
    input.value = obj[key];
  }
  input.readOnly = readOnly && input.tagName !== "SELECT";
  input.addEventListener("input", () => {
    const numeric = prop.type === "number" || prop.type === "integer";
    obj[key] = numeric ? (input.value === "" ? null : Number(input.value)) : input.value;
    onChange();
  });
  input.addEventListener("change", () => input.dispatchEvent(new Event("input")));
  return el("div", { class: "field" }, label, hint, input);
}

function arrayField(key, prop, obj, onChange, readOnly = false) {
  const section = el("fieldset", { class: "array" }, el("legend", { text: title(key, prop) }));
  if (prop.description) section.append(el("p", { class: "hint", text: prop.description }));
  const list = el("div", { class: "items" });
  const itemSchema = prop.items || { type: "string" };
  const singular = title(key, prop).replace(/s$/, "");
  const render = () => {
    list.replaceChildren();
    obj[key].forEach((item, i) => {
      const box = el("fieldset", { class: "item" }, el("legend", { text: `${singular} ${i + 1}` }));
      if (itemSchema.type === "object") {
        const required = new Set(itemSchema.required || []);
        for (const [k, p] of Object.entries(itemSchema.properties || {})) box.append(scalarField(k, p, item, required.has(k), onChange, readOnly));
      } else {
        box.append(scalarField(i, { ...itemSchema, title: singular }, obj[key], false, onChange, readOnly));
      }
      if (!readOnly) {
        const remove = () => {
          obj[key].splice(i, 1);
          render();
          onChange();
        };
        box.append(el("button", { type: "button", class: "secondary small", text: `Remove ${singular.toLowerCase()} ${i + 1}`, onclick: remove }));
      }
      list.append(box);
    });
    if (readOnly && !obj[key].length) list.append(el("p", { class: "hint", text: "None." }));
    add.disabled = prop.maxItems !== undefined && obj[key].length >= prop.maxItems;
  };
  const add = el("button", {
    type: "button",
    class: "secondary small",
    text: `Add ${singular.toLowerCase()}`,
    onclick: () => {
      obj[key].push(itemSchema.type === "object" ? fill(itemSchema, {}) : "");
      render();
      onChange();
      const fields = list.querySelectorAll("input, select, textarea");
      if (fields.length) fields[fields.length - (itemSchema.type === "object" ? Object.keys(itemSchema.properties || {}).length : 1)].focus();
    },
  });
  section.append(list);
  if (!readOnly) section.append(add);
  render();
  return section;
}

// Build the form for `schema` in `container`, starting from `draft`. Returns the live value
// (an object the form edits in place); `onChange(value)` runs after every edit. `readOnly`:
// the values are shown, nothing can be changed (a signed report).
export function buildReportForm(container, schema, draft, onChange = () => {}, { readOnly = false } = {}) {
  const value = fill(schema, draft);
  const changed = () => onChange(value);
  const required = new Set(schema.required || []);
  container.replaceChildren();
  for (const [key, prop] of Object.entries(schema.properties || {})) {
    if (prop.type === "array") container.append(arrayField(key, prop, value, changed, readOnly));
    else container.append(scalarField(key, prop, value, required.has(key), changed, readOnly));
  }
  onChange(value);
  return value;
}
