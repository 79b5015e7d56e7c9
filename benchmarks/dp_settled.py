"""What the canvas DP costs a step as a canvas settles, over real JSON schemas.

    python benchmarks/dp_settled.py --data DIR [--only Snowplow/sp_338_Normalized.json ...] [--canvas 256]
        [--settled 0 64 128 192 240] [--budget-ends 256 128] [--repeats 3]

DIR is JSONSchemaBench's `data/` folder; each named file compiles over the same 32,000-token byte-level BPE as
jsonschemabench.py (`Constraint.from_json_schema`, 60 s limit). For each, one canvas of random log-probabilities
(seed 0) is read once (`class_scores`), and a sampled step's two solves (the argmax, and the draws preferred: half
the free positions draw a random token) run as lanes of one forward pass (`solve_each`), as step.head asks for
them, with the first --settled positions held to the argmax's tokens (serving's settled prefix: pinned for the
rest of the canvas) and the output budget ending --budget-ends tokens into the canvas (the last canvas of an
output; 256: at its end). Last, "allowed": nothing held, but the log-probabilities raised by 20 at the argmax's
tokens and the draws equal to them, so that each lane's best tokens are allowed (a confident model whose tokens
already obey the constraint: dp._allowed_walk takes them without the forward pass). Printed: the thread's CPU
milliseconds of the solves, the best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from schema_step_cost import vocabulary  # noqa: E402

DEFAULT = ["Snowplow/sp_338_Normalized.json", "Snowplow/sp_87_Normalized.json"]


def cpu_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--only", nargs="+", default=DEFAULT)
    parser.add_argument("--canvas", type=int, default=256)
    parser.add_argument("--settled", type=int, nargs="+", default=[0, 64, 128, 192, 240])
    parser.add_argument("--budget-ends", type=int, nargs="+", default=[256, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from dgemma.control import CompileLimits, Constraint
    from dgemma.control import ConstraintError
    from dgemma.control.dp import canvas_rule, class_scores, solve_each
    from dgemma.control.moves import moves_of
    vocab = vocabulary(args.data, 32000, 0)
    C = args.canvas
    print(f"canvas {C}, two lanes, CPU ms (best of {args.repeats}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'schema':36} {'pairs':>7} {'budget ends':>11} " + " ".join(f"{f'settled {n}':>11}" for n in args.settled)
          + f" {'allowed':>8}")
    for name in args.only:
        c = Constraint.from_json_schema(json.loads((args.data / name).read_text()), vocab,
                                        limits=CompileLimits(timeout_s=60))
        g = torch.Generator().manual_seed(0)
        log_probs = torch.log_softmax(torch.randn(C, c.vocab_size, generator=g) * 3, -1)
        read = class_scores(log_probs, c)
        draws = torch.randint(0, c.vocab_size, (C,), generator=g)
        coin = torch.rand(C, generator=g) < 0.5
        for budget in args.budget_ends:
            ends, done_from = canvas_rule(c, {}, 0, C, budget if budget < C else None)
            try:
                argmax = solve_each(read, [None], None, None, ends, done_from)[0].tokens
            except ConstraintError:
                print(f"{name[:36]:36} {'':7} {budget:11} no output of the schema fits")
                continue
            row = []
            for settled in args.settled:
                held = torch.where(torch.arange(C) < settled, argmax, -1)
                prefer = torch.where(coin & (held < 0), draws, -1)
                lanes = solve_each(read, [None, prefer], None, held, ends, done_from)
                assert torch.equal(lanes[0].tokens, argmax)  # the held prefix is the argmax's own
                row.append(cpu_ms(lambda: solve_each(read, [None, prefer], None, held, ends, done_from),
                                  args.repeats))
            sure = class_scores(log_probs.index_put((torch.arange(C), argmax), torch.tensor(20.0), accumulate=True), c)
            agree = torch.where(coin, argmax, -1)
            assert torch.equal(solve_each(sure, [None, agree], None, None, ends, done_from)[1].tokens, argmax)
            row.append(cpu_ms(lambda: solve_each(sure, [None, agree], None, None, ends, done_from), args.repeats))
            print(f"{name[:36]:36} {len(moves_of(c).pair_src):7} {budget:11} "
                  + " ".join(f"{ms:11.0f}" for ms in row[:-1]) + f" {row[-1]:8.1f}", flush=True)


if __name__ == "__main__":
    main()
