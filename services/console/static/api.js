// Calls to the platform's public API, with the user's API key when the server asks for one.
// The key lives in sessionStorage only: this tab, gone when it closes, never sent elsewhere.

const KEY_ITEM = "servery.apiKey";
const root = document.documentElement.dataset;

/** What the server told the page when it served it (services/console/__init__.py). */
export const server = {
  auth: root.auth === "true",
  llm: root.llm === "true",
};

/** The API's base path: where /console/ is served from (a reverse proxy may add a prefix). */
export const BASE = location.pathname.replace(/console\/.*$/, "");

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetApiKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

/** An API answer that was not 2xx, with the message of the platform, OIP or OpenAI envelope. */
export class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
  }
}

const listeners = new Set();

/** Call `fn` whenever the server refuses the key (401): the page asks for another one. */
export function onUnauthorized(fn) {
  listeners.add(fn);
}

/** fetch() on the API: JSON body, the key in Authorization, no caching. */
export async function call(path, { method = "GET", body, signal, key = true } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  const k = key ? apiKey() : null;
  if (k) headers.authorization = `Bearer ${k}`;
  const resp = await fetch(BASE + path.replace(/^\//, ""), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  if (resp.status === 401) for (const fn of listeners) fn();
  return resp;
}

/** The error an answer carries, from whichever envelope it uses. */
export async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let type;
  try {
    const body = await resp.json();
    const err = Array.isArray(body) ? body[0]?.error : body.error;
    if (typeof err === "string") message = err;
    else if (err && typeof err.message === "string") {
      message = err.message;
      type = err.type;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, message, type);
}

/** GET/POST `path` and return its JSON; throws ApiError for anything but 2xx. */
export async function json(path, options) {
  const resp = await call(path, options);
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}
