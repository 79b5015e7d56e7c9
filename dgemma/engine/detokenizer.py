"""Incremental detokenization with stop strings, for text that may only grow (never be retracted).

The whole output is decoded again at each update (outputs are a few canvases long, so this is cheap and it is
robust to tokens that merge across boundaries). Text is held back while it could still be the start of a stop
string, or while it ends in an incomplete UTF-8 sequence (U+FFFD), so no emitted text is ever taken back.
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
        self.emitted = 0  # characters already returned
        self.stopped = False

    def update(self, ids: list[int], final: bool) -> str:
        """Text newly safe to emit for output `ids` (cumulative). Sets `stopped` when a stop string appears; the text
        is then cut just before it and nothing more is emitted."""
        if self.stopped:
            return ""
        text = self.decode([t for t in ids if t not in self.eos], self.skip_special_tokens)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            text, final, self.stopped = text[: min(hits)], True, True
        end = len(text)
        if not final:
            end -= self.holdback
            while end > self.emitted and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        delta, self.emitted = text[self.emitted:end], end
        return delta
