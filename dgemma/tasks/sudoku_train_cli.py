"""`dgemma sudoku train`: train a Sudoku model, from scratch or from another, by hand or by a named recipe.

A recipe (`--recipe gpu`) is a set of option values: an option given on the command line wins over the recipe, the
recipe over the defaults. `--dry-run` runs the same code at tiny scale on the CPU (a few steps of a tiny model, two
validation puzzles), so a recipe is known to work before the machine it is sized for is at hand. `--time-limit`
bounds the whole command's wall-clock time: training stops early, then the model is evaluated and exported as at
the last step. Every run writes <out>/result.json: the steps taken, puzzle presentations, seconds, and the last
validation figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..cli_common import CLIError, add_threads_arg, apply_threads
from ..train.train_cli import add_distributed_args, add_refinement_args
from .sudoku_cli import GIVENS, REACHABLE_GIVENS, TRAIN_GIVENS, load_sudoku_model, parse_givens

FIXED_GIVENS = ("pin", "clean", "unscored")  # objective.FIXED_POSITIONS, without torch to build a parser

# The defaults: the 6-layer, hidden-192 shape the shipped model has, trained on a CPU.
DEFAULTS = dict(steps=6000, batch_size=32, lr=1e-3, warmup_steps=200, weight_decay=1e-2, hidden_size=192, layers=6,
                min_givens=TRAIN_GIVENS[0], max_givens=TRAIN_GIVENS[1], pin_givens=0.0, fixed_givens="pin",
                self_cond_passes=1, sampled_canvas=0.0, eval_every=500, eval_puzzles=100, eval_givens=str(GIVENS),
                save_every=100, time_limit=None, tf32=False)

# gpu: the deeper model TRAINING.md proposes (12 layers, hidden 256), from scratch, within 8 minutes on one H100.
# Sized from a CPU measurement and a FLOP count, not yet run on a GPU (TRAINING.md, "A recipe for one GPU").
RECIPES = {
    "gpu": dict(steps=2000, batch_size=512, lr=1e-3, warmup_steps=100, weight_decay=1e-2, hidden_size=256, layers=12,
                min_givens=23, max_givens=45, pin_givens=1.0, fixed_givens="pin", self_cond_passes=3,
                eval_every=500, eval_puzzles=200, eval_givens="44,23-36", save_every=250, time_limit=7.5, tf32=True),
}

# --dry-run: tiny scale on the CPU, whatever the recipe
DRY_RUN = dict(steps=3, batch_size=4, warmup_steps=1, hidden_size=48, layers=2, eval_every=2, eval_puzzles=2,
               save_every=2, device="cpu", tf32=False)


def add_train_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="train a Sudoku model, from scratch or from another (resumable)",
                       description="Train a Sudoku model. An option given here wins over --recipe, which wins over the "
                                   "defaults shown.")
    t.add_argument("--out", default="runs/sudoku", help="run directory (checkpoint, metrics, loss.png, model/)")
    t.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a named set of option values: gpu trains the 12-layer, hidden-256 model from scratch on one "
                        "GPU within 8 minutes (TRAINING.md, Sudoku)")
    t.add_argument("--dry-run", action="store_true",
                   help="the same run at tiny scale on the CPU: 3 steps of a 2-layer model, 2 validation puzzles")
    t.add_argument("--time-limit", type=float, metavar="MIN",
                   help="stop training when the command has run this many minutes, less the last eval's time, then "
                        "evaluate and export the model")
    _option(t, "--steps", int, "optimizer steps")
    _option(t, "--batch-size", int, "puzzles per step")
    _option(t, "--lr", float, "peak learning rate")
    _option(t, "--warmup-steps", int, "linear warm-up of the learning rate")
    _option(t, "--weight-decay", float, "AdamW weight decay")
    _option(t, "--hidden-size", int, "model width")
    _option(t, "--layers", int, "model depth")
    _option(t, "--min-givens", int, "fewest givens in a training puzzle")
    _option(t, "--max-givens", int, "most givens in a training puzzle")
    _option(t, "--pin-givens", float, "probability that a training puzzle's givens are fixed in its canvas, as "
            "`sudoku solve` pins them; above 0 the periodic evals also run pinned", metavar="P")
    t.add_argument("--fixed-givens", choices=FIXED_GIVENS, default=None,
                   help="what fixing a puzzle's givens (--pin-givens) means: pin: never noised and not scored; "
                        "clean: never noised, scored; unscored: noised, not scored (the loss on the empty cells "
                        f"only) (default: {DEFAULTS['fixed_givens']})")
    add_refinement_args(t)
    t.set_defaults(self_cond_passes=None, sampled_canvas=None)  # None: the recipe's or DEFAULTS'
    _option(t, "--eval-every", int, "steps between validation evaluations")
    _option(t, "--eval-puzzles", int, "validation puzzles per periodic eval")
    _option(t, "--eval-givens", str, "comma-separated difficulties to eval on (givens per puzzle, or a range), on "
            "validation puzzles: seeded like the held-out sets, but other puzzles", metavar="N|LO-HI,...")
    _option(t, "--save-every", int, "steps between resumable checkpoints")
    t.add_argument("--tf32", action="store_const", const=True, default=None,
                   help="let CUDA matrix products use TF32 (torch.set_float32_matmul_precision('high'))")
    t.add_argument("--seed", type=int, default=0, help="seed for initialisation and the puzzle stream")
    t.add_argument("--init", metavar="MODEL", default=None,
                   help="start from this Sudoku model's weights (e.g. dgemma/assets/sudoku) instead of random ones; "
                        "its shape is used, so --hidden-size must match it; a larger --layers inserts sliding layers "
                        "that start silent (copies with zeroed output norms), so the deeper model computes what it did")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_threads_arg(t)
    add_distributed_args(t)
    t.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.safetensors")
    t.set_defaults(func=cmd_train, interrupt_hint="resume with --resume")
    return t


def _option(p: argparse.ArgumentParser, flag: str, kind, text: str, metavar: str | None = None) -> None:
    """An option whose default comes from --recipe or DEFAULTS (None here: not given)."""
    default = DEFAULTS[flag[2:].replace("-", "_")]
    p.add_argument(flag, type=kind, default=None, metavar=metavar, help=f"{text} (default: {default})")


def resolve(args) -> argparse.Namespace:
    """`args` with every option not given filled in: from --dry-run's tiny scale, the recipe, then DEFAULTS (so
    `--dry-run --steps 5` runs 5 tiny steps)."""
    filled = dict(vars(args))
    layers = [DRY_RUN if args.dry_run else {}, RECIPES[args.recipe] if args.recipe else {}, DEFAULTS]
    for key in DEFAULTS.keys() | DRY_RUN.keys():
        if filled.get(key) is None:
            filled[key] = next((layer[key] for layer in layers if key in layer), None)
    return argparse.Namespace(**filled)


def _check(args) -> list:
    """The flag checks that need no torch. -> the eval difficulties."""
    from ..train.trainer import CHECKPOINT

    if not REACHABLE_GIVENS <= args.min_givens <= args.max_givens <= 80:
        raise CLIError(f"need {REACHABLE_GIVENS} <= --min-givens <= --max-givens <= 80 (below {REACHABLE_GIVENS} "
                       f"givens the puzzle generator takes minutes a puzzle)")
    try:
        eval_givens = [parse_givens(g.strip()) for g in args.eval_givens.split(",") if g.strip()]
    except argparse.ArgumentTypeError as e:
        raise CLIError(f"--eval-givens: {e}") from None
    if not 0.0 <= args.pin_givens <= 1.0:
        raise CLIError(f"--pin-givens is a probability in [0, 1], got {args.pin_givens}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise CLIError(f"--time-limit is in minutes, > 0, got {args.time_limit}")
    if args.init is not None and args.resume:
        raise CLIError("--init starts a new run from a model; --resume continues a run from its checkpoint: not both")
    out = Path(args.out)
    if (out / CHECKPOINT).exists() and not args.resume:
        raise CLIError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not (out / CHECKPOINT).exists():
        raise CLIError(f"{out / CHECKPOINT} not found; nothing to resume")
    return eval_givens


def _start_model(args, config, device: str):
    """The model to train: `--init`'s weights (grown to the vocabulary and depth asked for) or random ones."""
    from ..model import DiffusionGemma
    from ..presets import init_weights
    from . import sudoku as S

    if args.init is None:
        return init_weights(DiffusionGemma(config.text, config.canvas_length), seed=args.seed).to(device)
    start = load_sudoku_model(args.init)
    text = start.config.text
    shape = (text.hidden_size, text.num_hidden_layers)
    # a model with fewer layers than --layers asks is grown (grow_depth computes the same function)
    deeper = args.layers > text.num_hidden_layers
    same_depth = S.sudoku_config(args.hidden_size, text.num_hidden_layers) if deeper else config
    as_asked = dataclasses.replace(text, vocab_size=config.text.vocab_size)
    if (as_asked.to_hf(), start.config.canvas_length) != (same_depth.text.to_hf(), config.canvas_length):
        raise CLIError(f"--init {args.init}: its shape (hidden size {shape[0]}, {shape[1]} layers) is not the one "
                       f"asked for (--hidden-size {args.hidden_size} --layers {args.layers})")
    if text.vocab_size > config.text.vocab_size:
        raise CLIError(f"--init {args.init}: its vocabulary ({text.vocab_size} tokens) is larger than a Sudoku "
                       f"model's ({config.text.vocab_size})")
    # a model from before the vocabulary was padded (sudoku.VOCAB_SIZE) gets the unused tokens
    model = S.grow_vocabulary(start.model, same_depth, args.seed) if text.vocab_size < config.text.vocab_size \
        else start.model.float()
    return (S.grow_depth(model, config) if deeper else model).to(device)


class _Validation:
    """The periodic eval on the validation puzzles: solve rates and mean steps (plain, and pinned when training pins
    givens), and the share of empty cells one step gets right; remembers the last figures and the eval's time."""

    def __init__(self, args, eval_givens: list):
        self.args, self.eval_givens = args, eval_givens
        self.sets: dict = {}
        self.last: dict = {}
        self.seconds = 0.0

    def __call__(self, model) -> dict:
        from . import sudoku as S

        t0, gen, metrics = time.perf_counter(), S.sudoku_generation(), {}
        if not self.sets:  # built on first use: only rank 0 evaluates
            self.sets = {S.givens_label(g): S.heldout_set(self.args.eval_puzzles, g, validation=True)
                         for g in self.eval_givens}
        pinned = [("_pinned", S.pin_givens)] if self.args.pin_givens > 0 else []
        for g, puzzles in self.sets.items():
            for suffix, steer in [("", None)] + pinned:
                score = S.evaluate(model, puzzles, gen, steer=steer)
                metrics[f"solve_rate_{g}{suffix}"] = round(score.solve_rate, 4)
                metrics[f"steps_{g}{suffix}"] = round(score.mean_steps, 2)
            metrics[f"cells_1step_{g}"] = round(S.one_step_cells(model, puzzles), 4)
        self.last, self.seconds = metrics, time.perf_counter() - t0
        return metrics


def cmd_train(args) -> int:
    import torch

    from ..train.objective import LossConfig
    from ..train.train_cli import record_run, start_distributed
    from ..train.trainer import TrainConfig, Trainer
    from . import sudoku as S

    started = time.perf_counter()
    args = resolve(args)
    apply_threads(args.threads)
    eval_givens = _check(args)
    out = Path(args.out)
    dist, device = start_distributed(args, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    config = S.sudoku_config(args.hidden_size, args.layers)
    model = _start_model(args, config, device)
    # The encoder loss adds a second full pass over the solution and nothing the decoder needs: w_enc = 0.
    try:
        loss = LossConfig(w_enc=0.0, self_cond_passes=args.self_cond_passes, sampled_canvas=args.sampled_canvas,
                          fixed_positions=args.fixed_givens)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                          weight_decay=args.weight_decay, eval_every=args.eval_every, save_every=args.save_every,
                          seed=args.seed, loss=loss)
    except ValueError as e:  # the configs' own checks name the field
        raise CLIError(str(e)) from None
    # Every rank draws the same stream (distributed.py, step 1); only rank 0 evaluates, so only it builds the sets.
    data = S.SudokuStream(seed=args.seed + 1, givens=(args.min_givens, args.max_givens), pin_givens=args.pin_givens)
    validation = _Validation(args, eval_givens)
    trainer = Trainer(model, config, S.sudoku_generation(), cfg, data, out, validation, tokenizer_dir=out / "tokenizer",
                      export_on_eval=True, dist=dist)  # first: it refuses an --out holding files dgemma did not write
    if dist.is_main:
        S.write_tokenizer(trainer.run_dir.claim("tokenizer"))
    if args.resume:
        trainer.load()
        if dist.is_main:
            print(f"resumed {out} at step {trainer.step}", file=sys.stderr)
    record_run(trainer.run_dir, args, trainer.step, dist)
    first = trainer.step
    stopped = _train_within(trainer, validation, started, args.time_limit)
    # the last eval is the run's figure: train() ran one at its last step; a stopped run, or one resumed at its last
    # step (train() then runs nothing), needs its own, on every rank (FSDP gathers the model for it)
    if stopped or trainer.step == first:
        trainer.run_eval()
    trainer.export()
    if dist.is_main:
        _write_result(out, args, trainer, validation, first, time.perf_counter() - started, stopped, device)
    return 0


def _train_within(trainer, validation: _Validation, started: float, minutes: float | None) -> bool:
    """Train to the last step, or, with a time limit, in chunks of save_every steps until the next chunk would end
    past the limit less the last eval's time. -> whether the limit stopped it early."""
    if minutes is None:
        trainer.train()
        return False
    from ..train.distributed import broadcast_object

    budget, chunk = 60.0 * minutes, trainer.cfg.save_every
    while trainer.step < trainer.cfg.steps:
        t0 = time.perf_counter()
        trainer.train(stop_after=chunk)
        per_chunk = time.perf_counter() - t0
        # rank 0's clock decides for every rank: ranks that disagreed would wait on each other's collectives
        if broadcast_object(time.perf_counter() - started + per_chunk + validation.seconds > budget, trainer.dist):
            break
    return trainer.step < trainer.cfg.steps


def _write_result(out: Path, args, trainer, validation: _Validation, first: int, seconds: float, stopped: bool,
                  device: str) -> None:
    from .sudoku_cli import weights_sha256

    steps = trainer.step - first
    result = {"recipe": args.recipe, "dry_run": args.dry_run, "device": device, "seconds": round(seconds, 1),
              "steps": trainer.step, "steps_this_invocation": steps, "planned_steps": trainer.cfg.steps,
              "stopped_by_time_limit": stopped, "presentations": steps * trainer.cfg.batch_size,
              "validation": validation.last, "model": str(out / "model"),
              "model_sha256": weights_sha256(out / "model")}
    trainer.run_dir.claim("result.json").write_text(json.dumps(result, indent=2) + "\n")
    figures = " ".join(f"{k}={v}" for k, v in validation.last.items())
    print(f"model written to {out / 'model'}: {trainer.step} steps in {seconds:.0f} s"
          + (" (stopped by --time-limit)" if stopped else "") + f"; validation {figures}")
