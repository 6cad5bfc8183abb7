// Small hand-drawn charts: an SVG sparkline and an HTML bar list. No library.

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

/**
 * A sparkline of `values` (numbers or null for "nothing to show"; nulls break the line) drawn
 * into a new <svg>. The chart is an image to assistive technology, labelled with `label`; the
 * caller shows the current value as text beside it.
 */
export function sparkline(values, { label, width = 300, height = 36, min = 0, max } = {}) {
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    class: "spark",
    role: "img",
    "aria-label": label,
    preserveAspectRatio: "none",
  });
  chart.append(svg("line", { x1: 0, y1: height - 1, x2: width, y2: height - 1, class: "axis" }));
  const present = values.filter((v) => v !== null && Number.isFinite(v));
  if (present.length === 0 || values.length < 2) return chart;
  const top = Math.max(max ?? 0, ...present) || 1;
  const pad = 3;
  const x = (i) => (i * width) / (values.length - 1);
  const y = (v) => height - 1 - ((v - min) / (top - min)) * (height - 1 - pad);
  let run = [];
  const flush = () => {
    if (run.length === 1) {
      chart.append(svg("circle", { cx: run[0][0], cy: run[0][1], r: 1.5, class: "dot" }));
    } else if (run.length > 1) {
      const pts = run.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" ");
      const area = `${run[0][0].toFixed(1)},${height - 1} ${pts} ${run.at(-1)[0].toFixed(1)},${height - 1}`;
      chart.append(svg("polygon", { points: area, class: "area" }));
      chart.append(svg("polyline", { points: pts, class: "line" }));
    }
    run = [];
  };
  values.forEach((v, i) => {
    if (v === null || !Number.isFinite(v)) flush();
    else run.push([x(i), y(v)]);
  });
  flush();
  return chart;
}

/** Bars for `items` ([{label, value in 0..1, highlight}]) as list items of `list` (an <ol>). */
export function bars(list, items) {
  list.replaceChildren(
    ...items.map(({ label, value, highlight }) => {
      const li = document.createElement("li");
      if (highlight) li.className = "best";
      const name = document.createElement("span");
      name.className = "bar-label";
      name.textContent = label;
      const track = document.createElement("span");
      track.className = "bar";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
      track.append(fill);
      const pct = document.createElement("span");
      pct.className = "bar-value";
      pct.textContent = `${(value * 100).toFixed(1)} %`;
      li.append(name, track, pct);
      return li;
    }),
  );
}
