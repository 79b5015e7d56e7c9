"""The embedded Sudoku model with the canvas-steering primitives, on the seeded held-out set: plain solving, the
givens pinned, the last 27 digits of the solution pinned (suffix infilling), repair of a solution with N wrong
cells (seeded canvas), the output constrained by a regex of 81 digits 1-9 and EOS, and that regex with the
givens pinned.

    python benchmarks/sudoku_steering.py --puzzles 1000 [--givens 44] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from dgemma.io import checkpoint
from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.pins import Steering
from dgemma.runtime import tune_malloc
from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_cli import weights_sha256
from dgemma.text.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puzzles", type=int, default=1000)
    ap.add_argument("--givens", type=int, default=S.GIVENS)
    ap.add_argument("--wrong", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--case", action="append",
                    choices=["plain", "givens", "suffix", "repair", "regex", "regex-givens"],
                    help="run only these cases (repeatable; default: all)")
    args = ap.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    ck = checkpoint.load(S.ASSET_DIR, quiet=True)
    sha = weights_sha256(S.ASSET_DIR)[:16]
    puzzles = S.heldout_set(args.puzzles, args.givens)
    tok = Tokenizer.from_dir(S.ASSET_DIR)
    vocab = ConstraintVocabulary.from_tokenizer(tok.backend, [S.EOS], [S.PAD], ck.config.text.vocab_size)
    digits = Constraint.from_regex("[1-9]{81}", vocab)
    print(f"model sha256 {sha}..., {len(puzzles)} held-out puzzles with {args.givens} givens")
    cases = {
        "plain": None,
        "givens pinned": S.pin_givens,
        "last 27 digits pinned (suffix)": lambda p, s, rng: Steering(
            pinned={i: S.DIGIT0 + s[i] for i in range(54, 81)}),
        f"repair {args.wrong} wrong, strength 0.2": S.repair(args.wrong, 0.2),
        "regex [1-9]{81}": lambda p, s, rng: Steering(constraint=digits),
        "regex [1-9]{81}, givens pinned": lambda p, s, rng: Steering(pinned=S.givens_steering(p).pinned,
                                                                      constraint=digits),
    }
    keys = ["plain", "givens", "suffix", "repair", "regex", "regex-givens"]
    for key, (label, steer) in zip(keys, cases.items()):
        if args.case and key not in args.case:
            continue
        t = time.perf_counter()
        score = S.evaluate(ck.model, puzzles, ck.generation, 100, 0, steer=steer)
        print(f"{label:34s} solved {score.solved}/{score.total} ({100 * score.solve_rate:.1f}%)  "
              f"mean steps {score.mean_steps:.2f}  [{time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
