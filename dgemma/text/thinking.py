"""The model's thought channel: `<|channel>thought\n...<channel|>answer`, split whole or while streaming."""

from __future__ import annotations

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
THOUGHT_PREFIX = "thought\n"
END_MARKERS = ("<turn|>", "<eos>")

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
