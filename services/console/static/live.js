// Live view: scrapes /metrics every few seconds while the tab is visible, keeps 5 minutes of
// per-model points and draws them as sparklines. /metrics needs no API key (services/gate.py).

import { call, errorOf } from "./api.js";
import { sparkline } from "./charts.js";
import { $, h, ms, num, pct } from "./dom.js";
import { FLUSH_REASONS, parse, points, snapshot } from "./metrics.js";

const WINDOW_MS = 5 * 60 * 1000;

const ROWS = {
  classifier: [
    ["rps", "Requests/s", (v) => num(v)],
    ["errorRate", "Errors (5xx)", pct],
    ["p50", "Latency p50", ms],
    ["p99", "Latency p99", ms],
    ["batch", "Mean batch size", (v) => (v === null ? "–" : `${num(v)} rows`)],
    ["flushes", "Batches/s", (v) => num(v)],
    ["hold", "Mean hold", ms],
    ["shed", "Shed/s (queue full)", (v) => num(v)],
  ],
  llm: [
    ["rps", "Requests/s", (v) => num(v)],
    ["errorRate", "Errors (5xx)", pct],
    ["p50", "Request time p50", ms],
    ["p99", "Request time p99", ms],
    ["tps", "Tokens/s", (v) => num(v)],
  ],
};

export class Live {
  constructor() {
    this.history = []; // [{t, points: Map(model -> point)}], oldest first
    this.last = null; // the latest snapshot
    this.known = new Map(); // model -> kind, from the catalog
    this.interval = 2000;
    this.timer = null;
    this.visible = false;
    this.scrapes = 0;
    $("live-interval").addEventListener("change", (e) => {
      this.interval = Number(e.target.value);
      this.schedule(0);
    });
    document.addEventListener("visibilitychange", () => this.schedule(0));
  }

  /** Models the catalog lists: shown even before their first request. */
  setModels(models, llms) {
    for (const m of models) this.known.set(m.name, "classifier");
    for (const l of llms) this.known.set(l.id, "llm");
  }

  show(visible) {
    this.visible = visible;
    if (visible) this.render();
    if (this.timer === null) this.schedule(0);
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.timer = null;
    if (document.visibilityState === "hidden") return;
    this.timer = setTimeout(() => this.tick(), delay);
  }

  async tick() {
    try {
      const resp = await call("/metrics", { key: false });
      if (!resp.ok) throw await errorOf(resp);
      const snap = snapshot(parse(await resp.text()), Date.now());
      if (this.last) this.history.push({ t: snap.t, points: points(this.last, snap) });
      this.last = snap;
      this.scrapes += 1;
      const cutoff = snap.t - WINDOW_MS;
      while (this.history.length && this.history[0].t < cutoff) this.history.shift();
      $("live-state").textContent = "";
    } catch (e) {
      $("live-state").textContent = `Could not read /metrics: ${e.message}`;
    }
    if (this.visible) this.render();
    this.schedule(this.interval);
  }

  models() {
    const found = new Map(this.known);
    if (this.last) for (const [name, e] of this.last.models) found.set(name, e.kind);
    return [...found.entries()].sort((a, b) => a[1].localeCompare(b[1]) || a[0].localeCompare(b[0]));
  }

  render() {
    const root = $("live-models");
    if (this.history.length === 0) {
      root.replaceChildren(h("p", { class: "hint" }, "Collecting the first two scrapes…"));
      return;
    }
    const span = Math.round((this.history.at(-1).t - this.history[0].t) / 1000);
    root.replaceChildren(
      ...this.models().map(([name, kind]) => {
        const series = this.history.map((p) => p.points.get(name) || null);
        const now = series.at(-1);
        const rows = ROWS[kind].map(([field, label, fmt]) => {
          const values = series.map((p) => (p ? p[field] : null));
          const current = now ? now[field] : null;
          return h(
            "div",
            { class: "metric", "data-metric": field },
            h("span", { class: "metric-label" }, label),
            h("span", { class: "metric-value" }, fmt(current)),
            sparkline(values, { label: `${label} of ${name}, last ${span} s; now ${fmt(current)}` }),
          );
        });
        const noLatency = kind === "classifier" && now && !now.hasLatency;
        const reasons = kind === "classifier" && now ? flushReasons(now.flushRates) : null;
        return h(
          "article",
          { class: "card", "data-model": name, "aria-label": `${name} live metrics` },
          h("div", { class: "card-head" }, h("h2", {}, name), h("span", { class: "badge" }, kind === "llm" ? "LLM" : "classifier")),
          h("div", { class: "metrics" }, rows),
          reasons,
          noLatency ? h("p", { class: "hint" }, "No per-model latency histogram on this server.") : null,
        );
      }),
    );
  }
}

const REASON_LABELS = {
  tick: "next tick",
  full: "full",
  hold_ended: "hold ended",
  hold_alone: "held alone",
};

/** Why the batcher flushed, per second by reason (services/runtime/batcher.py): `next tick` no
 *  hold, `full` a hold cut short by max_batch_size, `hold ended` a hold with company, `held
 *  alone` a hold that gathered nobody. */
function flushReasons(rates) {
  return h(
    "p",
    { class: "hint flush-reasons", "data-metric": "flushReasons" },
    "Batches by why they were released, per second: ",
    FLUSH_REASONS.flatMap((r, i) => [
      i ? " · " : "",
      h("span", { "data-reason": r }, `${REASON_LABELS[r]} ${num(rates[r])}`),
    ]),
  );
}
