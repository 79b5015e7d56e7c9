"""Incremental detokenization with stop strings, for text that may only grow (never be retracted).

Only a short window of ids is decoded per update (the ids since the last safe point), as tokens may merge across
boundaries. Text is held back while it ends in an incomplete UTF-8 sequence (U+FFFD) or while it could still be the
start of a stop string, so no emitted text is ever taken back.
"""

from __future__ import annotations

from typing import Callable

Decode = Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text


class TextStream:
    def __init__(self, decode: Decode, skip_special_tokens: bool, eos_token_ids: list[int], stop: list[str]):
        self.decode = decode
        self.skip_special_tokens = skip_special_tokens
        self.eos = set(eos_token_ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to the tail of `text` (context for merges)
        self.read_offset = 0
        self.text = ""  # decoded so far
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False

    def update(self, new_ids: list[int], final: bool) -> str:
        """Text newly safe to emit after `new_ids`. Sets `stopped` when a stop string appears; the text is then cut
        just before it and nothing more is emitted."""
        if self.stopped:
            return ""
        self.ids += [t for t in new_ids if t not in self.eos]
        before = self.decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        after = self.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        text = self.text
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            text, final, self.stopped = text[: min(hits)], True, True
        end = len(text) if final else len(text) - self.holdback
        if end <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:end], end
        return delta
