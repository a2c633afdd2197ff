// The worklist: most urgent first, refreshed every few seconds, one click to a study.
"use strict";
const REFRESH_MS = 10000;
const tbody = document.querySelector("#worklist tbody");
const form = document.getElementById("filters");
let nextCursor = null;
let extraPages = 0;  // pages loaded with "Load more": auto-refresh pauses so the reader keeps their place

function query(cursor) {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(form)) if (value) params.set(key, key === "modality" ? value.toUpperCase() : value);
  if (!params.get("probe")) params.delete("min_score");
  params.set("limit", "50");
  if (cursor) params.set("cursor", cursor);
  return "/worklist?" + params;
}

function row(item) {
  const open = () => { window.location = "/studies/" + item.study_instance_uid; };
  const top = item.top_probe;
  return el("tr", { class: "u-" + item.urgency, tabindex: 0, "data-uid": item.study_instance_uid, onclick: open,
                    onkeydown: (e) => { if (e.key === "Enter") open(); } },
    el("td", {}, badge(item.urgency), item.urgency_reason ? el("div", { class: "why", title: item.urgency_reason },
      "draft: " + (item.report_urgency || "—")) : null),
    el("td", {}, el("div", { class: "name" }, item.patient_name || "—"), el("small", {}, item.patient_id || "")),
    el("td", {}, item.accession_number || "—"),
    el("td", {}, item.modality || "—"),
    el("td", { class: "desc" }, item.study_description || "—"),
    el("td", { class: "top" }, top ? [el("span", { class: "probe-name" }, top.condition), bar(top.score, top.threshold, top.condition),
      el("span", { class: "score" }, top.score.toFixed(2))] : "—"),
    el("td", { class: "mini" }, item.probes.slice(0, 8).map((p) => bar(p.score, p.threshold, p.condition))),
    el("td", { class: "impression" }, item.impression || (item.parse_status ? "(" + item.parse_status + ")" : "—")),
    el("td", {}, el("span", { class: "state" }, item.state)),
    el("td", { title: item.received_at }, fmtTime(item.received_at)),
    el("td", {}, item.feedback ? el("span", { class: "verdict " + item.feedback }, item.feedback) : ""));
}

async function load(append) {
  try {
    const page = await api(query(append ? nextCursor : null));
    if (!append) tbody.replaceChildren();
    extraPages = append ? extraPages + 1 : 0;
    page.items.forEach((item) => tbody.append(row(item)));
    nextCursor = page.next_cursor;
    document.getElementById("more").hidden = !nextCursor;
    document.getElementById("empty").hidden = tbody.children.length > 0;
    document.getElementById("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("refreshed").textContent = "refresh failed: " + err.message;
  }
}

form.addEventListener("submit", (e) => { e.preventDefault(); load(false); });
document.getElementById("more").addEventListener("click", () => load(true));
load(false);
setInterval(() => { if (!document.hidden && extraPages === 0) load(false); }, REFRESH_MS);
