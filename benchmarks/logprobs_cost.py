"""What asking for log-probabilities costs an engine step: the same request (same seed, same tokens) stepped with
and without `logprobs`, on random weights. The difference is step/logprobs.py's record (a top-20 and one
normalising pass over the row's (C, V) probabilities) and the host copy of the row's record.

    python benchmarks/logprobs_cost.py --preset small --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dgemma.engine import Engine, SamplingParams
from dgemma.presets import default_generation, preset_config, random_model


def step_times(engine: Engine, logprobs: int | None, steps: int) -> list[float]:
    params = SamplingParams(max_tokens=engine.canvas_length, seed=0, pin_prefix=False, logprobs=logprobs)
    outputs = []
    engine.add_request(list(range(5, 69)), params, outputs.append)
    engine.step()  # admission and prefill, and a first step
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    while not (outputs and outputs[-1].finished):
        engine.step()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset_config(args.preset)
    model = random_model(cfg, std=0.02, seed=0)
    # as many steps as the timing needs, and no early stop: every timed step runs the whole canvas
    gen = default_generation(cfg).replace(max_denoising_steps=args.steps + 2, confidence_threshold=1e-30)
    engine = Engine(model, gen, max_num_seqs=1, max_model_len=512, sampler="exact")
    print(f"preset {args.preset}: canvas {model.canvas_length}, vocabulary {cfg.text.vocab_size}, "
          f"{args.threads} threads, {args.steps} steps each")
    for _ in range(2):  # alternate, so a change in the machine's load shows in both
        for asked in (None, 20):
            median = statistics.median(step_times(engine, asked, args.steps))
            print(f"  logprobs={asked}: median step {median * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
