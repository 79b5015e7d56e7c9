"""`dgemma` command line: generate | chat | convert (and serve, train, sudoku, bench when installed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .config import ConfigError


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


DEFAULT_MODEL = Path(__file__).parent / "assets" / "sudoku"


def resolve_model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise CLIError(f"no --model given and the embedded default model is missing at {DEFAULT_MODEL}")
    return DEFAULT_MODEL


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise CLIError(f"--prompt-ids expects comma-separated integers, got {text!r}") from None
    if not ids:
        raise CLIError("--prompt-ids is empty")
    return ids


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda requested but no CUDA device is available")
    return name


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_runtime(args):
    """Model, generation config and tokenizer (None when the checkpoint has none)."""
    from . import checkpoint
    from .tokenizer import Tokenizer

    model_dir = resolve_model_dir(args.model)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    ckpt = checkpoint.load(model_dir, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_dir(model_dir)
    return ckpt, tokenizer


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="stop after this many tokens (default: until EOS or the context limit)")
    p.add_argument("--max-denoising-steps", type=int, default=None, help="cap on denoising steps per canvas")
    p.add_argument("--entropy-bound", type=float, default=None, help="entropy budget of the sampler per step")
    p.add_argument("--t-min", type=float, default=None, help="temperature at the last denoising step")
    p.add_argument("--t-max", type=float, default=None, help="temperature at the first denoising step")
    p.add_argument("--seed", type=int, default=None, help="seed for the canvas noise and sampling")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the embedded Sudoku model)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")


def generation_config(args, base):
    return base.replace(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.max_denoising_steps,
                        entropy_bound=args.entropy_bound, t_min=args.t_min, t_max=args.t_max)


def seed_everything(seed: int | None) -> int:
    # The global RNG, seeded like torch.manual_seed(S), is what reproduces the reference's tokens.
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    torch.manual_seed(seed)
    return seed


class CanvasView:
    """Redraws row 0's argmax canvas in the terminal after every denoising step: settled (accepted) tokens in
    bold, the rest dim."""

    def __init__(self, tokenizer, stream=None):
        self.tokenizer = tokenizer
        self.stream = stream or sys.stderr
        self.lines = 0

    def piece(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"{token_id} "
        return self.tokenizer.decode([token_id], skip_special_tokens=False).replace("\n", "⏎")

    def __call__(self, view) -> None:
        ids = view.argmax_canvas[0].tolist()
        accepted = view.accepted[0].tolist()
        text = "".join(("\x1b[1m" if a else "\x1b[2m") + self.piece(t) + "\x1b[0m" for t, a in zip(ids, accepted))
        header = f"canvas {view.canvas_index + 1}  step {view.step}/{view.max_steps}  settled {sum(accepted)}/{len(ids)}"
        if self.lines:
            self.stream.write(f"\x1b[{self.lines}F\x1b[J")
        out = header + "\n" + text + "\n"
        self.stream.write(out)
        self.stream.flush()
        width = max(os.get_terminal_size(self.stream.fileno()).columns if self.stream.isatty() else 120, 1)
        self.lines = sum(max(1, -(-len(line) // width)) for line in (header, _strip_ansi(text)))


def _strip_ansi(s: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", s)


def render_prompts(args, tokenizer) -> list[list[int]]:
    if args.prompt_ids:
        if args.chat or args.think:
            raise CLIError("--chat/--think need text prompts (--prompt), not --prompt-ids")
        return [parse_ids(x) for x in args.prompt_ids]
    if not args.prompt:
        raise CLIError("give --prompt TEXT or --prompt-ids 1,2,3")
    if tokenizer is None:
        raise CLIError("this checkpoint has no tokenizer.json; use --prompt-ids")
    prompts = []
    for text in args.prompt:
        if args.chat or args.think:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 enable_thinking=args.think)
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            prompts.append(tokenizer.encode(text, add_special_tokens=True))
    return prompts


def output_record(token_ids, reason, tokenizer, eos_ids, split: bool) -> dict:
    record = {"token_ids": token_ids, "text": None, "finish_reason": reason}
    if tokenizer is not None:
        body = [t for t in token_ids if t not in eos_ids]
        raw = tokenizer.decode(body, skip_special_tokens=False)
        if split:
            from .tokenizer import split_thinking

            reasoning, content = split_thinking(raw)
            record["text"] = content
            record["reasoning_content"] = reasoning
        else:
            record["text"] = tokenizer.decode(body, skip_special_tokens=True)
    return record


def cmd_generate(args) -> int:
    from .config import GenerationConfig
    from .generate import generate

    generation_config(args, GenerationConfig())  # reject bad sampling arguments before loading any weights
    if args.prompt_ids:
        [parse_ids(x) for x in args.prompt_ids]
    ckpt, tokenizer = load_runtime(args)
    prompts = render_prompts(args, tokenizer)
    gen = generation_config(args, ckpt.generation)
    seed = seed_everything(args.seed)
    view = CanvasView(tokenizer) if args.show_canvas else None
    out = generate(ckpt.model, prompts, gen, on_step=view)
    eos = set(gen.eos_token_id)
    records = [output_record(ids, reason, tokenizer, eos, split=args.chat or args.think)
               for ids, reason in zip(out.token_ids, out.finish_reasons)]
    stats = dict(out.stats.to_dict(), seed=seed)
    if args.json:
        print(json.dumps({"outputs": records, "stats": stats}))
        return 0
    for i, r in enumerate(records):
        if len(records) > 1:
            print(f"--- output {i} ({r['finish_reason']})")
        if r.get("reasoning_content"):
            print(f"[thinking]\n{r['reasoning_content']}\n[answer]")
        print(r["text"] if r["text"] is not None else ",".join(map(str, r["token_ids"])))
        if r["finish_reason"] == "length":
            print("[stopped at the length limit]", file=sys.stderr)
    s = out.stats
    print(f"[{s.canvases} canvases, {s.denoising_steps} denoising steps, {s.tokens_per_forward:.2f} tokens/forward, "
          f"{s.seconds:.2f} s, {s.tokens_per_second:.1f} tokens/s, seed {seed}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .generate import generate
    from .tokenizer import split_thinking

    ckpt, tokenizer = load_runtime(args)
    if tokenizer is None:
        raise CLIError("chat needs a checkpoint with tokenizer.json")
    gen = generation_config(args, ckpt.generation)
    seed_everything(args.seed)
    eos = set(gen.eos_token_id)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("dgemma chat: type a message; /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=args.think)
        out = generate(ckpt.model, [tokenizer.encode(text)], gen,
                       on_step=CanvasView(tokenizer) if args.show_canvas else None)
        ids = [t for t in out.token_ids[0] if t not in eos]
        reasoning, answer = split_thinking(tokenizer.decode(ids, skip_special_tokens=False))
        if reasoning:
            print(f"\x1b[2m{reasoning}\x1b[0m")
        print(f"model> {answer}")
        messages.append({"role": "assistant", "content": answer})


def cmd_convert(args) -> int:
    from . import checkpoint

    dtype = DTYPES[args.dtype]
    ckpt = checkpoint.load(args.model, device="cpu", dtype=torch.float32)
    out = checkpoint.save(args.out, ckpt.model, ckpt.config, ckpt.generation, tokenizer_dir=args.model, dtype=dtype,
                          passthrough=ckpt.passthrough, vision_config=ckpt.vision_config)
    print(f"wrote {out} ({args.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="Run, serve and fine-tune DiffusionGemma models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text for one or more prompts")
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", help="prompt token ids, comma-separated (repeat for a batch)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--think", action="store_true", help="enable thinking mode (implies --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and stats")
    p.add_argument("--show-canvas", action="store_true", help="watch the canvas settle (drawn on stderr)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    add_model_args(p)
    p.add_argument("--think", action="store_true", help="enable thinking mode")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--show-canvas", action="store_true", help="watch the canvas settle")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="re-save a checkpoint in another dtype (HF format)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.set_defaults(func=cmd_convert)

    for register in _plugins():
        register(sub)
    return parser


def _plugins():
    """Subcommands that live with their feature (serve, train, sudoku, bench, quantize). Their heavy imports stay inside
    the handlers, so `dgemma generate` does not pay for FastAPI or the trainer."""
    from .bench import add_bench_parser
    from .bench_serve import add_bench_serve_parser
    from .quant.quant_cli import add_quantize_parser
    from .server.serve_cli import add_serve_parser
    from .tasks.sudoku_cli import add_sudoku_parser
    from .train.train_cli import add_train_parser

    return [add_serve_parser, add_train_parser, add_sudoku_parser, add_bench_parser, add_bench_serve_parser,
            add_quantize_parser]


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    from .runtime import tune_malloc

    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc()
    user_errors: tuple = (CLIError, CheckpointError, ConfigError, ValueError, FileNotFoundError)
    try:
        from .tokenizer import TokenizerError

        user_errors += (TokenizerError,)
    except ImportError:
        pass
    try:
        return args.func(args) or 0
    except user_errors as e:
        print(f"dgemma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dgemma {args.command}: {getattr(args, 'interrupt_hint', 'interrupted')}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
