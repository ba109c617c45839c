"use strict";
// Reads an OpenAI-style Server-Sent Events stream answered to a POST. EventSource can only
// GET, so the body is read by hand: events end with a blank line, and each `data: ` line
// holds one JSON chunk, until `data: [DONE]`.

class APIError extends Error {}

async function streamSSE(url, body, { headers = {}, signal, onData }) {
  const response = await fetch(url, {
    method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", ...headers },
  });
  if (!response.ok) {  // an OpenAI-shaped error body: show its message and the parameter
    let message = `HTTP ${response.status}`;
    try {
      const error = (await response.json()).error;
      message = error.param ? `${error.message} (parameter: ${error.param})` : error.message;
    } catch (_) { /* not JSON: keep the status */ }
    throw new APIError(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}
