"""What the canvas DP costs at each step of a run, in order: the first step of a run against the later ones.

    python benchmarks/dp_first_step.py --data DIR [--only Subset/file.json ...] [--runs 3] [--steps 4]

DIR is JSONSchemaBench's `data/` folder and its trained 32,000-token BPE (as benchmarks/schema_step_cost.py uses
them). For each schema (default: Snowplow sp_80 and Github_easy o10009), --runs constrained runs of the `small`
preset (canvas 256, --steps fixed steps, one canvas), one after another in this process, after one run to warm
up. Printed per run: the ms of each read of the probabilities (dp.class_scores, step 1) and of each full
forward pass (moves.Forward.run, step 3; the bounded pass's tries are not in it), in the order they ran, with
the process's minor page faults during each in brackets.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from schema_step_cost import vocabulary  # noqa: E402
from structured_output import cost_model, step_cost_pairs  # noqa: E402


def logged(owner, name: str, log: list):
    """`owner.name` wrapped to append (ms, minor page faults) of each call to `log`."""
    inner = getattr(owner, name)

    def call(*args, **kwargs):
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            log.append((1e3 * (time.perf_counter() - start), faults))
    setattr(owner, name, call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--only", nargs="+", default=["Snowplow/sp_80_Normalized.json", "Github_easy/o10009.json"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    import dgemma
    import dgemma.control.dp as dp
    import dgemma.control.moves as moves
    from dgemma.control import CompileLimits, Constraint

    reads, passes = [], []
    logged(dp, "class_scores", reads)
    logged(moves.Forward, "run", passes)
    vocab = vocabulary(args.data, 32000, 0)
    model, gen, prompt = cost_model(vocab.vocab_size, args.steps, vocab.eos_token_ids[0], vocab.pad_token_ids[0])
    print(f"{args.steps} steps a canvas, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, dgemma from "
          f"{Path(dgemma.__file__).parent}")
    show = lambda log: " ".join(f"{ms:.1f} ({faults})" for ms, faults in log)  # noqa: E731
    for name in args.only:
        constraint = Constraint.from_json_schema(json.loads((args.data / name).read_text()), vocab,
                                                 limits=CompileLimits(timeout_s=120))
        gen_one = gen.replace(max_new_tokens=model.canvas_length)
        for run in range(args.runs + 1):
            reads.clear()
            passes.clear()
            list(step_cost_pairs(model, gen_one, prompt, constraint, 1))
            if run:
                print(f"{name} run {run}: reads {show(reads)}; full passes {show(passes) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
