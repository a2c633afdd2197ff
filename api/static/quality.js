// Quality: the /quality figures as tables and a bar chart (SVG, no library).
"use strict";

function chart(probes) {
  const rowH = 26, labelW = 170, barW = 320, height = probes.length * rowH * 2 + 30;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${labelW + barW + 60} ${height}`);
  svg.setAttribute("role", "img");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  probes.forEach((p, i) => {
    const y = 10 + i * rowH * 2;
    add("text", { x: 0, y: y + 15, class: "chart-label" }, p.probe.replace(/_/g, " "));
    [["sensitivity", p.sensitivity, 0], ["specificity", p.specificity, rowH - 4]].forEach(([name, value, dy]) => {
      add("rect", { x: labelW, y: y + dy, width: barW, height: rowH - 8, class: "chart-bg" });
      if (value !== null) add("rect", { x: labelW, y: y + dy, width: Math.max(1, value * barW), height: rowH - 8, class: "chart-" + name });
      add("text", { x: labelW + barW + 6, y: y + dy + 14, class: "chart-value" }, `${name.slice(0, 4)} ${pct(value)}`);
    });
  });
  return svg;
}

async function load() {
  const q = await api("/quality");
  document.getElementById("answered").textContent = `(${q.answered_studies} studies answered)`;
  document.querySelector("#probe-table tbody").replaceChildren(...(q.probes.length ? q.probes.map((p) => el("tr", { "data-probe": p.probe },
    el("td", {}, p.probe), el("td", {}, p.threshold.toFixed(2)), el("td", {}, p.labelled), el("td", {}, `${p.positives} / ${p.negatives}`),
    el("td", { class: "sens" }, pct(p.sensitivity)), el("td", { class: "spec" }, pct(p.specificity)),
    el("td", {}, p.auroc === null ? "—" : p.auroc.toFixed(2)))) : [el("tr", {}, el("td", { colspan: 7 }, "No labelled studies yet."))]));
  document.getElementById("chart").replaceChildren(chart(q.probes));
  document.querySelector("#verdict-table tbody").replaceChildren(...q.verdicts.map((v) => el("tr", { "data-verdict": v.verdict },
    el("td", {}, el("span", { class: "verdict " + v.verdict }, v.verdict)), el("td", { class: "count" }, v.count),
    el("td", {}, pct(v.rate)))));
  document.querySelector("#version-table tbody").replaceChildren(...q.versions.map((v) => el("tr", {},
    el("td", {}, v.model_id.split("/").pop()), el("td", {}, v.prompt_version), el("td", {}, v.answered), el("td", {}, v.accept),
    el("td", {}, v.edit), el("td", {}, v.reject))));
}
load();
