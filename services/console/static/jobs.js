// Jobs view: this API key's batch jobs (GET /v1/batches, services/batch/), newest first, with
// their status, progress (request_counts) and their input, output and error files. A file is
// fetched with the key (the API needs it) and handed to the browser as a download.

import { call, errorOf, json } from "./api.js";
import { $, h, num } from "./dom.js";

const PAGE = 20;
const REFRESH_MS = 2000;
const ENDED = new Set(["completed", "failed", "expired", "cancelled"]);
const GOOD = new Set(["completed"]);
const BAD = new Set(["failed", "expired", "cancelled", "cancelling"]);

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "–";
}

export class Jobs {
  constructor() {
    this.visible = false;
    this.timer = null;
    this.jobs = [];
    this.more = false;
    $("jobs-refresh").addEventListener("click", () => this.load());
    $("jobs-more").addEventListener("click", () => this.load(true));
  }

  show(visible) {
    this.visible = visible;
    clearTimeout(this.timer);
    this.timer = null;
    if (visible) this.load();
  }

  /** The first page again (or, with `more`, the page after the last one shown). */
  async load(more = false) {
    clearTimeout(this.timer);
    this.timer = null;
    try {
      const after = more && this.jobs.length ? `&after=${encodeURIComponent(this.jobs.at(-1).id)}` : "";
      const page = await json(`/v1/batches?limit=${PAGE}${after}`);
      if (more) this.jobs = this.jobs.concat(page.data);
      else {
        // a refresh keeps the pages loaded beyond the first: replace what it returned
        const fresh = new Map(page.data.map((b) => [b.id, b]));
        const rest = this.jobs.slice(PAGE).map((b) => fresh.get(b.id) || b);
        this.jobs = page.data.concat(rest.filter((b) => !page.data.some((d) => d.id === b.id)));
      }
      if (more || this.jobs.length <= PAGE) this.more = page.has_more;
      this.render();
      $("jobs-error").textContent = "";
    } catch (e) {
      if (e.status !== 401) $("jobs-error").textContent = `Could not load the jobs: ${e.message}`;
    }
    // follow running jobs while the view is shown
    if (this.visible && this.jobs.some((b) => !ENDED.has(b.status))) {
      this.timer = setTimeout(() => this.load(), REFRESH_MS);
    }
  }

  render() {
    $("jobs-more").hidden = !this.more;
    if (this.jobs.length === 0) {
      $("jobs-table").replaceChildren(
        h("p", { class: "hint" }, "No batch jobs yet. Submit one with ", h("code", {}, "servery jobs submit FILE --endpoint /predict"), " or the OpenAI client (docs/batch.md)."),
      );
      return;
    }
    $("jobs-table").replaceChildren(
      h(
        "table",
        { class: "versions jobs" },
        h("caption", {}, "Batch jobs of this API key, newest first"),
        h(
          "thead",
          {},
          h("tr", {}, ["Job", "Status", "Endpoint", "Progress", "Created", "Files"].map((t) => h("th", { scope: "col" }, t))),
        ),
        h("tbody", {}, this.jobs.map((b) => this.row(b))),
      ),
    );
  }

  row(b) {
    const c = b.request_counts || { total: 0, completed: 0, failed: 0 };
    const done = c.completed + c.failed;
    const status = GOOD.has(b.status) ? "badge ok" : BAD.has(b.status) ? "badge bad" : "badge";
    return h(
      "tr",
      { "data-job": b.id, "data-status": b.status },
      h("td", { "data-field": "id" }, h("code", {}, b.id)),
      h("td", { "data-field": "status" }, h("span", { class: status }, b.status)),
      h("td", { "data-field": "endpoint" }, h("code", {}, b.endpoint)),
      h(
        "td",
        { "data-field": "progress" },
        h("progress", { max: c.total || 1, value: done, "aria-label": `${b.id}: ${done} of ${c.total} lines answered` }),
        " ",
        h("span", { class: "progress-text" }, `${num(done, 12)}/${num(c.total, 12)}`),
        c.failed ? h("span", { class: "error" }, ` (${num(c.failed, 12)} failed)`) : null,
      ),
      h("td", { "data-field": "created" }, when(b.created_at)),
      h(
        "td",
        { "data-field": "files" },
        h(
          "ul",
          { class: "inline-list" },
          [
            ["input", b.input_file_id],
            ["output", b.output_file_id],
            ["errors", b.error_file_id],
          ]
            .filter(([, id]) => id)
            .map(([label, id]) => h("li", {}, this.fileLink(label, id))),
        ),
      ),
    );
  }

  fileLink(label, fileId) {
    return h(
      "a",
      {
        href: `#/jobs`,
        "data-file": label,
        "data-file-id": fileId,
        title: `Download ${fileId}`,
        onclick: (e) => {
          e.preventDefault();
          this.download(fileId);
        },
      },
      label,
    );
  }

  /** GET /v1/files/{id}/content with the key, saved by the browser under the file's id. */
  async download(fileId) {
    try {
      const resp = await call(`/v1/files/${encodeURIComponent(fileId)}/content`);
      if (!resp.ok) throw await errorOf(resp);
      const url = URL.createObjectURL(await resp.blob());
      const a = h("a", { href: url, download: `${fileId}.jsonl`, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      $("jobs-error").textContent = "";
    } catch (e) {
      if (e.status !== 401) $("jobs-error").textContent = `Could not download ${fileId}: ${e.message}`;
    }
  }
}
