"""`dgemma quantize`: write a block-wise FP8 copy of a checkpoint that dgemma and transformers load, or a group-wise
int4 copy that dgemma loads and runs on packed weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_common import CLIError, add_threads_arg, apply_threads


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="write an FP8 or int4 (weight-only) copy of a checkpoint",
        description="Quantize the attention and MLP projections and the MoE experts. fp8 (default): E4M3 with one "
                    "fp32 scale per block, in the fine-grained FP8 layout transformers reads (quant_method \"fp8\"). "
                    "int4: 4-bit codes with a bf16 scale and zero per group of input weights (quant_method "
                    "\"dgemma-int4\"; dgemma runs it with torch's int4 kernels on a CPU or a CUDA GPU). "
                    "Embeddings, routers and norms keep the checkpoint's dtype.")
    p.add_argument("--model", required=True, help="checkpoint directory to quantize")
    p.add_argument("--out", required=True,
                   help="directory to write: new, empty, or an earlier dgemma output (of which only the files dgemma "
                        "wrote are replaced, once the new copy is complete)")
    p.add_argument("--format", choices=["fp8", "int4"], default="fp8", help="weight format (default: fp8)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4: weights per scale and zero along the input side, 32, 64, 128 or 256 (default: the "
                        "largest of 128, 64, 32 that divides every quantized matrix)")
    p.add_argument("--block-size", type=int, default=None,
                   help="weights per side of a scale block (default: the largest of 128, 64, 32, 16 that divides "
                        "every quantized matrix)")
    p.add_argument("--skip-experts", action="store_true",
                   help="leave the MoE experts unquantized (transformers 5.23 on a CPU cannot dequantize fused "
                        "FP8 experts; it loads the projections either way)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_arg(p)
    p.set_defaults(func=cmd_quantize)
    return p


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def cmd_quantize(args) -> int:
    from ..io import checkpoint
    from ..io.output_dir import previous_output
    from . import fp8, int4
    from .fp8 import QuantError

    apply_threads(args.threads)
    src, out = Path(args.model), Path(args.out)
    if out.resolve() == src.resolve():
        raise CLIError("--out must differ from --model (the source is read while the copy is written)")
    previous_output(out)  # refuse an --out dgemma may not replace before loading anything
    if args.block_size is not None and args.block_size < 1:
        raise CLIError("--block-size must be a positive integer")
    if args.format == "int4" and args.block_size is not None:
        raise CLIError("--block-size is for --format fp8; int4 takes --group-size")
    if args.format == "fp8" and args.group_size is not None:
        raise CLIError("--group-size is for --format int4; fp8 takes --block-size")
    if args.group_size is not None and args.group_size not in int4.KERNEL_GROUP_SIZES:
        raise CLIError(f"--group-size must be one of {', '.join(map(str, int4.KERNEL_GROUP_SIZES))}")
    # Keep the unquantized tensors in the dtype they are stored in; a bf16 file maps without a copy.
    dtype = checkpoint.stored_dtype(src)
    # the tower is not quantized: its tensors are copied through, so it is not built
    ckpt = checkpoint.load(src, device="cpu", dtype=dtype, quiet=args.quiet, vision=False)
    try:
        if args.format == "int4":
            config = int4.quantize_model(ckpt.model, args.group_size, experts=not args.skip_experts,
                                         progress=not args.quiet)
        else:
            config = fp8.quantize_model(ckpt.model, args.block_size, experts=not args.skip_experts,
                                        progress=not args.quiet)
    except QuantError as e:
        raise CLIError(f"{src}: {e}") from None
    checkpoint.save(out, ckpt.model, ckpt.config, ckpt.generation, tokenizer_dir=src, dtype=dtype,
                    passthrough=ckpt.passthrough, vision_config=ckpt.vision_config)
    what = (f"int4 weights in groups of {config['group_size']}" if args.format == "int4"
            else f"FP8 weights in {'x'.join(map(str, config['weight_block_size']))} blocks")
    tower = f"; the vision tower ({len(ckpt.passthrough)} tensors) copied unquantized" if ckpt.passthrough else ""
    print(f"wrote {out}: {what}{'' if not args.skip_experts else ' (experts left as they were)'}"
          f", {_size(src) / 2**20:.1f} MiB -> {_size(out) / 2**20:.1f} MiB{tower}")
    return 0
