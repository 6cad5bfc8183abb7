// A tiny DOM helper and number formats shared by the views. Text goes in as text nodes only,
// never as HTML, so nothing the server or a user sends can become markup.

/** h("p", {class: "x"}, "text", child, ...) -> element; null/undefined children are skipped. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export const $ = (id) => document.getElementById(id);

/** 3 significant digits, no exponent for everyday magnitudes. */
export function num(v, digits = 3) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1000) return Math.round(v).toLocaleString("en");
  return Number(v.toPrecision(digits)).toString();
}

export function ms(seconds) {
  return seconds === null || seconds === undefined ? "–" : `${num(seconds * 1000)} ms`;
}

export function pct(fraction) {
  return fraction === null || fraction === undefined ? "–" : `${num(fraction * 100)} %`;
}

export function shortVersion(v) {
  return v && v.length > 12 ? v.slice(0, 12) : v;
}
