"""The HTTP adapter of the input processor: an OpenAI request body (server/protocol.py, validated) -> the prompt
ids, SamplingParams (images and Steering included) and, for a chat, its tools. Runs off the event loop (templates,
long prompts, images and constraint compiles take time); every refusal is an InputError naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..control.steering import ConstraintSpec, SteeringSpec, ToolCallSpec
from ..engine.request import RequestError, SamplingParams
from ..step import TOP_LOGPROBS
from .processor import InputError, InputProcessor
from .structured_read import StructuredRead, structured_read


@dataclass(frozen=True)
class RequestInput:
    prompt: list[int]
    params: SamplingParams
    tools: object = None  # server.tools.ToolRequest of a chat, or None


@dataclass(frozen=True)
class ServingOptions:
    """The server's settings that shape a request's input (flags of `dgemma serve`)."""

    settled_prefix: bool = True
    max_messages: int = 1024
    max_content_chars: int = 1_000_000
    images: object = None  # images.ImageSupport, or None: the model takes no images
    allowed_media: object = None  # --allowed-local-media: the one directory image paths may name
    max_images: int = 8


def completion_input(processor: InputProcessor, body, options: ServingOptions) -> RequestInput:
    """/v1/completions: the prompt (text or token ids) and its parameters."""
    if isinstance(body.prompt, str):
        prompt = processor.encode(body.prompt, "prompt", add_special_tokens=True)
    else:
        prompt = list(body.prompt)
    read = structured_read(body, processor.canvas_length, processor.vocab_size)
    plan = processor.steering(steering_spec(body, body.max_tokens, read, suffix=body.suffix))
    return RequestInput(prompt, sampling_params(body, plan, options, read, skip_special_tokens=True))


def chat_input(processor: InputProcessor, body, options: ServingOptions) -> RequestInput:
    """/v1/chat/completions: the rendered chat (images expanded), its parameters and its tools."""
    from ..server.tools import ToolRequestError, template_messages, tool_request

    try:
        processor.check_can_chat()
    except InputError as e:
        ids = " with a prompt of token ids" if processor.tokenizer is None else ""
        raise InputError(f"{e}; use /v1/completions{ids}", e.param) from None
    if len(body.messages) > options.max_messages:
        raise InputError(f"messages: {len(body.messages)} messages, more than this server's limit of "
                         f"{options.max_messages} (--max-messages)", "messages")
    kwargs = dict(body.chat_template_kwargs or {})
    thinking = bool(kwargs.pop("enable_thinking", False))
    try:
        tools = tool_request(body)
    except ToolRequestError as e:
        raise InputError(str(e), e.param) from None
    if tools is not None:
        kwargs["tools"] = tools.tools
    messages, pictures = _take_images([m.model_dump(exclude_none=True) for m in body.messages], options)
    messages = template_messages(messages)
    chars = _text_chars(messages) + _text_chars(kwargs)
    if chars > options.max_content_chars:
        raise InputError(f"messages: {chars} characters of text, more than this server's limit of "
                         f"{options.max_content_chars} (--max-content-chars)", "messages")
    prompt = processor.chat_ids(messages, thinking, kwargs)
    images = None
    if pictures:
        from ..images import ImageError

        try:
            prompt, patches = options.images.prepare(prompt, pictures)
        except ImageError as e:
            raise InputError(f"messages: {e}", "messages") from None
        images = options.images.prompt_images([patches])
    max_tokens = body.max_completion_tokens or body.max_tokens
    forced = tools.forced if tools is not None else None
    call = None if forced is None else ToolCallSpec(
        tuple(forced), repeat=tools.choice == "required" and body.parallel_tool_calls is not False,
        choice=tools.choice, name=tools.name)
    # a forced call's grammar is the constraint; pins or a prediction steer the call (checked by the engine)
    read = structured_read(body, processor.canvas_length, processor.vocab_size)
    plan = processor.steering(steering_spec(body, max_tokens, read, tool_call=call, thinking=thinking))
    # the thought channel markers are special tokens: keep them in the text and split on them
    return RequestInput(prompt, sampling_params(body, plan, options, read, skip_special_tokens=False, images=images),
                        tools)


def steering_spec(body, max_tokens: int | None, read: StructuredRead = StructuredRead(), suffix: str | None = None,
                  tool_call: ToolCallSpec | None = None, thinking: bool = False) -> SteeringSpec:
    """The steering fields of a body (pinned, seed_tokens, prediction, strength, template, response_format,
    structured_outputs, and vLLM's diffusion_seed_canvas and diffusion_pinned as `read`) as one SteeringSpec. A
    seed canvas starts unrenoised (strength 0) unless the body sets strength."""
    seed, seed_from, strength = body.seed_tokens, "seed_tokens", body.strength
    if read.seed_tokens is not None:
        seed, seed_from, strength = read.seed_tokens, "diffusion_seed_canvas", 0.0 if strength is None else strength
    pinned, pins_from = pinned_positions(body.pinned), "pinned"
    if read.pinned is not None:
        pinned, pins_from = read.pinned, "diffusion_pinned"
    return SteeringSpec(pinned=pinned, seed_tokens=tuple(seed) if seed is not None else None,
                        prediction=prediction_text(body.prediction), strength=strength, suffix=suffix,
                        template=body.template, constraint=constraint_spec(body), tool_call=tool_call,
                        max_tokens=max_tokens, thinking=thinking, pins_from=pins_from, seed_from=seed_from)


def sampling_params(body, plan, options: ServingOptions, read: StructuredRead, skip_special_tokens: bool,
                    images=None) -> SamplingParams:
    from ..server.protocol import StreamOptions

    stream_options = body.stream_options or StreamOptions()
    steps = body.max_denoising_steps if read.max_steps is None else read.max_steps
    try:
        return SamplingParams(
            max_tokens=plan.max_tokens, stop=body.stop_list(), seed=body.seed,
            temperature=1.0 if body.temperature is None else body.temperature,
            max_denoising_steps=steps, entropy_bound=body.entropy_bound, t_min=body.t_min,
            t_max=body.t_max, pin_prefix=options.settled_prefix if body.settled_prefix is None else body.settled_prefix,
            include_drafts=body.stream and stream_options.include_drafts, skip_special_tokens=skip_special_tokens,
            steering=plan.steering, images=images, logprobs=logprobs_asked(body, read), read_only=read.read_only,
            **sampler_cuts(body))
    except RequestError as e:
        raise InputError(str(e), e.param) from None


def sampler_cuts(body) -> dict:
    """top_p and top_k as SamplingParams takes them: top_k -1 or 0 is no cut (as vLLM reads it)."""
    return {"top_p": body.top_p, "top_k": None if body.top_k in (-1, 0) else body.top_k}


def logprobs_asked(body, read: StructuredRead) -> int | None:
    """How many alternatives each output token's log-probability comes with (None: no log-probabilities): chat's
    logprobs (a bool) and top_logprobs (which needs logprobs), or completions' logprobs (a count). A read-only
    structured read always returns them, with TOP_LOGPROBS alternatives unless the request names a count."""
    if hasattr(body, "top_logprobs"):  # chat
        if not body.logprobs and body.top_logprobs:
            raise InputError("top_logprobs needs logprobs: true", "top_logprobs")
        asked = (body.top_logprobs or 0) if body.logprobs else None
    else:
        asked = body.logprobs
    return TOP_LOGPROBS if asked is None and read.read_only else asked


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The parameters of n choices. With a seed s, choice i draws from seed s + i (wrapped into the signed 64-bit
    range), so choice i is what a single request with that seed gives; without one, each choice draws its own random
    seed (the engine's rule for a request with no seed)."""
    if n == 1 or params.seed is None:
        return [params] + [dataclasses.replace(params) for _ in range(n - 1)]
    return [dataclasses.replace(params, seed=(params.seed + i + 2**63) % 2**64 - 2**63) for i in range(n)]


def pinned_positions(pinned: dict[str, int] | None) -> tuple[tuple[int, int], ...] | None:
    """`pinned`'s keys (JSON object keys: strings of ASCII digits) as output positions. Two keys that name the same
    position ("0" and "00") are refused: one would silently overwrite the other."""
    if pinned is None:
        return None
    positions: dict[int, str] = {}
    for key in pinned:
        if not (key.isascii() and key.isdigit()):
            raise InputError(f"pinned: the key {key[:20]!r} is not an output position (a key is a number written "
                             f"with the digits 0-9)", "pinned")
        position = int(key)
        if position in positions:
            raise InputError(f"pinned: the keys {positions[position]!r} and {key!r} both name position {position}",
                             "pinned")
        positions[position] = key
    return tuple((int(k), v) for k, v in pinned.items())


def prediction_text(prediction) -> str | None:
    """The text of OpenAI's `prediction`: its content, or its content parts' text in order (each part a text part
    whose text is a string)."""
    if prediction is None:
        return None
    content = prediction.content
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        where = f"prediction.content[{i}]"
        if part.get("type") != "text":
            raise InputError(f"{where}.type: a prediction's content parts are text parts ({{\"type\": \"text\", "
                             f"\"text\": ...}})", "prediction")
        if not isinstance(part.get("text"), str):
            raise InputError(f"{where}.text must be a string, got {type(part.get('text')).__name__}", "prediction")
        texts.append(part["text"])
    return "".join(texts)


def constraint_spec(body) -> ConstraintSpec | None:
    """response_format (json_object, json_schema) or vLLM's structured_outputs (json, regex, choice), or None."""
    fmt, so = body.response_format, body.structured_outputs
    if fmt is not None and fmt.type == "text":
        fmt = None
    if fmt is not None and so is not None:
        raise InputError("give response_format or structured_outputs, not both", "structured_outputs")
    if fmt is not None:
        if fmt.type == "json_object":
            return ConstraintSpec("json_object", None, "response_format")
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InputError("response_format json_schema needs json_schema.schema", "response_format")
        return ConstraintSpec("json_schema", fmt.json_schema.schema_, "response_format")
    if so is None:
        return None
    given = [k for k in ("json_", "regex", "choice") if getattr(so, k) is not None]
    if len(given) != 1:
        raise InputError("structured_outputs takes exactly one of json, regex and choice", "structured_outputs")
    kind = {"json_": "json_schema", "regex": "regex", "choice": "choice"}[given[0]]
    value = getattr(so, given[0])
    return ConstraintSpec(kind, tuple(value) if kind == "choice" else value, "structured_outputs")


def _take_images(messages: list[dict], options: ServingOptions) -> tuple[list[dict], list]:
    """The messages with their image_url parts read (server/media.py), and the pictures in order."""
    if not any(isinstance(part, dict) and part.get("type") == "image_url"
               for m in messages if isinstance(m.get("content"), list) for part in m["content"]):
        return messages, []
    from ..images import ImageError
    from ..server.media import MediaError, take_images

    if options.images is None:
        raise InputError("messages: this model cannot take images (it has no vision tower, or the server runs "
                         "with --no-vision)", "messages")
    try:
        return take_images(messages, options.allowed_media, options.max_images)
    except (MediaError, ImageError) as e:
        raise InputError(str(e), "messages") from None


def _text_chars(value, depth: int = 0) -> int:
    """Characters in all the strings of plain JSON data (deeper than 64 levels counts as too much)."""
    if isinstance(value, str):
        return len(value)
    if depth > 64:
        return 1 << 62
    if isinstance(value, dict):
        return sum(len(str(k)) + _text_chars(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_chars(v, depth + 1) for v in value)
    return 0
