"""What `dgemma sudoku solve --tries N` buys: the share of puzzles solved within 1, 2, ... N tries, and whether a
retry does better by repairing the last answer (the canvas seeded with it, the cells that break a rule renoised)
than by sampling again from noise with a new seed (what `solve` does).

    python benchmarks/sudoku_tries.py --givens 23-36 --puzzles 200 --tries 4 --retry fresh,conflicts,peers

Each round solves the puzzles still unsolved, in batches of 100 (`sudoku.evaluate`, seed = the round's number), with
the givens pinned as `solve` pins them (--no-pin-givens: not). A round's draws are a batch's, not the seeds `solve`
gives one puzzle alone, so a puzzle's tries are other samples than `solve`'s; each try is still a fresh sample of
the same distribution. Validation puzzles by default (the held-out set with --heldout, for reporting).
Retries: fresh, a new sample from noise; conflicts, the last answer kept and the empty cells that repeat a digit
in their row, column or box renoised; peers, those cells and every empty cell sharing a row, column or box with
one of them renoised.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from dgemma.io import checkpoint
from dgemma.control.pins import Steering
from dgemma.runtime import tune_malloc
from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_cli import parse_givens, weights_sha256
from dgemma.tasks.sudoku_puzzles import CELLS, PEERS, is_solution

RETRIES = ("fresh", "conflicts", "peers")


def renoised_cells(retry: str, puzzle: list[int], grid: list[int]) -> set[int]:
    """The cells a repair renoises: the empty cells whose digit repeats in their row, column or box ("conflicts"),
    and with "peers" every empty cell that shares a row, column or box with one of them too."""
    bad = {i for i in range(CELLS) if not puzzle[i] and any(grid[j] == grid[i] for j in PEERS[i])}
    if retry == "peers":
        bad |= {j for i in bad for j in PEERS[i] if not puzzle[j]}
    return bad


def repair_steering(puzzle: list[int], grid: list[int], cells: set[int], vocab_size: int,
                    rng: random.Random, pin: bool) -> Steering:
    """The canvas seeded with `grid`, `cells` drawn uniformly from the vocabulary (renoised, as the sampler does),
    every other cell kept (strength 0); the givens pinned when `pin`."""
    seed = [rng.randrange(vocab_size) if i in cells else S.DIGIT0 + d for i, d in enumerate(grid)]
    steering = S.givens_steering(puzzle) if pin else Steering()
    steering.seed_tokens, steering.strength = seed, 0.0
    return steering


def solved_by_try(model, gen, puzzles, tries: int, retry: str, pin: bool) -> list[int]:
    """How many puzzles are solved within 1, 2, ..., `tries` tries."""
    open_ = list(puzzles)
    last: dict[tuple[int, ...], list[int]] = {}  # puzzle -> its last answer (81 digits)
    cumulative = []
    for round_ in range(tries):
        def steer(puzzle, solution, rng):
            grid = last.get(tuple(puzzle))
            if round_ and retry != "fresh" and grid is not None:
                return repair_steering(puzzle, grid, renoised_cells(retry, puzzle, grid), model.config.vocab_size,
                                       rng, pin)
            return S.givens_steering(puzzle) if pin else None

        failed = []

        def on_answer(puzzle, solution, grid, steps):
            if grid is None or not is_solution(puzzle, grid):
                failed.append((puzzle, solution))
                if grid is not None:
                    last[tuple(puzzle)] = grid

        S.evaluate(model, open_, gen, 100, round_, steer=steer, on_answer=on_answer)
        cumulative.append(len(puzzles) - len(failed))
        open_ = failed
        if not open_:
            cumulative += [len(puzzles)] * (tries - round_ - 1)
            break
    return cumulative


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(S.ASSET_DIR))
    ap.add_argument("--givens", type=parse_givens, default=(23, 36))
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--tries", type=int, default=4)
    ap.add_argument("--retry", default="fresh", help=f"comma-separated, of {', '.join(RETRIES)}")
    ap.add_argument("--heldout", action="store_true", help="the held-out set (default: validation puzzles)")
    ap.add_argument("--no-pin-givens", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    retries = args.retry.split(",")
    if any(r not in RETRIES for r in retries) or args.tries < 1:
        ap.error(f"--retry takes {', '.join(RETRIES)}; --tries must be >= 1")
    tune_malloc()
    torch.set_num_threads(args.threads)
    ck = checkpoint.load(args.model, quiet=True)
    puzzles = S.heldout_set(args.puzzles, args.givens, validation=not args.heldout)
    pin = not args.no_pin_givens
    print(f"{args.model} (model.safetensors sha256 {weights_sha256(args.model)}); {len(puzzles)} "
          f"{'held-out' if args.heldout else 'validation'} puzzles, {S.givens_label(args.givens)} givens"
          f"{', givens pinned' if pin else ''}")
    for retry in retries:
        t = time.perf_counter()
        solved = solved_by_try(ck.model, ck.generation, puzzles, args.tries, retry, pin)
        within = "  ".join(f"{n}: {s} ({100 * s / len(puzzles):.1f}%)" for n, s in enumerate(solved, 1))
        print(f"{retry:10s} solved within N tries  {within}  [{time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
