"""`dgemma sudoku train | eval | solve`: train the Sudoku model, measure it, use it.

Also runnable without the main CLI: python -m dgemma.tasks.sudoku_cli <command> ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from ..cli_common import CLIError, add_threads_arg, apply_threads, generation_config, load_checkpoint, notice
from ..package_data import SUDOKU_MODEL_DIR as ASSET_DIR

# sudoku.py's constants, without its imports (torch, the generator) to build a parser; tests/test_cli.py checks
# that they agree
GIVENS, TRAIN_GIVENS, HELDOUT_SIZE, HARD_MAX_GIVENS = 44, (30, 50), 1000, 25
REACHABLE_GIVENS = 22  # sudoku_puzzles.REACHABLE_GIVENS: fewer takes the generator minutes a puzzle
EVAL_PUZZLES = 200  # about a minute on a 2-core CPU; --full runs all HELDOUT_SIZE
GOAL_STEPS = 12  # the goal's step budget (95% at 23-36 givens in <= 12 mean steps): the rate when no canvas takes more
UNTRAINED_PUZZLES = 20  # an untrained model never converges, so each of its canvases costs the whole step cap


def add_sudoku_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sudoku", help="train, evaluate or run the Sudoku model",
                              description="Sudoku with a small block-diffusion model: one canvas holds the solution.")
    from .sudoku_train_cli import add_train_parser  # it imports this module: not at the top

    sub = p.add_subparsers(dest="sudoku_command", required=True)
    add_train_parser(sub)
    _add_eval_parser(sub)
    x = sub.add_parser("ship", help="copy a run's model into the package as the default Sudoku model")
    x.add_argument("--run", default="runs/sudoku", help="run directory (its model/ is exported at every eval)")
    x.add_argument("--out", default=str(ASSET_DIR), help="directory to write")
    x.set_defaults(func=cmd_ship)
    _add_solve_parser(sub)
    return p


def _add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="solve rate and denoising steps on the held-out puzzles")
    e.add_argument("--model", default=None, help=f"checkpoint directory (default: the shipped {ASSET_DIR})")
    e.add_argument("--puzzles", type=int, default=EVAL_PUZZLES,
                   help=f"how many held-out puzzles, the first of the fixed set (max {HELDOUT_SIZE})")
    e.add_argument("--full", action="store_true",
                   help=f"the whole held-out set ({HELDOUT_SIZE} puzzles, and the untrained baseline on all of them)")
    e.add_argument("--givens", type=parse_givens, default=GIVENS, metavar="N|LO-HI",
                   help="givens per puzzle (difficulty), or a range each puzzle draws from (23-36: 45-58 empty cells)")
    e.add_argument("--hard", action="store_true",
                   help=f"instead of --givens, the hard set: minimal puzzles (no given can be removed) with at most "
                        f"{HARD_MAX_GIVENS} givens (21-{HARD_MAX_GIVENS} as the generator makes them)")
    e.add_argument("--batch-size", type=int, default=50, help="puzzles solved together")
    e.add_argument("--no-untrained", action="store_true",
                   help=f"skip the untrained-model baseline (it runs every step cap on the first {UNTRAINED_PUZZLES} "
                        f"puzzles, all of them with --full)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--pin-givens", action="store_true", help="also evaluate with the givens pinned into the canvas")
    e.add_argument("--repair-wrong", type=int, default=None, metavar="N",
                   help="also evaluate repair: each canvas seeded with its solution with N cells wrong")
    e.add_argument("--strength", type=float, default=0.2, help="renoise strength of the repair seed, in [0, 1]")
    add_threads_arg(e)
    e.set_defaults(func=cmd_eval)


def _add_solve_parser(sub) -> None:
    s = sub.add_parser("solve", help="solve one puzzle (81 digits, 0 or . for blanks, or a 9-line grid)",
                       description="The puzzle: 81 characters (digits, 0 or . for blanks) or a grid over 9 lines with "
                                   "spaces, | and -/+ separator lines, as an argument or on stdin.")
    s.add_argument("puzzle", nargs="?", default=None,
                   help="the puzzle; '-' or nothing reads it from stdin (when stdin is not a terminal)")
    s.add_argument("--tries", type=int, default=4,
                   help="sample again with the next seed until the checker accepts the grid, at most this many times "
                        "(default: 4; README, \"The embedded Sudoku model\", says what tries buy)")
    s.add_argument("--model", default=None, help="checkpoint directory (default: the shipped model)")
    s.add_argument("--steps", type=int, default=None, help="max denoising steps (default: the model's)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (try N uses seed + N - 1)")
    s.add_argument("--no-pin-givens", action="store_true",
                   help="let the model rewrite the givens (by default they are pinned into the canvas)")
    s.add_argument("--repair", metavar="GRID", default=None,
                   help="a full grid, partly wrong, to start the canvas from: the model fixes it")
    s.add_argument("--strength", type=float, default=0.2, help="renoise strength of --repair, in [0, 1]")
    add_threads_arg(s)
    s.set_defaults(func=cmd_solve)


def load_sudoku_model(path: str | None):
    path = Path(path) if path else ASSET_DIR
    if not (path / "config.json").is_file():
        raise CLIError(f"{path}: no Sudoku model there (config.json missing); train one with `dgemma sudoku train`")
    return load_checkpoint(path, quiet=True)


def weights_sha256(model_dir: str | Path) -> str:
    """The sha256 of a model directory's model.safetensors (hex), read in 1 MiB blocks: what an eval or a benchmark
    prints so that a figure names exactly the file it measured."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(path: str | None) -> str:
    """The model directory and its weights' sha256, so an eval names exactly the file it measured."""
    path = Path(path) if path else ASSET_DIR
    return f"{path} (model.safetensors sha256 {weights_sha256(path)})"


def _eval_line(label: str, score, seconds: float) -> str:
    return (f"{label:<28} solved {score.solved}/{score.total} ({100 * score.solve_rate:.1f}%)  "
            f"mean denoising steps per canvas {score.mean_steps:.2f}  [{seconds:.0f}s]")


def parse_givens(text: str) -> int | tuple[int, int]:
    """--givens: N or LO-HI, each in [REACHABLE_GIVENS, 81]."""
    lo, _, hi = text.partition("-")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if not (REACHABLE_GIVENS <= bounds[0] <= bounds[1] <= 81):
        raise argparse.ArgumentTypeError(
            f"givens must be in [{REACHABLE_GIVENS}, 81] with LO <= HI (below {REACHABLE_GIVENS} the puzzle generator "
            f"takes minutes a puzzle; `sudoku eval --hard` has minimal puzzles), got {text!r}")
    return bounds[0] if not hi else bounds


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from ..presets import random_model
    from . import sudoku as S

    apply_threads(args.threads)
    n = HELDOUT_SIZE if args.full else args.puzzles
    if not 1 <= n <= HELDOUT_SIZE:
        raise CLIError(f"--puzzles must be in [1, {HELDOUT_SIZE}], got {args.puzzles}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.hard and args.givens != GIVENS:
        raise CLIError("--hard is its own set of puzzles; leave out --givens")
    ckpt = load_sudoku_model(args.model)
    print(f"model: {_fingerprint(args.model)}")
    which = ("the full set" if n == HELDOUT_SIZE else
             f"the first {n} of the {HELDOUT_SIZE}; --full runs all" if n < HELDOUT_SIZE else "")
    if args.hard:
        puzzles = S.hard_set(n)
        counts = Counter(81 - p.count(0) for p, _ in puzzles)
        print(f"hard set: {len(puzzles)} puzzles ({which}), minimal (no given can be removed), at most "
              f"{S.HARD_MAX_GIVENS} givens: " + ", ".join(f"{g} givens x{k}" for g, k in sorted(counts.items()))
              + f"; unique solutions, seed {S.hard_seed()}; one try per puzzle")
    else:
        puzzles = S.heldout_set(n, args.givens)
        lo, hi = (args.givens, args.givens) if isinstance(args.givens, int) else args.givens
        count = (f"{lo} givens ({81 - lo} empty cells)" if lo == hi else
                 f"{lo}-{hi} givens ({81 - hi}-{81 - lo} empty cells)")
        print(f"held-out set: {len(puzzles)} puzzles ({which}) with {count}, unique solutions, seed "
              f"{S.heldout_seed(args.givens)}; one try per puzzle")
    gen = ckpt.generation
    runs = [("default sampler", ckpt.model, gen, puzzles),
            (f"{GOAL_STEPS}-step cap", ckpt.model, gen.replace(max_denoising_steps=GOAL_STEPS), puzzles),
            ("1 step", ckpt.model, gen.replace(max_denoising_steps=1), puzzles)]
    if not args.no_untrained:
        few = puzzles if args.full else puzzles[:UNTRAINED_PUZZLES]
        label = "untrained model" if len(few) == len(puzzles) else f"untrained model, first {len(few)}"
        runs.append((label, random_model(ckpt.config, seed=args.seed), gen, few))
    runs = [(label, model, g, chunk, {}) for label, model, g, chunk in runs]
    if args.pin_givens:
        runs.insert(1, ("givens pinned", ckpt.model, gen, puzzles, {"steer": S.pin_givens}))
    if args.repair_wrong is not None:
        if not 0 <= args.repair_wrong <= 81 or not 0 <= args.strength <= 1:
            raise CLIError("--repair-wrong must be in [0, 81] and --strength in [0, 1]")
        runs.insert(1, (f"repair {args.repair_wrong} wrong, strength {args.strength}", ckpt.model, gen, puzzles,
                        {"steer": S.repair(args.repair_wrong, args.strength)}))
    keys = [(id(model), repr(g), len(chunk), repr(kw)) for _, model, g, chunk, kw in runs]
    todo = sum(len(runs[keys.index(k)][3]) for k in dict.fromkeys(keys))  # a run the same as another runs once
    done: dict = {}
    with tqdm(total=todo, unit="puzzle", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        for (label, model, g, chunk, kw), key in zip(runs, keys):
            t0 = time.perf_counter()
            if key not in done:
                bar.set_description(label)
                done[key] = S.evaluate(model, chunk, g, args.batch_size, args.seed, on_batch=bar.update, **kw)
            bar.write(_eval_line(f"{label} (cap {g.max_denoising_steps})", done[key], time.perf_counter() - t0),
                      file=sys.stdout)
    return 0


def cmd_ship(args) -> int:
    """Re-save the run's model with the Sudoku sampler defaults and the tokenizer, in fp32 (about 12 MB)."""
    from ..io.checkpoint import save
    from . import sudoku as S

    ckpt = load_sudoku_model(str(Path(args.run) / "model"))
    tok_dir = Path(args.run) / "tokenizer"
    S.write_tokenizer(tok_dir)
    out = save(args.out, ckpt.model, ckpt.config, S.sudoku_generation(), tokenizer_dir=tok_dir)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"shipped {out} ({size:.1f} MB)")
    return 0


def _checked_puzzle(args) -> list[int]:
    """`solve`'s puzzle (the argument, or stdin for '-' or none when stdin is not a terminal), parsed and checked in
    pure Python; too few givens for a single solution is a warning."""
    from .sudoku_puzzles import MIN_UNIQUE_GIVENS, parse_grid, puzzle_problem

    if args.tries < 1:
        raise CLIError(f"--tries must be >= 1, got {args.tries}")
    if args.puzzle is None and sys.stdin.isatty():
        raise CLIError("give the puzzle as an argument (81 characters, 0 or . for blanks), or pipe it in")
    try:
        puzzle = parse_grid(args.puzzle if args.puzzle not in (None, "-") else sys.stdin.read())
    except ValueError as e:
        raise CLIError(str(e)) from None
    if problem := puzzle_problem(puzzle):
        raise CLIError(f"this puzzle has no solution: {problem}")
    from ..config import GenerationConfig

    generation_config(args, GenerationConfig(), flags={"max_denoising_steps": "--steps"})  # a bad --steps first
    if (givens := sum(1 for d in puzzle if d)) < MIN_UNIQUE_GIVENS:
        notice("sudoku solve", f"warning: {givens} givens; a Sudoku needs at least {MIN_UNIQUE_GIVENS} for a single "
                               f"solution, so any grid that fits them counts as solved")
    return puzzle


def cmd_solve(args) -> int:
    puzzle = _checked_puzzle(args)  # before torch loads: a typo is reported at once
    import torch

    from ..control.steering import SteeringSpec, build_steering
    from ..generate import generate
    from . import sudoku as S
    from .sudoku_puzzles import format_grid, is_solution, parse_grid, pretty

    apply_threads(args.threads)
    pins = None if args.no_pin_givens else tuple(S.givens_steering(puzzle).pinned.items())
    seed = strength = None
    if args.repair is not None:
        try:
            seed_grid = parse_grid(args.repair)
        except ValueError as e:
            raise CLIError(f"--repair: {e}") from None
        if 0 in seed_grid:
            raise CLIError("--repair needs a full grid (81 digits 1-9, no blanks)")
        if not 0 <= args.strength <= 1:
            raise CLIError(f"--strength must be in [0, 1], got {args.strength}")
        repair = S.repair_steering(seed_grid, args.strength)
        seed, strength = tuple(repair.seed_tokens), repair.strength
    # token ids only, no text: no tokenizer, constraint vocabulary or EOS needed
    steering = build_steering(SteeringSpec(pinned=pins, seed_tokens=seed, strength=strength), None, None, None)
    ckpt = load_sudoku_model(args.model)
    gen = generation_config(args, ckpt.generation, flags={"max_denoising_steps": "--steps"})
    # Each try is a fresh sample (seed, seed + 1, ...); the checker, not the model, decides when to stop.
    for attempt in range(1, args.tries + 1):
        seed = args.seed + attempt - 1
        out = generate(ckpt.model, [S.prompt_ids(puzzle)], gen, generator=torch.Generator().manual_seed(seed),
                       steering=[steering])
        grid = S.decode_grid(out.token_ids[0])
        steps = out.steps_per_canvas[0][0] if out.steps_per_canvas[0] else 0
        ok = grid is not None and is_solution(puzzle, grid)
        if ok:
            break
    tries = f"try {attempt} of {args.tries}, seed {seed}" if args.tries > 1 else f"seed {seed}"
    if grid is None:
        print(f"the model did not produce 81 digits ({steps} denoising steps; {tries})")
        return 1
    print(pretty(grid))
    print(format_grid(grid))
    print(f"{'valid solution' if ok else 'NOT a valid solution'} after {steps} denoising steps ({tries})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["sudoku", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
