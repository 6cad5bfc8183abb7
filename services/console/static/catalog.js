// Catalog: every served classifier (GET /models) and LLM (GET /v1/models) with framework,
// versions, aliases, routing split, readiness and the metrics recorded at training time.

import { BASE, json, server } from "./api.js";
import { $, h, num, shortVersion } from "./dom.js";

let uid = 0;

function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}`.trim() }, text);
}

function dl(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
  );
}

function splitBar(split) {
  const bar = h("span", { class: "split", "aria-hidden": "true" });
  split.forEach((s, i) => {
    const part = h("span", { class: `part c${i % 4}` });
    part.style.width = `${s.weight * 100}%`;
    bar.append(part);
  });
  const text = split
    .map((s) => `${s.target} ${num(s.weight * 100)} % (${shortVersion(s.version)})`)
    .join(" · ");
  return h("span", { class: "split-wrap" }, bar, h("span", {}, text));
}

function classifierCard(m) {
  const id = `model-${++uid}`;
  if (m.ready === false && !m.versions) {
    return h(
      "article",
      { class: "card", "aria-labelledby": id, "data-model": m.name },
      h("div", { class: "card-head" }, h("h2", { id }, m.name), badge("not ready", "bad")),
      h("p", { class: "error" }, m.error || "nothing is serving"),
    );
  }
  const aliases = Object.entries(m.aliases || {});
  const routing = m.routing || {};
  const schema = m.input_schema || {};
  const metrics = Object.entries(m.metrics || {});
  const created = (m.versions || []).some((v) => v.created);
  const problems = [
    ...(m.load_errors || []).map((e) => `${shortVersion(e.version)} failed to load (${e.at}): ${e.error}`),
    ...(m.warnings || []),
  ];
  return h(
    "article",
    { class: "card", "aria-labelledby": id, "data-model": m.name },
    h(
      "div",
      { class: "card-head" },
      h("h2", { id }, m.name),
      badge(m.framework),
      m.ready ? badge("ready", "ok") : badge("not ready", "bad"),
    ),
    dl([
      ["Default", `${shortVersion(m.default_version)} (${m.default_from})`],
      [
        "Aliases",
        aliases.length
          ? h("ul", { class: "inline-list aliases" }, aliases.map(([a, v]) => h("li", {}, h("strong", {}, a), ` → ${shortVersion(v)}`)))
          : "none",
      ],
      ["Routing", routing.split?.length ? splitBar(routing.split) : `all to the default`],
      ["Shadow", routing.shadow ? shortVersion(routing.shadow) : null],
      ["Task", m.task],
      [
        "Input",
        Number.isInteger(schema.n_features)
          ? `${schema.n_features} × ${schema.dtype}`
          : (schema.inputs || []).map((t) => `${t.name} [${t.shape.join(", ")}] ${t.datatype}`).join("; "),
      ],
      ["Classes", (m.class_names || []).join(", ")],
      ["Placement", m.placement],
    ]),
    h(
      "table",
      { class: "versions" },
      h("caption", {}, `Versions served (${(m.versions || []).length})`),
      h("thead", {}, h("tr", {}, ["Version", "Aliases", created ? "Created" : null].map((c) => c && h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        (m.versions || []).map((v) =>
          h(
            "tr",
            {},
            h("td", {}, h("code", { title: v.version }, shortVersion(v.version))),
            h("td", {}, v.aliases.join(", ") || "–"),
            created ? h("td", {}, v.created ? String(v.created).replace("T", " ").slice(0, 19) : "–") : null,
          ),
        ),
      ),
    ),
    metrics.length
      ? h(
          "div",
          {},
          h("h3", {}, "Training metrics"),
          dl(metrics.map(([k, v]) => [k, typeof v === "number" ? num(v, 4) : String(v)])),
        )
      : null,
    problems.length ? h("ul", { class: "problems" }, problems.map((p) => h("li", {}, p))) : null,
    h(
      "p",
      { class: "actions" },
      h("a", { href: `#/try/${encodeURIComponent(m.name)}` }, `Try ${m.name}`),
      h("a", { href: "#/live" }, "Live view"),
    ),
  );
}

function llmTable(cards) {
  return h(
    "article",
    { class: "card wide", "aria-labelledby": "llm-h" },
    h("div", { class: "card-head" }, h("h2", { id: "llm-h" }, "LLMs"), badge("vLLM"), badge("ready", "ok")),
    h(
      "table",
      { class: "versions" },
      h("caption", {}, "OpenAI API at /v1 (chat/completions, completions)"),
      h("thead", {}, h("tr", {}, ["Name", "Store tag", "Context", "Serves"].map((c) => h("th", { scope: "col" }, c)))),
      h(
        "tbody",
        {},
        cards.map((c) =>
          h(
            "tr",
            { "data-model": c.id },
            h("td", {}, h("strong", {}, c.id)),
            h("td", {}, h("code", {}, c.root || "–")),
            h("td", {}, c.max_model_len ? `${c.max_model_len} tokens` : "–"),
            h("td", {}, c.parent ? `task → ${c.parent}` : h("a", { href: `#/chat/${encodeURIComponent(c.id)}` }, "Chat")),
          ),
        ),
      ),
    ),
  );
}

/** The data every view shares: {models, llms, ready}; llms is [] when the LLM service is off. */
export async function loadCatalog() {
  const [models, llms, ready] = await Promise.all([
    json("/models").then((b) => b.models),
    server.llm ? json("/v1/models").then((b) => b.data) : Promise.resolve([]),
    fetch(`${BASE}readyz`, { cache: "no-store" }).then((r) => r.ok),
  ]);
  return { models, llms, ready };
}

export function renderCatalog({ models, llms }) {
  $("catalog-models").replaceChildren(...models.map(classifierCard));
  $("catalog-llms").replaceChildren(...(llms.length ? [llmTable(llms)] : []));
}
