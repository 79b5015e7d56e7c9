"""The embedded Sudoku model with the canvas-steering primitives, on the seeded held-out set: plain solving, the
givens pinned, the last 27 digits of the solution pinned (suffix infilling), repair of a solution with N wrong
cells (seeded canvas), and the output constrained by a regex of 81 digits 1-9 and EOS.

    python benchmarks/sudoku_steering.py --puzzles 1000 [--givens 44] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time

import torch

from dgemma import checkpoint
from dgemma.control import Constraint, ConstraintVocabulary
from dgemma.control.pins import Steering
from dgemma.generate import generate
from dgemma.runtime import tune_malloc
from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_puzzles import is_solution
from dgemma.tokenizer import Tokenizer


def run(model, puzzles, gen, steer, batch_size=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    solved = steps = canvases = 0
    for i in range(0, len(puzzles), batch_size):
        chunk = puzzles[i:i + batch_size]
        steering = [steer(p, s, rng) for p, s in chunk]
        out = generate(model, [S.prompt_ids(p) for p, _ in chunk], gen, generator=g, steering=steering)
        for (p, _), ids, row_steps in zip(chunk, out.token_ids, out.steps_per_canvas):
            grid = S.decode_grid(ids)
            solved += grid is not None and is_solution(p, grid)
            steps += sum(row_steps)
            canvases += len(row_steps)
    return solved, steps / canvases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puzzles", type=int, default=1000)
    ap.add_argument("--givens", type=int, default=S.GIVENS)
    ap.add_argument("--wrong", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    ck = checkpoint.load(S.ASSET_DIR, quiet=True)
    sha = hashlib.sha256((S.ASSET_DIR / "model.safetensors").read_bytes()).hexdigest()[:16]
    puzzles = S.heldout_set(args.puzzles, args.givens)
    tok = Tokenizer.from_dir(S.ASSET_DIR)
    vocab = ConstraintVocabulary.from_tokenizer(tok.backend, [S.EOS], [S.PAD], ck.config.text.vocab_size)
    digits = Constraint.from_regex("[1-9]{81}", vocab)
    print(f"model sha256 {sha}..., {len(puzzles)} held-out puzzles with {args.givens} givens")
    cases = {
        "plain": lambda p, s, rng: None,
        "givens pinned": lambda p, s, rng: S.givens_steering(p),
        "last 27 digits pinned (suffix)": lambda p, s, rng: Steering(
            pinned={i: S.DIGIT0 + s[i] for i in range(54, 81)}),
        f"repair {args.wrong} wrong, strength 0.2": lambda p, s, rng: S.repair_steering(S.corrupt(s, args.wrong, rng),
                                                                                        0.2),
        "regex [1-9]{81}": lambda p, s, rng: Steering(constraint=digits),
    }
    for label, steer in cases.items():
        t = time.perf_counter()
        solved, steps = run(ck.model, puzzles, ck.generation, steer)
        print(f"{label:34s} solved {solved}/{len(puzzles)} ({100 * solved / len(puzzles):.1f}%)  "
              f"mean steps {steps:.2f}  [{time.perf_counter() - t:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
