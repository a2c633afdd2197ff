// Shared helpers of the dashboard: API calls with the session cookie and CSRF header, small DOM builders.
"use strict";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const CAN_WRITE = document.body.dataset.canWrite === "true";

async function api(path, options = {}) {
  const opts = Object.assign({ credentials: "same-origin", headers: {} }, options);
  if (opts.method && opts.method !== "GET") {
    opts.headers["X-CSRF-Token"] = CSRF;
    if (opts.body && typeof opts.body !== "string") {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(opts.body);
    }
  }
  const response = await fetch("/api/v1" + path, opts);
  if (response.status === 401) { window.location = "/login"; throw new Error("signed out"); }
  const data = response.headers.get("content-type", "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = data && data.detail ? (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail)) : response.statusText;
    throw new Error(detail);
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "style") node.setAttribute("style", value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(urgency) {
  return el("span", { class: "badge " + (urgency || "none") }, urgency || "—");
}

function bar(score, threshold, label) {
  const pct = Math.round(score * 100);
  return el("div", { class: "bar" + (score >= threshold ? " positive" : ""), title: `${label || ""} ${score.toFixed(2)} (threshold ${threshold})` },
    el("span", { class: "fill", style: `width:${pct}%` }),
    el("span", { class: "tick", style: `left:${Math.round(threshold * 100)}%` }));
}

function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  const mins = Math.round((Date.now() - d.getTime()) / 60000);
  if (mins < 1) return "just now";
  if (mins < 60) return `${mins} min ago`;
  if (mins < 48 * 60) return `${Math.round(mins / 60)} h ago`;
  return d.toLocaleDateString();
}

function pct(x) { return x === null || x === undefined ? "—" : (x * 100).toFixed(0) + "%"; }
