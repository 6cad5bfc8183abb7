// The console's entry point: hash routing between the views, the API key, and the catalog
// data that every view shares (refreshed while the page is open).

import { apiKey, forgetApiKey, onUnauthorized, server, setApiKey } from "./api.js";
import { loadCatalog, renderCatalog } from "./catalog.js";
import { Chat } from "./chat.js";
import { $ } from "./dom.js";
import { Jobs } from "./jobs.js";
import { Live } from "./live.js";
import { Try } from "./try.js";
import { Usage } from "./usage.js";

const VIEWS = ["catalog", "live", "try", "chat", "jobs", "usage"];
const REFRESH_MS = 10000;

const live = new Live();
const tryIt = new Try();
const chat = new Chat();
const usage = new Usage();
const jobs = new Jobs();
let catalog = null;
let refreshTimer = null;
let rendered = null;

function needsKey() {
  return server.auth && !apiKey();
}

function route() {
  const [, name = "catalog", arg] = location.hash.match(/^#\/([^/]*)\/?(.*)$/) || [];
  return { view: VIEWS.includes(name) ? name : "catalog", arg: arg ? decodeURIComponent(arg) : "" };
}

function show() {
  const { view, arg } = route();
  const shown = needsKey() ? "key" : view;
  for (const section of document.querySelectorAll("main > .view")) {
    section.hidden = section.id !== `view-${shown}`;
  }
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  $("key-state").hidden = !(server.auth && apiKey());
  document.title = `${shown === "key" ? "API key" : $(`view-${shown}`).querySelector("h1").textContent} · servery console`;
  live.show(shown === "live");
  usage.show(shown === "usage");
  jobs.show(shown === "jobs");
  if (shown === "key") {
    $("key-input").focus();
    return;
  }
  if (view === "try" && arg) tryIt.select(arg);
  if (view === "chat" && arg) chat.select(arg);
  if (catalog === null) refresh();
}

async function refresh() {
  clearTimeout(refreshTimer);
  refreshTimer = null;
  if (needsKey()) return;
  try {
    catalog = await loadCatalog();
    $("catalog-error").textContent = "";
    $("server-state").textContent = catalog.ready ? "server ready" : "server not ready";
    $("server-state").className = catalog.ready ? "ok" : "bad";
    const seen = JSON.stringify(catalog);
    if (seen !== rendered) renderCatalog(catalog); // unchanged: keep the DOM (and the focus)
    rendered = seen;
    live.setModels(catalog.models, catalog.llms);
    tryIt.setModels(catalog.models);
    chat.setModels(catalog.llms, server.llm);
    const { view, arg } = route();
    if (view === "try" && arg) tryIt.select(arg);
    if (view === "chat" && arg) chat.select(arg);
  } catch (e) {
    if (e.status !== 401) {
      $("catalog-error").textContent = `Could not load the catalog: ${e.message}`;
      $("server-state").textContent = "server unreachable";
      $("server-state").className = "bad";
    }
  }
  if (document.visibilityState !== "hidden") refreshTimer = setTimeout(refresh, REFRESH_MS);
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  setApiKey(key);
  $("key-input").value = "";
  $("key-error").textContent = "";
  catalog = null;
  show();
});

$("key-forget").addEventListener("click", () => {
  forgetApiKey();
  catalog = null;
  show();
});

onUnauthorized(() => {
  if (!server.auth) return;
  forgetApiKey();
  catalog = null;
  $("key-error").textContent = "The server refused that API key; enter another.";
  show();
});

$("catalog-refresh").addEventListener("click", refresh);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && refreshTimer === null && catalog !== null) refresh();
});
window.addEventListener("hashchange", () => {
  show();
  // a new view: move focus (and a screen reader) to its heading
  const heading = document.querySelector("main > .view:not([hidden]) h1");
  if (heading && !heading.closest("#view-key")) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: true });
  }
});
chat.setModels([], server.llm);
show();
