"""The one prompt check and the one context-budget rule, shared by `generate` and the serving engine."""

from __future__ import annotations

import math

from .errors import DgemmaError


class PromptError(DgemmaError, ValueError):
    """A prompt that cannot be run; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(PromptError):
    """A prompt (or a prompt with its max_tokens) that does not fit the context."""


def check_prompt(prompt, vocab_size: int, name: str = "the prompt") -> None:
    """A prompt is a non-empty list of token ids in [0, vocab_size)."""
    if not isinstance(prompt, list) or not prompt:
        raise PromptError(f"{name} is empty", "prompt")
    bad = next((t for t in prompt if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size)),
               None)
    if bad is not None:
        raise PromptError(f"{name}: token id {bad!r} is outside the vocabulary [0, {vocab_size})", "prompt")


def canvases_for(prompt_len: int, max_tokens: int | None, canvas_length: int, context: int) -> int:
    """How many canvases a sequence may use after a prompt of `prompt_len` tokens.

    A canvas is the unit of cache use, so max_tokens is rounded up to whole canvases, and they must fit in the
    context: a request that cannot is refused, not cut short. With max_tokens unset, every whole canvas that
    fits (the sequence runs until EOS or the context limit)."""
    room = context - prompt_len
    if room <= 0:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens, which fills the context of {context} tokens",
                                 "prompt")
    if max_tokens is None:
        n = room // canvas_length
        if n == 0:
            raise ContextLengthError(f"the prompt has {prompt_len} tokens; with a {canvas_length}-token canvas that "
                                     f"leaves no room to generate within the context of {context} tokens", "prompt")
        return n
    n = math.ceil(max_tokens / canvas_length)
    if prompt_len + n * canvas_length > context:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens and max_tokens={max_tokens} needs {n} canvases "
                                 f"of {canvas_length} tokens: {prompt_len + n * canvas_length} tokens, more than the "
                                 f"context of {context}; lower max_tokens or shorten the prompt", "max_tokens")
    return n
