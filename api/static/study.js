// A study: the images beside the draft, probe bars, and the reader's answer.
"use strict";
const UID = document.getElementById("study").dataset.uid;
let study = null;
let verdict = null;

function showImage(image) {
  const img = document.getElementById("main-image");
  img.src = image.url;
  document.getElementById("caption").textContent = `image ${image.n + 1} of ${study.images.length} · ${image.width}×${image.height}` +
    (image.window ? ` · ${image.window}` : "");
  document.querySelectorAll("#thumbs img").forEach((t) => t.classList.toggle("on", Number(t.dataset.n) === image.n));
}

function identity(s) {
  const born = s.patient_birth_date ? ` · born ${s.patient_birth_date}` : "";
  return [
    el("h1", {}, s.patient_name || "Unnamed patient", " ", badge(s.urgency)),
    el("p", { class: "meta" }, `ID ${s.patient_id || "—"}${s.issuer_of_patient_id ? " (" + s.issuer_of_patient_id + ")" : ""}${born}` +
      ` · ${s.patient_age || "?"} ${s.patient_sex || ""}`),
    el("p", { class: "meta" }, `${s.modality || "?"} · ${s.study_description || "no description"} · accession ${s.accession_number || "—"}` +
      ` · ${s.series_count} series, ${s.instance_count} instances · ${s.state}`),
    s.urgency_reason ? el("p", { class: "why" }, "Urgency: " + s.urgency_reason) : null,
    s.error ? el("p", { class: "error" }, s.error) : null,
    s.viewer_url ? el("p", {}, el("a", { href: s.viewer_url, target: "_blank", rel: "noopener" }, "Open in the site viewer")) : null,
  ].filter(Boolean);
}

function render(s) {
  study = s;
  document.title = `${s.study_description || "Study"} · preread`;
  document.getElementById("identity").replaceChildren(...identity(s));
  const thumbs = document.getElementById("thumbs");
  thumbs.replaceChildren(...s.images.map((image) =>
    el("img", { src: image.url, alt: `image ${image.n + 1}`, "data-n": image.n, onclick: () => showImage(image) })));
  if (s.images.length) showImage(s.images[0]);
  else document.getElementById("caption").textContent = "no rendered images";
  const report = s.report;
  document.getElementById("report-meta").textContent = report
    ? `${report.urgency || "no urgency"} · ${report.model_id.split("/").pop()} · prompt ${report.prompt_version} · ${fmtTime(report.created_at)}`
    : "no draft yet";
  const findings = document.querySelector("#findings tbody");
  findings.replaceChildren(...(report ? report.findings : []).map((f) =>
    el("tr", { class: "presence-" + (f.presence || "") }, el("td", {}, f.text), el("td", {}, f.anatomy || ""),
      el("td", {}, f.laterality || ""), el("td", {}, f.presence || ""), el("td", {}, f.severity || ""))));
  if (report && !report.findings.length) findings.append(el("tr", {}, el("td", { colspan: 5 }, report.draft_text || "(the model output did not parse: " + report.parse_status + ")")));
  document.getElementById("impression").textContent = report ? (report.impression || "—") : "—";
  document.getElementById("probes").replaceChildren(...s.probes.map((p) =>
    el("div", { class: "probe" + (p.positive ? " positive" : ""), title: p.question || "" },
      el("span", { class: "probe-name" }, p.condition.replace(/_/g, " ")), bar(p.score, p.threshold, p.condition),
      el("span", { class: "score" }, p.score.toFixed(2)))));
  document.getElementById("history").replaceChildren(...s.history.map((r) =>
    el("li", { class: r.current ? "current" : "" }, `${new Date(r.created_at).toLocaleString()} · ${r.urgency || "—"} · ${r.parse_status}` +
      ` · ${r.model_id.split("/").pop()} · ${r.current ? "current" : "earlier"}`)));
  document.getElementById("answers").replaceChildren(...(s.feedback.length ? s.feedback.map((f) =>
    el("li", {}, el("span", { class: "verdict " + f.verdict }, f.verdict), ` by ${f.token_name}, ${new Date(f.created_at).toLocaleString()}`,
      f.text ? el("div", { class: "feedback-text" }, f.text) : null)) : [el("li", {}, "none yet")]));
  document.getElementById("deliveries").replaceChildren(...(s.deliveries.length ? s.deliveries.map((d) =>
    el("li", { class: "delivery " + d.state, "data-destination": d.destination },
      el("span", { class: "delivery-name" }, `${d.destination} (${d.kind})`), " · ", el("span", { class: "delivery-state" }, d.state),
      d.sent_at ? ` · ${fmtTime(d.sent_at)}` : "", d.attempts > 1 ? ` · ${d.attempts} attempts` : "",
      d.last_error && d.state !== "delivered" ? el("div", { class: "error" }, d.last_error) : null))
    : [el("li", {}, report ? "not sent anywhere (no destination configured)" : "nothing to send yet")]));
  const labels = document.getElementById("labels");
  labels.replaceChildren(el("legend", {}, "Probe labels (what the images show)"), ...s.probes.map((p) =>
    el("label", { class: "label-choice" }, p.condition.replace(/_/g, " "), " ",
      el("select", { name: p.condition }, el("option", { value: "" }, "not judged"), el("option", { value: "true" }, "present"),
        el("option", { value: "false" }, "absent")))));
  document.getElementById("reprocess").disabled = !CAN_WRITE || s.reprocess_pending;
  document.querySelectorAll(".verdicts [data-verdict]").forEach((b) => { b.disabled = !CAN_WRITE || !report; });
}

async function load() {
  try { render(await api("/studies/" + UID)); }
  catch (err) { document.getElementById("identity").replaceChildren(el("p", { class: "error" }, err.message)); }
}

function say(text, error) {
  const msg = document.getElementById("message");
  msg.textContent = text;
  msg.classList.toggle("error", Boolean(error));
}

document.querySelectorAll(".verdicts [data-verdict]").forEach((button) => button.addEventListener("click", () => {
  verdict = button.dataset.verdict;
  const form = document.getElementById("feedback");
  form.hidden = false;
  document.getElementById("feedback-text").value = verdict === "accept" ? "" : (study.report && study.report.draft_text) || "";
  document.getElementById("send").textContent = "Send: " + verdict;
}));
document.getElementById("cancel").addEventListener("click", () => { document.getElementById("feedback").hidden = true; });
document.getElementById("feedback").addEventListener("submit", async (e) => {
  e.preventDefault();
  const labels = {};
  document.querySelectorAll("#labels select").forEach((s) => { if (s.value) labels[s.name] = s.value === "true"; });
  const text = document.getElementById("feedback-text").value.trim();
  try {
    await api(`/studies/${UID}/feedback`, { method: "POST", body: { verdict, text: text || null, labels } });
    document.getElementById("feedback").hidden = true;
    say(`Saved: ${verdict}.`);
    load();
  } catch (err) { say("Not saved: " + err.message, true); }
});
document.getElementById("reprocess").addEventListener("click", async () => {
  try {
    const result = await api(`/studies/${UID}/reprocess`, { method: "POST" });
    say(result.detail);
    load();
  } catch (err) { say("Not queued: " + err.message, true); }
});
load();
