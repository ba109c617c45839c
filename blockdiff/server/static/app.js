"use strict";
// The form: read the settings, start one stream per pane (two for a race against ar, run
// concurrently, so the server batches them side by side), and rank the panes at the end.

const byId = id => document.getElementById(id);
let controller = null;
let current = [];  // the panes of the generation in progress

async function loadServerInfo() {
  try {
    const info = await (await fetch("/get_server_info")).json();
    // one block length for every mode, or the engine's per-mode defaults (ar has no blocks)
    const blocks = typeof info.block_length === "object"
      ? Object.entries(info.block_length).filter(([mode]) => mode !== "ar").map(([mode, L]) => `${mode} ${L}`).join(", ")
      : info.block_length;
    // where the spec modes take AR steps under load (engine/block_lengths.py)
    const limits = Object.entries(info.spec_disable_batch_size || {}).map(([mode, n]) => `${mode} ${n}`).join(", ");
    byId("server-info").textContent = `${info.served_model_name} · default mode ${info.default_mode}` +
      ` · block ${blocks}` + (limits ? ` · AR steps from ${limits} running` : "") +
      ` · threshold ${info.threshold} · context ${info.context_length}`;
    const mode = byId("mode");
    if (![...mode.options].some(o => o.value === info.default_mode)) mode.add(new Option(info.default_mode));
    mode.value = info.default_mode;
    byId("threshold").value = info.threshold;
  } catch (e) {
    byId("server-info").textContent = "server info unavailable";
  }
  document.body.dataset.ready = "1";  // the defaults are in: the form is the user's now
}

function settings() {
  const number = id => Number(byId(id).value);
  return {
    prompt: byId("prompt").value, mode: byId("mode").value, blockLength: number("block-length"),
    threshold: number("threshold"), maxTokens: number("max-tokens"), temperature: number("temperature"),
    chat: byId("chat").checked, race: byId("race").checked, delay: number("delay"),
    apiKey: byId("api-key").value.trim(),
  };
}

function requestFor(s, mode) {
  // the same body any OpenAI client could send, plus the blockdiff extras at the top level
  const body = {
    stream: true, stream_options: { include_usage: true }, return_steps: true, mode, block_length: s.blockLength, threshold: s.threshold,
    max_tokens: s.maxTokens, temperature: s.temperature,
  };
  if (s.chat) return ["/v1/chat/completions", { ...body, messages: [{ role: "user", content: s.prompt }] }];
  return ["/v1/completions", { ...body, prompt: s.prompt }];
}

async function generate(pane, s, signal) {
  const [url, body] = requestFor(s, pane.mode);
  const headers = s.apiKey ? { Authorization: `Bearer ${s.apiKey}` } : {};
  pane.start();
  try {
    await streamSSE(url, body, { headers, signal, onData: chunk => pane.push(chunk, performance.now()) });
    pane.push({ error: { message: "the stream ended without a finish chunk" } }, performance.now());
  } catch (e) {
    pane.fail(e.name === "AbortError" ? "stopped" : e.message);
  }
  await pane.done;  // the replay may still be drawing
}

function rank(panes) {
  const finished = panes.filter(p => p.finishedAt !== undefined).sort((a, b) => a.finishedAt - b.finishedAt);
  if (finished.length < 2) return;
  const first = finished[0];
  first.badge(`first · ${first.elapsed.toFixed(2)} s`, true);
  for (const p of finished.slice(1)) p.badge(`+${((p.finishedAt - first.finishedAt) / 1000).toFixed(2)} s`, false);
}

async function run(event) {
  event.preventDefault();
  if (controller) controller.abort();  // Ctrl+Enter during a run starts over
  current.forEach(pane => pane.stop());
  const s = settings();
  const container = byId("panes");
  container.replaceChildren();
  byId("error").hidden = true;
  const modes = s.race ? ["ar", s.mode] : [s.mode];
  container.classList.toggle("race", modes.length > 1);
  const panes = modes.map(mode => new Pane(container, mode, s.delay));
  current = panes;
  controller = new AbortController();
  const mine = controller;
  byId("run").disabled = true;
  byId("stop").disabled = false;
  document.body.dataset.running = "1";
  await Promise.all(panes.map(p => generate(p, s, mine.signal)));
  rank(panes);
  if (controller === mine) {
    controller = null;
    byId("run").disabled = false;
    byId("stop").disabled = true;
    delete document.body.dataset.running;
  }
}

byId("form").addEventListener("submit", e => run(e).catch(err => {
  byId("error").hidden = false;
  byId("error").textContent = String(err);
}));
byId("stop").addEventListener("click", () => {
  if (controller) controller.abort();
  current.forEach(pane => pane.stop());  // also ends a slowed-down replay of a finished stream
});
byId("prompt").addEventListener("keydown", e => {  // Ctrl/Cmd+Enter generates
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) byId("form").requestSubmit();
});
loadServerInfo();
