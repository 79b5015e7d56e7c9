"""`dgemma generate`: text for one or more prompts, optionally steered (a template, a suffix, a prediction, a
constraint) and watched as its canvases settle. The input processor (dgemma/inputs) builds the prompts and the
steering from the flags."""

from __future__ import annotations

import json
import os
import sys

from ..cli_common import (DEFAULT_MODEL_NOTE, CLIError, apply_threads, generation_config, load_runtime, notice,
                          parse_ids, seed_everything)

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
    from ..cli_common import DEFAULT_MODEL
    from ..text.tokenizer import Tokenizer

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
            from ..text.thinking import split_thinking

            reasoning, content = split_thinking(raw)
            record["text"] = content
            record["reasoning_content"] = reasoning
        else:
            record["text"] = tokenizer.decode(body, skip_special_tokens=True)
    return record


def cmd_generate(args) -> int:
    from ..config import GenerationConfig
    from ..control.pins import SteeringError
    from ..generate import ContextLengthError, generate
    from ..inputs import InputProcessor
    from ..inputs.args import flag_error, prompt_ids, prompt_images, steering_plan

    generation_config(args, GenerationConfig())  # reject bad sampling arguments before loading any weights
    if args.prompt_ids:
        [parse_ids(x) for x in args.prompt_ids]
    check_default_model(args)
    apply_threads(args.threads)
    ckpt, tokenizer = load_runtime(args)
    processor = InputProcessor(tokenizer, ckpt.generation, ckpt.config.text.vocab_size)
    prompts, images = prompt_images(args, ckpt, prompt_ids(args, processor))
    gen = generation_config(args, ckpt.generation)
    plan = steering_plan(args, processor, gen.max_new_tokens)
    if plan.max_tokens != gen.max_new_tokens:  # a template's length
        gen = gen.replace(max_new_tokens=plan.max_tokens)
    steering = None if plan.steering is None else [plan.steering] * len(prompts)
    seed = seed_everything(args.seed)
    view = CanvasView(tokenizer) if args.show_canvas else None
    try:
        out = generate(ckpt.model, prompts, gen, on_step=view, sampler=args.sampler, steering=steering,
                       greedy=args.greedy, images=images)
    except (ContextLengthError, SteeringError) as e:
        raise flag_error(e) from None
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
