"""Sampler settings for a Sudoku model, on the validation puzzles (never the held-out set the README reports):
solve rate and mean denoising steps per setting, to choose the generation_config.json a model ships with.

    python benchmarks/sudoku_sampler.py --model runs/sudoku-hard/model --givens 23-36 --puzzles 200 \\
        --set entropy_bound=0.1,0.3,1.0 --set t_max=0.8,0.5 [--set t_min=...] [--pin-givens] [--threads 2]

Every combination of the --set values is run (a grid), each on the same puzzles with the same seed; the first line
is the model's own generation_config.json. --pin-givens pins each puzzle's givens, as `sudoku solve` does.
--failures describes each setting's unsolved answers: how many cells are wrong, how many row/column/box rules
they break, how many ran to the step cap, and how many needed naked singles only (every empty cell reached by
filling in forced cells, again and again, from the givens).
"""

from __future__ import annotations

import argparse
import itertools
import time
import torch

from dgemma.io import checkpoint
from dgemma.config import ConfigError
from dgemma.runtime import tune_malloc
from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_puzzles import broken_rules, is_solution, naked_singles_solve
from dgemma.tasks.sudoku_cli import parse_givens, weights_sha256

FIELDS = {"entropy_bound": float, "t_min": float, "t_max": float, "max_denoising_steps": int,
          "stability_threshold": int, "confidence_threshold": float}


def setting(text: str) -> tuple[str, list]:
    key, _, values = text.partition("=")
    if key not in FIELDS or not values:
        raise argparse.ArgumentTypeError(f"expected FIELD=v1,v2,... with FIELD one of {sorted(FIELDS)}, got {text!r}")
    return key, [FIELDS[key](v) for v in values.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(S.ASSET_DIR))
    ap.add_argument("--givens", type=parse_givens, default=(23, 36))
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--set", type=setting, action="append", default=[], dest="grid")
    ap.add_argument("--pin-givens", action="store_true")
    ap.add_argument("--failures", action="store_true", help="describe the unsolved answers")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    ck = checkpoint.load(args.model, quiet=True)
    sha = weights_sha256(args.model)
    puzzles = S.heldout_set(args.puzzles, args.givens, validation=True)
    print(f"{args.model} (model.safetensors sha256 {sha}); {len(puzzles)} validation puzzles, "
          f"{S.givens_label(args.givens)} givens{', givens pinned' if args.pin_givens else ''}")
    keys = [k for k, _ in args.grid]
    combos = [()] + (list(itertools.product(*(v for _, v in args.grid))) if args.grid else [])
    for combo in combos:
        label = "generation_config.json" if not combo else " ".join(f"{k}={v}" for k, v in zip(keys, combo))
        try:
            gen = ck.generation.replace(**dict(zip(keys, combo)))
        except ConfigError as e:  # t_max <= t_min, say: not a setting
            print(f"{label:60s} skipped: {e}")
            continue
        t = time.perf_counter()
        answers: list = []
        score = S.evaluate(ck.model, puzzles, gen, 50, 0, steer=S.pin_givens if args.pin_givens else None,
                           on_answer=lambda *answer: answers.append(answer))
        print(f"{label:60s} solved {score.solved}/{score.total} ({100 * score.solve_rate:.1f}%)  "
              f"mean steps {score.mean_steps:.2f}  [{time.perf_counter() - t:.0f} s]", flush=True)
        if args.failures:
            print(describe_failures(answers, gen.max_denoising_steps), flush=True)


def describe_failures(answers: list, cap: int) -> str:
    """Steps of the solved and the unsolved; the unsolved answers' wrong cells and broken rules (quartiles); and how
    many puzzles naked singles alone solve (filling in forced cells, again and again, from the givens), how many of
    those went unsolved, and how often the unsolved grids are wrong at cells naked singles reach and at the rest."""
    solved = [steps for puzzle, _, grid, steps in answers if grid is not None and is_solution(puzzle, grid)]
    failed = [(puzzle, solution, grid, steps) for puzzle, solution, grid, steps in answers
              if grid is None or not is_solution(puzzle, grid)]
    grids = [(puzzle, solution, grid) for puzzle, solution, grid, _ in failed if grid is not None]
    wrong = sorted(sum(a != b for a, b in zip(grid, solution)) for _, solution, grid in grids)
    broken = sorted(broken_rules(grid) for *_, grid in grids)
    closure = {tuple(puzzle): naked_singles_solve(puzzle) for puzzle, *_ in answers}
    easy = sum(0 not in c for c in closure.values())
    easy_failed = sum(0 not in closure[tuple(puzzle)] for puzzle, *_ in failed)
    cells = {True: [0, 0], False: [0, 0]}  # whether naked singles reach the cell -> [cells, wrong]
    for puzzle, solution, grid in grids:
        for i, d in enumerate(puzzle):
            if not d:
                reached = bool(closure[tuple(puzzle)][i])
                cells[reached][0] += 1
                cells[reached][1] += grid[i] != solution[i]

    def quartiles(xs: list[int]) -> str:
        return "/".join(str(xs[min(len(xs) - 1, len(xs) * q // 4)]) for q in (1, 2, 3)) if xs else "-"

    def mean(xs: list[int]) -> str:
        return f"{sum(xs) / len(xs):.2f}" if xs else "-"

    def share(reached: bool) -> str:
        n, bad = cells[reached]
        return f"{100 * bad / n:.1f}% of {n}" if n else "-"

    return (f"{'':4s}solved: mean steps {mean(solved)}; unsolved {len(failed)}: mean steps "
            f"{mean([s for *_, s in failed])}, {sum(s >= cap for *_, s in failed)} at the {cap}-step cap, "
            f"{len(failed) - len(grids)} not 81 digits; wrong cells (quartiles) {quartiles(wrong)}, broken "
            f"row/column/box rules (quartiles) {quartiles(broken)}\n"
            f"{'':4s}naked singles alone solve {easy} of the puzzles, {easy_failed} of them unsolved; wrong in the "
            f"unsolved grids: {share(True)} cells naked singles reach, {share(False)} cells they do not")


if __name__ == "__main__":
    main()
