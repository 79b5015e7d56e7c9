"""`dgemma init-tiny --out DIR`: a small random text checkpoint, with a byte-level tokenizer and the Gemma 4 chat
template, for trying `generate`, `chat`, `serve` and `train` without downloading a model. Its weights are random, so
its text is noise; what it shows is that each command runs, and how fast. `dgemma train --model DIR` teaches it."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .cli_common import PRESET_NAMES, CLIError

TOKENIZER_VOCAB = 256  # the byte-level tokenizer's 251 tokens, rounded up


def add_init_tiny_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("init-tiny", help="write a small random text checkpoint with a tokenizer (no download)",
                              description=__doc__.split("\n\n")[0].split(": ", 1)[1].capitalize())
    p.add_argument("--out", required=True, help="directory to write: new, empty, or an earlier dgemma output")
    p.add_argument("--preset", choices=PRESET_NAMES, default="tiny", help="model size (the vocabulary is the "
                                                                          "tokenizer's)")
    p.add_argument("--canvas-length", type=int, default=16, help="tokens denoised together")
    p.add_argument("--max-denoising-steps", type=int, default=8, help="the checkpoint's step cap")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--tool-tokens", action="store_true", help="give the tokenizer the Gemma 4 tool-call markers")
    p.set_defaults(func=cmd_init_tiny)
    return p


def write_random_checkpoint(out, preset: str = "tiny", canvas_length: int = 16, max_denoising_steps: int = 8,
                            seed: int = 0, std: float = 0.1, tool_tokens: bool = False) -> Path:
    """A random `preset` checkpoint (weights drawn with `std` from `seed`) with the byte-level tokenizer and the
    Gemma 4 chat template (dgemma.testing.write_test_tokenizer), saved into `out`; returns `out`."""
    from .io import checkpoint
    from .presets import default_generation, preset_config, random_model
    from .testing import TOOL_VOCAB_SIZE, write_test_tokenizer

    vocab = TOOL_VOCAB_SIZE if tool_tokens else TOKENIZER_VOCAB
    cfg = preset_config(preset, canvas_length=canvas_length, vocab_size=vocab)
    with tempfile.TemporaryDirectory() as tok:
        write_test_tokenizer(tok, tool_tokens=tool_tokens)
        return checkpoint.save(out, random_model(cfg, std=std, seed=seed), cfg,
                               default_generation(cfg).replace(max_denoising_steps=max_denoising_steps),
                               tokenizer_dir=tok)


def cmd_init_tiny(args) -> int:
    from .config import ConfigError

    try:
        out = write_random_checkpoint(args.out, args.preset, args.canvas_length, args.max_denoising_steps, args.seed,
                                      tool_tokens=args.tool_tokens)
    except ConfigError as e:
        raise CLIError(str(e).replace("canvas_length", "--canvas-length")
                       .replace("max_denoising_steps", "--max-denoising-steps")) from None
    print(f"wrote {out}: a random {args.preset} model (text is noise). Try:\n"
          f"  dgemma chat --model {out}\n  dgemma serve --model {out}\n"
          f"  dgemma generate --model {out} --prompt 'Hello' --max-new-tokens 32")
    return 0
