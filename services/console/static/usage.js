// Usage view: what each API key used, per model (GET /v1/usage, services/ops/usage.py). A key
// that may use every model sees every key's usage (?all=true); any other key its own.

import { call, errorOf } from "./api.js";
import { $, h, num } from "./dom.js";

const COLUMNS = [
  ["api_key_id", "API key"],
  ["model", "Model"],
  ["num_model_requests", "Requests"],
  ["rows", "Rows"],
  ["input_tokens", "Prompt tokens"],
  ["output_tokens", "Completion tokens"],
];

export class Usage {
  constructor() {
    $("usage-refresh").addEventListener("click", () => this.load());
  }

  show(visible) {
    if (visible) this.load();
  }

  async load() {
    try {
      let resp = await call("/v1/usage?all=true");
      let every = true;
      if (resp.status === 403) {
        // a key limited to some models: its own usage only
        resp = await call("/v1/usage");
        every = false;
      }
      if (!resp.ok) throw await errorOf(resp);
      this.render(await resp.json(), every);
      $("usage-error").textContent = "";
    } catch (e) {
      if (e.status !== 401) $("usage-error").textContent = `Could not load the usage: ${e.message}`;
    }
  }

  render(page, every) {
    const bucket = page.data[0];
    const since = new Date(bucket.start_time * 1000).toISOString().replace("T", " ").slice(0, 19);
    $("usage-scope").textContent = `${every ? "Every API key" : "This API key"}, since the server started (${since} UTC).`;
    const results = bucket.results;
    if (results.length === 0) {
      $("usage-table").replaceChildren(h("p", { class: "hint" }, "Nothing used yet."));
      return;
    }
    $("usage-table").replaceChildren(
      h(
        "table",
        { class: "versions usage" },
        h("caption", {}, "Requests answered, rows predicted and LLM tokens, per API key and model"),
        h("thead", {}, h("tr", {}, COLUMNS.map(([, label]) => h("th", { scope: "col" }, label)))),
        h(
          "tbody",
          {},
          results.map((r) =>
            h(
              "tr",
              { "data-key": r.api_key_id, "data-model": r.model },
              COLUMNS.map(([field]) =>
                h("td", { "data-field": field }, typeof r[field] === "number" ? num(r[field], 12) : r[field]),
              ),
            ),
          ),
        ),
      ),
    );
  }
}
