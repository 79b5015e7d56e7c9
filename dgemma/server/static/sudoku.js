// Sudoku: parsing a puzzle, checking a grid (rows, columns, boxes, givens), and the 9x9 board that is typed into
// and then draws the canvas as it settles.

export const EXAMPLE = "124680309003940026079001004960478200402006007007300005000754012200100700741860903";

// "53..7...." / "530070000" (spaces, newlines and | - + ignored) -> 81 numbers, 0 for a blank. Throws on bad input.
export function parsePuzzle(text) {
  const cells = text.replace(/[\s|+\-]/g, "");
  const bad = cells.match(/[^0-9.]/);
  if (bad) throw new Error(`the puzzle may hold only digits, and 0 or . for a blank, not "${bad[0]}"`);
  if (cells.length !== 81) throw new Error(`a puzzle has 81 cells; this one has ${cells.length}`);
  return Array.from(cells, (c) => (c === "." ? 0 : Number(c)));
}

export function formatPuzzle(puzzle) {
  return puzzle.join("");
}

const ordinal = (i) => i + 1;

// Check `grid` (81 numbers, 0 for an empty cell) as a solution of `puzzle`. Returns {solved, problems, badCells}:
// problems are sentences, badCells the indices of the cells they are about.
export function checkGrid(puzzle, grid) {
  const problems = [];
  const badCells = new Set();
  const empty = grid.reduce((n, d) => n + (d >= 1 && d <= 9 ? 0 : 1), 0);
  if (empty) problems.push(`${empty} cell${empty === 1 ? " is" : "s are"} not filled with a digit 1-9`);
  for (let i = 0; i < 81; i++) {
    if (puzzle[i] && grid[i] !== puzzle[i]) {
      problems.push(`row ${ordinal(Math.floor(i / 9))}, column ${ordinal(i % 9)}: the given ${puzzle[i]} became ` +
                    `${grid[i] || "empty"}`);
      badCells.add(i);
    }
  }
  const units = [];
  for (let k = 0; k < 9; k++) {
    units.push({ name: `row ${k + 1}`, cells: Array.from({ length: 9 }, (_, j) => k * 9 + j) });
    units.push({ name: `column ${k + 1}`, cells: Array.from({ length: 9 }, (_, j) => j * 9 + k) });
    const r = Math.floor(k / 3) * 3, c = (k % 3) * 3;
    units.push({ name: `box ${k + 1}`, cells: Array.from({ length: 9 }, (_, j) => (r + Math.floor(j / 3)) * 9 + c + (j % 3)) });
  }
  for (const unit of units) {
    const seen = new Map();
    for (const i of unit.cells) {
      const d = grid[i];
      if (d >= 1 && d <= 9) seen.set(d, [...(seen.get(d) || []), i]);
    }
    for (const [d, cells] of seen) {
      if (cells.length > 1) {
        problems.push(`${unit.name} has ${cells.length} ${d}s`);
        cells.forEach((i) => badCells.add(i));
      }
    }
  }
  return { solved: problems.length === 0, problems, badCells };
}

// The board: 81 inputs in an ARIA grid, one tab stop (roving tabindex), arrow keys between cells.
export class Board {
  constructor(element, onEdit) {
    this.element = element;
    this.onEdit = onEdit; // called with the puzzle after the user changes a cell
    this.puzzle = new Array(81).fill(0);
    this.locked = false;
    this.showingResult = false;
    this.shown = []; // per cell: {digit, state, age}
    this.cells = [];
    this.active = 0;
    for (let r = 0; r < 9; r++) {
      const row = document.createElement("div");
      row.setAttribute("role", "row");
      for (let c = 0; c < 9; c++) {
        const i = r * 9 + c;
        const gridcell = document.createElement("div");
        gridcell.setAttribute("role", "gridcell");
        const input = document.createElement("input");
        input.type = "text";
        input.inputMode = "numeric";
        input.autocomplete = "off";
        input.maxLength = 1;
        input.className = "cell";
        input.dataset.index = String(i);
        input.setAttribute("aria-label", `Row ${r + 1}, column ${c + 1}`);
        input.tabIndex = i === 0 ? 0 : -1;
        if (c % 3 === 2 && c < 8) gridcell.classList.add("box-right");
        if (r % 3 === 2 && r < 8) gridcell.classList.add("box-bottom");
        gridcell.appendChild(input);
        row.appendChild(gridcell);
        this.cells.push(input);
      }
      element.appendChild(row);
    }
    element.addEventListener("keydown", (e) => this._key(e));
    element.addEventListener("paste", (e) => this._paste(e));
    element.addEventListener("input", (e) => this._input(e));
    element.addEventListener("focusin", (e) => {
      if (e.target.dataset.index !== undefined) this._activate(Number(e.target.dataset.index), false);
    });
    this.showPuzzle();
  }

  setPuzzle(puzzle) {
    this.puzzle = puzzle.slice();
    this.showPuzzle();
  }

  // The puzzle as typed: givens only, no model output.
  showPuzzle() {
    this.showingResult = false;
    this.shown = [];
    this.element.dataset.drafts = "0";
    this.cells.forEach((input, i) => {
      const d = this.puzzle[i];
      input.value = d ? String(d) : "";
      input.dataset.given = d ? "true" : "false";
      input.dataset.state = d ? "given" : "blank";
      input.removeAttribute("data-age");
      input.classList.remove("changed", "bad");
      input.removeAttribute("aria-invalid");
      this.shown.push({ digit: input.value, state: input.dataset.state, age: 0 });
    });
  }

  lock(locked) {
    this.locked = locked;
    this.cells.forEach((input) => { input.readOnly = locked; });
    this.element.setAttribute("aria-busy", locked ? "true" : "false");
  }

  // Draw the canvas: `settled` (text that will not change) then `draft` (the undecided rest). A cell's shade says how
  // sure the model is: settled, a draft digit that has held for 2+ drafts, or a new one; a digit that changed flashes.
  drawCanvas(settled, draft, isNewDraft) {
    if (!this.showingResult) {
      this.showingResult = true;
      this.element.dataset.drafts = "0";
    }
    if (isNewDraft) this.element.dataset.drafts = String(Number(this.element.dataset.drafts) + 1);
    const text = settled + draft;
    this.cells.forEach((input, i) => {
      const ch = text[i] || "";
      const digit = /[1-9]/.test(ch) ? ch : "";
      const state = i < settled.length ? "settled" : i < text.length ? "draft" : "pending";
      const before = this.shown[i];
      const changed = before.state !== "given" && before.state !== "blank" && before.state !== "pending" &&
                      before.digit !== digit;
      const age = state === "draft" && !changed && before.state === "draft" ? Math.min(before.age + 1, 2) : 0;
      input.value = digit;
      input.dataset.state = state;
      if (state === "draft") input.dataset.age = String(age);
      else input.removeAttribute("data-age");
      if (changed) {
        input.classList.remove("changed");
        void input.offsetWidth; // restart the flash animation
        input.classList.add("changed");
      }
      this.shown[i] = { digit, state, age };
    });
  }

  grid() {
    return this.cells.map((input) => (/^[1-9]$/.test(input.value) ? Number(input.value) : 0));
  }

  markBad(badCells) {
    this.cells.forEach((input, i) => {
      const bad = badCells.has(i);
      input.classList.toggle("bad", bad);
      if (bad) input.setAttribute("aria-invalid", "true");
      else input.removeAttribute("aria-invalid");
    });
  }

  _activate(i, focus = true) {
    this.cells[this.active].tabIndex = -1;
    this.active = i;
    this.cells[i].tabIndex = 0;
    if (focus) this.cells[i].focus();
  }

  _edit(i, digit) {
    if (this.locked) return;
    if (this.showingResult) this.showPuzzle();
    this.puzzle[i] = digit;
    const input = this.cells[i];
    input.value = digit ? String(digit) : "";
    input.dataset.given = digit ? "true" : "false";
    input.dataset.state = digit ? "given" : "blank";
    this.shown[i] = { digit: input.value, state: input.dataset.state, age: 0 };
    this.onEdit(this.puzzle.slice());
  }

  _key(e) {
    if (e.target.dataset.index === undefined || e.altKey || e.metaKey) return;
    const i = Number(e.target.dataset.index);
    const r = Math.floor(i / 9), c = i % 9;
    const moves = {
      ArrowLeft: c > 0 ? i - 1 : i, ArrowRight: c < 8 ? i + 1 : i,
      ArrowUp: r > 0 ? i - 9 : i, ArrowDown: r < 8 ? i + 9 : i,
      Home: e.ctrlKey ? 0 : r * 9, End: e.ctrlKey ? 80 : r * 9 + 8,
    };
    if (e.key in moves) {
      e.preventDefault();
      this._activate(moves[e.key]);
    } else if (e.ctrlKey) {
      // Ctrl+V and the like keep their meaning
    } else if (/^[1-9]$/.test(e.key)) {
      e.preventDefault();
      this._edit(i, Number(e.key));
      if (!this.locked && i < 80) this._activate(i + 1);
    } else if (["0", ".", " ", "Delete", "Backspace"].includes(e.key)) {
      e.preventDefault();
      this._edit(i, 0);
    } else if (e.key.length === 1) {
      e.preventDefault(); // only digits go into a cell
    }
  }

  _paste(e) {
    if (this.locked || e.target.dataset.index === undefined) return;
    const text = (e.clipboardData || window.clipboardData).getData("text");
    e.preventDefault();
    try {
      const puzzle = parsePuzzle(text);
      this.setPuzzle(puzzle);
      this.onEdit(this.puzzle.slice());
    } catch (_) {
      const d = text.trim();
      if (/^[0-9.]$/.test(d)) this._edit(Number(e.target.dataset.index), d === "." ? 0 : Number(d));
    }
  }

  _input(e) {
    // typing that bypassed keydown (an on-screen keyboard): keep the last digit typed
    if (e.target.dataset.index === undefined) return;
    const i = Number(e.target.dataset.index);
    const d = (e.target.value.match(/[1-9]/g) || []).pop();
    this._edit(i, d ? Number(d) : 0);
  }
}
