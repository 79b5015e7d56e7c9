"""The serving engine's denoising step against `generate`'s, on one random-weight preset: are the tokens the same,
and what does a step cost in each.

One request (the exact sampler, prefix pinning off) must give `generate`'s tokens for the same seed, eager and,
on CUDA, graph-replayed (tests/test_engine.py checks the eager case on tiny models; this checks it at a preset's
shapes on the device). Then --batch-size requests at once are timed against `generate` of the same batch.

    python -m dgemma.bench.engine_step --preset small --device cuda --json
    python -m dgemma.bench.engine_step --preset tiny --device cpu --new-tokens 64 --steps 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .probes import sync


def engine_run(model, gen, prompts: list[list[int]], seeds: list[int], sampler: str,
               cuda_graphs: bool = False) -> dict:
    """Run `prompts` through a fresh Engine, stepped directly, its decoder pass eager or bucketed (`cuda_graphs`:
    captured and replayed on CUDA). -> tokens per request and ms per engine step (the first step, which also
    prefills, left out; the first pass of each bucket captures it)."""
    from ..engine import Engine, SamplingParams

    C = model.canvas_length
    engine = Engine(model, gen, max_num_seqs=len(prompts), sampler=sampler,
                    max_model_len=max(map(len, prompts)) + gen.max_new_tokens + 2 * C, cuda_graphs=cuda_graphs)
    outputs: list[list] = [[] for _ in prompts]
    for prompt, seed, sink in zip(prompts, seeds, outputs):
        engine.add_request(prompt, SamplingParams(max_tokens=gen.max_new_tokens, seed=seed, pin_prefix=False),
                           sink.append)
    times = []
    while not all(o and o[-1].finished for o in outputs):
        if len(times) > 64 * gen.max_new_tokens:
            raise RuntimeError("the engine did not finish")
        sync(str(model.device))
        t = time.perf_counter()
        engine.step()
        sync(str(model.device))
        times.append(time.perf_counter() - t)
    steady = times[1:] or times
    return {"tokens": [[t for chunk in o for t in chunk.token_ids] for o in outputs],
            "ms_per_step": 1e3 * sum(steady) / len(steady), "steps": len(times)}


def generate_run(model, gen, prompts: list[list[int]], seed: int, sampler: str, cuda_graphs: bool) -> dict:
    from ..generate import generate

    # graph replay needs the default generator; seeded alike, it draws what a seeded device generator draws
    torch.manual_seed(seed)
    generator = None if cuda_graphs else torch.Generator(model.device).manual_seed(seed)
    out = generate(model, prompts, gen, generator=generator, sampler=sampler, cuda_graphs=cuda_graphs)
    steps = out.stats.denoising_steps // len(prompts)
    return {"tokens": out.token_ids,
            "ms_per_step": 1e3 * (out.stats.seconds - out.stats.prefill_seconds) / max(steps, 1), "steps": steps}


def compare(model, gen, prompt_len: int, batch_size: int, sampler: str = "exact") -> dict:
    """The report: token equality of one request, and ms per step of engine and generate, one request and a
    batch. On CUDA generate runs both eagerly and replaying CUDA graphs; the engine runs eagerly and with its
    bucketed pass (replayed as CUDA graphs on CUDA; on a CPU the same buckets run uncaptured), whose tokens must
    equal the eager engine's."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    prompts = torch.randint(3, V, (batch_size, prompt_len), generator=g).tolist()
    cuda = model.device.type == "cuda"
    modes = [False, True] if cuda else [False]
    report: dict = {"sampler": sampler, "rows": []}
    for b, batch in ((1, prompts[:1]), (batch_size, prompts)):
        if b == 1 or batch_size > 1:
            engine_run(model, gen, batch, list(range(b)), sampler)  # warm-up
            eng = engine_run(model, gen, batch, list(range(b)), sampler)
            row = {"batch_size": b, "engine_ms_per_step": eng["ms_per_step"], "engine_steps": eng["steps"]}
            engine_run(model, gen, batch, list(range(b)), sampler, cuda_graphs=True)  # warm-up (and capture)
            bucketed = engine_run(model, gen, batch, list(range(b)), sampler, cuda_graphs=True)
            row["engine_graphs_ms_per_step"] = bucketed["ms_per_step"]
            row["tokens_equal_engine_graphs"] = bucketed["tokens"] == eng["tokens"]
            for graphs in modes:
                name = "generate_graphs" if graphs else "generate_eager"
                generate_run(model, gen, batch, 0, sampler, graphs)  # warm-up (and graph capture)
                ref = generate_run(model, gen, batch, 0, sampler, graphs)
                row[f"{name}_ms_per_step"] = ref["ms_per_step"]
                if b == 1:  # one row: the engine's per-request draws are generate's draws
                    row[f"tokens_equal_{name}"] = eng["tokens"] == ref["tokens"]
            report["rows"].append(row)
    report["tokens_equal"] = all(v for r in report["rows"] for k, v in r.items() if k.startswith("tokens_equal"))
    return report


def main(argv: list[str] | None = None) -> int:
    from ..io.checkpoint import default_dtype
    from ..cli_common import apply_threads
    from ..presets import default_generation, preset_config, random_model

    p = argparse.ArgumentParser(prog="python -m dgemma.bench.engine_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--sampler", choices=["exact", "fast"], default="exact")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    config = preset_config(args.preset)
    model = random_model(config, std=0.02, seed=0, device=args.device, dtype=default_dtype(args.device))
    gen = default_generation(config).replace(max_new_tokens=args.new_tokens, max_denoising_steps=args.steps,
                                             confidence_threshold=1e-30)  # fixed steps
    report = {"preset": args.preset, "device": args.device, "new_tokens": args.new_tokens, "steps": args.steps,
              **compare(model, gen, args.prompt_len, args.batch_size, args.sampler)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for row in report["rows"]:
            print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    return 0 if report["tokens_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
