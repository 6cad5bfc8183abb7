// Chat playground: streams POST /v1/chat/completions (server-sent events) into the page token
// by token. Stop aborts the fetch; the router's proxy sees the client go away and vLLM aborts
// the generation (docs/llm.md). Tools (OpenAI function definitions, in the settings) are sent with
// the chat; the calls an answer makes are shown as they stream (`delta.tool_calls` pieces: the
// name first, then the arguments' text), assembled by `addToolCalls`.

import { call, errorOf } from "./api.js";
import { $, h, num } from "./dom.js";

/** The `data:` payloads of a server-sent event stream, as they arrive. */
export async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r/g, "");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * Add one stream chunk's `delta.tool_calls` to `calls` (by `index`): the first piece of a call
 * carries its id and function name, later ones append to its arguments' text. Returns `calls`.
 */
export function addToolCalls(calls, deltas) {
  for (const d of deltas || []) {
    const i = Number.isInteger(d.index) ? d.index : calls.length;
    const call = (calls[i] ??= { id: "", type: "function", function: { name: "", arguments: "" } });
    if (d.id) call.id = d.id;
    if (d.function?.name) call.function.name += d.function.name;
    if (d.function?.arguments) call.function.arguments += d.function.arguments;
  }
  return calls;
}

/** One tool call as text: `name(arguments)`, the arguments pretty once they parse as JSON. */
export function toolCallText(call) {
  let args = call.function.arguments;
  try {
    args = JSON.stringify(JSON.parse(args));
  } catch {
    // still streaming (or not JSON): as received
  }
  return `${call.function.name || "…"}(${args})`;
}

/** The tools the settings name: null when none, else the parsed list (an Error if invalid). */
export function parseTools(text) {
  text = text.trim();
  if (!text) return null;
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (e) {
    throw new Error(`Tools: not JSON (${e.message})`);
  }
  if (!Array.isArray(tools)) tools = [tools];
  for (const t of tools) {
    if (t?.type !== "function" || typeof t.function?.name !== "string") {
      throw new Error('Tools: each one is {"type": "function", "function": {"name": ..., "parameters": {...}}}');
    }
  }
  return tools;
}

// The tools fields, added to the settings by script (index.html belongs to the page as a whole).
function toolFields() {
  const choice = h(
    "select",
    { id: "chat-tool-choice" },
    ...["auto", "required", "none"].map((c) => h("option", { value: c }, c)),
  );
  return h(
    "div",
    { class: "stack" },
    h("label", { for: "chat-tools" }, "Tools (optional: OpenAI function definitions, a JSON list)"),
    h("textarea", { id: "chat-tools", rows: 4, spellcheck: "false", placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]' }),
    h(
      "div",
      { class: "row" },
      h("div", { class: "field" }, h("label", { for: "chat-tool-choice" }, "Tool choice"), choice),
    ),
    h("p", { class: "hint" }, '"auto" needs a tool call parser in the LLM config; "required" always calls one (docs/llm.md).'),
  );
}

export class Chat {
  constructor() {
    this.messages = []; // the conversation sent with each request
    this.controller = null;
    $("chat-system").closest(".stack")?.append(toolFields());
    $("chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    $("chat-input").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    $("chat-form").addEventListener("keydown", (e) => {
      if (e.key === "Escape" && this.controller) {
        e.preventDefault();
        this.stop();
      }
    });
    $("chat-stop").addEventListener("click", () => this.stop());
    $("chat-model").addEventListener("change", (e) => {
      history.replaceState(null, "", `#/chat/${encodeURIComponent(e.target.value)}`);
    });
    $("chat-new").addEventListener("click", () => {
      this.stop();
      this.messages = [];
      $("chat-log").replaceChildren();
      $("chat-stats").textContent = "";
      $("chat-error").textContent = "";
    });
  }

  setModels(llms, enabled) {
    $("chat-off").hidden = enabled;
    $("chat-form").hidden = !enabled;
    const select = $("chat-model");
    const keep = select.value;
    // /v1/models also lists the embedding model (not a chat model); RAG apps are (services/rag/)
    llms = llms.filter((c) => c.servery?.task !== "embeddings");
    const ids = llms.map((c) => c.id).join();
    if (ids !== select.dataset.ids) {
      select.dataset.ids = ids;
      select.replaceChildren(
        ...llms.map((c) => h("option", { value: c.id }, label(c))),
      );
      if (llms.some((c) => c.id === keep)) select.value = keep;
    }
  }

  select(name) {
    if ([...$("chat-model").options].some((o) => o.value === name)) $("chat-model").value = name;
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  bubble(role, text) {
    const content = h("div", { class: "content" }, text);
    const li = h("li", { class: `msg ${role}` }, h("span", { class: "role" }, role === "user" ? "You" : "Assistant"), content);
    $("chat-log").append(li);
    return { li, content };
  }

  async send() {
    if (this.controller) return;
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text) return;
    $("chat-error").textContent = "";
    let tools;
    try {
      tools = parseTools($("chat-tools")?.value ?? "");
    } catch (e) {
      $("chat-error").textContent = e.message;
      return;
    }
    const system = $("chat-system").value.trim();
    this.messages.push({ role: "user", content: text });
    this.bubble("user", text);
    input.value = "";
    const body = {
      model: $("chat-model").value,
      messages: system ? [{ role: "system", content: system }, ...this.messages] : this.messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: Number($("chat-max-tokens").value) || 256,
      temperature: Number($("chat-temperature").value),
    };
    if ($("chat-ignore-eos").checked) body.ignore_eos = true;
    if (tools) {
      body.tools = tools;
      body.tool_choice = $("chat-tool-choice").value;
    }

    const { li, content } = this.bubble("assistant", "");
    li.setAttribute("aria-live", "polite");
    li.setAttribute("aria-busy", "true");
    li.dataset.state = "streaming";
    const answer = document.createTextNode("");
    content.append(answer);
    this.controller = new AbortController();
    $("chat-send").disabled = true;
    $("chat-stop").disabled = false;
    $("chat-stats").textContent = "Waiting for the first token…";
    const start = performance.now();
    let first = null;
    let chunks = 0;
    let tokens = null;
    let state = "done";
    const calls = [];
    let callList = null;
    try {
      const resp = await call("/v1/chat/completions", { method: "POST", body, signal: this.controller.signal });
      if (!resp.ok) throw await errorOf(resp);
      for await (const data of events(resp.body)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          if (first === null) first = performance.now();
          answer.appendData(delta);
          chunks += 1;
          if (chunks % 8 === 0) $("chat-stats").textContent = `${chunks} chunks…`;
        }
        const toolDeltas = chunk.choices?.[0]?.delta?.tool_calls;
        if (toolDeltas?.length) {
          if (first === null) first = performance.now();
          addToolCalls(calls, toolDeltas);
          callList ??= content.appendChild(h("ol", { class: "tool-calls", "aria-label": "Tool calls" }));
          while (callList.children.length < calls.length) callList.append(h("li", {}, h("code")));
          calls.forEach((c, i) => {
            const li = callList.children[i];
            li.dataset.name = c.function.name;
            li.firstChild.textContent = toolCallText(c);
          });
          chunks += 1;
        }
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        if (chunk.sources) content.append(sourceList(chunk.sources));
      }
    } catch (e) {
      if (e.name === "AbortError") state = "stopped";
      else {
        state = "error";
        $("chat-error").textContent = e.message;
      }
    } finally {
      this.controller = null;
      $("chat-send").disabled = false;
      $("chat-stop").disabled = true;
      li.setAttribute("aria-busy", "false");
      li.dataset.state = state;
    }
    if (calls.length) {
      // content "" rather than null: chat templates concatenate it
      this.messages.push({ role: "assistant", content: answer.data, tool_calls: calls });
    } else if (answer.data) this.messages.push({ role: "assistant", content: answer.data });
    else if (state === "error") {
      li.remove();
      this.messages.pop(); // the user's message: send it again after fixing the problem
      input.value = text;
    }
    const took = (performance.now() - start) / 1000;
    const count = tokens ?? chunks;
    const parts = [state === "stopped" ? `Stopped after ${count} tokens` : `${count} tokens`];
    if (calls.length) parts.push(`${calls.length} tool call${calls.length > 1 ? "s" : ""}`);
    if (first !== null) parts.push(`first token after ${num(first - start)} ms`);
    if (first !== null && count > 1) parts.push(`${num(count / ((performance.now() - first) / 1000))} tokens/s`);
    parts.push(`${num(took)} s in all`);
    $("chat-stats").textContent = state === "error" ? "" : parts.join(", ") + ".";
    input.focus();
  }
}

function label(card) {
  if (card.servery?.task === "rag") return `${card.id} (RAG: ${card.servery.collection} → ${card.parent})`;
  // a LoRA adapter's root is its own store tag (services/llm/adapters.py); a task's is its LLM's
  if (card.parent && card.root?.startsWith(`${card.id.split("@")[0]}:`)) {
    return `${card.id} (LoRA adapter of ${card.parent})`;
  }
  return card.parent ? `${card.id} (task → ${card.parent})` : card.id;
}

// The passages a RAG app's answer was built from (its last stream chunk, services/rag/chat.py).
function sourceList(sources) {
  return h(
    "ol",
    { class: "sources", "aria-label": "Sources" },
    ...sources.map((s) => h("li", {}, `${s.source} #${s.chunk} (score ${s.score.toFixed(3)})`)),
  );
}
