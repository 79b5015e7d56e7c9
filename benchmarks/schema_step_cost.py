"""What a real JSON schema's constraint adds to a denoising step, over JSONSchemaBench.

    python benchmarks/schema_step_cost.py --data DIR [--per-subset 8] [--pick 4] [--vocab 32000]
        [--pad-vocab 262144] [--steps 8] [--pairs 2] [--timeout 20] [--only Subset/file.json ...] [--out r.json]

DIR is JSONSchemaBench's `data/` folder, sampled as benchmarks/jsonschemabench.py samples it (--per-subset files
per subset, seed 0, the same files), over the same 32,000-token byte-level BPE trained on the data (--pad-vocab:
padded with structured_output.py's synthetic tokens, as compile_profile.py --pad-vocab does, for 262k). Each file
compiles with `Constraint.from_json_schema` (CompileLimits with --timeout); refusals and timeouts are counted and
skipped. Of those that compile, --pick per subset are timed: sorted by automaton states, the largest, the smallest
and the rest spread evenly between (ranks round(i (n-1) / (pick-1))), so the largest automata of the sample are
always in. --only names files (Subset/name) to time instead, all of them.

Each picked schema is timed as `structured_output.py cost` times the JSON-object constraint: the `small` preset
(canvas 256, batch 1) over the vocabulary, --steps fixed steps per canvas, runs without and with the constraint
alternating in one process (--pairs of each). max_tokens is one canvas, or as many whole canvases as the shortest
valid output and its EOS need. Printed per schema: states, token classes, (state, next state) pairs of the DP,
"layout", the seconds the DP's layout of the automaton takes (made once per constraint, before the timed runs; a
server makes it with the first canvas that uses it), canvases (of the budget; run with the constraint), ms per
step without and with, the median of the with/without ratios over its pairs, and "DP ms": ms per step spent in
the constraint's calls (step.head's `constrain_row`: one read of the probabilities and the DP's solves), wall
and, in brackets, the process's CPU time (the DP's forward pass runs on torch's thread count), which other
processes on a shared machine change far less than they change the ratio of two runs; then the wall ms split
into the read (step 1 of dp.py), the forward passes (step 3: the bounded pass's tries and the full pass) and
the rest (the class-set values, the backward walk, the tokens); then p50/p95/max of the ratios over the
schemas, and of 1 + DP ms / the quickest step without the constraint in the whole run, by wall time (what a quiet
machine shows) and by CPU time (the DP's threads added up: what a busy machine still shows, and an upper bound of
the wall).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_profile import padded  # noqa: E402
from jsonschemabench import percentile, sample, tokenizer_path  # noqa: E402
from structured_output import cost_model, ms_per_step, step_cost_pairs  # noqa: E402


def vocabulary(data: Path, size: int, pad_vocab: int):
    from tokenizers import Tokenizer
    from dgemma.control import ConstraintVocabulary
    tok = Tokenizer.from_file(str(tokenizer_path(data, size)))
    vocab = ConstraintVocabulary.from_tokenizer(tok, [tok.token_to_id("<eos>")], [tok.token_to_id("<pad>")])
    return padded(vocab, pad_vocab) if pad_vocab > vocab.vocab_size else vocab


def compile_all(paths: list[Path], vocab, timeout: float) -> tuple[dict, dict]:
    """name -> (states, token classes) of each file that compiles; name -> error of the rest."""
    from dgemma.control import CompileLimits, Constraint, ConstraintError
    sizes, errors, limits = {}, {}, CompileLimits(timeout_s=timeout)
    for path in paths:
        name = f"{path.parent.name}/{path.name}"
        try:
            c = Constraint.from_json_schema(json.loads(path.read_text()), vocab, limits=limits)
        except ConstraintError as err:
            errors[name] = str(err)
            continue
        sizes[name] = (c.num_states, c.num_classes)
    return sizes, errors


def pick(sizes: dict, count: int) -> list[str]:
    """`count` names spread over the ranks by states, largest first: ranks round(i (n-1) / (count-1))."""
    ranked = sorted(sizes, key=lambda n: -sizes[n][0])
    if len(ranked) <= count:
        return ranked
    return [ranked[round(i * (len(ranked) - 1) / (count - 1))] for i in range(count)] if count > 1 else ranked[:1]


class Stopwatch:
    """Time spent in `module.name`, summed while installed: wall seconds, and CPU seconds of the process (the DP's
    numpy work and its threads; what other processes on the machine barely change)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.seconds, self.cpu = module, name, 0.0, 0.0
        self.inner = getattr(module, name)

    def __call__(self, *args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.cpu += time.process_time() - cpu

    def __enter__(self):
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.inner)


def constraint_clocks():
    """Stopwatches on what the step spends in a row's constraint: all of it (step.head's calls of `constrain_row`:
    one read of the row's probabilities, the DP's solves), the read (dp.class_scores, step 1), steps 3-5
    (dp._paths) and steps 4-5 in it (dp._walk_back): the forward passes (the bounded pass's tries and the full
    pass) are the difference."""
    import dgemma.control.dp as dp
    import dgemma.step.head as head
    return [Stopwatch(head, "constrain_row"), Stopwatch(dp, "class_scores"), Stopwatch(dp, "_paths"),
            Stopwatch(dp, "_walk_back")]


def time_schema(path: Path, vocab, timeout: float, model, gen, prompt, pairs: int) -> dict:
    from dgemma.control import CompileLimits, Constraint
    from dgemma.control.dp import CanvasDP
    from dgemma.control.moves import moves_of
    constraint = Constraint.from_json_schema(json.loads(path.read_text()), vocab,
                                             limits=CompileLimits(timeout_s=timeout))
    C = model.canvas_length
    canvases = -(-(constraint.min_tokens_to_accept(constraint.initial_state) + 1) // C)
    gen = gen.replace(max_new_tokens=canvases * C)
    start = time.perf_counter()
    CanvasDP(constraint, constraint.initial_state, None)  # the DP's layout, made once per constraint: not a step's
    layout_s = time.perf_counter() - start
    clocks = constraint_clocks()
    with clocks[0], clocks[1], clocks[2], clocks[3]:
        runs = list(step_cost_pairs(model, gen, prompt, constraint, pairs))
    ms = [tuple(map(ms_per_step, r)) for r in runs]
    ratios = sorted(w / wo for wo, w in ms)
    steps = sum(r[1].stats.denoising_steps for r in runs)
    total, read, paths, walks = (clock.seconds * 1e3 / steps for clock in clocks)
    return {"states": constraint.num_states, "classes": constraint.num_classes,
            "pairs": len(moves_of(constraint).pair_src), "budget_canvases": canvases, "layout_s": layout_s,
            "canvases_with": [r[1].stats.canvases for r in runs], "ms_without": [wo for wo, _ in ms],
            "ms_with": [w for _, w in ms], "ratio": ratios[len(ratios) // 2], "dp_ms": total,
            "dp_read_ms": read, "dp_pass_ms": paths - walks, "dp_cpu_ms": clocks[0].cpu * 1e3 / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-subset", type=int, default=8)
    parser.add_argument("--pick", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--pad-vocab", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--only", nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = lambda: " ".join(f"{x:.1f}" for x in os.getloadavg())  # noqa: E731
    vocab = vocabulary(args.data, args.vocab, args.pad_vocab)
    import dgemma
    print(f"vocab {vocab.vocab_size}, {args.steps} steps per canvas, {args.pairs} pairs, compile limit "
          f"{args.timeout:g} s, load average {load()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"dgemma from {Path(dgemma.__file__).parent}")
    if args.only:
        picked = args.only
    else:
        picked = []
        for subset in sorted(p.name for p in args.data.iterdir() if p.is_dir()):
            t = time.perf_counter()
            sizes, errors = compile_all(sample(args.data, subset, args.per_subset)[0], vocab, args.timeout)
            picked += pick(sizes, args.pick)
            timeouts = sum("longer than the limit" in e for e in errors.values())
            print(f"{subset:16} {len(sizes)} compile, {len(errors) - timeouts} refused, {timeouts} timed out "
                  f"[{time.perf_counter() - t:.0f} s]; states of those that compile: "
                  f"{sorted((s for s, _ in sizes.values()), reverse=True)}", flush=True)
    model, gen, prompt = cost_model(vocab.vocab_size, args.steps, vocab.eos_token_ids[0], vocab.pad_token_ids[0])
    print(f"{'schema':44} {'states':>6} {'classes':>7} {'pairs':>7} layout canvases {'ms without':>17} {'ms with':>17} "
          f"ratio  DP ms (CPU) = read + pass + rest")
    results = {}
    for name in picked:
        r = results[name] = time_schema(args.data / name, vocab, args.timeout, model, gen, prompt, args.pairs)
        rest = r["dp_ms"] - r["dp_read_ms"] - r["dp_pass_ms"]
        print(f"{name[:44]:44} {r['states']:6} {r['classes']:7} {r['pairs']:7} {r['layout_s']:5.2f}s "
              f"{r['budget_canvases']:2} ({'/'.join(map(str, r['canvases_with']))}) "
              f"{' '.join(f'{x:8.1f}' for x in r['ms_without']):>17} {' '.join(f'{x:8.1f}' for x in r['ms_with']):>17} "
              f"{r['ratio']:5.2f} {r['dp_ms']:6.1f} ({r['dp_cpu_ms']:5.1f}) = {r['dp_read_ms']:5.1f} + "
              f"{r['dp_pass_ms']:5.1f} + {rest:5.1f}", flush=True)
    ratios = [r["ratio"] for r in results.values()]
    print(f"with/without over {len(ratios)} schemas: p50 {percentile(ratios, .5):.2f}, "
          f"p95 {percentile(ratios, .95):.2f}, max {max(ratios):.2f}; above 1.25: {sum(x > 1.25 for x in ratios)}; "
          f"load average {load()}")
    quiet = min(x for r in results.values() for x in r["ms_without"])
    for label, key in (("wall", "dp_ms"), ("CPU", "dp_cpu_ms")):
        estimates = [1 + r[key] / quiet for r in results.values()]
        print(f"1 + DP {label} ms / the quickest step without ({quiet:.1f} ms): p50 {percentile(estimates, .5):.2f}, "
              f"p95 {percentile(estimates, .95):.2f}, max {max(estimates):.2f}; above 1.25: "
              f"{sum(x > 1.25 for x in estimates)}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
