"""The serving engine's decoder pass over rows at different cache lengths, two ways: one attention call over the
longest row's key range with the rest masked, and row by row over each row's own keys (ForwardPlan.spans, what the
model does on a CPU so that a row's tokens do not depend on its batch). Random weights; the time is what differs.

    python benchmarks/ragged_rows.py --preset small --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from dgemma.presets import preset_config, random_model

LENGTHS = [37, 120, 64, 300, 5, 210, 90, 150]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset)
    model = random_model(cfg, std=0.02, seed=0)
    C, V = model.canvas_length, model.config.vocab_size
    cache = model.new_cache(len(LENGTHS), max(LENGTHS) + 2 * C)
    g = torch.Generator().manual_seed(0)
    for r, n in enumerate(LENGTHS):
        model.encode(torch.randint(3, V, (1, n), generator=g), cache, rows=[r])
    canvas = torch.randint(0, V, (len(LENGTHS), C), generator=g)
    rows = list(range(len(LENGTHS)))

    def seconds(row_by_row: bool) -> float:
        plan = model.plan(cache, rows, C, encoder=False)
        if not row_by_row:
            plan.spans = None
        model.decode(canvas, None, plan)  # warm-up
        t = time.perf_counter()
        for _ in range(args.repeats):
            model.decode(canvas, None, plan)
        return (time.perf_counter() - t) / args.repeats

    with torch.no_grad():
        masked = [seconds(False), seconds(False)]
        own = [seconds(True), seconds(True)]
    masked_ms, own_ms = 1000 * sum(masked) / 2, 1000 * sum(own) / 2
    print(f"preset {args.preset}, canvas {C}, {args.threads} threads; decoder pass over {len(LENGTHS)} rows at "
          f"cache lengths {LENGTHS}")
    print(f"one call, masked to the longest row   {masked_ms:8.1f} ms")
    print(f"row by row, each over its own keys    {own_ms:8.1f} ms  ({own_ms / masked_ms:.2f}x)")


if __name__ == "__main__":
    main()
