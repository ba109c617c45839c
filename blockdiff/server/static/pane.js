"use strict";
// One generation drawn live from its stream: counters, the current block as rows of token
// slots (one row per denoising pass, or per draft with its verdict), and the committed text.
// The committed text comes from the ordinary text chunks only, so it is exactly what any
// OpenAI client would print; the step chunks (blockdiff_step) only feed the drawing.

const MAX_ROWS = 14;  // older rows scroll away; a block rarely needs more passes than this
const SHOWN = { " ": "␣", "\n": "↵", "\t": "⇥" };

function shown(text) {
  if (text === null) return "M";
  if (text === "") return "∅";
  // code is full of indentation: a run of spaces shows as one glyph and its length
  return text.replace(/ {3,}/g, run => `␣×${run.length}`).replace(/[ \n\t]/g, c => SHOWN[c]);
}

class Pane {
  constructor(container, mode, delayMs) {
    const node = document.getElementById("pane-template").content.firstElementChild.cloneNode(true);
    container.appendChild(node);
    this.root = node;
    this.mode = mode;  // as asked; the step events say which mode actually runs (see step)
    this.delay = delayMs;
    this.trace = this.$(".trace");
    this.output = this.$(".output");
    this.$(".pane-mode").textContent = mode;
    this.queue = [];  // [chunk, arrival time]: drawn in order, at the replay speed
    this.draining = false;
    this.stats = { steps: 0, masks: 0, accepted: 0, rejected: 0, verifies: 0, committedPerVerify: 0 };
    this.nfe = 0;
    this.tokens = 0;
    this.block = 0;
    this.previous = null;  // the last denoising pass's ids, to spot the slots it unmasked
    this.draftRow = null;  // the draft row waiting for its verdict
    this.streak = null;    // ar: the row of recent tokens
    this.lastKind = null;
    this.done = new Promise(resolve => { this.resolveDone = resolve; });
    this.setState("waiting", "waiting for the server");
  }

  $(selector) { return this.root.querySelector(selector); }

  setState(state, label) {
    this.root.dataset.state = state;
    this.$(".status").textContent = label;
  }

  start() {
    this.t0 = performance.now();
    this.setState("running", "generating…");
  }

  push(chunk, at) {
    this.queue.push([chunk, at]);
    if (!this.draining) this.drain();
  }

  async drain() {
    this.draining = true;
    while (this.queue.length) {
      const [chunk, at] = this.queue.shift();
      this.handle(chunk, at);
      if (this.delay && chunk.blockdiff_step) await new Promise(r => setTimeout(r, this.delay));
    }
    this.draining = false;
  }

  stop() {  // the user pressed Stop: drop what is still queued for drawing
    this.queue.length = 0;
    this.fail("stopped");
  }

  handle(chunk, at) {
    if (chunk.error) return this.fail(chunk.error.message);
    if (chunk.blockdiff_step) return this.step(chunk.blockdiff_step, at);
    if (chunk.usage && this.final) {  // after the finish chunk: the exact token count
      this.tokens = chunk.usage.completion_tokens;
      this.counters(this.finishedAt, this.final);
    }
    for (const choice of chunk.choices || []) {
      const text = choice.delta ? (choice.delta.content || "") : (choice.text || "");
      if (text) this.appendText(text);
      if (choice.finish_reason) this.finish(choice.finish_reason, chunk.metrics || {}, at);
    }
  }

  // --- step events ---------------------------------------------------------------------
  step(s, at) {
    if (s.mode && s.mode !== this.mode) {  // e.g. a mode the server resolves per request
      this.mode = s.mode;
      this.$(".pane-mode").textContent += ` → ${s.mode}`;
    }
    this.stats.steps++;
    this.nfe = s.nfe;
    this.tokens = s.completion_tokens;
    if (s.kind === "denoise") this.denoise(s);
    else if (s.kind === "draft") this.draft(s);
    else if (s.kind === "verify") this.verify(s);
    else if (s.kind === "commit") this.commit(s);
    this.lastKind = s.kind;
    this.counters(at);
    Object.assign(this.root.dataset, {
      steps: this.stats.steps, masks: this.stats.masks,
      accepted: this.stats.accepted, rejected: this.stats.rejected,
    });
  }

  denoise(s) {
    if (s.step === 0) this.newBlock();
    const row = this.addRow(`pass ${s.step + 1}`);
    s.token_ids.forEach((id, i) => {
      if (id === null) {
        this.stats.masks++;
        this.slot(row, "mask", null, null);
      } else {
        const fresh = !this.previous || this.previous[i] === null;
        this.slot(row, fresh ? "fresh" : "provisional", id, s.texts[i]);
      }
    });
    this.previous = s.token_ids;
  }

  draft(s) {
    this.block++;
    this.note(`draft ${this.block}`);
    this.draftRow = this.addRow("draft");
    s.token_ids.forEach((id, i) => this.slot(this.draftRow, "draft", id, s.texts[i]));
  }

  verify(s) {
    let row = this.draftRow;
    if (!row) {  // no draft seen (it came before we listened): draw the drafts now
      row = this.addRow("");
      s.token_ids.forEach((id, i) => this.slot(row, "draft", id, s.texts[i]));
    }
    [...row.querySelector(".slots").children].forEach((cell, i) => {
      cell.className = "slot " + (i < s.accepted ? "accepted" : "rejected");
    });
    this.slot(row, "bonus", s.bonus_id, s.bonus_text);
    row.querySelector(".row-label").textContent = `${s.accepted}/${s.drafted} ok`;
    this.stats.accepted += s.accepted;
    this.stats.rejected += s.drafted - s.accepted;
    this.stats.verifies++;
    this.stats.committedPerVerify += s.accepted + 1;
    this.draftRow = null;
  }

  commit(s) {
    if (this.mode === "ar") {  // one token per forward: a rolling row of the latest ones
      if (!this.streak) { this.note("one token per forward"); this.streak = this.addRow("committed"); }
      s.token_ids.forEach((id, i) => this.slot(this.streak, "committed", id, s.texts[i]));
      const cells = this.streak.querySelector(".slots");
      while (cells.children.length > 24) cells.firstElementChild.remove();
      return;
    }
    if (this.lastKind === "verify") return;  // the verdict row already shows these tokens
    const label = this.lastKind === null ? "prefill" : (this.lastKind === "commit" ? "next seed" : "commit");
    const row = this.addRow(label);
    s.token_ids.forEach((id, i) => this.slot(row, "committed", id, s.texts[i]));
  }

  newBlock() {
    this.block++;
    this.previous = null;
    this.trace.replaceChildren();
    this.note(`block ${this.block}`);
  }

  note(text) { this.$(".trace-note").textContent = text; }

  addRow(label) {
    const row = document.createElement("div");
    row.className = "row";
    row.innerHTML = '<span class="row-label"></span><div class="slots"></div>';
    row.firstElementChild.textContent = label;
    this.trace.appendChild(row);
    while (this.trace.children.length > MAX_ROWS) this.trace.firstElementChild.remove();
    this.trace.scrollTop = this.trace.scrollHeight;
    return row;
  }

  slot(row, kind, id, text) {
    const cell = document.createElement("span");
    cell.className = "slot " + kind;
    cell.textContent = shown(text);
    cell.title = id === null ? "MASK" : `id ${id}: ${JSON.stringify(text)}`;
    row.querySelector(".slots").appendChild(cell);
  }

  // --- text and counters ---------------------------------------------------------------
  appendText(text) {
    for (const old of this.output.querySelectorAll(".new")) old.className = "old";
    const span = document.createElement("span");
    span.className = "new";
    span.textContent = text;
    this.output.appendChild(span);
    this.output.scrollTop = this.output.scrollHeight;
  }

  counters(at, final) {
    const seconds = (at - this.t0) / 1000;
    const set = (cls, value) => { this.$(cls).textContent = value; };
    set(".c-nfe", this.nfe);
    set(".c-tokens", this.tokens);
    set(".c-tpf", this.nfe ? (this.tokens / this.nfe).toFixed(2) : "–");
    set(".c-tps", final && final.tokens_per_s != null ? final.tokens_per_s.toFixed(1)
      : (seconds > 0 ? (this.tokens / seconds).toFixed(1) : "–"));
    const acceptance = final && final.acceptance != null ? final.acceptance
      : (this.stats.verifies ? this.stats.committedPerVerify / this.stats.verifies : null);
    set(".c-acc", acceptance == null ? "–" : acceptance.toFixed(2));
  }

  finish(reason, metrics, at) {
    // the server's own numbers win at the end: they count exactly what the engine did
    if (metrics.nfe != null) this.nfe = metrics.nfe;
    this.final = metrics;
    this.counters(at, metrics);
    this.elapsed = (at - this.t0) / 1000;
    this.finishedAt = at;
    this.setState("done", `finished (${reason}) in ${this.elapsed.toFixed(2)} s`);
    this.resolveDone();
  }

  fail(message) {
    if (this.root.dataset.state === "done" || this.root.dataset.state === "failed") return;
    this.queue.length = 0;
    const box = this.$(".pane-error");
    box.hidden = false;
    box.textContent = message;
    this.setState("failed", "failed");
    this.resolveDone();
  }

  badge(text, winner) {
    const badge = this.$(".badge");
    badge.hidden = false;
    badge.textContent = text;
    badge.classList.toggle("winner", winner);
  }
}
