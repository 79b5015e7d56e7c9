"""`dgemma edit`: rewrite a file as an instruction asks, the file's own text seeding the canvas (a prediction)."""

from __future__ import annotations

import os
import sys

from ..cli_common import CLIError, apply_threads, generation_config, load_runtime, seed_everything


def cmd_edit(args) -> int:
    """Rewrite a file as an instruction asks: the prompt is the instruction and the file, and the file's own text
    seeds the canvas (renoised by --strength), so a mostly right answer needs few denoising steps."""
    from pathlib import Path

    from ..config import GenerationConfig
    from ..control.pins import DEFAULT_PREDICTION_STRENGTH
    from ..control.steering import SteeringSpec
    from ..generate import generate
    from ..inputs import InputProcessor
    from ..inputs.args import plan

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
    prompt = tokenizer.encode_chat([{"role": "user", "content": request}], add_generation_prompt=True)
    # the file's text is the prediction: plain text, its special-token spellings included
    steering = plan(InputProcessor(tokenizer, ckpt.generation, ckpt.config.text.vocab_size),
                    SteeringSpec(prediction=text, strength=strength)).steering
    gen = generation_config(args, ckpt.generation)
    if args.max_new_tokens is None:  # room for the file and a little more
        gen = gen.replace(max_new_tokens=len(steering.seed_tokens) + ckpt.config.canvas_length // 4)
    seed = seed_everything(args.seed)
    # a prompt too long for the context or a seed longer than the output is a DgemmaError: main prints its line
    out = generate(ckpt.model, [prompt], gen, sampler=args.sampler, steering=[steering], greedy=args.greedy)
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
