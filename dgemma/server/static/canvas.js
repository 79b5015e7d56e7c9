// The live canvas of one streamed request: settled text (streamed as content, never retracted), the draft (the
// unsettled rest of the current canvas, from stream_options.include_drafts) and which draft pieces changed since
// the previous draft (the sampler re-noised them).

// Chat streams send one output as up to three chunks, in this order: {draft}, {reasoning_content}, {content}.
// A new draft is only sent when it differs, and none is sent when a canvas is committed; so text that arrives
// without a draft just before it means the canvas was committed, and the old draft is gone. When the draft came
// in an earlier output and the commit's text equals it, the canvas was committed as drawn: the draft is gone too.
export class LiveCanvas {
  constructor() {
    this.reasoning = "";
    this.content = "";
    this.draft = "";
    this.previousDraft = "";
    this.drafts = 0; // drafts received
    this.firstTextAt = null; // performance.now() of the first settled text
    this.usage = null;
    this.finishReason = null;
    this._last = null; // kind of the previous chunk: "draft", "reasoning", "content"
    this._lastFresh = false;
  }

  // What the page shows at this moment, for replaying.
  snapshot() {
    const { reasoning, content, draft, previousDraft, drafts } = this;
    return { reasoning, content, draft, previousDraft, drafts };
  }

  _setDraft(draft) {
    this.previousDraft = this.draft;
    this.draft = draft;
    this.drafts += 1;
  }

  _dropDraft() {
    this.previousDraft = "";
    this.draft = "";
  }

  _text(kind, text) {
    const fresh = (this._last === "draft" || (this._last === "reasoning" && this._lastFresh)) && text !== this.draft;
    if (!fresh) this._dropDraft();
    if (kind === "reasoning") this.reasoning += text;
    else this.content += text;
    if (this.firstTextAt === null) this.firstTextAt = performance.now();
    this._last = kind;
    this._lastFresh = fresh;
  }

  // One chat.completion.chunk.
  chatChunk(chunk) {
    if (chunk.usage) this.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    const delta = choice.delta || {};
    if (typeof delta.draft === "string") {
      this._setDraft(delta.draft);
      this._last = "draft";
    }
    if (delta.reasoning_content) this._text("reasoning", delta.reasoning_content);
    if (delta.content) this._text("content", delta.content);
    if (choice.finish_reason) {
      this.finishReason = choice.finish_reason;
      this._dropDraft();
    }
  }

  // One text_completion chunk: its text and draft come from the same engine output.
  completionChunk(chunk) {
    if (chunk.usage) this.usage = chunk.usage;
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) return;
    if (typeof choice.draft === "string") this._setDraft(choice.draft);
    else if (choice.text) this._dropDraft();
    if (choice.text) {
      this.content += choice.text;
      if (this.firstTextAt === null) this.firstTextAt = performance.now();
    }
    if (choice.finish_reason) {
      this.finishReason = choice.finish_reason;
      this._dropDraft();
    }
  }
}

// Text split into pieces that are compared between drafts: runs of letters/digits, of spaces, or one other character.
export function pieces(text) {
  return text.match(/\s+|[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]/gu) || [];
}

// The pieces of `next`, each marked changed when it is not part of a longest common subsequence with `previous`
// (pieces that only moved because text before them settled still match). Long drafts fall back to comparing
// pieces position by position, to bound the work per step.
export function diffPieces(previous, next) {
  const a = pieces(previous), b = pieces(next);
  if (a.length === 0) return b.map((text) => ({ text, changed: false }));
  if (a.length * b.length > 400000) return b.map((text, i) => ({ text, changed: a[i] !== text }));
  const width = b.length + 1;
  const table = new Uint16Array((a.length + 1) * width); // table[i, j]: LCS length of a[i:], b[j:]
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      table[i * width + j] = a[i] === b[j] ? table[(i + 1) * width + j + 1] + 1
        : Math.max(table[(i + 1) * width + j], table[i * width + j + 1]);
    }
  }
  const out = [];
  let i = 0, j = 0;
  while (j < b.length) {
    if (i < a.length && a[i] === b[j]) {
      out.push({ text: b[j], changed: false });
      i++; j++;
    } else if (i < a.length && table[(i + 1) * width + j] >= table[i * width + j + 1]) {
      i++;
    } else {
      out.push({ text: b[j], changed: true });
      j++;
    }
  }
  return out;
}

// Figures for the statistics list: denoising steps and tokens from usage, times from the page's clock.
export function requestStats(canvas, startedAt, endedAt) {
  const seconds = (endedAt - startedAt) / 1000;
  const usage = canvas.usage;
  return {
    steps: usage ? String(usage.denoising_steps) : "–",
    tokens: usage ? String(usage.completion_tokens) : "–",
    tps: usage && seconds > 0 ? (usage.completion_tokens / seconds).toFixed(1) : "–",
    ttft: canvas.firstTextAt !== null ? `${Math.round(canvas.firstTextAt - startedAt)} ms` : "–",
    total: `${seconds.toFixed(2)} s`,
    drafts: String(canvas.drafts),
  };
}

export function showStats(list, stats) {
  for (const dd of list.querySelectorAll("dd[data-stat]")) {
    dd.textContent = stats ? stats[dd.dataset.stat] : "–";
  }
}

// A range input that steps through recorded frames: draw(frameIndex) redraws; the output says where it is.
export class Replay {
  constructor(range, output, draw) {
    this.range = range;
    this.output = output;
    this.draw = draw;
    range.addEventListener("input", () => this.show(Number(range.value)));
    this.reset();
  }

  reset() {
    this.range.disabled = true;
    this.range.max = "0";
    this.range.value = "0";
    this.output.textContent = "";
  }

  // Enable it over `count` frames, showing the last.
  ready(count) {
    if (count < 1) return;
    this.range.max = String(count - 1);
    this.range.value = String(count - 1);
    this.range.disabled = false;
    this.label(count - 1);
  }

  show(i) {
    this.draw(i);
    this.label(i);
  }

  label(i) {
    const last = Number(this.range.max);
    this.output.textContent = i === last ? `frame ${i + 1} of ${last + 1}: the end` : `frame ${i + 1} of ${last + 1}`;
    this.range.setAttribute("aria-valuetext", this.output.textContent);
  }
}
