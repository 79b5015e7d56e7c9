"""`dgemma` command line: generate | chat | convert, plus the subcommands that live with their feature (serve,
train, sudoku, bench, bench-serve, quantize). Light to import: torch and the model are imported in the handlers."""

from __future__ import annotations

import json
import os
import sys

from .cli_common import (DEFAULT_MODEL_NOTE, DTYPES, CLIError, DgemmaError, Parser, add_model_args,  # noqa: F401
                         add_sampling_args, add_threads_arg, apply_threads, generation_config, load_checkpoint,
                         load_runtime, notice, parse_ids, pick_device, resolve_model_dir, seed_everything)


class CanvasView:
    """Redraws row 0's argmax canvas after every denoising step. On a terminal the canvas is redrawn in place, with
    settled (accepted) tokens in bold and the rest dim; to a file or a pipe it is appended as plain text, with each
    unsettled token shown as `_`, so a log holds no escape codes."""

    def __init__(self, tokenizer, stream=None):
        self.tokenizer = tokenizer
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.lines = 0

    def piece(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"{token_id} "
        return self.tokenizer.decode([token_id], skip_special_tokens=False).replace("\n", "⏎")

    def __call__(self, view) -> None:
        ids = view.argmax_canvas[0].tolist()
        accepted = view.accepted[0].tolist()
        header = f"canvas {view.canvas_index + 1}  step {view.step}/{view.max_steps}  settled {sum(accepted)}/{len(ids)}"
        if not self.tty:
            text = "".join(self.piece(t) if a else "_" for t, a in zip(ids, accepted))
            self.stream.write(header + "\n" + text + "\n")
            self.stream.flush()
            return
        text = "".join(("\x1b[1m" if a else "\x1b[2m") + self.piece(t) + "\x1b[0m" for t, a in zip(ids, accepted))
        if self.lines:
            self.stream.write(f"\x1b[{self.lines}F\x1b[J")
        self.stream.write(header + "\n" + text + "\n")
        self.stream.flush()
        width = max(os.get_terminal_size(self.stream.fileno()).columns, 1)
        self.lines = sum(max(1, -(-len(line) // width)) for line in (header, _strip_ansi(text)))


def _strip_ansi(s: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", s)


def render_prompts(args, tokenizer, vocab_size: int) -> list[list[int]]:
    if args.prompt_ids:
        if args.chat or args.think:
            raise CLIError("--chat/--think need text prompts (--prompt), not --prompt-ids")
        prompts = [parse_ids(x) for x in args.prompt_ids]
        for ids in prompts:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise CLIError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return prompts
    if not args.prompt:
        raise CLIError("give --prompt TEXT or --prompt-ids 1,2,3")
    if tokenizer is None:
        raise CLIError("this checkpoint has no tokenizer.json; use --prompt-ids")
    prompts = []
    for text in args.prompt:
        if args.chat or args.think:
            content = ([{"type": "image"} for _ in args.image] + [{"type": "text", "text": text}] if args.image
                       else text)
            text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 enable_thinking=args.think)
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        else:
            prompts.append(tokenizer.encode(text, add_special_tokens=True))
        if not prompts[-1]:
            raise CLIError(f"--prompt {text!r} is empty once tokenized")
    return prompts


def cli_images(args, ckpt, prompts: list[list[int]]):
    """--image: the prompt expanded with its images' tokens, and the images (generate's `images`). A --chat prompt
    gets the images before its text; a plain prompt must hold one <|image|> per image where it goes."""
    if not args.image:
        return prompts, None
    from .images import ImageSupport, read_image

    if len(prompts) != 1:
        raise CLIError("--image works with one prompt")
    support = ImageSupport.of(ckpt)
    pictures = [read_image(p) for p in args.image]
    ids, patches = support.prepare(prompts[0], pictures)
    return [ids], support.prompt_images([patches])


STEERING_FLAGS = ("suffix", "template", "prediction", "strength", "seed_tokens", "pinned")


def canvas_steering(args, tokenizer, gen, vocab_size: int):
    """The Steering asked for by --suffix, --template or --prediction/--strength, and a constraint flag, or None.
    A constraint combines with any one of the others (a JSON schema with a template, say)."""
    from .control.pins import DEFAULT_PREDICTION_STRENGTH, Steering, SteeringError

    shapes = [f for f in ("suffix", "template", "prediction") if getattr(args, f, None)]
    constraints = [f for f in ("json_schema", "regex", "choice", "json_object") if getattr(args, f, None)]
    if not shapes and not constraints:
        if getattr(args, "strength", None) is not None:
            raise CLIError("--strength needs --prediction")
        return None
    for group, names in ((shapes, "--suffix, --template and --prediction"),
                         (constraints, "--json-schema, --json-object, --regex and --choice")):
        if len(group) > 1:
            flags = " and ".join("--" + a.replace("_", "-") for a in group)
            raise CLIError(f"give one of {names}, not {flags}")
    if tokenizer is None:
        raise CLIError(f"--{(shapes + constraints)[0].replace('_', '-')} needs a checkpoint with tokenizer.json")
    constraint = cli_constraint(args, tokenizer, gen, vocab_size) if constraints else None
    if not shapes:
        return Steering(constraint=constraint)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    try:
        if args.suffix:
            steering = Steering(suffix=encode(args.suffix) or None)
        elif args.template:
            from .control.template import parse_template

            steering = parse_template(args.template, encode, gen.eos_token_id[0])[0]
        else:
            strength = DEFAULT_PREDICTION_STRENGTH if args.strength is None else args.strength
            steering = Steering(seed_tokens=encode(args.prediction) or None, strength=strength)
    except SteeringError as e:
        raise CLIError(f"--{e.param}: {e}") from None
    steering.constraint = constraint
    return steering


def cli_constraint(args, tokenizer, gen, vocab_size: int):
    """Compile the constraint flag into an automaton over the checkpoint's tokenizer."""
    from pathlib import Path

    from .control import Constraint, ConstraintError, ConstraintVocabulary

    vocab = ConstraintVocabulary.from_tokenizer(tokenizer.backend, gen.eos_token_id, [gen.pad_token_id], vocab_size)
    try:
        if args.json_schema:
            path = Path(args.json_schema)
            try:
                schema = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise CLIError(f"--json-schema {path}: cannot read it ({type(e).__name__})") from None
            except json.JSONDecodeError as e:
                raise CLIError(f"--json-schema {path}: not JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(schema, dict):
                raise CLIError(f"--json-schema {path}: a JSON schema is an object")
            return Constraint.from_json_schema(schema, vocab, max_tokens=gen.max_new_tokens)
        if args.json_object:
            return Constraint.json_object(vocab, max_tokens=gen.max_new_tokens)
        if args.regex:
            return Constraint.from_regex(args.regex, vocab, max_tokens=gen.max_new_tokens)
        return Constraint.from_choice(args.choice, vocab, max_tokens=gen.max_new_tokens)
    except ConstraintError as e:
        flag = next(f for f in ("--json-schema", "--json-object", "--regex", "--choice")
                    if getattr(args, f[2:].replace("-", "_")))
        raise CLIError(f"{flag}: {e}") from None


def add_steering_args(p) -> None:
    p.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against this schema (by "
                                                         "construction: every canvas keeps it valid)")
    p.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    p.add_argument("--regex", help="the output fully matches this regular expression (Rust syntax)")
    p.add_argument("--choice", action="append", help="the output is one of these strings (repeat the flag)")
    p.add_argument("--suffix", help="fill in the middle: the output goes between the prompt and this text")
    p.add_argument("--template", help='pin literal text and fill the holes, e.g. "Name: {{8}}, age: {{2}}."')
    p.add_argument("--prediction", help="text the output should resemble: it seeds the canvas (an edit)")
    p.add_argument("--strength", type=float, default=None,
                   help="renoise strength of --prediction in [0, 1] (default: 0.2, as measured in BENCHMARKS.md)")
    p.add_argument("--sampler", choices=["exact", "fast"], default="exact",
                   help="exact: the reference's random draws; fast: the same distribution, far fewer draws")


def check_default_model(args) -> None:
    """The embedded default model solves Sudoku; it is no language model. Text outside its vocabulary would become
    <unk> and come back as digits, so refuse that with the flag to pass instead, and say which model runs."""
    if args.model:
        return
    from .cli_common import DEFAULT_MODEL
    from .tokenizer import Tokenizer

    hint = "pass --model DIR (a DiffusionGemma checkpoint directory) for text, or use `dgemma sudoku solve PUZZLE`"
    if args.command == "chat" or getattr(args, "chat", False) or getattr(args, "think", False):
        raise CLIError(f"no --model given, and {DEFAULT_MODEL_NOTE}: it cannot chat; {hint}")
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL)
    unk = tokenizer.token_id("<unk>") if tokenizer is not None else None
    for text in args.prompt or []:
        if unk is not None and unk in tokenizer.encode(text):
            raise CLIError(f"no --model given, and {DEFAULT_MODEL_NOTE}: it cannot read {text[:40]!r}; {hint}")
    notice(args.command, "running the embedded Sudoku model (no --model given); pass --model DIR for text")


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
    from .generate import ContextLengthError, generate

    generation_config(args, GenerationConfig())  # reject bad sampling arguments before loading any weights
    if args.prompt_ids:
        [parse_ids(x) for x in args.prompt_ids]
    check_default_model(args)
    apply_threads(args.threads)
    ckpt, tokenizer = load_runtime(args)
    prompts = render_prompts(args, tokenizer, ckpt.config.text.vocab_size)
    prompts, images = cli_images(args, ckpt, prompts)
    gen = generation_config(args, ckpt.generation)
    steering = canvas_steering(args, tokenizer, gen, ckpt.config.text.vocab_size)
    if steering is not None:
        if args.template and args.max_new_tokens is None:  # the template is the whole output
            from .control.template import template_length

            gen = gen.replace(max_new_tokens=template_length(steering))
        steering = [steering] * len(prompts)
    seed = seed_everything(args.seed)
    view = CanvasView(tokenizer) if args.show_canvas else None
    from .control.pins import SteeringError

    try:
        out = generate(ckpt.model, prompts, gen, on_step=view, sampler=args.sampler, steering=steering,
                       greedy=args.greedy, images=images)
    except (ContextLengthError, SteeringError) as e:
        param = getattr(e, "param", None)
        raise CLIError(f"--{param.replace('_', '-')}: {e}" if param in STEERING_FLAGS else str(e)) from None
    if args.suffix:  # fill in the middle: print the middle
        out.token_ids = [ids[:n] for ids, n in zip(out.token_ids, out.middle_lengths)]
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


def fit_conversation(messages: list[dict], render, limit: int) -> tuple[list[dict], list[int], int]:
    """Drop the oldest user/assistant turns (never the system prompt, never the newest message) until the rendered
    prompt leaves `limit` or fewer tokens. Returns the kept messages, the prompt's ids and how many turns were
    dropped; the ids are longer than `limit` only when the newest message alone does not fit."""
    keep_system = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = render(messages)
        if len(ids) <= limit or len(messages) <= keep_system + 1:
            return messages, ids, dropped
        # one turn: the oldest user message and the assistant's answer to it
        cut = keep_system + (2 if len(messages) > keep_system + 2 and messages[keep_system + 1]["role"] == "assistant"
                             else 1)
        messages = messages[:keep_system] + messages[cut:]
        dropped += 1


def cmd_edit(args) -> int:
    """Rewrite a file as an instruction asks: the prompt is the instruction and the file, and the file's own text
    seeds the canvas (renoised by --strength), so a mostly right answer needs few denoising steps."""
    from pathlib import Path

    from .config import GenerationConfig
    from .control.pins import DEFAULT_PREDICTION_STRENGTH, Steering
    from .generate import generate

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"--file {path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise CLIError(f"--file {path}: cannot read it as UTF-8 text ({type(e).__name__})") from None
    if not text.strip():
        raise CLIError(f"--file {path} is empty")
    strength = DEFAULT_PREDICTION_STRENGTH if args.strength is None else args.strength
    if not 0 <= strength <= 1:
        raise CLIError(f"--strength must be in [0, 1], got {strength}")
    out_path = Path(args.out) if args.out else None
    if out_path is not None and out_path.exists():
        raise CLIError(f"--out {out_path} exists; dgemma edit writes a new file and never replaces one")
    generation_config(args, GenerationConfig())  # reject bad sampling arguments before loading any weights
    if not args.model:
        raise CLIError("dgemma edit needs --model DIR (a language model; the embedded default solves Sudoku)")
    apply_threads(args.threads)
    ckpt, tokenizer = load_runtime(args)
    if tokenizer is None:
        raise CLIError("dgemma edit needs a checkpoint with tokenizer.json")
    request = f"{args.instruction}\n\n{text}"
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                                            add_generation_prompt=True), add_special_tokens=False)
    seed_tokens = tokenizer.encode(text, add_special_tokens=False)
    gen = generation_config(args, ckpt.generation)
    if args.max_new_tokens is None:  # room for the file and a little more
        gen = gen.replace(max_new_tokens=len(seed_tokens) + ckpt.config.canvas_length // 4)
    seed = seed_everything(args.seed)
    # a prompt too long for the context or a seed longer than the output is a DgemmaError: main prints its line
    out = generate(ckpt.model, [prompt], gen, sampler=args.sampler,
                   steering=[Steering(seed_tokens=seed_tokens, strength=strength)], greedy=args.greedy)
    ids = [t for t in out.token_ids[0] if t not in set(gen.eos_token_id)]
    edited = tokenizer.decode(ids, skip_special_tokens=True)
    if out_path is None:
        sys.stdout.write(edited if edited.endswith("\n") else edited + "\n")
    else:
        tmp = out_path.with_name(f".{out_path.name}.dgemma-tmp")
        tmp.write_text(edited, encoding="utf-8")
        os.replace(tmp, out_path)
        print(f"wrote {out_path}", file=sys.stderr)
    s = out.stats
    print(f"[{s.denoising_steps} denoising steps, strength {strength}, {s.seconds:.2f} s, seed {seed}]",
          file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .generate import generate
    from .images import ImageError, ImageSupport, expand_image_tokens, read_image
    from .tokenizer import split_thinking

    check_default_model(args)
    apply_threads(args.threads)
    ckpt, tokenizer = load_runtime(args)
    if tokenizer is None:
        raise CLIError("chat needs a checkpoint with tokenizer.json")
    gen = generation_config(args, ckpt.generation)
    seed_everything(args.seed)
    eos = set(gen.eos_token_id)
    # a prompt must leave room for at least one canvas inside the model's context (then generate cannot refuse it)
    limit = ckpt.config.text.max_position_embeddings - ckpt.config.canvas_length
    dim, undim = ("\x1b[2m", "\x1b[0m") if sys.stdout.isatty() else ("", "")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)

    pending: list[int] = []  # /image: pictures for the next message, by index into `pictures`
    pictures: list = []  # every picture of the session, preprocessed (images.ImagePatches)

    def images_of(msgs: list[dict]) -> list:
        return [pictures[part["index"]] for m in msgs if isinstance(m["content"], list)
                for part in m["content"] if part.get("type") == "image"]

    def render(msgs: list[dict]) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=args.think)
        ids = tokenizer.encode(text)
        images = images_of(msgs)
        return expand_image_tokens(ids, images, support.tokens) if images else ids

    support = None
    print("dgemma chat: type a message; /image PATH adds a picture to the next one; /reset clears the history, "
          "/exit or Ctrl-D quits.", file=sys.stderr)
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
            messages, pending = list(system), []
            continue
        if line == "/image" or line.startswith("/image "):
            try:
                support = support or ImageSupport.of(ckpt)
                pictures.append(support.patches(read_image(line[len("/image"):].strip())))
            except ImageError as e:
                print(f"[{e}]", file=sys.stderr)
                continue
            pending.append(len(pictures) - 1)
            print(f"[image {len(pending)} will go with your next message]", file=sys.stderr)
            continue
        content = ([{"type": "image", "index": i} for i in pending] + [{"type": "text", "text": line}] if pending
                   else line)
        try:
            kept, prompt, dropped = fit_conversation(messages + [{"role": "user", "content": content}], render,
                                                     limit)
        except ImageError as e:  # e.g. a chat template that does not write the image placeholders
            print(f"[{e}]", file=sys.stderr)
            continue
        if len(prompt) > limit:  # this message alone does not fit: keep the conversation as it was
            print(f"[that message makes a {len(prompt)}-token prompt; the model's context leaves room for {limit}: "
                  f"send a shorter one]", file=sys.stderr)
            continue
        if dropped:
            print(f"[the conversation outgrew the model's {ckpt.config.text.max_position_embeddings}-token context: "
                  f"dropped the oldest {dropped} turn{'s' * (dropped > 1)}; /reset starts afresh]", file=sys.stderr)
        messages, pending = kept, []
        images = images_of(kept)
        out = generate(ckpt.model, [prompt], gen, on_step=CanvasView(tokenizer) if args.show_canvas else None,
                       greedy=args.greedy, images=support.prompt_images([images]) if images else None)
        ids = [t for t in out.token_ids[0] if t not in eos]
        reasoning, answer = split_thinking(tokenizer.decode(ids, skip_special_tokens=False))
        if reasoning:
            print(f"{dim}{reasoning}{undim}")
        print(f"model> {answer}")
        messages.append({"role": "assistant", "content": answer})


def cmd_convert(args) -> int:
    from pathlib import Path

    import torch

    from . import checkpoint
    from .output_dir import previous_output

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
    from . import __version__

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
    from .cli_common import add_eos_arg
    add_eos_arg(p)
    add_steering_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("edit", help="rewrite a file as an instruction asks, the file seeding the canvas")
    add_model_args(p)
    p.add_argument("--file", required=True, help="the UTF-8 text file to edit")
    p.add_argument("--instruction", required=True, help="what to change")
    p.add_argument("--out", help="write the edited text to this new file (default: standard output)")
    p.add_argument("--strength", type=float, default=None,
                   help="renoise strength of the file's text in [0, 1] (default: 0.2, as measured in BENCHMARKS.md)")
    p.add_argument("--sampler", choices=["exact", "fast"], default="exact", help="random draws (see generate)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    add_model_args(p)
    p.add_argument("--think", action="store_true", help="enable thinking mode")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--show-canvas", action="store_true", help="watch the canvas settle (on stderr)")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

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
    from .bench.cli import add_bench_parser
    from .bench_serve import add_bench_serve_parser
    from .init_tiny import add_init_tiny_parser
    from .quant.quant_cli import add_quantize_parser
    from .server.serve_cli import add_serve_parser
    from .tasks.sudoku_cli import add_sudoku_parser
    from .train.train_cli import add_train_parser

    return [add_serve_parser, add_train_parser, add_sudoku_parser, add_bench_parser, add_bench_serve_parser,
            add_quantize_parser, add_init_tiny_parser]


def main(argv: list[str] | None = None) -> int:
    """Run one command. A DgemmaError (a user error) is printed as one line with exit status 2; any other exception
    is a bug in dgemma and propagates with its traceback."""
    from .runtime import tune_malloc

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


if __name__ == "__main__":
    sys.exit(main())
