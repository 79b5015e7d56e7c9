"""Sudoku puzzles: a seeded generator of unique-solution puzzles, a solver and a checker. Pure Python.

A grid is a list of 81 ints in row-major order; 0 is an empty cell.

Generation (numbers reused in the code):
  1. Fill an empty grid by randomised backtracking (fewest candidates first) -> a random solved grid.
  2. Visit the cells in random order; blank each one unless the puzzle would then have more than one solution.
     Stop at the requested number of givens.
  3. If every cell was visited before reaching that number (rare below ~25 givens), start again.
Below 22 givens step 3 almost never ends (21 givens took 55 s a puzzle here, 22 took 1.8 s, with a search about
1.8x slower than today's), so the fewest givens asked of make_puzzle is REACHABLE_GIVENS. `minimal_puzzle` instead
visits every cell once and keeps what is left: a minimal puzzle (no given can be removed), about 21-27 givens,
0.03 s each.
"""

from __future__ import annotations

import random

CELLS = 81
REACHABLE_GIVENS = 22  # make_puzzle's floor in practice (see above)
ALL = 0x3FE  # bits 1..9
_ROW = [i // 9 for i in range(CELLS)]
_COL = [i % 9 for i in range(CELLS)]
_BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(CELLS)]
PEERS = [sorted({j for j in range(CELLS) if j != i and (_ROW[i] == _ROW[j] or _COL[i] == _COL[j]
                                                        or _BOX[i] == _BOX[j])}) for i in range(CELLS)]
_BITS = {1 << d: d for d in range(1, 10)}


def _candidates(grid: list[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Used-digit masks per row, column and box; None if a given conflicts with another."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, d in enumerate(grid):
        if d:
            bit = 1 << d
            if (rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]]) & bit:
                return None
            rows[_ROW[i]] |= bit
            cols[_COL[i]] |= bit
            boxes[_BOX[i]] |= bit
    return rows, cols, boxes


_UNITS = [(_ROW[i], _COL[i], _BOX[i]) for i in range(CELLS)]
_COUNT = [bin(m).count("1") for m in range(1 << 10)]  # candidates in a mask


def _search(grid: list[int], empty: list[int], rows, cols, boxes, limit: int, rng: random.Random | None,
            found: list) -> None:
    """Depth-first search over the `empty` cells (in row-major order), fewest candidates first (the first such cell).
    Appends solutions to `found` until it holds `limit`."""
    if not empty:
        found.append(list(grid))
        return
    at, best_mask, best_n = -1, 0, 10
    for k, i in enumerate(empty):
        r, c, b = _UNITS[i]
        mask = ALL & ~(rows[r] | cols[c] | boxes[b])
        n = _COUNT[mask]
        if n < best_n:
            at, best_mask, best_n = k, mask, n
            if n <= 1:
                break
    if best_n == 0:
        return
    digits = [d for d in range(1, 10) if best_mask >> d & 1]
    if rng is not None:
        rng.shuffle(digits)
    best = empty.pop(at)
    r, c, b = _UNITS[best]
    for d in digits:
        bit = 1 << d
        grid[best] = d
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        _search(grid, empty, rows, cols, boxes, limit, rng, found)
        rows[r] &= ~bit
        cols[c] &= ~bit
        boxes[b] &= ~bit
        grid[best] = 0
        if len(found) >= limit:
            break
    empty.insert(at, best)


def solve(puzzle: list[int], limit: int = 1, rng: random.Random | None = None) -> list[list[int]]:
    """Up to `limit` solutions of `puzzle`."""
    masks = _candidates(puzzle)
    if masks is None:
        return []
    found: list[list[int]] = []
    _search(list(puzzle), [i for i in range(CELLS) if not puzzle[i]], *masks, limit, rng, found)
    return found


def count_solutions(puzzle: list[int], limit: int = 2) -> int:
    return len(solve(puzzle, limit))


def is_solution(puzzle: list[int], grid: list[int]) -> bool:
    """True when `grid` is a valid full Sudoku that keeps every given of `puzzle`."""
    if len(grid) != CELLS or any(not (isinstance(d, int) and 1 <= d <= 9) for d in grid):
        return False
    if any(p and p != g for p, g in zip(puzzle, grid)):
        return False
    return broken_rules(grid) == 0


def broken_rules(grid: list[int]) -> int:
    """Repeated digits over the 27 rows, columns and boxes of a full grid: 0 when every one holds 9 distinct."""
    return sum(9 - len({grid[i] for i in range(CELLS) if key[i] == group})
               for group in range(9) for key in (_ROW, _COL, _BOX))


def random_solution(rng: random.Random) -> list[int]:
    return solve([0] * CELLS, 1, rng)[0]


def make_puzzle(rng: random.Random, givens: int) -> tuple[list[int], list[int]]:
    """A puzzle with exactly `givens` filled cells and one solution, and that solution."""
    if not 17 <= givens <= CELLS:
        raise ValueError(f"givens must be in [17, 81], got {givens}")
    while True:
        # 1. a random solved grid
        solution = random_solution(rng)
        puzzle = list(solution)
        # 2. blank cells while the solution stays unique
        order = list(range(CELLS))
        rng.shuffle(order)
        filled = CELLS
        for i in order:
            if filled == givens:
                break
            puzzle[i] = 0
            if _forced(puzzle, i) or count_solutions(puzzle, 2) == 1:
                filled -= 1
            else:
                puzzle[i] = solution[i]
        if filled == givens:
            return puzzle, solution
        # 3. dead end: start over


def _peer_candidates(grid: list[int], i: int) -> int:
    """The digits (bits 1-9) that no cell in cell i's row, column or box holds."""
    used = 0
    for j in PEERS[i]:
        used |= 1 << grid[j]
    return ALL & ~used


def _forced(puzzle: list[int], i: int) -> bool:
    """Whether empty cell i has one candidate left (its row, column and box hold the other eight digits). Blanking
    such a cell keeps a puzzle's one solution, so step 2 needs no search for it: the same puzzles, sooner."""
    return _peer_candidates(puzzle, i) in _BITS


def minimal_puzzle(rng: random.Random) -> tuple[list[int], list[int]]:
    """A minimal puzzle (one solution, and removing any given would allow a second) and its solution: steps 1 and 2
    of make_puzzle with no target, every cell visited once."""
    solution = random_solution(rng)
    puzzle = list(solution)
    order = list(range(CELLS))
    rng.shuffle(order)
    for i in order:
        puzzle[i] = 0
        if not _forced(puzzle, i) and count_solutions(puzzle, 2) != 1:
            puzzle[i] = solution[i]
    return puzzle, solution


def generate_puzzles(n: int, givens: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [make_puzzle(rng, givens) for _ in range(n)]


def shuffle_symmetry(puzzle: list[int], solution: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """Apply a random validity-preserving symmetry (relabel digits, permute bands/stacks and the rows/columns
    inside them, transpose). A unique-solution puzzle stays unique, so this multiplies the training data cheaply."""
    digits = list(range(1, 10))
    rng.shuffle(digits)
    relabel = [0] + digits

    def axis() -> list[int]:
        bands = [0, 1, 2]
        rng.shuffle(bands)
        out = []
        for b in bands:
            inner = [0, 1, 2]
            rng.shuffle(inner)
            out += [3 * b + r for r in inner]
        return out

    rows, cols, transpose = axis(), axis(), rng.random() < 0.5

    def apply(grid: list[int]) -> list[int]:
        out = [0] * CELLS
        for r in range(9):
            for c in range(9):
                src = rows[r] * 9 + cols[c] if not transpose else cols[c] * 9 + rows[r]
                out[r * 9 + c] = relabel[grid[src]]
        return out

    return apply(puzzle), apply(solution)


def naked_singles_solve(puzzle: list[int]) -> list[int]:
    """Fill cells that have one candidate, repeatedly. Returns the grid reached (zeros where it got stuck);
    a measure of difficulty."""
    grid = list(puzzle)
    progress = True
    while progress:
        progress = False
        for i in range(CELLS):
            if grid[i] == 0:
                mask = _peer_candidates(grid, i)
                if mask in _BITS:
                    grid[i] = _BITS[mask]
                    progress = True
    return grid


SEPARATOR_LINE = frozenset("-+=|")


def parse_grid(text: str) -> list[int]:
    """A grid in the usual notations -> 81 ints. Digits 1-9 are givens, 0 or '.' an empty cell, in one line of 81
    or over 9 lines; spaces and '|' between cells are ignored, and so are separator lines made of '-', '+', '='
    and '|' (so `pretty`'s output reads back)."""
    cells = []
    for line in text.splitlines():
        marks = set(line) - set(" \t")
        if marks and marks <= SEPARATOR_LINE:
            continue
        for ch in line:
            if ch.isspace() or ch == "|":
                continue
            if ch == ".":
                cells.append(0)
            elif ch in "0123456789":
                cells.append(int(ch))
            else:
                raise ValueError(f"unexpected character {ch!r} in the grid (use digits 1-9, and 0 or '.' for blanks)")
    if len(cells) != CELLS:
        raise ValueError(f"a Sudoku has 81 cells, got {len(cells)}")
    return cells


MIN_UNIQUE_GIVENS = 17  # no Sudoku with fewer givens has a single solution (McGuire, Tugemann and Civario, 2012)


def puzzle_problem(puzzle: list[int]) -> str | None:
    """Why `puzzle` has no solution, in words (rows and columns from 1): the first two equal givens that share a
    row, column or box, or a dead end; None when it has one."""
    for i in range(CELLS):
        for j in PEERS[i]:
            if j > i and puzzle[i] and puzzle[j] == puzzle[i]:
                unit = ("row", _ROW[i]) if _ROW[i] == _ROW[j] else ("column", _COL[i]) if _COL[i] == _COL[j] \
                    else ("box", _BOX[i])
                return (f"the givens conflict: two {puzzle[i]}s in {unit[0]} {unit[1] + 1}, at row {_ROW[i] + 1} "
                        f"column {_COL[i] + 1} and row {_ROW[j] + 1} column {_COL[j] + 1}")
    return None if count_solutions(puzzle, 1) else "its givens lead to a dead end"


def format_grid(grid: list[int]) -> str:
    return "".join(str(d) for d in grid)


def pretty(grid: list[int]) -> str:
    lines = []
    for r in range(9):
        if r and r % 3 == 0:
            lines.append("------+-------+------")
        row = [str(d) if d else "." for d in grid[9 * r:9 * r + 9]]
        lines.append(" | ".join(" ".join(row[3 * k:3 * k + 3]) for k in range(3)))
    return "\n".join(lines)
