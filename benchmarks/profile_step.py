"""Where a denoising step's time goes: GPU kernel time by kernel (torch.profiler), and the wall time of one
graph replay against one eager step. On CPU, first the wall time of each phase of the row-by-row step (decoder
layers, head, temper-and-score, race, self-conditioning matmul), timed around the calls without the profiler.

    python benchmarks/profile_step.py --preset small --device cuda --dtype bfloat16
    python benchmarks/profile_step.py --preset small --device cpu --dtype float32 [--sampler fast]
"""

from __future__ import annotations

import argparse
import time

import torch

from dgemma.generate import LockstepDenoiser
from dgemma.presets import default_generation, preset_config, random_model
from dgemma.runtime import tune_malloc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sampler", choices=["exact", "fast"], default="exact")
    args = ap.parse_args()
    tune_malloc()  # as the CLI does
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    config = preset_config(args.preset)
    model = random_model(config, std=0.02, seed=0, device=args.device, dtype=dtype)
    gen = default_generation(config).replace(max_denoising_steps=16, confidence_threshold=1e-30)
    B = args.batch_size
    cache = model.new_cache(B, args.context + 2 * config.canvas_length)
    with torch.inference_mode():
        model.encode(torch.randint(3, config.text.vocab_size, (B, args.context), device=args.device), cache)

        def timed(den: LockstepDenoiser, steps: int) -> float:
            sync()
            t = time.perf_counter()
            for s in range(2, steps + 2):
                den.step(s)
            sync()
            return (time.perf_counter() - t) / steps * 1e3

        for graphs in (False, True) if cuda else (False,):
            den = LockstepDenoiser(model, gen, B, cuda_graphs=graphs, sampler=args.sampler)
            den.start(cache)
            sync()
            t = time.perf_counter()
            den.step(1)  # eager; with graphs, also the capture
            sync()
            first = (time.perf_counter() - t) * 1e3
            per = timed(den, 10)
            print(f"cuda_graphs={graphs}: first step {first:.2f} ms (with capture if graphed), then {per:.3f} ms/step")

        den = LockstepDenoiser(model, gen, B, cuda_graphs=False, sampler=args.sampler)
        den.start(cache)
        den.step(1)
        if not cuda:
            phases(den, steps=10)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for s in range(2, 6):
                den.step(s)
            sync()
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=args.top, max_name_column_width=60))


def phases(den: LockstepDenoiser, steps: int) -> None:
    """Wall ms per step in each phase of the CPU step (CPU ops are synchronous, so timing the calls is exact)."""
    import dgemma.step.draws as Dr
    import dgemma.step.head as D
    from dgemma.model.model import DiffusionGemma

    spent: dict[str, float] = {}
    patched = [(DiffusionGemma, "run_layers", "decoder layers"), (DiffusionGemma, "head_into", "head"),
               (D, "cap_and_score_row_", "soft cap, temper, softmax, argmax, entropy"),
               (Dr, "race_sample", "sample (random draws)"), (Dr, "inverse_cdf_sample", "sample (random draws)"),
               (Dr, "skip_race", "sample (random draws)"), (Dr, "skip_inverse_cdf", "sample (random draws)"),
               (DiffusionGemma, "embed_probs", "self-conditioning matmul")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]

    def timer(fn, label):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
        return timed

    for (owner, name, label), (_, _, fn) in zip(patched, originals):
        setattr(owner, name, timer(fn, label))
    try:
        start = 2
        t = time.perf_counter()
        for s in range(start, start + steps):
            den.step(s)
        total = time.perf_counter() - t
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    for label, sec in spent.items():
        print(f"{label:45s} {sec / steps * 1e3:8.1f} ms/step")
    print(f"{'other':45s} {(total - sum(spent.values())) / steps * 1e3:8.1f} ms/step")
    print(f"{'whole step':45s} {total / steps * 1e3:8.1f} ms/step")


if __name__ == "__main__":
    main()
