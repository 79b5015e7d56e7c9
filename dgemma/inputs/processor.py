"""The input processor: what every way into dgemma (the CLI, the HTTP server) shares to turn a request into prompt
ids, images and a Steering. Adapters (args.py for the command line, http.py for the server) read their own request
shape into its calls; they never encode steering text or compile a constraint themselves.

It never touches the model: the facts it needs (EOS, the vocabulary size, the context) are passed in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..control.pins import Steering, SteeringError
from ..control.steering import SteeringSpec, build_steering, steering_budget
from ..errors import DgemmaError

# The built-in chat template's turn marker. A tokenizer with no chat template of its own and no token for it (the
# embedded Sudoku model's) would spell a chat as <unk>s: it is no chat model.
TURN_MARKER = "<|turn>"


class InputError(DgemmaError, ValueError):
    """A request the input processor refuses; `param` names the request field (the CLI shows it as a flag)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SteeringPlan:
    """A request's steering and the output budget it runs with (a template's length when it set none)."""

    steering: Steering | None
    max_tokens: int | None


class InputProcessor:
    """Prompt and steering building over one model's tokenizer (None: the model has none) and generation config.
    `vocab_size`: the model's (it may exceed the tokenizer's); `max_model_len`: the context a request may fill,
    which bounds the text it may send (None: unbounded); `canvas_length`: the model's (None: not checked);
    `compile_limits`: the CompileLimits every constraint compiles under (None: CompileLimits' defaults)."""

    def __init__(self, tokenizer, generation, vocab_size: int, max_model_len: int | None = None,
                 canvas_length: int | None = None, compile_limits=None):
        from ..control.constraint import CompileLimits

        self.tokenizer = tokenizer
        self.compile_limits = compile_limits or CompileLimits()
        self.canvas_length = canvas_length
        self.generation = generation
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._vocabulary = None  # the constraint automata's view of the tokenizer, built on first use
        self._vocabulary_lock = threading.Lock()

    @property
    def max_text_bytes(self) -> int | None:
        """The longest text (UTF-8 bytes) that can fit in the context: a token covers at most max_token_bytes bytes,
        so longer text is refused before it is encoded (encoding megabytes takes seconds)."""
        if self.max_model_len is None or self.tokenizer is None:
            return None
        return self.max_model_len * self.tokenizer.max_token_bytes

    def vocabulary(self):
        """The tokenizer as the constraint automata see it (built once; compiled constraints are cached on it)."""
        from ..control import ConstraintVocabulary

        with self._vocabulary_lock:
            if self._vocabulary is None:
                gen = self.generation
                self._vocabulary = ConstraintVocabulary.from_tokenizer(
                    self.tokenizer.backend, gen.eos_token_id, [gen.pad_token_id], self.vocab_size)
            return self._vocabulary

    def encode(self, text: str, param: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of request text (special-token text read as its token, as in a prompt); InputError naming
        `param` when the model has no tokenizer or the text is too long for the context."""
        if self.tokenizer is None:
            raise InputError(f"this model has no tokenizer: send the {param} as a list of token ids", param)
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        limit = self.max_text_bytes
        if limit is not None and size > limit:
            raise InputError(f"{param}: {size} bytes of text cannot fit in the context of {self.max_model_len} "
                             f"tokens (at most {limit} bytes)", param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_prompt_ids(self, ids: list[int], param: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param)
        return ids

    def check_can_chat(self) -> None:
        """Refuse a chat on a model whose tokenizer cannot write the chat template (InputError naming messages)."""
        tok = self.tokenizer
        if tok is None:
            raise InputError("this model has no tokenizer, so it cannot render chats", "messages")
        if not tok.has_chat_template and tok.token_id(TURN_MARKER) is None:
            raise InputError(f"this model cannot chat: its tokenizer has no chat template and no {TURN_MARKER} token "
                             f"(the embedded Sudoku solver is such a model)", "messages")

    def chat_ids(self, messages: list[dict], thinking: bool = False, template_kwargs: dict | None = None) -> list[int]:
        """The chat rendered with the generation prompt and encoded; message text is plain text (only the template
        writes control tokens). InputError naming `messages` when it cannot render or is too long."""
        from ..text.tokenizer import TextTooLongError, TokenizerError

        self.check_can_chat()
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True, enable_thinking=thinking,
                                              max_bytes=self.max_text_bytes, **(template_kwargs or {}))
        except TextTooLongError as e:
            raise InputError(f"messages: {e}", "messages") from None
        except (TokenizerError, TypeError) as e:
            raise InputError(f"cannot render the chat template: {e}", "messages") from None

    def steering(self, spec: SteeringSpec) -> SteeringPlan:
        """build_steering over this model; InputError naming the field of a refusal."""
        try:
            steering = build_steering(spec, self.tokenizer, self.vocabulary, self.generation, self.max_text_bytes,
                                      self.compile_limits)
        except SteeringError as e:
            raise InputError(str(e), e.param) from None
        return SteeringPlan(steering, steering_budget(spec, steering))
