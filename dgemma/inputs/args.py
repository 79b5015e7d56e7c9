"""The command-line adapter of the input processor: `dgemma generate`'s and `dgemma edit`'s flags -> prompt ids,
images and a SteeringPlan. A refusal is a CLIError that names the flag the user typed."""

from __future__ import annotations

import json

from ..cli_common import CLIError, parse_ids
from ..control.steering import ConstraintSpec, SteeringSpec
from .processor import InputError, InputProcessor, SteeringPlan

SHAPE_FLAGS = ("suffix", "template", "prediction")
CONSTRAINT_FLAGS = ("json_schema", "regex", "choice", "json_object")
# request fields that name a flag of their own (a refusal naming another field is shown as it is)
FIELD_FLAGS = SHAPE_FLAGS + CONSTRAINT_FLAGS + ("strength",)


def flag(param: str) -> str:
    return "--" + param.replace("_", "-")


def prompt_ids(args, processor: InputProcessor) -> list[list[int]]:
    """--prompt (plain or --chat/--think) or --prompt-ids, one list of ids per prompt."""
    if args.prompt_ids:
        if args.chat or args.think:
            raise CLIError("--chat/--think need text prompts (--prompt), not --prompt-ids")
        return [processor.check_prompt_ids(parse_ids(x), "--prompt-ids") for x in args.prompt_ids]
    if not args.prompt:
        raise CLIError("give --prompt TEXT or --prompt-ids 1,2,3")
    tokenizer = processor.tokenizer
    if tokenizer is None:
        raise CLIError("this checkpoint has no tokenizer.json; use --prompt-ids")
    prompts = []
    for text in args.prompt:
        if args.chat or args.think:
            content = ([{"type": "image"} for _ in args.image] + [{"type": "text", "text": text}] if args.image
                       else text)
            try:  # the prompt's text is plain text: only the template writes control tokens, as in the server
                prompts.append(processor.chat_ids([{"role": "user", "content": content}], thinking=args.think))
            except InputError as e:
                raise CLIError(f"--prompt: {e}") from None
        else:
            prompts.append(tokenizer.encode(text, add_special_tokens=True))
        if not prompts[-1]:
            raise CLIError(f"--prompt {text!r} is empty once tokenized")
    return prompts


def prompt_images(args, ckpt, prompts: list[list[int]]):
    """--image: the prompt expanded with its images' tokens, and the images (generate's `images`). A --chat prompt
    gets the images before its text; a plain prompt must hold one <|image|> per image where it goes."""
    if not args.image:
        return prompts, None
    from ..image_files import read_image
    from ..images import ImageSupport

    if len(prompts) != 1:
        raise CLIError("--image works with one prompt")
    support = ImageSupport.of(ckpt)
    pictures = [read_image(p) for p in args.image]
    ids, patches = support.prepare(prompts[0], pictures)
    return [ids], support.prompt_images([patches])


def steering_spec(args, max_tokens: int | None) -> SteeringSpec | None:
    """--suffix, --template or --prediction/--strength, and a constraint flag, as one SteeringSpec (None: none of
    them). A constraint combines with any one of the others (a JSON schema with a template, say)."""
    shapes = [f for f in SHAPE_FLAGS if getattr(args, f, None)]
    constraints = [f for f in CONSTRAINT_FLAGS if getattr(args, f, None)]
    if not shapes and not constraints:
        if getattr(args, "strength", None) is not None:
            raise CLIError("--strength needs --prediction")
        return None
    for group, names in ((shapes, "--suffix, --template and --prediction"),
                         (constraints, "--json-schema, --json-object, --regex and --choice")):
        if len(group) > 1:
            raise CLIError(f"give one of {names}, not {' and '.join(flag(a) for a in group)}")
    constraint = None
    if constraints:
        kind = constraints[0]
        value = {"json_schema": lambda: _read_schema(args.json_schema), "json_object": lambda: None,
                 "regex": lambda: args.regex, "choice": lambda: tuple(args.choice)}[kind]()
        constraint = ConstraintSpec(kind, value, param=kind)
    return SteeringSpec(prediction=args.prediction or None, strength=getattr(args, "strength", None),
                        suffix=args.suffix or None, template=args.template or None, constraint=constraint,
                        max_tokens=max_tokens, thinking=bool(getattr(args, "think", False)))


def steering_plan(args, processor: InputProcessor, max_tokens: int | None) -> SteeringPlan:
    """The steering the flags ask for, built by the input processor, and the output budget (`max_tokens`, the
    --max-new-tokens or checkpoint's; without the flag a --template is the whole output, its length the budget).
    An error names the flag."""
    spec = steering_spec(args, None if args.template and args.max_new_tokens is None else max_tokens)
    if spec is None:
        return SteeringPlan(None, max_tokens)
    if processor.tokenizer is None:
        first = next(f for f in FIELD_FLAGS if getattr(args, f, None))
        raise CLIError(f"{flag(first)} needs a checkpoint with tokenizer.json")
    return plan(processor, spec)


def plan(processor: InputProcessor, spec: SteeringSpec) -> SteeringPlan:
    """processor.steering(spec), its refusals naming the flag of the field."""
    try:
        return processor.steering(spec)
    except InputError as e:
        raise flag_error(e) from None


def flag_error(e: Exception) -> CLIError:
    """A steering refusal (InputError, SteeringError: `param` a request field) as a CLIError naming the flag."""
    param = getattr(e, "param", None)
    return CLIError(f"{flag(param)}: {e}" if param in FIELD_FLAGS else str(e))


def _read_schema(path_text: str) -> dict:
    from pathlib import Path

    path = Path(path_text)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--json-schema {path}: cannot read it ({type(e).__name__})") from None
    except json.JSONDecodeError as e:
        raise CLIError(f"--json-schema {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(schema, dict):
        raise CLIError(f"--json-schema {path}: a JSON schema is an object")
    return schema
