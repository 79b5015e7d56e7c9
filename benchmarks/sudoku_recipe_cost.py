"""What one training step of a Sudoku recipe costs: matrix-product FLOPs per puzzle (counted by torch's
FlopCounterMode over the loss's forward and backward), seconds per step measured here, and the recipe's projected
time on a device that sustains a given rate. This is how `sudoku train --recipe gpu` was sized without a GPU.

    python benchmarks/sudoku_recipe_cost.py --recipe gpu --batch-size 8 --steps 3 --threads 2 --assume-tflops 40

The step's decoder passes vary (1 to --self-cond-passes no-gradient passes, one draw a step): the count is for one
pass and for the whole step at the mean number of passes.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dgemma.model import DiffusionGemma
from dgemma.presets import init_weights
from dgemma.tasks import sudoku as S
from dgemma.tasks.sudoku_train_cli import DEFAULTS, RECIPES
from dgemma.train.batch import collate
from dgemma.train.objective import LossConfig, block_diffusion_loss, decoder_pass, encoder_pass


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="puzzles per measured step here (FLOPs scale with it)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--assume-tflops", type=float, default=40.0,
                    help="the sustained rate assumed for the target device, TFLOP/s")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = {**DEFAULTS, **(RECIPES[args.recipe] if args.recipe else {})}
    config = S.sudoku_config(r["hidden_size"], r["layers"])
    model = init_weights(DiffusionGemma(config.text, config.canvas_length), seed=0)
    data = S.SudokuStream(seed=1, givens=(r["min_givens"], r["max_givens"]), pin_givens=r["pin_givens"], pool_size=64)
    batch = collate(data.next_batch(args.batch_size), config.canvas_length, S.EOS, S.PAD)
    one = LossConfig(w_enc=0.0, self_cond_passes=1, fixed_positions=r["fixed_givens"])
    step_1 = _flops(lambda: block_diffusion_loss(model, batch, one, torch.Generator().manual_seed(0)).loss.backward())
    with torch.no_grad():
        _, kv = encoder_pass(model, batch.tokens[:, :82])
        canvas = batch.tokens[:, 82:82 + config.canvas_length]
        per_pass = _flops(lambda: decoder_pass(model, kv, canvas, batch.prompt_lengths, None))
    mean_passes = (r["self_cond_passes"] + 1) / 2
    per_step = step_1 + (mean_passes - 1) * per_pass
    per_puzzle = per_step / args.batch_size
    params = sum(p.numel() for p in model.parameters())
    print(f"recipe {args.recipe or 'default'}: {r['layers']} layers x {r['hidden_size']}, {params / 1e6:.2f}M "
          f"parameters; self-conditioning passes 1-{r['self_cond_passes']} (mean {mean_passes})")
    print(f"FLOPs per puzzle presentation: {per_puzzle / 1e9:.3f} GFLOP (one extra decoder pass: "
          f"{per_pass / args.batch_size / 1e9:.3f})")
    loss = LossConfig(w_enc=0.0, self_cond_passes=r["self_cond_passes"], fixed_positions=r["fixed_givens"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        block_diffusion_loss(model, batch, loss, g).loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    sec = sum(times[1:]) / args.steps
    print(f"here: {sec:.2f} s a step at batch {args.batch_size} ({per_step / sec / 1e9:.1f} GFLOP/s at the mean "
          f"passes; {args.threads} threads)")
    total = r["steps"] * r["batch_size"] * per_puzzle
    print(f"the recipe: {r['steps']} steps x {r['batch_size']} puzzles = {r['steps'] * r['batch_size']:,} "
          f"presentations, {total / 1e12:.1f} TFLOP: {total / args.assume_tflops / 1e12 / 60:.1f} minutes at "
          f"{args.assume_tflops:g} TFLOP/s, {total / (per_step / sec) / 3600:.1f} hours at this machine's rate")


if __name__ == "__main__":
    main()
