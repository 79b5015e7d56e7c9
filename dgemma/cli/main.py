"""The `dgemma` parser and `main`: generate | edit | chat | convert here, plus the subcommands that live with their
feature (serve, train, sudoku, bench, bench-serve, quantize). Light to import: a command's module, torch and the
model are imported when the command runs."""

from __future__ import annotations

import os
import sys

from ..cli_common import (DTYPES, CLIError, DgemmaError, Parser, add_eos_arg, add_model_args, add_sampling_args,
                          add_threads_arg, apply_threads)
from .generate import add_steering_args


def _command(module: str, name: str):
    """The handler `name` of dgemma.cli.<module>, imported when the command runs."""

    def run(args) -> int:
        from importlib import import_module

        return getattr(import_module(f"{__package__}.{module}"), name)(args)

    return run


def cmd_convert(args) -> int:
    from pathlib import Path

    import torch

    from ..io import checkpoint
    from ..io.output_dir import previous_output

    apply_threads(args.threads)

    if Path(args.out).resolve() == Path(args.model).resolve():
        raise CLIError("--out must differ from --model (the source is read while the copy is written)")
    previous_output(args.out)  # refuse an --out dgemma may not replace before loading anything
    dtype = DTYPES[args.dtype]
    ckpt = checkpoint.load(args.model, device="cpu", dtype=torch.float32, vision=False)  # the tower is copied through
    out = checkpoint.save(args.out, ckpt.model, ckpt.config, ckpt.generation, tokenizer_dir=args.model, dtype=dtype,
                          passthrough=ckpt.passthrough, vision_config=ckpt.vision_config)
    print(f"wrote {out} ({args.dtype})")
    return 0


def build_parser() -> Parser:
    from .. import __version__

    parser = Parser(prog="dgemma", description="Run, serve and fine-tune DiffusionGemma models.")
    parser.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text for one or more prompts")
    add_model_args(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    prompt.add_argument("--prompt-ids", action="append",
                        help="prompt token ids, comma-separated (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--think", action="store_true", help="enable thinking mode (implies --chat)")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="an image for the prompt (repeat for several; with --chat they go before the text, else "
                        "write <|image|> in the prompt where each one goes)")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    p.add_argument("--show-canvas", action="store_true",
                   help="watch the canvas settle (on stderr; plain text when stderr is not a terminal)")
    add_sampling_args(p)
    add_eos_arg(p)
    add_steering_args(p)
    p.set_defaults(func=_command("generate", "cmd_generate"))

    p = sub.add_parser("edit", help="rewrite a file as an instruction asks, the file seeding the canvas")
    add_model_args(p)
    p.add_argument("--file", required=True, help="the UTF-8 text file to edit")
    p.add_argument("--instruction", required=True, help="what to change")
    p.add_argument("--out", help="write the edited text to this new file (default: standard output)")
    p.add_argument("--strength", type=float, default=None,
                   help="renoise strength of the file's text in [0, 1] (default: 0.2, as measured in BENCHMARKS.md)")
    p.add_argument("--sampler", choices=["exact", "fast"], default="exact", help="random draws (see generate)")
    add_sampling_args(p)
    p.set_defaults(func=_command("edit", "cmd_edit"))

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    add_model_args(p)
    p.add_argument("--think", action="store_true", help="enable thinking mode")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--show-canvas", action="store_true", help="watch the canvas settle (on stderr)")
    add_sampling_args(p)
    p.set_defaults(func=_command("chat", "cmd_chat"))

    p = sub.add_parser("convert", help="re-save a checkpoint in another dtype (HF format)")
    p.add_argument("--model", required=True, help="checkpoint directory to read")
    p.add_argument("--out", required=True, help="directory to write: new, empty, or an earlier dgemma output "
                                                "(only the files dgemma wrote are replaced)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the saved weights")
    add_threads_arg(p)
    p.set_defaults(func=cmd_convert)

    for register in _plugins():
        register(sub)
    return parser


def _plugins():
    """Subcommands that live with their feature (serve, train, sudoku, bench, quantize). Registering them imports
    only their parsers; their heavy imports (torch, FastAPI, the trainer) stay inside the handlers."""
    from ..bench.cli import add_bench_parser
    from ..bench.serve import add_bench_serve_parser
    from ..init_tiny import add_init_tiny_parser
    from ..quant.quant_cli import add_quantize_parser
    from ..server.serve_cli import add_serve_parser
    from ..tasks.sudoku_cli import add_sudoku_parser
    from ..train.train_cli import add_train_parser

    return [add_serve_parser, add_train_parser, add_sudoku_parser, add_bench_parser, add_bench_serve_parser,
            add_quantize_parser, add_init_tiny_parser]


def main(argv: list[str] | None = None) -> int:
    """Run one command. A DgemmaError (a user error) is printed as one line with exit status 2; any other exception
    is a bug in dgemma and propagates with its traceback."""
    from ..runtime import tune_malloc

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed (status 2)
        return e.code if isinstance(e.code, int) else 2
    tune_malloc()
    try:
        return args.func(args) or 0
    except DgemmaError as e:
        print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training run's TrainingStopped says at which step it saved
        hint = getattr(args, "interrupt_hint", None)
        print(f"dgemma {args.command}: {str(e) or 'interrupted'}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
