"""`dgemma quantize`: write a block-wise FP8 copy of a checkpoint that dgemma and transformers load."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_common import CLIError, add_threads_arg, apply_threads


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="write an FP8 (weight-only, block-wise) copy of a checkpoint",
        description="Quantize the attention and MLP projections and the MoE experts to FP8 (E4M3) with one fp32 "
                    "scale per block, in the fine-grained FP8 layout transformers reads (quant_method \"fp8\"). "
                    "Embeddings, routers and norms keep the checkpoint's dtype.")
    p.add_argument("--model", required=True, help="checkpoint directory to quantize")
    p.add_argument("--out", required=True,
                   help="directory to write: new, empty, or an earlier dgemma output (of which only the files dgemma "
                        "wrote are replaced, once the new copy is complete)")
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
    from .. import checkpoint
    from ..output_dir import previous_output
    from .fp8 import QuantError, quantize_model

    apply_threads(args.threads)
    src, out = Path(args.model), Path(args.out)
    if out.resolve() == src.resolve():
        raise CLIError("--out must differ from --model (the source is read while the copy is written)")
    previous_output(out)  # refuse an --out dgemma may not replace before loading anything
    if args.block_size is not None and args.block_size < 1:
        raise CLIError("--block-size must be a positive integer")
    # Keep the unquantized tensors in the dtype they are stored in; a bf16 file maps without a copy.
    dtype = checkpoint.stored_dtype(src)
    ckpt = checkpoint.load(src, device="cpu", dtype=dtype, quiet=args.quiet)
    try:
        config = quantize_model(ckpt.model, args.block_size, experts=not args.skip_experts, progress=not args.quiet)
    except QuantError as e:
        raise CLIError(f"{src}: {e}") from None
    checkpoint.save(out, ckpt.model, ckpt.config, ckpt.generation, tokenizer_dir=src, dtype=dtype,
                    passthrough=ckpt.passthrough, vision_config=ckpt.vision_config)
    block = "x".join(map(str, config["weight_block_size"]))
    print(f"wrote {out}: FP8 weights in {block} blocks{'' if not args.skip_experts else ' (experts left as they were)'}"
          f", {_size(src) / 2**20:.1f} MiB -> {_size(out) / 2**20:.1f} MiB")
    return 0
