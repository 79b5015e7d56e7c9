"""`dgemma bench`: the parser (light to import) and the handler."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli_common import PRESET_NAMES, CLIError, apply_threads, available_cpus, default_threads

BENCH_PRESETS = (*PRESET_NAMES, "26b-a4b")  # 26b-a4b: the release's shapes, built on the device (not for training)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure generation speed (optionally against transformers / AR)")
    p.add_argument("--preset", choices=sorted(BENCH_PRESETS), default="small",
                   help="random-weight model preset (26b-a4b: the 26B release's exact shapes, each module made on "
                        "--device in the compute dtype and quantized there, never a full fp32 copy on the CPU)")
    p.add_argument("--model", help="benchmark a checkpoint directory instead of a preset")
    p.add_argument("--batch-size", type=int, default=1, help="sequences generated together")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=512, help="tokens generated per sequence")
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas")
    p.add_argument("--adaptive", action="store_true", help="allow the early stop (default: fixed steps)")
    p.add_argument("--entropy-bound", type=float, default=0.1, help="entropy budget of the sampler per step")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: the {available_cpus()} cores this process may use, less those "
                        f"other processes keep busy, at least 1, at most 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine (the median is reported)")
    p.add_argument("--compare", action="append", default=[], choices=["transformers", "autoregressive", "eager"],
                   help="also run transformers' generate, an autoregressive decode, or (CUDA) dgemma without graphs")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, run each denoising step eagerly instead of replaying a CUDA graph (default: "
                        "graphs are replayed)")
    p.add_argument("--quantize", choices=["fp8", "int4", "nvfp4"], default=None,
                   help="quantize the model's weights first (as `dgemma quantize` does) and time that; nvfp4: "
                        "the experts only, as NVIDIA's release, with the model built on --device")
    p.add_argument("--sizes-only", action="store_true",
                   help="print what the model's weights take in bf16, FP8, NVFP4 and int4 (computed from its shapes "
                        "on the meta device, nothing allocated) and the KV cache of this workload, and exit")
    p.add_argument("--sampler", choices=["exact", "fast"], default="exact",
                   help="exact: the reference's random draws (an Exp(1) race over the vocabulary per position); "
                        "fast: the same distribution from one uniform per position")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_bench)
    return p


def main_bench(args) -> dict:
    """Run the workload `args` describes and return the report (a dict, as --json prints it)."""
    from .report import summarize
    from .runners import run_workload

    args.threads = apply_threads(args.threads if args.threads is not None else min(default_threads(), 8))
    return summarize(args, run_workload(args))


def cmd_bench(args) -> int:
    from .report import print_table, spread_warnings

    for name in ("batch_size", "prompt_len", "new_tokens", "steps", "threads", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if args.sizes_only:
        from .runners import print_format_sizes

        print_format_sizes(args)
        return 0
    if args.preset == "26b-a4b" and not args.model and args.compare:
        raise CLIError("--preset 26b-a4b runs dgemma only (--compare would build a second 26B model)")
    if (args.preset == "26b-a4b" and not args.model and not args.device.startswith("cuda")
            and args.quantize != "int4"):
        raise CLIError("--preset 26b-a4b on a CPU holds 101 GB of fp32 weights; use --device cuda, --quantize int4 "
                       "(about 15 GB plus the embedding in fp32), or --sizes-only")
    if args.quantize in ("int4", "nvfp4") and "transformers" in args.compare:
        raise CLIError(f"--compare transformers with --quantize {args.quantize}: transformers does not read "
                       f"dgemma's {args.quantize} weights")
    if args.quantize and "transformers" in args.compare and not args.device.startswith("cuda"):
        raise CLIError("--compare transformers with --quantize needs --device cuda: on a CPU transformers "
                       "5.23 cannot dequantize fused FP8 experts")
    out = main_bench(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out)
    for line in spread_warnings(out):
        print(line, file=sys.stderr)
    return 0
