// Chat mode: a conversation sent to /v1/chat/completions (or, with a suffix, the message as a raw prompt to
// /v1/completions), streamed with drafts so the reply's canvas is drawn as it settles.

import { stream } from "./api.js";
import { LiveCanvas, Replay, diffPieces, requestStats, showStats } from "./canvas.js";

const $ = (id) => document.getElementById(id);

function number(id, integer) {
  const value = $(id).value.trim();
  if (value === "") return undefined;
  return integer ? parseInt(value, 10) : Number(value);
}

function fieldError(input, errorElement, message) {
  errorElement.textContent = message || "";
  errorElement.hidden = !message;
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

// The request body from the form; null (with the field marked) when a field is wrong.
function requestBody(model, history, message) {
  const body = { model, stream: true, stream_options: { include_usage: true, include_drafts: true } };
  const options = {
    max_tokens: number("max-tokens", true), temperature: number("temperature"), seed: number("seed", true),
    max_denoising_steps: number("max-denoising-steps", true), entropy_bound: number("entropy-bound"),
    strength: number("strength"),
  };
  for (const [k, v] of Object.entries(options)) if (v !== undefined && !Number.isNaN(v)) body[k] = v;
  const prediction = $("prediction").value;
  if (prediction) body.prediction = { type: "content", content: prediction };
  const schemaText = $("json-schema").value.trim();
  fieldError($("json-schema"), $("json-schema-error"), "");
  if (schemaText) {
    let schema;
    try {
      schema = JSON.parse(schemaText);
    } catch (e) {
      fieldError($("json-schema"), $("json-schema-error"), `The JSON schema is not valid JSON: ${e.message}`);
      $("json-schema").focus();
      return null;
    }
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema } };
  }
  const suffix = $("suffix").value;
  if (suffix) {
    return { path: "/v1/completions", kind: "completion", body: { ...body, prompt: message, suffix } };
  }
  const system = $("system").value.trim();
  body.messages = [...(system ? [{ role: "system", content: system }] : []), ...history,
                   { role: "user", content: message }];
  body.chat_template_kwargs = { enable_thinking: $("thinking").checked };
  return { path: "/v1/chat/completions", kind: "chat", body };
}

function turn(role, label) {
  const li = document.createElement("li");
  li.className = `turn ${role}`;
  const heading = document.createElement("p");
  heading.className = "speaker";
  heading.textContent = label;
  li.appendChild(heading);
  $("transcript").appendChild(li);
  return li;
}

// The reply being written: thought (when thinking), settled text, then the draft with its changed pieces marked.
class ReplyView {
  constructor(li) {
    this.reasoning = document.createElement("details");
    this.reasoning.className = "reasoning";
    this.reasoning.hidden = true;
    this.reasoning.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    this.reasoningText = document.createElement("div");
    this.reasoning.append(summary, this.reasoningText);
    this.body = document.createElement("div");
    this.body.className = "canvas";
    this.settled = document.createElement("span");
    this.settled.className = "settled";
    this.draft = document.createElement("span");
    this.draft.className = "draft-area";
    this.body.append(this.settled, this.draft);
    li.append(this.reasoning, this.body);
    this.drawnDrafts = 0;
  }

  draw(canvas) {
    if (canvas.reasoning) {
      this.reasoning.hidden = false;
      this.reasoningText.textContent = canvas.reasoning;
    }
    this.settled.textContent = canvas.content;
    if (canvas.drafts === this.drawnDrafts && canvas.draft) return;
    this.drawnDrafts = canvas.drafts;
    this.draft.replaceChildren(...diffPieces(canvas.previousDraft, canvas.draft).map(({ text, changed }) => {
      const span = document.createElement("span");
      span.className = changed ? "draft changed" : "draft";
      span.textContent = text;
      return span;
    }));
    this.body.dataset.drafts = String(canvas.drafts);
  }
}

export function setupChat(getModel) {
  const history = [];
  let controller = null;
  let frames = []; // snapshots of the last reply's canvas, one per chunk
  let lastView = null;
  const replay = new Replay($("chat-frame"), $("chat-frame-text"), (i) => {
    lastView.drawnDrafts = -1;
    lastView.draw(frames[i]);
  });
  const form = $("chat-form");

  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  $("chat-clear").addEventListener("click", () => {
    history.length = 0;
    replay.reset();
    $("transcript").replaceChildren();
    $("chat-error").textContent = "";
    showStats($("chat-stats"), null);
    $("message").focus();
  });
  $("chat-stop").addEventListener("click", () => controller && controller.abort());

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (controller) return;
    const message = $("message").value;
    if (!message.trim()) {
      $("message").focus();
      return;
    }
    const request = requestBody(getModel(), history, message);
    if (!request) return;
    $("chat-error").textContent = "";
    turn("user", "You").appendChild(Object.assign(document.createElement("div"), { className: "text", textContent: message }));
    const li = turn("assistant", "Model");
    li.setAttribute("aria-busy", "true");
    const view = new ReplyView(li);
    const canvas = new LiveCanvas();
    frames = [];
    lastView = view;
    replay.reset();
    controller = new AbortController();
    $("send").disabled = true;
    $("chat-stop").disabled = false;
    const startedAt = performance.now();
    try {
      await stream(request.path, request.body, (chunk) => {
        if (request.kind === "chat") canvas.chatChunk(chunk);
        else canvas.completionChunk(chunk);
        frames.push(canvas.snapshot());
        view.draw(canvas);
      }, controller.signal);
      view.draw(canvas);
      if (request.kind === "chat") history.push({ role: "assistant", content: canvas.content });
      $("message").value = "";
      li.dataset.finishReason = canvas.finishReason || "";
    } catch (err) {
      $("chat-error").textContent = err.name === "AbortError" ? "Stopped." : `Error: ${err.message}`;
      canvas.draft = "";
      view.draw(canvas);
    } finally {
      frames.push(canvas.snapshot());
      replay.ready(frames.length);
      li.setAttribute("aria-busy", "false");
      li.dataset.done = "true";
      showStats($("chat-stats"), requestStats(canvas, startedAt, performance.now()));
      controller = null;
      $("send").disabled = false;
      $("chat-stop").disabled = true;
      $("message").focus();
    }
  });
}
