"""The tokenizer and chat template of a checkpoint directory.

Text goes through the HF `tokenizers` library (tokenizer.json); transformers is not used. Chat templates come from
the checkpoint and render sandboxed (chat_template.py).

Reading a reply with thinking: decode with `skip_special_tokens=False` (so the `<|channel>` markers survive), then
call thinking.split_thinking on the text, or feed the text deltas to a thinking.ThinkingStreamParser when streaming.
"""

from __future__ import annotations

import json
import re
import secrets
from functools import cached_property
from pathlib import Path

import tokenizers

from ..errors import one_line
from .chat_template import GEMMA4_CHAT_TEMPLATE, ChatTemplate, TokenizerError, plain_value


class TextTooLongError(TokenizerError):
    """Text refused before encoding: more bytes than the context can hold at the longest token."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({one_line(err)})") from None
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
        self.backend = backend  # the `tokenizers` object (constraint automata read its vocabulary)
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
            raise TokenizerError(f"{file}: cannot load tokenizer ({one_line(err)})") from None
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
                raise TokenizerError(f"{jinja_file}: cannot read ({one_line(err)})") from None
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
        # encode_batch releases the GIL while it works (encode does not), so a long text never stalls other threads
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 length of the longest vocabulary entry. No token stands for more text than its entry spells (a
        byte-level BPE character is one byte, SentencePiece's "▁" one space, "<0xNN>" one byte), so a text of B bytes
        has at least B / max_token_bytes tokens, unless a normalizer deletes characters."""
        vocab = self._backend.get_vocab(with_added_tokens=True)
        return max((len(t.encode("utf-8")) for t in vocab), default=1)

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        specials = {t.content for t in self._backend.get_added_tokens_decoder().values() if t.special}
        if not specials:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    @cached_property
    def _plain_backend(self) -> tokenizers.Tokenizer:
        """A copy of the backend that reads special-token text as plain text (a separate object: the flag is shared
        state, and encodes run on several threads)."""
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        backend.encode_special_tokens = True
        return backend

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text`, special-token text in it read as plain text (for text from users)."""
        return self._plain_backend.encode_batch([text], add_special_tokens=False)[0].ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = False,
                    max_bytes: int | None = None, **template_kwargs) -> list[int]:
        """Render and encode a chat so that only the template writes control tokens: text in the messages (and in
        template arguments) that spells `<bos>` or a turn marker is encoded as plain text, so no one can forge a turn.

        1. Each special-token text inside any string of the input becomes a placeholder only this call knows.
        2. The template renders; the special tokens in its output are its own.
        3. The output is cut at those tokens (as the tokenizer itself cuts at special tokens), the placeholders turn
           back into their text, the length is checked against `max_bytes`, and each piece is encoded as plain text.
        """
        pattern = self._special_pattern
        # 1.
        nonce = f"\ue000{secrets.randbelow(10**12)}."  # digits and a private-use character: case filters keep it
        found: dict[str, int] = {}

        def escape(text: str) -> str:
            if pattern is None:
                return text
            return pattern.sub(lambda m: f"{nonce}{found.setdefault(m.group(0), len(found))}\ue001", text)

        # 2.
        text = self.apply_chat_template(_map_strings(plain_value(list(messages)), escape), add_generation_prompt,
                                        enable_thinking, **_map_strings(plain_value(template_kwargs), escape))
        # 3.
        restore = {f"{nonce}{k}\ue001": special for special, k in found.items()}
        alternatives = [re.escape(p) for p in restore] + ([pattern.pattern] if pattern is not None else [])
        parts = re.split(f"({'|'.join(alternatives)})", text) if alternatives else [text]
        pieces: list[str | int] = []
        run: list[str] = []
        for i, part in enumerate(parts):
            if i % 2 == 0 or part in restore:
                run.append(restore.get(part, part) if i % 2 else part)
            else:
                pieces += ["".join(run), self.token_id(part)]
                run = []
        pieces.append("".join(run))
        texts = [p for p in pieces if isinstance(p, str) and p]
        if max_bytes is not None:
            size = sum(len(p.encode("utf-8", "surrogatepass")) for p in texts) + sum(
                len(p.encode("utf-8")) for p in parts[1::2] if p not in restore)
            if size > max_bytes:
                raise TextTooLongError(f"the rendered chat is {size} bytes of text, which cannot fit in the context "
                                       f"(at most {max_bytes} bytes)")
        encoded = iter(self._plain_backend.encode_batch(texts, add_special_tokens=False))
        ids: list[int] = []
        for p in pieces:
            if isinstance(p, int):
                ids.append(p)
            elif p:
                ids += next(encoded).ids
        return ids

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
        context = {"tools": None, "documents": None, **{k: plain_value(v) for k, v in template_kwargs.items()}}
        context.update(messages=plain_value(list(messages)), add_generation_prompt=bool(add_generation_prompt),
                       enable_thinking=bool(enable_thinking), bos_token=self.bos_token or "",
                       eos_token=self.eos_token or "", pad_token=self.pad_token or "")
        return self.chat_template.render(**context)


def _map_strings(value, fn):
    """`value` (plain JSON data) with fn applied to every string in it, keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value
