"""Batched generation when rows stop at different steps: the embedded Sudoku model on held-out puzzles, with the
rows that have stopped skipped (the default) and computed (as before). Both give the same results.

    python benchmarks/skip_stopped_rows.py --puzzles 200 --batch-size 100
"""

from __future__ import annotations

import argparse
import time

import torch

from dgemma import checkpoint
from dgemma.denoiser import CanvasDenoiser
from dgemma.runtime import tune_malloc
from dgemma.tasks import sudoku as S


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--puzzles", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tune_malloc()  # as the CLI does
    torch.set_num_threads(args.threads)
    ck = checkpoint.load(S.ASSET_DIR, quiet=True)
    puzzles = S.heldout_set(args.puzzles)
    for _ in range(args.repeats):
        for skip in (True, False):
            CanvasDenoiser.skip_stopped_rows = skip
            t = time.perf_counter()
            score = S.evaluate(ck.model, puzzles, ck.generation, args.batch_size, 0)
            print(f"stopped rows {'skipped ' if skip else 'computed'}: {time.perf_counter() - t:6.2f} s, solved "
                  f"{score.solved}/{score.total}, mean denoising steps per canvas {score.mean_steps:.2f}", flush=True)


if __name__ == "__main__":
    main()
