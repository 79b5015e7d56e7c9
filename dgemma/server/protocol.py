"""The OpenAI-compatible wire format: request models (validated) and the response/chunk shapes.

Requests are validated strictly (no "5" for 5, no 1.5 for an int) so a bad value is a 400 that names its field.
No field is silently ignored: a field the server does not know is a 400 naming it, and OpenAI's fields dgemma does
not apply are accepted only at the value that changes nothing (NEUTRAL; SERVING.md lists every field).
Non-standard fields, all optional:
  request: max_denoising_steps, entropy_bound, t_min, t_max (diffusion sampler), settled_prefix (pin and stream
           the settled prefix; default: the server's setting), stream_options.include_drafts,
           chat_template_kwargs (e.g. {"enable_thinking": true}), pinned / seed_tokens / strength (steer the
           canvas), OpenAI's prediction and suffix (editing, fill in the middle), response_format and vLLM's
           structured_outputs (json, regex, choice), top_k, vLLM's return_tokens_as_token_ids, vLLM's structured-read
           fields (diffusion_seed_canvas, diffusion_pinned, diffusion_max_steps, diffusion_read_only,
           diffusion_canvas_length) at the top level or in vllm_xargs; chat: OpenAI's tools and tool_choice
           (control/tools.py);
  response: usage.denoising_steps, choices[0].delta.draft (drafts), choices[0].token_ids (completions).
OpenAI's logprobs and top_logprobs (chat) and logprobs (completions) are honoured (server/logprobs.py).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ..step import TOP_LOGPROBS


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False
    include_drafts: bool = False


class Prediction(_Body):
    """OpenAI's Predicted Outputs: text the answer is expected to resemble. dgemma seeds the canvas with it."""

    type: Literal["content"]
    content: str | Annotated[list[dict[str, Any]], Field(max_length=64)]


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text, json_object, or json_schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's structured_outputs: exactly one of json (a schema), regex, choice."""

    json_: dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = Field(None, max_length=4096)
    choice: Annotated[list[str], Field(min_length=1, max_length=256)] | None = None


class FunctionDefinition(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule, plus "." as vLLM allows
    description: str | None = Field(None, max_length=65536)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


# the chat template renders text and image parts only; any other part would vanish from the prompt, so it is refused
REFUSED_PARTS = {
    "image": "a part of type 'image' carries no picture here; send the picture as an image_url part",
    "input_audio": "this server takes no audio",
    "audio": "this server takes no audio",
    "audio_url": "this server takes no audio",
    "video_url": "this server takes no video",
    "video": "this server takes no video",
}


def _content_parts(parts: str | list[dict[str, Any]] | None):
    for j, part in enumerate(parts if isinstance(parts, list) else ()):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str) or kind == "image_url":
            continue
        if kind == "text":
            why = "a text part needs a string `text`"
        else:
            why = REFUSED_PARTS.get(kind) if isinstance(kind, str) else None
            why = why or f"unsupported content part type {kind!r:.40}; the parts taken are text and image_url"
        raise PydanticCustomError("content_part", "part {j}: {why}", {"j": j, "why": why})
    return parts


MAX_STOP = 16


def _stop_count(stop: str | list[str] | None):
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise PydanticCustomError("stop_count", "at most {limit} stop strings, got {n}",
                                  {"limit": MAX_STOP, "n": len(stop)})
    return stop


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: Annotated[str | list[dict[str, Any]] | None, AfterValidator(_content_parts)] = None


MAX_CHOICES = 8  # n: the most choices one request may ask for

# OpenAI's fields dgemma does not apply: the values accepted (they change nothing) and why any other is refused.
NEUTRAL: dict[str, tuple[tuple, str]] = {
    "frequency_penalty": ((None, 0), "dgemma applies no frequency penalty; only 0 is accepted"),
    "presence_penalty": ((None, 0), "dgemma applies no presence penalty; only 0 is accepted"),
    "logit_bias": ((None, {}), "dgemma applies no logit bias; only an empty object is accepted"),
    "service_tier": ((None, "auto", "default"), "dgemma has one service tier; only \"auto\" or \"default\""),
    "store": ((None, False), "dgemma stores no completions; only false is accepted"),
    "metadata": ((None, {}), "metadata is kept only with stored completions, which dgemma does not keep"),
    "echo": ((None, False), "echo is not supported; only false is accepted"),
    "best_of": ((None, 1), "best_of is not supported; only 1 is accepted (n gives several choices)"),
    "audio": ((None,), "dgemma writes no audio"),
    "modalities": ((None, ["text"]), "dgemma writes text only; only [\"text\"] is accepted"),
    "reasoning_effort": ((None,), "dgemma has no reasoning effort; chat_template_kwargs.enable_thinking turns "
                                  "the thought channel on"),
    "verbosity": ((None,), "dgemma has no verbosity setting"),
    "web_search_options": ((None,), "dgemma does not search the web"),
    "functions": ((None,), "the deprecated functions field is not supported; send tools"),
    "function_call": ((None,), "the deprecated function_call field is not supported; send tool_choice"),
    "prompt_cache_key": ((None,), "prompt_cache_key is not supported"),
}


class _SamplingBody(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    stop: Annotated[str | list[str] | None, AfterValidator(_stop_count)] = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 and 0: no cut, as vLLM reads them
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_denoising_steps: int | None = Field(None, ge=1, le=1024)
    entropy_bound: float | None = Field(None, gt=0, le=1e6)
    t_min: float | None = Field(None, ge=0, le=100)
    t_max: float | None = Field(None, gt=0, le=100)
    settled_prefix: bool | None = None
    # steering the canvas: output position -> token id (JSON keys are strings), a seed and its renoise strength
    pinned: Annotated[dict[str, int], Field(max_length=65536)] | None = None
    seed_tokens: Annotated[list[int], Field(min_length=1, max_length=65536)] | None = None
    strength: float | None = Field(None, ge=0, le=1)
    prediction: Prediction | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    template: str | None = Field(None, min_length=1, max_length=65536)  # "Name: {{8}}." literal text pinned, holes
    # vLLM's structured reads (inputs/http.py reads them, here or in vllm_xargs, vLLM's dict of extra arguments)
    diffusion_seed_canvas: Annotated[list[int], Field(max_length=65536)] | None = None
    diffusion_pinned: Annotated[list[int], Field(max_length=65536)] | None = None
    diffusion_max_steps: int | None = None
    diffusion_read_only: bool | None = None
    diffusion_canvas_length: int | None = None
    vllm_xargs: Annotated[dict[str, Any], Field(max_length=16)] | None = None
    # OpenAI's fields dgemma does not apply: accepted at their neutral value only (NEUTRAL)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs name tokens "token_id:<id>"
    user: str | None = Field(None, max_length=256)  # an end-user id: accepted, recorded nowhere
    safety_identifier: str | None = Field(None, max_length=256)  # the same, under OpenAI's newer name
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    @field_validator(*NEUTRAL, mode="after", check_fields=False)
    @classmethod
    def _neutral_only(cls, value, info):
        accepted, why = NEUTRAL[info.field_name]
        # 0 == False in Python: a neutral value must also be a bool exactly when the accepted one is
        if not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in accepted):
            raise PydanticCustomError("unsupported_value", why)
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    tools: Annotated[list[Tool], Field(max_length=256)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None  # each content token's log-probability (SERVING.md, "Log-probabilities")
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)  # and that many alternatives (needs logprobs)
    # OpenAI's chat fields dgemma does not apply (NEUTRAL)
    audio: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    prompt_cache_key: Any = None


class CompletionRequest(_SamplingBody):
    prompt: str | list[int] = Field(min_length=1)
    suffix: str | None = Field(None, min_length=1)  # fill in the middle: the output goes between prompt and suffix
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)  # log-probabilities, with that many alternatives
    echo: Any = None  # NEUTRAL
    best_of: Any = None  # NEUTRAL


# -- responses ----------------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    denoising_steps: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text: vLLM now names it `reasoning`; clients of either work
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: dict[str, Any] | None = None  # {"content": [{token, logprob, bytes, top_logprobs}]}
    finish_reason: str | None


class _Response(BaseModel):
    """What every completion response carries besides its object type and choices."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None  # {tokens, token_logprobs, top_logprobs, text_offset}
    finish_reason: str | None
    token_ids: list[int] | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dgemma"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
