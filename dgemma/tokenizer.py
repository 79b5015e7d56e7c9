"""Tokenizer, chat template and thought-channel parsing for a checkpoint directory.

Text goes through the HF `tokenizers` library (tokenizer.json); transformers is not used. Chat templates come from
the checkpoint and are untrusted code, so they render in a jinja2 sandbox with a budget on steps, time, value sizes
and output size; every failure is a one-line TokenizerError.

Reading a reply with thinking: decode with `skip_special_tokens=False` (so the `<|channel>` markers survive), then
call `split_thinking` on the text, or feed the text deltas to a `ThinkingStreamParser` when streaming.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
THOUGHT_PREFIX = "thought\n"
END_MARKERS = ("<turn|>", "<eos>")

MAX_TEMPLATE_OUTPUT = 1_000_000  # characters of rendered prompt
MAX_TEMPLATE_VALUE = 1_000_000  # length of any string/list a template builds
MAX_TEMPLATE_STEPS = 1_000_000  # loop iterations + calls per render
MAX_TEMPLATE_SECONDS = 5.0

# Gemma 4 chat format, used when the checkpoint ships no template. Assistant turns in history keep only the answer:
# a thought channel is cut off, as the model never sees its own old reasoning.
GEMMA4_CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable and content is not mapping -%}
{%- for part in content -%}
{%- if part is string -%}{{ part }}
{%- elif part is mapping and part.get('type') == 'text' -%}{{ part.get('text', '') }}
{%- endif -%}
{%- endfor -%}
{%- elif content is not none -%}{{ raise_exception('message content must be a string or a list of parts') }}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if messages and messages[0].get('role') in ['system', 'developer'] -%}
{{- '<|turn>system\\n' -}}{%- if enable_thinking -%}{{- '<|think|>' -}}{%- endif -%}
{{- render_content(messages[0].get('content')) -}}{{- '<turn|>\\n' -}}
{%- set loop_messages = messages[1:] -%}
{%- elif enable_thinking -%}
{{- '<|turn>system\\n<|think|><turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = message.get('role') -%}
{%- if role == 'user' -%}
{{- '<|turn>user\\n' ~ render_content(message.get('content')) ~ '<turn|>\\n' -}}
{%- elif role in ['assistant', 'model'] -%}
{%- set text = render_content(message.get('content')) -%}
{{- '<|turn>model\\n' ~ text.split('<channel|>')[-1] ~ '<turn|>\\n' -}}
{%- else -%}
{{- raise_exception('unsupported message role ' ~ role ~ ' (expected a first system message, then user/assistant)') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


class TokenizerError(ValueError):
    """A tokenizer file or chat template dgemma cannot use. The message is one line naming the file."""


def _one_line(err: BaseException, with_type: bool = True) -> str:
    text = " ".join(str(err).split())
    if not with_type:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---------------------------------------------------------------------------------------------------------------
# Sandbox for untrusted chat templates
# ---------------------------------------------------------------------------------------------------------------

class _TemplateLimit(Exception):
    """A render that went over its budget; turned into a TokenizerError by the caller."""


class _TemplateRaised(jinja2.TemplateError):
    """The template called raise_exception(message)."""


class _Budget:
    """Steps and wall time one render may use."""

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS

    def tick(self) -> None:
        self.steps += 1
        if self.steps > MAX_TEMPLATE_STEPS:
            raise _TemplateLimit(f"more than {MAX_TEMPLATE_STEPS} steps")
        if self.steps % 1024 == 0 and time.monotonic() > self.deadline:
            raise _TemplateLimit(f"more than {MAX_TEMPLATE_SECONDS} s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("dgemma_template_budget", default=None)

# Width/precision fields in format strings can allocate gigabytes from a short literal ("%1000000000s").
_HUGE_PERCENT_FIELD = re.compile(r"%[-#0 +]*(\d{7,}|\d*\.\d{7,})")  # "*" widths are checked as arguments
_HUGE_BRACE_FIELD = re.compile(r"\{[^{}]*:[^{}]*\d{7,}[^{}]*\}")


def _tick() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.tick()


def _check_value(value):
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_TEMPLATE_VALUE:
        raise _TemplateLimit(f"a value longer than {MAX_TEMPLATE_VALUE}")
    return value


def _check_params(params) -> None:
    for p in params:
        if isinstance(p, int) and abs(p) > MAX_TEMPLATE_VALUE:
            shown = p if p.bit_length() < 64 else "a huge number"
            raise _TemplateLimit(f"the argument {shown} (larger than {MAX_TEMPLATE_VALUE})")


def _guard_iter(iterable):
    for item in iterable:
        _tick()
        yield item


def _guard_filter(func, name: str):
    # Arguments up to and including the filtered value; a context/environment argument comes before it.
    n_leading = 2 if getattr(func, "jinja_pass_arg", None) is not None else 1

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        _tick()
        _check_params(list(args[n_leading:]) + list(kwargs.values()))
        value = args[n_leading - 1] if len(args) >= n_leading else None
        if name == "format" and isinstance(value, str) and _HUGE_PERCENT_FIELD.search(value):
            raise _TemplateLimit("a format string with a huge width")
        return _check_value(func(*args, **kwargs))

    return guarded


class _TemplateNamespace(Namespace):
    """`namespace()` that refuses dunder/private names and oversized values."""

    def __init__(*args, **kwargs) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _TemplateNamespace._check(name, value)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value) -> None:
        _TemplateNamespace._check(name, value)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name, value) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")
        _check_value(value)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, HF's marker of assistant text for training masks: renders the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """The HF chat-template environment plus a budget: every call, filter and loop iteration ticks it, and the
    operators and assignments that can grow a value are size-checked."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])

        def raise_exception(message):
            raise _TemplateRaised(str(message))

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        self.filters["tojson"] = tojson
        self.filters = {name: _guard_filter(f, name) for name, f in self.filters.items()}
        self.filters["_dgemma_value"] = _check_value
        self.globals.pop("lipsum", None)
        self.globals.update(raise_exception=raise_exception, namespace=_TemplateNamespace, dict=_plain_dict,
                            strftime_now=lambda fmt: datetime.now().strftime(fmt),
                            _dgemma_iter=_guard_iter, _dgemma_value=_check_value)

    def _parse(self, source, name, filename) -> nodes.Template:
        """Route every loop iterable and every assigned value through the guards."""
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(nodes.For):
            node.iter = nodes.Call(nodes.Name("_dgemma_iter", "load"), [node.iter], [], None, None,
                                   lineno=node.lineno)
        for node in tree.find_all(nodes.Assign):
            node.node = nodes.Call(nodes.Name("_dgemma_value", "load"), [node.node], [], None, None,
                                   lineno=node.lineno)
        for node in tree.find_all(nodes.AssignBlock):
            node.filter = nodes.Filter(node.filter, "_dgemma_value", [], [], None, None, lineno=node.lineno)
        return tree

    def unsafe_undefined(self, obj, attribute):
        """Fail at once on a forbidden attribute (jinja would return an Undefined that prints as "")."""
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _tick()
        _check_params(list(args) + list(kwargs.values()))
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
        if isinstance(owner, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
            if _HUGE_BRACE_FIELD.search(owner):
                raise _TemplateLimit("a format string with a huge width")
        return _check_value(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(right, (int, float)) and isinstance(left, (int, float)):
            if abs(right) > 4096 or (isinstance(left, int) and left.bit_length() * abs(right) > 1_000_000):
                raise _TemplateLimit(f"a power over 1000000 bits ({left!s:.20} ** {right!s:.20})")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_VALUE:
                    raise _TemplateLimit(f"a value longer than {MAX_TEMPLATE_VALUE}")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 65536:
                raise _TemplateLimit("an integer product over 65536 bits")
        if operator == "%" and isinstance(left, str):
            _check_params(right if isinstance(right, tuple) else (right,))
            if _HUGE_PERCENT_FIELD.search(left):
                raise _TemplateLimit("a format string with a huge width")
        return _check_value(super().call_binop(context, operator, left, right))


def _plain_dict(*args, **kwargs):
    return dict(*args, **kwargs)


def _plain(value, depth: int = 0):
    """Rebuild template inputs out of plain JSON types, so the sandbox never sees a rich object's methods."""
    if depth > 64:
        raise TokenizerError("chat template input is nested more than 64 levels deep")
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, ...) become the base value
        if isinstance(value, base):
            return base.__str__(value) if base is str else base(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """One compiled, sandboxed chat template. `source` names where it came from, for error messages."""

    _env = None

    def __init__(self, template: str, source: str) -> None:
        self.text = template
        self.source = source
        if ChatTemplate._env is None:
            ChatTemplate._env = _ChatTemplateEnvironment()
        try:
            self._template = ChatTemplate._env.from_string(template)
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{source}: chat template does not compile: {_one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 (a template must never crash the loader)
            raise TokenizerError(f"{source}: chat template does not compile: {_one_line(err)}") from None

    def render(self, **context) -> str:
        token = _budget.set(_Budget())
        try:
            parts, size = [], 0
            for chunk in self._template.generate(**context):
                size += len(chunk)
                if size > MAX_TEMPLATE_OUTPUT:
                    raise _TemplateLimit(f"more than {MAX_TEMPLATE_OUTPUT} characters of output")
                parts.append(chunk)
            return "".join(parts)
        except _TemplateLimit as err:
            raise TokenizerError(f"{self.source}: chat template went over a limit: {err}") from None
        except _TemplateRaised as err:
            raise TokenizerError(f"{self.source}: chat template refused: {_one_line(err, False)}") from None
        except jinja2.exceptions.SecurityError as err:
            raise TokenizerError(f"{self.source}: chat template blocked by the sandbox: {_one_line(err)}") from None
        except jinja2.TemplateError as err:
            raise TokenizerError(f"{self.source}: chat template failed: {_one_line(err)}") from None
        except Exception as err:  # noqa: BLE001 (OverflowError, RecursionError, TypeError, ... from the template)
            raise TokenizerError(f"{self.source}: chat template failed: {_one_line(err)}") from None
        finally:
            _budget.reset(token)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({_one_line(err)})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{where}: expected a token string or {{\"content\": ...}}, got {value!r:.80}")


def _pick_template(value, where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} where "default" is used."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(f"{where}: chat_template lists {sorted(map(str, named))} but no \"default\" template")
    raise TokenizerError(f"{where}: chat_template must be a string or a list, got {type(value).__name__}")


class Tokenizer:
    """A checkpoint's tokenizer: ids <-> text, special token ids and the chat template.

    `has_chat_template` says whether the checkpoint ships a template; without one `apply_chat_template` uses the
    built-in Gemma 4 format (`chat_template_source == "builtin"`).
    """

    def __init__(self, backend: tokenizers.Tokenizer, chat_template: str | None = None,
                 chat_template_source: str = "chat_template", bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, name: str = "tokenizer.json") -> None:
        self._backend = backend
        self.name = name
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{name}: {role}_token {token!r} is not in the vocabulary")
        self.bos_token_id = self.token_id(bos_token) if bos_token else None
        self.eos_token_ids = [self.token_id(eos_token)] if eos_token else []
        self.pad_token_id = self.token_id(pad_token) if pad_token else None
        self.has_chat_template = chat_template is not None
        if chat_template is None:
            chat_template, chat_template_source = GEMMA4_CHAT_TEMPLATE, "builtin"
        self.chat_template_source = chat_template_source
        self.chat_template = ChatTemplate(chat_template, chat_template_source)

    @classmethod
    def from_dir(cls, path) -> Tokenizer | None:
        """Load tokenizer.json and its companions from a checkpoint directory; None when there is no tokenizer.json.

        1. tokenizer.json -> the `tokenizers` backend.
        2. Special tokens: tokenizer_config.json, then special_tokens_map.json, then `<bos>`/`<eos>`/`<pad>` when the
           vocabulary has them.
        3. Chat template: chat_template.jinja, then chat_template.json, then tokenizer_config.json["chat_template"].
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            return None
        # 1.
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 (the Rust side raises a bare Exception)
            raise TokenizerError(f"{file}: cannot load tokenizer ({_one_line(err)})") from None
        # 2.
        config_file, map_file = path / "tokenizer_config.json", path / "special_tokens_map.json"
        config, special_map = _read_json(config_file), _read_json(map_file)
        special = {}
        for role in ("bos", "eos", "pad"):
            key = f"{role}_token"
            token = _token_text(config.get(key), f"{config_file}: {key}")
            if token is None:
                token = _token_text(special_map.get(key), f"{map_file}: {key}")
            if token is None and backend.token_to_id(f"<{role}>") is not None:
                token = f"<{role}>"
            special[key] = token
        # 3.
        template, source = None, "chat_template"
        jinja_file, json_file = path / "chat_template.jinja", path / "chat_template.json"
        if jinja_file.is_file():
            try:
                template, source = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
            except (OSError, UnicodeDecodeError) as err:
                raise TokenizerError(f"{jinja_file}: cannot read ({_one_line(err)})") from None
        elif json_file.is_file():
            source = str(json_file)
            template = _pick_template(_read_json(json_file).get("chat_template"), source)
        elif config.get("chat_template") is not None:
            source = str(config_file)
            template = _pick_template(config["chat_template"], source)
        return cls(backend, chat_template=template, chat_template_source=source, name=str(file), **special)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text in it (e.g. `<bos>` from a chat template) becomes its id."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Use skip_special_tokens=False before split_thinking: the channel markers are special."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = False, **template_kwargs) -> str:
        """Render `messages` ([{"role", "content"}, ...]) into a prompt string; encode it with add_special_tokens=False,
        since the template already writes `<bos>`."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TokenizerError("apply_chat_template: messages must be a list of dicts")
        context = {"tools": None, "documents": None, **{k: _plain(v) for k, v in template_kwargs.items()}}
        context.update(messages=_plain(list(messages)), add_generation_prompt=bool(add_generation_prompt),
                       enable_thinking=bool(enable_thinking), bos_token=self.bos_token or "",
                       eos_token=self.eos_token or "", pad_token=self.pad_token or "")
        return self.chat_template.render(**context)


# ---------------------------------------------------------------------------------------------------------------
# Thought channel
# ---------------------------------------------------------------------------------------------------------------

_CONTENT, _REASONING, _DONE = "content", "reasoning", "done"
# Markers each state reacts to, with the state they lead to. Longer markers first: "<|channel>thought\n" wins over
# "<|channel>". A stray marker (a close in content, an open in reasoning) is dropped.
_TRANSITIONS = {
    _CONTENT: [(CHANNEL_OPEN + THOUGHT_PREFIX, _REASONING), (CHANNEL_OPEN, _REASONING), (CHANNEL_CLOSE, _CONTENT)]
    + [(m, _DONE) for m in END_MARKERS],
    _REASONING: [(CHANNEL_CLOSE, _CONTENT), (CHANNEL_OPEN + THOUGHT_PREFIX, _REASONING),
                 (CHANNEL_OPEN, _REASONING)] + [(m, _DONE) for m in END_MARKERS],
}


class ThinkingStreamParser:
    """Split streamed model text into reasoning and content deltas, as `split_thinking` does for the whole text.

    A suffix that could still grow into a marker is held back until the next feed (or flush), so no partial marker
    text is ever emitted. The first `<turn|>` or `<eos>` ends the reply; text after it is dropped.
    """

    def __init__(self) -> None:
        self._state = _CONTENT
        self._pending = ""
        self.saw_reasoning = False

    def feed(self, delta_text: str) -> tuple[str, str]:
        self._pending += delta_text
        return self._scan(final=False)

    def flush(self) -> tuple[str, str]:
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, str]:
        out = {_CONTENT: [], _REASONING: []}
        buf, i = self._pending, 0
        while i < len(buf) and self._state != _DONE:
            j = buf.find("<", i)  # every marker starts with "<"
            if j < 0:
                j = len(buf)
            out[self._state].append(buf[i:j])
            i = j
            if i == len(buf):
                break
            rest = buf[i:]
            markers = _TRANSITIONS[self._state]
            if not final and any(len(rest) < len(m) and m.startswith(rest) for m, _ in markers):
                break  # could still become a marker: hold it back
            match = next(((m, nxt) for m, nxt in markers if rest.startswith(m)), None)
            if match is None:
                out[self._state].append("<")
                i += 1
                continue
            marker, self._state = match
            if final and any(len(rest) < len(m) and m.startswith(rest) for m, _ in markers):
                marker = rest  # the text ends inside a longer opener ("<|channel>thought"): all of it is the opener
            self.saw_reasoning |= self._state == _REASONING
            i += len(marker)
        self._pending = "" if self._state == _DONE else buf[i:]
        return "".join(out[_REASONING]), "".join(out[_CONTENT])


def split_thinking(text: str) -> tuple[str | None, str]:
    """(reasoning, content) of a decoded reply: `<|channel>thought\\n...<channel|>answer` -> ("...", "answer").

    No channel -> (None, text). An unclosed channel -> everything after the opener is reasoning. Content ends at the
    first `<turn|>`/`<eos>`. The text must be decoded with skip_special_tokens=False.
    """
    parser = ThinkingStreamParser()
    r1, c1 = parser.feed(text)
    r2, c2 = parser.flush()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2
