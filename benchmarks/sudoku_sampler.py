"""Sampler settings for a Sudoku model, on the validation puzzles (never the held-out set the README reports):
solve rate and mean denoising steps per setting, to choose the generation_config.json a model ships with.

    python benchmarks/sudoku_sampler.py --model runs/sudoku-hard/model --givens 23-36 --puzzles 200 \\
        --set entropy_bound=0.1,0.3,1.0 --set t_max=0.8,0.5 [--set t_min=...] [--pin-givens] [--threads 2]

Every combination of the --set values is run (a grid), each on the same puzzles with the same seed; the first line
is the model's own generation_config.json. --pin-givens pins each puzzle's givens, as `sudoku solve` does.
"""

from __future__ import annotations

import argparse
import itertools
import time
import torch

from dgemma import checkpoint
from dgemma.config import ConfigError
from dgemma.runtime import tune_malloc
from dgemma.tasks import sudoku as S
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
        score = S.evaluate(ck.model, puzzles, gen, 50, 0, steer=S.pin_givens if args.pin_givens else None)
        print(f"{label:60s} solved {score.solved}/{score.total} ({100 * score.solve_rate:.1f}%)  "
              f"mean steps {score.mean_steps:.2f}  [{time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
