// The public API, from the browser: /v1/models and streamed completions (server-sent events over fetch).
// Same origin as the page, so the server's guard sees a same-origin request and no CORS preflight is needed.

export class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let apiKey = "";

export function setKey(key) {
  apiKey = key.trim();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h.Authorization = `Bearer ${apiKey}`;
  return h;
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new APIError(response.status, message);
}

export async function models() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw await failure(response);
  return (await response.json()).data;
}

// POST `body` to `path` with stream: true and call onChunk(object) for every SSE data event, in order.
// Resolves when the server sends [DONE]; rejects with APIError on an HTTP error or an error event.
export async function stream(path, body, onChunk, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new APIError(500, chunk.error.message || "error");
      onChunk(chunk);
    }
  }
  throw new APIError(0, "the stream ended before [DONE]");
}
