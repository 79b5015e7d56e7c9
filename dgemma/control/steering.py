"""Every steering input of a request as one frozen SteeringSpec, and the one builder that turns it into the
Steering the step reads (control/pins.py). Nothing changes a Steering after build_steering returns it.

What a spec may hold, and how build_steering reads it:
  1. pins: `pinned` (output position -> token id) or a `template` ("Name: {{8}}." its literal text pinned, then
     EOS); not both, and a template takes no suffix;
  2. a seed: `seed_tokens` or a `prediction` (text), renoised by `strength` (default 0.2 for a seed);
  3. a `suffix` (fill in the middle: resolved into pins at prefill, control/infill.py);
  4. a constraint: `constraint` (a JSON schema, JSON object, regex or choice) or a forced `tool_call`, not both,
     compiled over the tokenizer's constraint vocabulary for the output budget `max_tokens`. With `thinking` (the
     chat was rendered with thinking on) it applies to the answer after a free thought (control/thought.py).
Text a user wrote for the output (prediction, template literals) is plain text: "<eos>" typed in it is five
characters, never the EOS token. A suffix is read as a prompt is (special-token text is its token).
Every refusal is a SteeringError naming the request field it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from .pins import DEFAULT_PREDICTION_STRENGTH, Steering, SteeringError

CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "choice")


@dataclass(frozen=True)
class ConstraintSpec:
    """A constraint to compile: `kind` one of CONSTRAINT_KINDS, `value` its schema (dict), regex (str) or choices
    (tuple of str; None for json_object). `param`: the request field (or flag) its errors name."""

    kind: str
    value: object = None
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind {self.kind!r} is not one of {CONSTRAINT_KINDS}")


@dataclass(frozen=True)
class ToolCallSpec:
    """A forced tool call: the reply is one call to one of `functions` ({"name", "parameters"}), or one or more
    calls when `repeat`. `choice` ("required" or "named") is what its errors quote; `name` the named function."""

    functions: tuple
    repeat: bool
    choice: str
    name: str | None = None


@dataclass(frozen=True)
class SteeringSpec:
    pinned: tuple[tuple[int, int], ...] | None = None  # (output position, token id) pairs
    seed_tokens: tuple[int, ...] | None = None
    prediction: str | None = None  # text the output should resemble: its tokens are the seed
    strength: float | None = None  # renoise strength of the seed (default DEFAULT_PREDICTION_STRENGTH)
    suffix: str | tuple[int, ...] | None = None  # text or token ids after the middle
    template: str | None = None
    constraint: ConstraintSpec | None = None
    tool_call: ToolCallSpec | None = None
    max_tokens: int | None = None  # the output budget the request asked for (None: until EOS)
    thinking: bool = False  # the reply may open with a thought; a constraint applies to the answer after it
    pins_from: str = "pinned"  # the request field `pinned` came from, which errors name
    seed_from: str = "seed_tokens"  # the request field `seed_tokens` came from

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in ("pinned", "seed_tokens", "prediction", "strength",
                                                             "suffix", "template", "constraint", "tool_call"))


def build_steering(spec: SteeringSpec, tokenizer, vocabulary: Callable[[], object] | None, generation,
                   max_text_bytes: int | None = None, limits=None) -> Steering | None:
    """The Steering `spec` asks for, or None when it asks for nothing. `tokenizer` (None: the model has none) encodes
    its text; `vocabulary()` gives the constraint vocabulary (built only when a constraint is asked for);
    `generation` (a GenerationConfig) gives EOS. Text longer than `max_text_bytes` (UTF-8) is refused before it is
    encoded. A constraint compiles under `limits` (a CompileLimits; None: its defaults). SteeringError names the
    field of any refusal."""
    _check_combinations(spec)
    # 1. pins
    pins, pins_from = None, spec.pins_from
    if spec.template is not None:
        from .template import parse_template

        _need_tokenizer(tokenizer, "template", "a text template cannot be used")
        pins = dict(parse_template(spec.template, lambda text: _encode(tokenizer, text, "template", max_text_bytes),
                                   generation.eos_token_id[0])[0].pinned)
        pins_from = "template"
    elif spec.pinned is not None:
        pins = dict(spec.pinned)
    # 2. the seed
    seed, seed_from = (list(spec.seed_tokens) if spec.seed_tokens is not None else None), spec.seed_from
    if spec.prediction is not None:
        _need_tokenizer(tokenizer, "prediction", "a text prediction cannot be used; send seed_tokens")
        seed, seed_from = _encode(tokenizer, spec.prediction, "prediction", max_text_bytes) or None, "prediction"
    # 3. the suffix
    suffix = spec.suffix
    if isinstance(suffix, str):
        _need_tokenizer(tokenizer, "suffix", "a text suffix cannot be used")
        suffix = _encode(tokenizer, suffix, "suffix", max_text_bytes, plain=False) or None
    elif suffix is not None:
        suffix = list(suffix)
    # 4. the constraint, for the budget the output has (a template's length is checked with its pins, which end
    # in EOS, by Steering.check, so a refusal names the template)
    constraint = _constraint(spec, tokenizer, vocabulary, spec.max_tokens, limits)
    if pins is None and seed is None and suffix is None and constraint is None:
        return None
    strength = spec.strength
    if strength is None:
        strength = DEFAULT_PREDICTION_STRENGTH if seed is not None else 1.0
    return Steering(pinned=pins or {}, seed_tokens=seed, strength=strength, suffix=suffix, constraint=constraint,
                    pins_from=pins_from, seed_from=seed_from)


def steering_budget(spec: SteeringSpec, steering: Steering | None) -> int | None:
    """The output budget a request runs with: its own, else a template's length (the template is the output)."""
    if spec.max_tokens is None and spec.template is not None and steering is not None:
        from .template import template_length

        return template_length(steering)
    return spec.max_tokens


def _check_combinations(spec: SteeringSpec) -> None:
    if spec.prediction is not None and spec.seed_tokens is not None:
        raise SteeringError("give prediction or seed_tokens, not both", "prediction")
    if spec.template is not None and (spec.suffix is not None or spec.pinned is not None):
        raise SteeringError("template cannot be combined with suffix or pinned", "template")
    if spec.strength is not None and spec.prediction is None and spec.seed_tokens is None:
        raise SteeringError("strength needs a prediction or seed_tokens", "strength")
    if spec.tool_call is not None and spec.constraint is not None:
        raise SteeringError(f"tool_choice {spec.tool_call.choice!r} constrains the reply to a tool call; it cannot "
                            f"be combined with response_format or structured_outputs", "tool_choice")


def _need_tokenizer(tokenizer, param: str, what: str) -> None:
    if tokenizer is None:
        raise SteeringError(f"this model has no tokenizer, so {what}", param)


def _encode(tokenizer, text: str, param: str, max_text_bytes: int | None, plain: bool = True) -> list[int]:
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if max_text_bytes is not None and size > max_text_bytes:
        raise SteeringError(f"{param}: {size} bytes of text cannot fit in the context (at most {max_text_bytes} "
                            f"bytes)", param)
    return tokenizer.encode_plain(text) if plain else tokenizer.encode(text, add_special_tokens=False)


def _constraint(spec: SteeringSpec, tokenizer, vocabulary, max_tokens: int | None, limits):
    """The compiled automaton of spec.constraint or spec.tool_call, or None."""
    if spec.constraint is None and spec.tool_call is None:
        return None
    from .constraint import CompileLimits

    limits = limits or CompileLimits()
    asked = spec.constraint
    param = asked.param if asked is not None else "tool_choice"
    _need_tokenizer(tokenizer, param, "it cannot constrain text")
    if asked is None:
        answer = _tool_call(spec.tool_call, tokenizer, vocabulary(), limits)
    else:
        answer = _answer(asked, vocabulary, limits)
    from .constraint import ConstraintError

    try:
        answer.check_budget(max_tokens)  # a refusal names the budget, not the constraint
    except ConstraintError as e:
        raise SteeringError(str(e), "max_tokens") from None
    return _after_thought(answer, tokenizer, param) if spec.thinking else answer


def _after_thought(answer, tokenizer, param: str):
    """`answer` after a free thought, when the chat was rendered with thinking on."""
    from .thought import after_thought
    from ..text.thinking import CHANNEL_CLOSE, CHANNEL_OPEN

    ids = [tokenizer.token_id(m) for m in (CHANNEL_OPEN, CHANNEL_CLOSE)]
    if None in ids:
        raise SteeringError(f"thinking is on, but this model's tokenizer has no {CHANNEL_OPEN} and {CHANNEL_CLOSE} "
                            f"tokens, so the constraint cannot follow a thought", param)
    return after_thought(answer, *ids)


def _answer(asked: ConstraintSpec, vocabulary, limits):
    """The compiled automaton of a response_format or structured_outputs constraint."""
    from .constraint import Constraint, ConstraintError

    param = asked.param
    build: Mapping[str, Callable] = {
        "json_schema": lambda v, vocab: Constraint.from_json_schema(v, vocab, limits=limits),
        "json_object": lambda v, vocab: Constraint.json_object(vocab, limits=limits),
        "regex": lambda v, vocab: Constraint.from_regex(v, vocab, limits=limits),
        "choice": lambda v, vocab: Constraint.from_choice(v, vocab, limits=limits)}
    try:
        return build[asked.kind](asked.value, vocabulary())
    except ConstraintError as e:
        raise SteeringError(str(e), param) from None


def _tool_call(call: ToolCallSpec, tokenizer, vocabulary, limits):
    """The automaton for a forced tool call: the Gemma call syntax with arguments valid against the function's
    parameters (control/tools.py)."""
    from .constraint import Constraint, ConstraintError
    from .tool_grammar import tool_vocabulary
    from .tools import MARKERS

    marker_ids = {m: tokenizer.token_id(m) for m in MARKERS}
    missing = [m for m, i in marker_ids.items() if i is None]
    if missing:
        raise SteeringError(f"tool_choice {call.choice!r} constrains the reply to a tool call, but this model's "
                            f"tokenizer has no {missing[0]} token", "tool_choice")
    try:
        return Constraint.from_tool_call(list(call.functions), call.repeat, tool_vocabulary(vocabulary, marker_ids),
                                         limits=limits, description=f"tool call ({call.name or call.choice})")
    except ConstraintError as e:  # a schema refused names where: tools[i].function.parameters...
        message = str(e)
        if message.startswith("tools["):
            raise SteeringError(f"tools: {message}", "tools") from None
        raise SteeringError(message, "tool_choice") from None
