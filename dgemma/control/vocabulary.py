"""The bytes each token id spells, read from a `tokenizers.Tokenizer`, for building constraint automata.

Automata run over bytes, so every token id needs the exact bytes it adds to the text. How to get them depends on
the tokenizer.json's decoder:
- byte-level BPE (GPT-2 style, `ByteLevel` decoder): each character of the token string stands for one byte;
- SentencePiece style (Gemma, Llama: `Metaspace`, or `Replace("▁", " ")` with `ByteFallback`): "▁" is a space
  and `<0xNN>` is the byte NN;
- anything else (WordLevel, WordPiece): the token string's UTF-8 bytes.
Special tokens (EOS, pad, chat markers) spell nothing: a constraint never allows them as text. Decoder steps
that only touch the start of the text (`Strip`, a Metaspace prefix space) are ignored, so a constrained text
may differ from the tokenizer's decode by one leading space.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import tokenizers

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _decoder_kinds(decoder: dict | None) -> set[str]:
    """The decoder types in a tokenizer.json decoder (a Sequence counts as its members), plus "replace_space"
    when a Replace step turns "▁" into a space."""
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        kinds: set[str] = set()
        for member in decoder.get("decoders", []):
            kinds |= _decoder_kinds(member)
        return kinds
    kinds = {decoder.get("type", "")}
    if decoder.get("type") == "Replace" and decoder.get("pattern", {}).get("String") == "▁":
        kinds.add("replace_space")
    return kinds


class ConstraintCache:
    """Compiled constraints, least recently used first out once they pass `max_bytes` together (the entry just
    added or grown always stays). An entry's size is its `nbytes` (0 for entries without one): a constraint's
    tables and what is later kept with it (kept.py: the DP's layout, a thought's automaton), which it reports as
    it grows. Thread-safe."""

    def __init__(self, max_bytes: int = 512 * 2**20):
        if max_bytes <= 0:
            raise ValueError(f"ConstraintCache max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict = OrderedDict()  # key -> [value, its bytes as counted, its growth watcher]
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key, default=None):
        with self._lock:
            if key not in self._entries:
                return default
            self._entries.move_to_end(key)
            return self._entries[key][0]

    def __setitem__(self, key, value) -> None:
        with self._lock:
            if key in self._entries:
                self._drop(key)
            watcher = None
            if hasattr(value, "watch"):  # a constraint tells of what it keeps later (kept.py)
                watcher = lambda nbytes: self._grew(key, value, nbytes)  # noqa: E731
                value.watch(watcher)
            self._entries[key] = [value, getattr(value, "nbytes", 0), watcher]
            self._bytes += self._entries[key][1]
            self._evict(key)

    def _grew(self, key, value, nbytes: int) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is not value:
                return
            entry[1] += nbytes
            self._bytes += nbytes
            self._evict(key)

    def _evict(self, keep) -> None:
        """Least recently used first, every entry but `keep`, until the entries fit (called holding the lock)."""
        for key in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            if key != keep:
                self._drop(key)

    def _drop(self, key) -> None:
        value, nbytes, watcher = self._entries.pop(key)
        self._bytes -= nbytes
        if watcher is not None:
            value.unwatch(watcher)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list:
        with self._lock:
            return [value for value, _, _ in self._entries.values()]


@dataclass(frozen=True, eq=False)
class ConstraintVocabulary:
    """Token id -> bytes (None: never allowed as text), plus the ids that end and pad a reply.

    `vocab_size` may exceed the tokenizer's (a model's padded embedding); the extra ids are never allowed.
    Compiled automata are cached on the object (`cache`, an LRU bounded in bytes), keyed by pattern and limits.
    """

    token_bytes: tuple[bytes | None, ...]
    eos_token_ids: tuple[int, ...]
    pad_token_ids: tuple[int, ...] = ()
    cache: ConstraintCache = field(default_factory=ConstraintCache, repr=False)

    def __post_init__(self):
        size = len(self.token_bytes)
        if not self.eos_token_ids:
            raise ValueError("a constraint vocabulary needs at least one EOS token id")
        for name, ids in (("eos", self.eos_token_ids), ("pad", self.pad_token_ids)):
            bad = [i for i in ids if not 0 <= i < size]
            if bad:
                raise ValueError(f"{name} token ids {bad} are outside the vocabulary (size {size})")

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes)

    @classmethod
    def from_tokenizer(cls, tokenizer: tokenizers.Tokenizer, eos_token_ids, pad_token_ids=(),
                       vocab_size: int | None = None) -> "ConstraintVocabulary":
        """eos_token_ids / pad_token_ids: an id, a list of ids, or None. vocab_size: the model's, if padded."""
        kinds = _decoder_kinds(json.loads(tokenizer.to_str()).get("decoder"))
        byte_level = "ByteLevel" in kinds
        sentencepiece = bool(kinds & {"Metaspace", "replace_space"})
        byte_fallback = "ByteFallback" in kinds
        size = max(tokenizer.get_vocab_size(with_added_tokens=True), vocab_size or 0)
        if vocab_size is not None and vocab_size < tokenizer.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's "
                             f"{tokenizer.get_vocab_size(with_added_tokens=True)}")
        token_bytes: list[bytes | None] = [None] * size
        for text, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
            token_bytes[token_id] = _spell(text, byte_level, sentencepiece, byte_fallback)
        for token_id, added in tokenizer.get_added_tokens_decoder().items():
            # added tokens are stored as plain text, not in the model's byte alphabet
            token_bytes[token_id] = None if added.special else added.content.encode("utf-8")
        return cls(tuple(token_bytes), _ids(eos_token_ids), _ids(pad_token_ids))


def _ids(ids) -> tuple[int, ...]:
    """A token id, None, or an iterable of them (generation configs give either) -> a tuple of ids."""
    if ids is None:
        return ()
    if isinstance(ids, int):
        return (ids,)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _spell(text: str, byte_level: bool, sentencepiece: bool, byte_fallback: bool) -> bytes:
    if byte_level and all(c in _BYTE_OF_CHAR for c in text):
        return bytes(_BYTE_OF_CHAR[c] for c in text)
    if byte_fallback:
        match = _BYTE_FALLBACK.fullmatch(text)
        if match:
            return bytes([int(match.group(1), 16)])
    if sentencepiece:
        text = text.replace("▁", " ")
    return text.encode("utf-8")
