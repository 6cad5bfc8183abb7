// Try a classifier: a form built from the model's input schema (feature names from its
// metadata) that sends one row to POST /predict and shows the class and its probabilities.

import { json } from "./api.js";
import { bars } from "./charts.js";
import { $, h, num, shortVersion } from "./dom.js";

export class Try {
  constructor() {
    this.models = new Map(); // name -> GET /models entry
    this.current = null;
    $("try-model").addEventListener("change", (e) => {
      this.select(e.target.value);
      // the address names the model shown (a link to it, and what the next refresh keeps)
      history.replaceState(null, "", `#/try/${encodeURIComponent(e.target.value)}`);
    });
    $("try-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.predict();
    });
    $("try-fill").addEventListener("click", () => this.fill($("try-paste").value));
    $("try-clear").addEventListener("click", () => {
      for (const input of this.inputs()) input.value = "";
      $("try-result").hidden = true;
      $("try-error").textContent = "";
    });
  }

  setModels(models) {
    // The form sends one flat row of numbers: models with n-D, named or string inputs are
    // called through the API (their inputs are listed in the catalog).
    const served = models.filter((m) => m.versions && Number.isInteger(m.input_schema?.n_features));
    const changed = served.map((m) => m.name).join() !== [...this.models.keys()].join();
    this.models = new Map(served.map((m) => [m.name, m]));
    if (changed) {
      $("try-model").replaceChildren(...served.map((m) => h("option", { value: m.name }, `${m.name} (${m.framework})`)));
    }
    if (!this.current && served.length) this.select(served[0].name);
    else if (this.current) this.versions(this.models.get(this.current));
  }

  /** Show model `name`'s form (the catalog's "Try" links land here). */
  select(name) {
    const model = this.models.get(name);
    if (!model) return;
    $("try-model").value = name;
    if (name === this.current) return;
    this.current = name;
    this.versions(model);
    const schema = model.input_schema;
    const names = schema.feature_names?.length === schema.n_features
      ? schema.feature_names
      : Array.from({ length: schema.n_features }, (_, i) => `feature ${i}`);
    $("try-fields").replaceChildren(
      ...names.map((feature, i) => {
        const id = `try-f${i}`;
        return h(
          "div",
          { class: "field" },
          h("label", { for: id }, feature),
          h("input", { id, name: feature, type: "number", step: "any", inputmode: "decimal", required: true, "data-index": i }),
        );
      }),
    );
    $("try-result").hidden = true;
    $("try-error").textContent = "";
  }

  versions(model) {
    const select = $("try-version");
    const keep = select.value;
    const byAlias = Object.entries(model.aliases || {});
    const state = JSON.stringify([model.name, byAlias, model.versions]);
    if (select.dataset.state === state) return; // unchanged: leave the open select alone
    select.dataset.state = state;
    select.replaceChildren(
      h("option", { value: "" }, "routing default"),
      ...byAlias.map(([alias, v]) => h("option", { value: alias }, `${alias} (${shortVersion(v)})`)),
      h("option", { value: "latest" }, "latest"),
      ...(model.versions || []).map((v) => h("option", { value: v.version }, shortVersion(v.version))),
    );
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }

  inputs() {
    return [...$("try-fields").querySelectorAll("input")];
  }

  /** Fill the fields from pasted text: numbers separated by commas, spaces or tabs. */
  fill(text) {
    const values = text.split(/[\s,;]+/).filter((s) => s !== "");
    const inputs = this.inputs();
    if (values.length !== inputs.length) {
      $("try-error").textContent = `Pasted ${values.length} values; ${this.current} takes ${inputs.length}.`;
      return;
    }
    inputs.forEach((input, i) => {
      input.value = values[i];
    });
    $("try-error").textContent = "";
  }

  async predict() {
    const error = $("try-error");
    error.textContent = "";
    const inputs = this.inputs();
    const bad = inputs.find((i) => i.value.trim() === "" || !Number.isFinite(Number(i.value)));
    if (bad) {
      error.textContent = `Enter a number for ${bad.name}.`;
      bad.focus();
      return;
    }
    const body = { model: this.current, inputs: [inputs.map((i) => Number(i.value))] };
    const version = $("try-version").value;
    if (version) body.version = version;
    const button = $("try-submit");
    button.disabled = true;
    const start = performance.now();
    try {
      const answer = await json("/predict", { method: "POST", body });
      const took = performance.now() - start;
      this.show(answer, took);
    } catch (e) {
      error.textContent = e.message;
      $("try-result").hidden = true;
    } finally {
      button.disabled = false;
    }
  }

  show(answer, took) {
    const model = this.models.get(answer.model);
    const names = model?.class_names || [];
    const proba = answer.probabilities?.[0] || [];
    const top = answer.predictions[0];
    $("try-class").textContent = answer.labels?.[0] ?? JSON.stringify(top);
    $("try-meta").textContent =
      `${answer.model} version ${shortVersion(answer.version)}, chosen by ${answer.routed_by}; ` +
      `answered in ${num(took)} ms (in this browser).`;
    bars(
      $("try-bars"),
      proba.map((p, i) => ({ label: names[i] ?? String(i), value: p, highlight: i === top })),
    );
    $("try-result").hidden = false;
  }
}
