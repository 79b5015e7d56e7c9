// Sudoku mode: the puzzle goes to /v1/completions as its 81 digits (the embedded model's tokenizer prepends <bos>),
// with its givens pinned (givensTemplate), streamed with drafts; the board draws each draft, then the checker gives
// its verdict. A grid the checker refuses is solved again (`tries`, 4 by default), as `dgemma sudoku solve` does.

import { stream } from "./api.js";
import { LiveCanvas, Replay, requestStats, showStats } from "./canvas.js";
import { Board, EXAMPLE, checkGrid, formatPuzzle, parsePuzzle } from "./sudoku.js";

const $ = (id) => document.getElementById(id);

// The givens pinned where they stand, as `dgemma sudoku solve` pins them: the server's `template` field, each given
// a literal digit and each run of blanks a hole of that many tokens ("53{{2}}7{{4}}..."), so no given is rewritten.
export function givensTemplate(puzzle) {
  return puzzle.map((d) => (d ? String(d) : "_")).join("").replace(/_+/g, (run) => `{{${run.length}}}`);
}

export function setupSudoku(getModel) {
  const puzzleText = $("puzzle-text");
  const board = new Board($("board"), (puzzle) => {
    puzzleText.value = formatPuzzle(puzzle);
    clearVerdict();
  });
  let controller = null;
  let frames = []; // what the board drew, in order: {content, draft, isNewDraft}
  let badCells = new Set();
  const replay = new Replay($("sudoku-frame"), $("sudoku-frame-text"), (last) => {
    board.showPuzzle();
    frames.slice(0, last + 1).forEach((f) => board.drawCanvas(f.content, f.draft, f.isNewDraft));
    board.markBad(last === frames.length - 1 ? badCells : new Set());
  });

  function clearVerdict() {
    replay.reset();
    $("sudoku-verdict").textContent = "";
    delete $("sudoku-verdict").dataset.solved;
    $("sudoku-error").textContent = "";
  }

  function load(text) {
    try {
      board.setPuzzle(parsePuzzle(text));
      puzzleText.value = formatPuzzle(board.puzzle);
      $("puzzle-error").hidden = true;
      puzzleText.removeAttribute("aria-invalid");
      clearVerdict();
      return true;
    } catch (err) {
      $("puzzle-error").textContent = err.message;
      $("puzzle-error").hidden = false;
      puzzleText.setAttribute("aria-invalid", "true");
      puzzleText.focus();
      return false;
    }
  }

  $("puzzle-form").addEventListener("submit", (e) => {
    e.preventDefault();
    load(puzzleText.value);
  });
  $("puzzle-example").addEventListener("click", () => load(EXAMPLE));
  $("puzzle-clear").addEventListener("click", () => load("0".repeat(81)));
  $("sudoku-stop").addEventListener("click", () => controller && controller.abort());

  // One request: stream the puzzle's solve onto the board. -> {finished, canvas, startedAt, endedAt}
  async function solveOnce(body) {
    board.showPuzzle();
    frames = [];
    const canvas = new LiveCanvas();
    const startedAt = performance.now();
    let finished = false;
    try {
      await stream("/v1/completions", body, (chunk) => {
        const drafts = canvas.drafts;
        canvas.completionChunk(chunk);
        frames.push({ content: canvas.content, draft: canvas.draft, isNewDraft: canvas.drafts > drafts });
        board.drawCanvas(canvas.content, canvas.draft, canvas.drafts > drafts);
      }, controller.signal);
      finished = true;
    } catch (err) {
      $("sudoku-error").textContent = err.name === "AbortError" ? "Stopped." : `Error: ${err.message}`;
    }
    if (canvas.content || canvas.drafts) {
      frames.push({ content: canvas.content, draft: "", isNewDraft: false });
      board.drawCanvas(canvas.content, "", false);
    } else {
      board.showPuzzle();
    }
    return { finished, canvas, startedAt, endedAt: performance.now() };
  }

  // Solve: up to `tries` requests, each a fresh sample (the next seed when one is given, else a random one),
  // until the checker accepts the grid, as `dgemma sudoku solve --tries` does.
  $("solve").addEventListener("click", async () => {
    if (controller) return;
    // a puzzle typed but not loaded is taken as it stands
    if (puzzleText.value.trim() && puzzleText.value.trim() !== formatPuzzle(board.puzzle) && !load(puzzleText.value)) {
      return;
    }
    const steps = $("sudoku-steps").value.trim(), seed = $("sudoku-seed").value.trim();
    const tries = Math.min(16, Math.max(1, parseInt($("sudoku-tries").value, 10) || 1));
    const verdict = $("sudoku-verdict");
    clearVerdict();
    board.lock(true);
    $("solve").disabled = true;
    $("sudoku-stop").disabled = false;
    controller = new AbortController();
    badCells = new Set();
    let run = null, check = null, attempt = 0;
    while (attempt < tries) {
      attempt += 1;
      verdict.textContent = tries > 1 ? `Solving… (try ${attempt} of ${tries})` : "Solving…";
      const body = {
        model: getModel(), prompt: formatPuzzle(board.puzzle), max_tokens: 82, stream: true,
        stream_options: { include_drafts: true, include_usage: true },
      };
      if (board.puzzle.includes(0)) body.template = givensTemplate(board.puzzle);
      if (steps) body.max_denoising_steps = parseInt(steps, 10);
      if (seed) body.seed = parseInt(seed, 10) + attempt - 1;
      run = await solveOnce(body);
      if (!run.finished) break;
      check = checkGrid(board.puzzle, board.grid());
      if (check.solved) break;
    }
    board.lock(false);
    controller = null;
    $("solve").disabled = false;
    $("sudoku-stop").disabled = true;
    showStats($("sudoku-stats"), requestStats(run.canvas, run.startedAt, run.endedAt));
    if (!run.finished) {
      verdict.textContent = "";
      return;
    }
    const { solved, problems } = check;
    badCells = check.badCells;
    board.markBad(badCells);
    replay.ready(frames.length);
    verdict.dataset.solved = String(solved);
    verdict.dataset.tries = String(attempt);
    const steps_ = run.canvas.usage ? ` in ${run.canvas.usage.denoising_steps} denoising steps` : "";
    const which = tries > 1 ? (solved ? ` on try ${attempt} of ${tries}` : ` after ${tries} tries (the last shown)`) : "";
    verdict.textContent = solved
      ? `Solved${which}${steps_}: every row, column and box holds 1 to 9 once, and every given is kept.`
      : `Not solved${which}${steps_}: ${problems.slice(0, 4).join("; ")}${problems.length > 4 ? `; and ${problems.length - 4} more problems` : ""}.`;
  });

  load(EXAMPLE);
}
