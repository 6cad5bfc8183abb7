// The live view's numbers, from the Prometheus text that /metrics serves. Pure functions: a
// scrape becomes a snapshot of counters per model; two snapshots give one point per model
// (rates from counter differences, percentiles from histogram bucket differences).

const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

// Per-model series the console reads. Classifiers: the router's counters and histograms
// (services/metrics.py); LLMs: the router's proxy counters and vLLM's token counter.
const WANTED = /^(servery_|vllm:generation_tokens_total)/;
export const UNKNOWN_MODEL = "_unknown";
// Why the micro-batcher flushed (services/ops/metrics.py FLUSH_REASONS).
export const FLUSH_REASONS = ["tick", "full", "hold_ended", "hold_alone"];

function number(text) {
  if (text === "+Inf" || text === "Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text);
}

function unescape(value) {
  return value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
}

/** Prometheus text exposition -> [{name, labels, value}] (only the series `keep` accepts). */
export function parse(text, keep = WANTED) {
  const out = [];
  for (const line of text.split("\n")) {
    if (line === "" || line[0] === "#" || !keep.test(line)) continue;
    const m = SAMPLE.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const [, k, v] of m[2].matchAll(LABEL)) labels[k] = unescape(v);
    out.push({ name: m[1], labels, value: number(m[3]) });
  }
  return out;
}

function entry(models, name, kind) {
  let e = models.get(name);
  if (!e) {
    e = {
      kind,
      requests: 0,
      errors: 0,
      buckets: new Map(),
      batchSum: 0,
      batchCount: 0,
      tokens: 0,
      flushes: Object.fromEntries(FLUSH_REASONS.map((r) => [r, 0])),
      shed: 0,
      holdSum: 0,
      holdCount: 0,
    };
    models.set(name, e);
  }
  if (kind === "llm") e.kind = "llm";
  return e;
}

function addBucket(e, labels, value) {
  const le = number(labels.le);
  e.buckets.set(le, (e.buckets.get(le) || 0) + value);
}

/** One scrape's samples -> {t, models: Map(name -> counters summed over versions)}. */
export function snapshot(samples, t) {
  const models = new Map();
  for (const { name, labels, value } of samples) {
    const model = labels.model ?? labels.model_name;
    if (model === undefined || model === UNKNOWN_MODEL) continue;
    switch (name) {
      case "servery_requests_total": {
        const e = entry(models, model, "classifier");
        e.requests += value;
        if (labels.status?.startsWith("5")) e.errors += value;
        break;
      }
      case "servery_model_request_duration_seconds_bucket":
        addBucket(entry(models, model, "classifier"), labels, value);
        break;
      case "servery_batch_size_sum":
        entry(models, model, "classifier").batchSum += value;
        break;
      case "servery_batch_size_count":
        entry(models, model, "classifier").batchCount += value;
        break;
      case "servery_batch_flushes_total": {
        const e = entry(models, model, "classifier");
        if (labels.reason in e.flushes) e.flushes[labels.reason] += value;
        break;
      }
      case "servery_batch_shed_total":
        entry(models, model, "classifier").shed += value;
        break;
      case "servery_batch_hold_seconds_sum":
        entry(models, model, "classifier").holdSum += value;
        break;
      case "servery_batch_hold_seconds_count":
        entry(models, model, "classifier").holdCount += value;
        break;
      case "servery_llm_requests_total": {
        const e = entry(models, model, "llm");
        e.requests += value;
        if (labels.status?.startsWith("5")) e.errors += value;
        break;
      }
      case "servery_llm_request_duration_seconds_bucket":
        addBucket(entry(models, model, "llm"), labels, value);
        break;
      case "vllm:generation_tokens_total":
        entry(models, model, "llm").tokens += value;
        break;
      default:
    }
  }
  return { t, models };
}

/**
 * The q-quantile of a histogram given as [[upper bound, cumulative count], ...] sorted by bound
 * (+Inf last), interpolated linearly inside the bucket the rank falls in, as Prometheus's
 * histogram_quantile does. null when the histogram is empty.
 */
export function quantile(q, buckets) {
  if (buckets.length === 0) return null;
  const total = buckets[buckets.length - 1][1];
  if (!(total > 0)) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, count] of buckets) {
    if (count >= rank) {
      if (le === Infinity) return lower; // above the largest finite bound: that bound
      if (count === below) return le;
      return lower + ((le - lower) * (rank - below)) / (count - below);
    }
    lower = le;
    below = count;
  }
  return lower;
}

/** Per model, what happened between two snapshots: {rps, errorRate, p50, p99, batch, tps,
 *  flushes (per second, in all), flushRates ({reason: per second}), hold (mean s), shed (per s)};
 *  a value is null where nothing happened (no requests: no latency). A counter that went down
 *  (the server restarted) gives no point for that model. */
export function points(prev, cur) {
  const dt = (cur.t - prev.t) / 1000;
  const out = new Map();
  if (!(dt > 0)) return out;
  for (const [name, now] of cur.models) {
    const before = prev.models.get(name) || entry(new Map(), name, now.kind);
    const requests = now.requests - before.requests;
    if (requests < 0) continue;
    const buckets = [...now.buckets.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([le, count]) => [le, count - (before.buckets.get(le) || 0)]);
    if (buckets.some(([, c]) => c < 0)) continue;
    const batches = now.batchCount - before.batchCount;
    const flushRates = Object.fromEntries(
      FLUSH_REASONS.map((r) => [r, Math.max(0, now.flushes[r] - before.flushes[r]) / dt]),
    );
    const holds = now.holdCount - before.holdCount;
    out.set(name, {
      kind: now.kind,
      rps: requests / dt,
      errorRate: requests > 0 ? (now.errors - before.errors) / requests : null,
      p50: quantile(0.5, buckets),
      p99: quantile(0.99, buckets),
      batch: batches > 0 ? (now.batchSum - before.batchSum) / batches : null,
      tps: now.kind === "llm" ? Math.max(0, now.tokens - before.tokens) / dt : null,
      hasLatency: now.buckets.size > 0,
      flushes: Object.values(flushRates).reduce((a, b) => a + b, 0),
      flushRates,
      hold: holds > 0 ? (now.holdSum - before.holdSum) / holds : null,
      shed: Math.max(0, now.shed - before.shed) / dt,
    });
  }
  return out;
}
